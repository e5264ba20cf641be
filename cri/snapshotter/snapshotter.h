/* crimage's snapshotter: containerd's containerd.services.snapshots.v1.Snapshots, served to containerd as a proxy
 * snapshotter (`[proxy_plugins.crimage] type = "snapshot"`), with the semantics of containerd's overlayfs
 * snapshotter.
 *
 * Snapshots live under a root directory: `metadata.json` (every snapshot's name, kind, parent, labels, times and
 * usage; replaced atomically on every change, so a crash keeps the old or the new state, never a mix) and
 * `snapshots/<id>/{fs,work}` for the snapshots it owns: an active snapshot's fs is the overlay upper directory (and a
 * committed one's fs its layer). A layer directory crimage unpacked itself is registered with snapshotter_add_layer:
 * that committed snapshot's fs IS the directory, which the snapshotter never deletes.
 *
 * Every function is thread-safe. Errors carry the gRPC status containerd's errdefs map to (NOT_FOUND,
 * ALREADY_EXISTS, FAILED_PRECONDITION, INVALID_ARGUMENT) and a message naming the snapshot. */
#ifndef CRIMAGE_CRI_SNAPSHOTTER_H
#define CRIMAGE_CRI_SNAPSHOTTER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/error.h"

/* Bounds on what a client may send. containerd's own rule for labels: a key and its value together at most 4096
 * bytes. */
#define SNAP_MAX_KEY 4096          /* a snapshot key, name or parent, in bytes */
#define SNAP_MAX_LABEL 4096        /* a label's key plus value */
#define SNAP_MAX_LABELS 256        /* labels on one snapshot */
#define SNAP_MAX_FILTER 4096       /* one filter expression */
#define SNAP_MAX_FILTERS 64        /* filter expressions in one List */
#define SNAP_MAX_UPDATE_PATHS 256  /* paths in one Update's field mask */
#define SNAP_MAX_SNAPSHOTS 100000  /* snapshots in the metadata */
#define SNAP_MAX_METADATA (64 * 1024 * 1024) /* bytes of metadata.json */

/* The label by which containerd's unpacker names the chain ID a snapshot is for (the remote-snapshot protocol). */
#define SNAP_LABEL_REF "containerd.io/snapshot.ref"

/* The numbers of containerd's Kind enum. */
typedef enum snap_kind {
  SNAP_KIND_UNKNOWN = 0,
  SNAP_KIND_VIEW = 1,
  SNAP_KIND_ACTIVE = 2,
  SNAP_KIND_COMMITTED = 3,
} snap_kind;

/* "view", "active", "committed" (as containerd's filters spell them), "unknown". */
const char *snap_kind_name(snap_kind k);

typedef struct snap_label {
  char *key;
  char *value;
} snap_label;

/* A set of labels, sorted by key; values are never empty (an empty value means "no such label", as in
 * containerd's metadata store). */
typedef struct snap_labels {
  snap_label *v;
  size_t n;
} snap_labels;

void snap_labels_clear(snap_labels *l);
/* The value of key, NULL when absent. */
const char *snap_labels_get(const snap_labels *l, const char *key);
/* Sets key to value; an empty or NULL value removes the label. */
void snap_labels_set(snap_labels *l, const char *key, const char *value);

typedef struct snap_info {
  char *name;
  char *parent; /* "" when none */
  snap_kind kind;
  int64_t created_ns; /* since the epoch */
  int64_t updated_ns;
  snap_labels labels;
} snap_info;

void snap_info_clear(snap_info *info);

typedef struct snap_mount {
  char *type;     /* "overlay" or "bind" */
  char *source;
  char **options; /* NULL-terminated */
} snap_mount;

typedef struct snap_mounts {
  snap_mount *v;
  size_t n;
} snap_mounts;

void snap_mounts_clear(snap_mounts *m);

typedef struct snapshotter snapshotter;

typedef struct snapshotter_options {
  const char *root; /* absolute; created when missing; no ',' or ':' (they would split overlay options) */
} snapshotter_options;

/* Opens (or creates) the snapshotter at opts->root and loads its metadata. */
int snapshotter_open(const snapshotter_options *opts, snapshotter **ret, crimage_error **err);
void snapshotter_free(snapshotter *s);
static inline void snapshotter_freep(snapshotter **s) { snapshotter_free(*s); }
#define cleanup_snapshotter __attribute__((cleanup(snapshotter_freep)))
const char *snapshotter_root(const snapshotter *s);

/* An active snapshot key on committed snapshot parent ("" for none), with its upper and work directories; *ret
 * gets the mounts of its filesystem. With label containerd.io/snapshot.ref=<chain ID> naming a committed snapshot
 * on the same parent that carries that label (a registered layer, or one committed earlier), nothing is created
 * and the answer is ALREADY_EXISTS: containerd's remote-snapshot protocol, after which containerd looks the target
 * up with List. */
int snapshotter_prepare(snapshotter *s, const char *key, const char *parent, const snap_labels *labels,
                        snap_mounts *ret, crimage_error **err);
/* A read-only view key of parent. */
int snapshotter_view(snapshotter *s, const char *key, const char *parent, const snap_labels *labels,
                     snap_mounts *ret, crimage_error **err);
/* The mounts of an active snapshot or a view. */
int snapshotter_mounts(snapshotter *s, const char *key, snap_mounts *ret, crimage_error **err);
/* Active snapshot key becomes committed snapshot name, with these labels (the active one's are not inherited). */
int snapshotter_commit(snapshotter *s, const char *name, const char *key, const snap_labels *labels,
                       crimage_error **err);
/* Removes a snapshot without children, and its directories when they are the snapshotter's own (a registered
 * layer's directory stays). */
int snapshotter_remove(snapshotter *s, const char *key, crimage_error **err);
int snapshotter_stat(snapshotter *s, const char *key, snap_info *ret, crimage_error **err);
/* Updates the labels of info->name as containerd does: paths "labels.<key>" set (or with no value in info
 * remove) one label, "labels" replaces them all, no path replaces them all too; other paths are INVALID_ARGUMENT.
 * *ret gets the result. */
int snapshotter_update(snapshotter *s, const snap_info *info, char *const *paths, size_t n_paths, snap_info *ret,
                       crimage_error **err);
/* Every snapshot matching any of the containerd filter expressions (all of them when n_filters is 0), in name
 * order. Free with snap_info_list_free. */
int snapshotter_list(snapshotter *s, char *const *filters, size_t n_filters, snap_info **ret, size_t *ret_n,
                     crimage_error **err);
void snap_info_list_free(snap_info *v, size_t n);
/* Bytes (allocated blocks) and inodes of the snapshot's own filesystem: measured now for an active snapshot, at
 * commit (or registration) for a committed one; 0 for a view. */
int snapshotter_usage(snapshotter *s, const char *key, int64_t *ret_size, int64_t *ret_inodes, crimage_error **err);
/* Removes what is under <root>/snapshots and belongs to no snapshot (left by a crash or a failed removal). */
int snapshotter_cleanup(snapshotter *s, crimage_error **err);

/* Registers dir, a layer directory crimage unpacked itself (overlay-ready: OCI whiteouts already turned into
 * overlay whiteouts), as the committed snapshot chain_id, labelled containerd.io/snapshot.ref=<chain_id>, on the
 * snapshot of parent_chain_id ("" for a base layer: the snapshot named so, else a committed one labelled with that
 * chain ID). Registering the same layer again is success; another directory or parent under a known chain ID is
 * ALREADY_EXISTS. The directory stays the caller's: Remove forgets it without deleting it. */
int snapshotter_add_layer(snapshotter *s, const char *chain_id, const char *parent_chain_id, const char *dir,
                          crimage_error **err);
/* Whether a committed snapshot's filesystem is dir (registered with snapshotter_add_layer): crimage's store keeps
 * such a layer while containerd may still use it. */
bool snapshotter_layer_in_use(snapshotter *s, const char *dir);

/* Serves the snapshotter on server as containerd.services.snapshots.v1.Snapshots (service.c). */
struct rpc_server;
int snapshotter_register(snapshotter *s, struct rpc_server *server, crimage_error **err);

#endif
