/* An image's filesystem from its unpacked layers, for `crimage rootfs` and `crimage mount`.
 *
 * The layers are the directories crimaged unpacks with unpackLayers (pull/unpack.h): one per layer, laid out for
 * overlayfs, deletions written as overlay whiteouts (a 0/0 character device for a deleted name, the xattr
 * trusted.overlay.opaque=y on a directory that hides what the layers below put there). Everything here needs
 * root: owners, device nodes, the trusted.* xattrs that carry the whiteouts, mounts. */
#ifndef CRIMAGE_PLUGIN_ROOTFS_H
#define CRIMAGE_PLUGIN_ROOTFS_H

#include <stdbool.h>

#include "common/error.h"

/* Copies the filesystem the layers make (directories, lowest first, NULL-terminated) into dir, which must be an
 * empty directory or absent (it is then created; its parent must exist): what a read-only overlay mount of the
 * layers shows, as plain files. Whiteouts delete what is below them and are not copied; an opaque directory
 * starts empty (also at the root of a layer, as the image spec says, where overlayfs ignores the xattr). Regular
 * files are copied, never linked to the layers, so a change in dir never reaches them; hard links within a layer
 * stay hard links; symlinks, device nodes, fifos and sockets are made anew. Owners, modes (setuid, setgid,
 * sticky), atimes, mtimes and xattrs are kept, but not trusted.overlay.* and user.overlay.* (they mean something
 * to overlayfs only); dir itself gets the attributes of the topmost layer's root. Nothing is written through a
 * symlink in dir: a layer's `etc -> /host` is replaced by a later layer's `etc/`, never followed. On failure dir is
 * left as it was found (emptied again, or removed if it was created). */
typedef struct rootfs_options {
  bool walk_only; /* resolve paths in dir with the O_NOFOLLOW walk even where openat2 exists (tests cover both) */
} rootfs_options;
/* opts NULL: the defaults. */
int rootfs_flatten(char *const *layers, const char *dir, const rootfs_options *opts, crimage_error **err);

/* Mounts the layers (lowest first, NULL-terminated) read-only on dir, an existing directory that is not already a
 * mount point: an overlay with lowerdir=<top>:...:<bottom>, or a read-only bind mount of a single layer (overlayfs
 * wants two layers without an upper one). */
int rootfs_mount(char *const *layers, const char *dir, crimage_error **err);

/* Unmounts what is mounted on dir (not following a symlink there). */
int rootfs_umount(const char *dir, crimage_error **err);

#endif
