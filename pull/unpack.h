/* The layer unpacker: extracts one image layer, as its compressed bytes arrive, into a directory laid out for
 * overlayfs (one directory per layer; an overlay mount of a chain of them is the image's rootfs).
 *
 * The caller pushes the blob's bytes with unpack_write as they come off the network. They are decompressed on the
 * calling thread (ISA-L inflate for gzip, libzstd for zstd, nothing for plain tar), hashed (the diff_id) and handed
 * through a small bounded queue to a worker thread that reads them with libarchive's tar reader and writes the
 * entries. unpack_write blocks while the queue is full, so a fast network never makes the unpacker buffer more than
 * the queue (UNPACK_QUEUE_BYTES).
 *
 * Safety: every name is resolved beneath the layer directory without following any symlink (openat2 with
 * RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS, or an O_NOFOLLOW walk on kernels without it). Names that climb out with
 * `..`, entries that would go through a symlink, and hard links to anything outside the layer are refused with an
 * error naming the entry. Leading `/` and `./` are taken relative to the layer root, as tar does. The limits below
 * stop archives that are too large, too many or too deep while they stream, not after.
 *
 * Atomicity: entries go into a temporary sibling directory (`<parent>/.unpack-<name>-XXXXXX`); unpack_finish
 * syncs it and renames it to the final name, so the final directory exists only complete. A failed or aborted
 * unpack removes everything it wrote. A crash can leave a temporary directory: unpack_remove_stale removes them.
 *
 * Whiteouts become overlayfs whiteouts: `.wh.<name>` a 0/0 character device <name>, `.wh..wh..opq` the xattr
 * trusted.overlay.opaque=y on its directory (the entry itself is not written); other `.wh..wh.*` entries (aufs
 * metadata) are ignored. xattrs named trusted.overlay.* or user.overlay.* in the archive are dropped: overlayfs
 * would act on them (redirects, metacopy), and only the unpacker decides what overlayfs sees.
 *
 * Owners (numeric uid/gid from the headers), modes with setuid/setgid/sticky, mtimes (also of symlinks;
 * directories' are set last), xattrs (security.capability included), hard links, symlinks, device nodes and fifos
 * are kept. Writing owners, devices and trusted.* xattrs needs root (CAP_CHOWN, CAP_MKNOD, CAP_SYS_ADMIN).
 *
 * Every unpack is independent (its own thread, queue and libarchive reader; no global state): several layers can be
 * unpacked in parallel from several threads, one unpack per layer. One unpack is used from one thread at a time.
 *
 * What a layer dir does not know: its lower layers. A hard link to a file of a lower layer, an entry written
 * through a directory symlink of a lower layer, or a parent directory a layer leaves implied (its attributes then
 * are 0755 root:root, not the lower layer's) are handled as if the layer were alone. Layers built from a
 * filesystem diff (docker, buildkit, containerd) do not contain such entries. */
#ifndef CRIMAGE_PULL_UNPACK_H
#define CRIMAGE_PULL_UNPACK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/digest.h"
#include "common/error.h"

/* What one layer may hold. Zero fields take the defaults below (unpack_limits_default). */
typedef struct unpack_limits {
  uint64_t max_entries;     /* tar entries, whiteouts included */
  uint64_t max_total_bytes; /* uncompressed size of the tar stream (headers, padding and data) */
  uint64_t max_file_size;   /* size of one regular file */
  size_t max_path_len;      /* bytes of a name after `/` and `./` are stripped, and of a link target */
  size_t max_name_len;      /* bytes of one path component */
  bool walk_only; /* resolve names with the O_NOFOLLOW walk even where openat2 exists (the tests cover both) */
} unpack_limits;

/* A million entries: about three times the largest layers seen in practice (a node_modules or a Python
 * site-packages layer holds a few hundred thousand files); an archive of a million tiny entries costs a million
 * inodes, so it stops there. */
#define UNPACK_DEFAULT_MAX_ENTRIES UINT64_C(1000000)
/* 64 GiB uncompressed: the largest real layers (CUDA toolkits, bundled models) are a fraction of that; a gzip bomb
 * (10 GB of zeros is 10 MB compressed) stops there at the latest, usually much earlier at max_file_size. */
#define UNPACK_DEFAULT_MAX_TOTAL_BYTES (UINT64_C(64) << 30)
/* 16 GiB for one file. */
#define UNPACK_DEFAULT_MAX_FILE_SIZE (UINT64_C(16) << 30)
/* PATH_MAX and NAME_MAX of Linux: longer names could not be created or opened anyway. */
#define UNPACK_DEFAULT_MAX_PATH_LEN 4095
#define UNPACK_DEFAULT_MAX_NAME_LEN 255

/* The bytes queued between the decompressing writer and the extracting worker: 8 chunks of 128 KiB. */
#define UNPACK_CHUNK_BYTES (128 * 1024)
#define UNPACK_QUEUE_CHUNKS 8
#define UNPACK_QUEUE_BYTES (UNPACK_CHUNK_BYTES * UNPACK_QUEUE_CHUNKS)

/* The defaults above. */
void unpack_limits_default(unpack_limits *ret);

typedef enum unpack_compression {
  UNPACK_PLAIN,
  UNPACK_GZIP,
  UNPACK_ZSTD,
} unpack_compression;

/* The compression of a layer media type: OCI image-spec `application/vnd.oci.image.layer.v1.tar[+gzip|+zstd]`,
 * their `nondistributable` variants, Docker schema2 `application/vnd.docker.image.rootfs.diff.tar.gzip` and
 * `...rootfs.foreign.diff.tar.gzip`. Returns 0, or -ENOTSUP for anything else (not a layer we can unpack). */
int unpack_compression_of(const char *media_type, unpack_compression *ret);

typedef struct unpack unpack;

/* Starts unpacking a layer of media_type into dir (which must not exist; its parent must). limits NULL: the
 * defaults. The returned unpack is finished with unpack_finish or unpack_abort, exactly once. */
int unpack_begin(const char *dir, const char *media_type, const unpack_limits *limits, unpack **ret,
                 crimage_error **err);

/* Feeds the next len compressed bytes of the blob. Blocks while the worker is behind (back-pressure). On error
 * (corrupt compression, a refused entry, a limit crossed, a write failure) nothing more is accepted: abort it. */
int unpack_write(unpack *u, const void *data, size_t len, crimage_error **err);

/* Starts over from byte 0 of the blob (e.g. a server ignored a Range request and resent it whole): everything
 * written so far is removed. */
int unpack_restart(unpack *u, crimage_error **err);

/* Ends the stream: checks that the compressed stream and the tar archive are complete, that the uncompressed bytes
 * hash to expected_diff_id (when not NULL), sets the times and modes of the directories, syncs the filesystem and
 * renames the temporary directory to dir. ret_diff_id (optional) receives "sha256:<hex>" of the uncompressed tar.
 * Frees u either way; on failure nothing is left behind, and a dir that appeared meanwhile is ALREADY_EXISTS. */
int unpack_finish(unpack *u, const char *expected_diff_id, char ret_diff_id[DIGEST_MAX_LEN + 1], crimage_error **err);

/* Stops and removes everything written. Frees u; NULL is a no-op. */
void unpack_abort(unpack *u);
static inline void unpack_abortp(unpack **u) { unpack_abort(*u); }
#define cleanup_unpack __attribute__((cleanup(unpack_abortp)))

/* Removes temporary directories a crashed unpack left in parent (the parent of the layer directories). Call it
 * only while no unpack into parent runs (at start-up): it cannot tell a live one from a dead one. */
int unpack_remove_stale(const char *parent, crimage_error **err);

/* The space a directory tree takes: bytes allocated (st_blocks) and inodes, each hard-linked inode counted once.
 * Symlinks are not followed and other mounts are not entered. */
int unpack_dir_usage(const char *dir, uint64_t *ret_bytes, uint64_t *ret_inodes, crimage_error **err);

#endif
