/* What the snapshotter's files share: the in-memory records, their crash-safe file, the directory walks and the
 * mount builder. Not for use outside cri/snapshotter/ (and its unit tests). */
#ifndef CRIMAGE_CRI_SNAPSHOTTER_INTERNAL_H
#define CRIMAGE_CRI_SNAPSHOTTER_INTERNAL_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include "cri/snapshotter/snapshotter.h"

/* One snapshot. The id names its directory <root>/snapshots/<id> (never reused, so a directory whose id no record
 * holds is garbage); a registered layer has an id too but no directory of ours: its fs is layer_dir. */
typedef struct snap_record {
  uint64_t id;
  char *name;
  char *parent; /* "" when none */
  snap_kind kind;
  int64_t created_ns;
  int64_t updated_ns;
  snap_labels labels;
  int64_t size;   /* committed: measured at commit or registration */
  int64_t inodes;
  char *layer_dir; /* non-NULL: a registered layer, not ours */
} snap_record;

void snap_record_free(snap_record *r);

/* Ids stay below 2^53 so any JSON reader of the metadata keeps them exact. */
#define SNAP_MAX_ID ((uint64_t) 1 << 53)

/* All records, in memory, and the file they are kept in. */
typedef struct snap_meta {
  char *path; /* <root>/metadata.json */
  snap_record **v;
  size_t n;
  uint64_t next_id; /* the id of the next new snapshot */
} snap_meta;

/* Loads path (a missing file is an empty table). The file is checked: bounded size and count, valid kinds,
 * unique names and ids, every parent present and committed; anything else is DATA_LOSS naming the file. */
int snap_meta_load(snap_meta *m, const char *path, crimage_error **err);
/* Writes every record to the file: temporary file, fsync, rename, fsync of the directory. RESOURCE_EXHAUSTED
 * beyond SNAP_MAX_METADATA. */
int snap_meta_save(const snap_meta *m, crimage_error **err);
void snap_meta_clear(snap_meta *m);
snap_record *snap_meta_find(const snap_meta *m, const char *name);
/* The first record whose parent is name, NULL when none. */
snap_record *snap_meta_child(const snap_meta *m, const char *name);
/* Appends r (taken over). */
void snap_meta_add(snap_meta *m, snap_record *r);
/* Takes r out of the table (not freed). */
void snap_meta_take(snap_meta *m, snap_record *r);

/* Label and string checks shared by every entry point. */
int snap_check_key(const char *what, const char *key, bool allow_empty, crimage_error **err);
int snap_check_labels(const char *what, const snap_labels *labels, crimage_error **err);
bool snap_utf8_valid(const char *s);
void snap_labels_copy(snap_labels *dst, const snap_labels *src);

struct snapshotter {
  char *root;
  char *snapshots_dir; /* <root>/snapshots */
  bool index_off;      /* the kernel knows overlay's index option: mounts turn it off, as containerd's do */
  pthread_mutex_t lock;
  snap_meta meta;
};

static inline void snap_unlockp(pthread_mutex_t **l)
{
  if (*l)
    pthread_mutex_unlock(*l);
}
/* Holds s->lock until the end of the scope. */
#define LOCKED(s)                                                                                                      \
  __attribute__((cleanup(snap_unlockp))) pthread_mutex_t *_held_ = &(s)->lock;                                         \
  pthread_mutex_lock(_held_)

/* <root>/snapshots/<id> and its fs and work directories (free them). */
char *snap_dir(const snapshotter *s, uint64_t id);
/* The filesystem of r: its layer directory, or <root>/snapshots/<id>/fs. */
char *snap_fs_path(const snapshotter *s, const snap_record *r);
char *snap_work_path(const snapshotter *s, uint64_t id);

/* The mounts of a snapshot of kind with its own fs and work directories and its parents' filesystems, nearest
 * first, as containerd's overlayfs snapshotter builds them. */
void snap_mounts_build(snap_kind kind, const char *fs, const char *work, char *const *parents, size_t n_parents,
                       bool index_off, snap_mounts *ret);

/* Allocated bytes (st_blocks * 512) and inodes below and including dir, each hard-linked inode once; does not
 * cross into other filesystems. */
int snap_disk_usage(const char *dir, int64_t *ret_size, int64_t *ret_inodes, crimage_error **err);
/* Removes dir and everything below it; never crosses into a mounted filesystem (what is mounted stays, and so
 * does the directory holding it). */
int snap_remove_tree(const char *dir, crimage_error **err);

#endif
