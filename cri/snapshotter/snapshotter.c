/* The snapshot operations, with the semantics (and the error classes) of containerd's overlayfs snapshotter and
 * its storage package (snapshots/overlay/overlay.go, snapshots/storage/bolt.go).
 *
 * One lock guards the records; what may take long (measuring a snapshot's usage, syncing its filesystem, removing
 * its directory) runs without it. Ids are never reused, so a directory found without its record is garbage whoever
 * looks at it, and an operation that dropped the lock finds its snapshot again by id. Every change is on disk (the
 * metadata file replaced and fsynced) before the call answers. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <sys/stat.h>

#include "common/fsutil.h"
#include "common/log.h"
#include "common/util.h"
#include "cri/snapshotter/filter.h"
#include "cri/snapshotter/internal.h"

/* Where containerd (overlayutils/supportsIndex) looks for the kernel's overlay index option. */
#define OVERLAY_INDEX_PARAMETER "/sys/module/overlay/parameters/index"

char *snap_dir(const snapshotter *s, uint64_t id) { return xasprintf("%s/%" PRIu64, s->snapshots_dir, id); }

char *snap_fs_path(const snapshotter *s, const snap_record *r)
{
  if (r->layer_dir)
    return xstrdup(r->layer_dir);
  return xasprintf("%s/%" PRIu64 "/fs", s->snapshots_dir, r->id);
}

/* A registered layer's directory goes into overlay options through <root>/l/<id>, a symlink to it: the options of
 * one mount must fit in a page, containerd shortens the lower directories to their paths below the longest common
 * parent, and a layer named by its 64-digit diff_id would take 65 bytes a layer (62 layers would not fit). The
 * link is made when a mount first needs it and is checked every time; when it cannot be made, the full path. */
static char *layer_alias(const snapshotter *s, const snap_record *r)
{
  char *alias = xasprintf("%s/l/%" PRIu64, s->root, r->id);
  char target[PATH_MAX + 1];
  ssize_t n = readlink(alias, target, sizeof(target) - 1);
  if (n >= 0) {
    target[n] = '\0';
    if (streq(target, r->layer_dir))
      return alias;
    (void) unlink(alias);
  }
  if (symlink(r->layer_dir, alias) == 0)
    return alias;
  log_warn("snapshotter: cannot link `%s` to `%s`: %s", alias, r->layer_dir, strerror(errno));
  free(alias);
  return xstrdup(r->layer_dir);
}

static void layer_alias_remove(const snapshotter *s, const snap_record *r)
{
  cleanup_free char *alias = xasprintf("%s/l/%" PRIu64, s->root, r->id);
  if (unlink(alias) < 0 && errno != ENOENT)
    log_warn("snapshotter: cannot remove `%s`: %s", alias, strerror(errno));
}

char *snap_work_path(const snapshotter *s, uint64_t id)
{
  return xasprintf("%s/%" PRIu64 "/work", s->snapshots_dir, id);
}

const char *snapshotter_root(const snapshotter *s) { return s->root; }

/* A crash during a metadata write leaves its temporary file behind. */
static void remove_temporary_files(snapshotter *s)
{
  DIR *d = opendir(s->root);
  if (!d)
    return;
  struct dirent *de;
  while ((de = readdir(d)))
    if (str_has_prefix(de->d_name, "metadata.json.tmp."))
      (void) unlinkat(dirfd(d), de->d_name, 0);
  closedir(d);
}

/* A crash between creating a snapshot's directory and recording it leaves a directory with an id the metadata
 * never saw: new ids start past every directory there is. */
static void skip_used_ids(snapshotter *s)
{
  DIR *d = opendir(s->snapshots_dir);
  if (!d)
    return;
  struct dirent *de;
  while ((de = readdir(d))) {
    char *end = NULL;
    errno = 0;
    unsigned long long id = strtoull(de->d_name, &end, 10);
    /* A name past the id range cannot be an id of ours: Cleanup removes it like any other stray entry. */
    if (errno == 0 && end && *end == '\0' && end != de->d_name && de->d_name[0] != '0' && id >= s->meta.next_id &&
        id < SNAP_MAX_ID - 1)
      s->meta.next_id = id + 1;
  }
  closedir(d);
}

int snapshotter_open(const snapshotter_options *opts, snapshotter **ret, crimage_error **err)
{
  const char *root = opts->root;
  if (str_empty(root) || root[0] != '/')
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, EINVAL, "the snapshotter root must be an absolute path");
  /* Its paths go into overlay's options, where ',' separates options and ':' lower directories. */
  if (strpbrk(root, ",:"))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, EINVAL,
                             "the snapshotter root `%s` holds ',' or ':', which overlay options cannot carry", root);
  cleanup_free char *snapshots_dir = xasprintf("%s/snapshots", root);
  cleanup_free char *aliases_dir = xasprintf("%s/l", root);
  int r = mkdir_p(snapshots_dir, 0700, err);
  if (r == 0)
    r = mkdir_p(aliases_dir, 0700, err);
  if (r < 0)
    return crimage_error_wrap(err, "snapshotter root");
  snapshotter *s = xcalloc(1, sizeof(*s));
  s->root = xstrdup(root);
  s->snapshots_dir = TAKE_PTR(snapshots_dir);
  pthread_mutex_init(&s->lock, NULL);
  cleanup_free char *meta_path = xasprintf("%s/metadata.json", root);
  r = snap_meta_load(&s->meta, meta_path, err);
  if (r < 0) {
    snapshotter_free(s);
    return r;
  }
  remove_temporary_files(s);
  skip_used_ids(s);
  s->index_off = access(OVERLAY_INDEX_PARAMETER, F_OK) == 0;
  log_debug("snapshotter at %s: %zu snapshots", root, s->meta.n);
  *ret = s;
  return 0;
}

void snapshotter_free(snapshotter *s)
{
  if (!s)
    return;
  snap_meta_clear(&s->meta);
  pthread_mutex_destroy(&s->lock);
  free(s->root);
  free(s->snapshots_dir);
  free(s);
}

static void info_from_record(const snap_record *r, snap_info *info)
{
  *info = (snap_info){
      .name = xstrdup(r->name),
      .parent = xstrdup(r->parent),
      .kind = r->kind,
      .created_ns = r->created_ns,
      .updated_ns = r->updated_ns,
  };
  snap_labels_copy(&info->labels, &r->labels);
}

/* The filesystems of parent and its ancestors, nearest first. The lock is held. */
static int parent_chain(snapshotter *s, const char *parent, char ***ret, size_t *ret_n, crimage_error **err)
{
  char **v = NULL;
  size_t n = 0;
  while (*parent) {
    const snap_record *p = snap_meta_find(&s->meta, parent);
    /* The metadata was checked at load and every change keeps it consistent: this is a bug, not a client error. */
    if (!p || n > s->meta.n) {
      for (size_t i = 0; i < n; i++)
        free(v[i]);
      free(v);
      return crimage_error_set(err, CRIMAGE_INTERNAL, ENOENT, "the parent chain is broken at `%s`", parent);
    }
    v = xrealloc(v, (n + 1) * sizeof(*v));
    v[n++] = p->layer_dir ? layer_alias(s, p) : snap_fs_path(s, p);
    parent = p->parent;
  }
  *ret = v;
  *ret_n = n;
  return 0;
}

static int record_mounts(snapshotter *s, const snap_record *r, snap_mounts *ret, crimage_error **err)
{
  char **parents = NULL;
  size_t n = 0;
  int rc = parent_chain(s, r->parent, &parents, &n, err);
  if (rc < 0)
    return rc;
  cleanup_free char *fs = snap_fs_path(s, r);
  cleanup_free char *work = snap_work_path(s, r->id);
  snap_mounts_build(r->kind, fs, work, parents, n, s->index_off, ret);
  for (size_t i = 0; i < n; i++)
    free(parents[i]);
  free(parents);
  return 0;
}

/* The committed snapshot that containerd's metadata store will find for a remote-snapshot Prepare: labelled
 * containerd.io/snapshot.ref=<target>, on parent (containerd then lists exactly that filter). */
static snap_record *find_target(const snap_meta *m, const char *target, const char *parent)
{
  for (size_t i = 0; i < m->n; i++) {
    snap_record *r = m->v[i];
    if (r->kind == SNAP_KIND_COMMITTED && streq(r->parent, parent) &&
        streq_ptr(snap_labels_get(&r->labels, SNAP_LABEL_REF), target))
      return r;
  }
  return NULL;
}

/* Makes <snapshots>/<id> with fs (and work for an active snapshot), fs owned as the parent's is (overlay shows the
 * upper directory's owner at the root), all synced, under a temporary name until complete. */
static int make_directories(snapshotter *s, snap_kind kind, uint64_t id, const char *parent_fs, crimage_error **err)
{
  cleanup_free char *tmp = xasprintf("%s/new-XXXXXX", s->snapshots_dir);
  if (!mkdtemp(tmp))
    return crimage_error_set(err, CRIMAGE_INTERNAL, errno, "create a directory in `%s`", s->snapshots_dir);
  cleanup_free char *fs = xasprintf("%s/fs", tmp);
  cleanup_free char *work = xasprintf("%s/work", tmp);
  cleanup_free char *final = snap_dir(s, id);
  int r = 0;
  const char *step = "create";
  const char *path = fs;
  /* The modes are set explicitly: crimaged may run with umask 077 (its systemd unit does), and the upper
   * directory's mode is the mode of the container's "/". */
  if (mkdir(fs, 0755) < 0 || chmod(fs, 0755) < 0)
    r = -errno;
  if (r == 0 && kind == SNAP_KIND_ACTIVE && (mkdir(work, 0711) < 0 || chmod(work, 0711) < 0)) {
    r = -errno;
    path = work;
  }
  if (r == 0 && parent_fs) {
    struct stat st;
    step = "take the owner of the parent for";
    if (stat(parent_fs, &st) < 0 || lchown(fs, st.st_uid, st.st_gid) < 0)
      r = -errno;
  }
  if (r == 0) {
    step = "sync";
    path = tmp;
    r = fsync_dir(tmp);
  }
  if (r == 0) {
    step = "rename";
    if (rename(tmp, final) < 0)
      r = -errno;
  }
  if (r == 0) {
    step = "sync";
    path = s->snapshots_dir;
    r = fsync_dir(s->snapshots_dir);
  }
  if (r < 0) {
    crimage_error *ignored = NULL;
    snap_remove_tree(tmp, &ignored);
    crimage_error_clear(&ignored);
    return crimage_error_set(err, CRIMAGE_INTERNAL, -r, "%s `%s`", step, path);
  }
  return 0;
}

/* Removes a snapshot directory that no record holds any more; a failure is left to Cleanup, as containerd does. */
static void discard_directory(snapshotter *s, uint64_t id)
{
  cleanup_free char *dir = snap_dir(s, id);
  crimage_error *err = NULL;
  if (snap_remove_tree(dir, &err) < 0) {
    log_warn("snapshotter: %s (Cleanup will try again)", err->message);
    crimage_error_clear(&err);
  }
}

static int create_snapshot(snapshotter *s, snap_kind kind, const char *key, const char *parent,
                           const snap_labels *labels, snap_mounts *ret, crimage_error **err)
{
  int r = snap_check_key("the snapshot key", key, false, err);
  if (r == 0)
    r = snap_check_key("the parent", parent, true, err);
  if (r == 0)
    r = snap_check_labels(key, labels, err);
  if (r < 0)
    return r;
  LOCKED(s);

  const char *target = labels ? snap_labels_get(labels, SNAP_LABEL_REF) : NULL;
  if (kind == SNAP_KIND_ACTIVE && target && find_target(&s->meta, target, parent))
    return crimage_error_set(err, CRIMAGE_ALREADY_EXISTS, EEXIST, "target snapshot `%s` already exists", target);

  const snap_record *p = NULL;
  if (*parent) {
    p = snap_meta_find(&s->meta, parent);
    if (!p)
      return crimage_error_set(err, CRIMAGE_NOT_FOUND, ENOENT, "parent snapshot `%s` does not exist", parent);
    if (p->kind != SNAP_KIND_COMMITTED)
      return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, EINVAL, "parent `%s` is not a committed snapshot",
                               parent);
  }
  if (snap_meta_find(&s->meta, key))
    return crimage_error_set(err, CRIMAGE_ALREADY_EXISTS, EEXIST, "snapshot `%s` already exists", key);
  if (s->meta.n >= SNAP_MAX_SNAPSHOTS || s->meta.next_id >= SNAP_MAX_ID)
    return crimage_error_set(err, CRIMAGE_RESOURCE_EXHAUSTED, ENOSPC, "snapshot `%s`: there are %d snapshots already",
                             key, SNAP_MAX_SNAPSHOTS);

  uint64_t id = s->meta.next_id++;
  cleanup_free char *parent_fs = p ? snap_fs_path(s, p) : NULL;
  r = make_directories(s, kind, id, parent_fs, err);
  if (r < 0)
    return crimage_error_wrap(err, "snapshot `%s`", key);

  snap_record *rec = xcalloc(1, sizeof(*rec));
  rec->id = id;
  rec->name = xstrdup(key);
  rec->parent = xstrdup(parent);
  rec->kind = kind;
  rec->created_ns = rec->updated_ns = now_realtime_ns();
  snap_labels_copy(&rec->labels, labels);
  snap_meta_add(&s->meta, rec);
  r = snap_meta_save(&s->meta, err);
  if (r < 0) {
    snap_meta_take(&s->meta, rec);
    snap_record_free(rec);
    discard_directory(s, id);
    return crimage_error_wrap(err, "snapshot `%s`", key);
  }
  log_debug("snapshotter: %s `%s` (id %" PRIu64 ") on `%s`", snap_kind_name(kind), key, id, parent);
  return record_mounts(s, rec, ret, err);
}

int snapshotter_prepare(snapshotter *s, const char *key, const char *parent, const snap_labels *labels,
                        snap_mounts *ret, crimage_error **err)
{
  return create_snapshot(s, SNAP_KIND_ACTIVE, key, parent ? parent : "", labels, ret, err);
}

int snapshotter_view(snapshotter *s, const char *key, const char *parent, const snap_labels *labels,
                     snap_mounts *ret, crimage_error **err)
{
  return create_snapshot(s, SNAP_KIND_VIEW, key, parent ? parent : "", labels, ret, err);
}

int snapshotter_mounts(snapshotter *s, const char *key, snap_mounts *ret, crimage_error **err)
{
  int r = snap_check_key("the snapshot key", key, false, err);
  if (r < 0)
    return r;
  LOCKED(s);
  const snap_record *rec = snap_meta_find(&s->meta, key);
  if (!rec)
    return crimage_error_set(err, CRIMAGE_NOT_FOUND, ENOENT, "snapshot `%s` does not exist", key);
  if (rec->kind != SNAP_KIND_ACTIVE && rec->kind != SNAP_KIND_VIEW)
    return crimage_error_set(err, CRIMAGE_FAILED_PRECONDITION, EINVAL, "snapshot `%s` is not active or a view", key);
  return record_mounts(s, rec, ret, err);
}

/* The checks of Commit, made twice: before measuring the snapshot and after. The lock is held. */
static int commit_check(snapshotter *s, const char *name, const char *key, snap_record **ret, crimage_error **err)
{
  if (snap_meta_find(&s->meta, name))
    return crimage_error_set(err, CRIMAGE_ALREADY_EXISTS, EEXIST, "committed snapshot `%s` already exists", name);
  snap_record *rec = snap_meta_find(&s->meta, key);
  if (!rec)
    return crimage_error_set(err, CRIMAGE_NOT_FOUND, ENOENT, "active snapshot `%s` does not exist", key);
  if (rec->kind != SNAP_KIND_ACTIVE)
    return crimage_error_set(err, CRIMAGE_FAILED_PRECONDITION, EINVAL, "snapshot `%s` is not active", key);
  *ret = rec;
  return 0;
}

/* Flushes what was written into the snapshot to the disk: once recorded as committed, a layer must survive a
 * crash as completely as its record does. */
static int sync_filesystem(const char *dir, crimage_error **err)
{
  cleanup_close int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0 || syncfs(fd) < 0)
    return crimage_error_set(err, CRIMAGE_INTERNAL, errno, "sync `%s`", dir);
  return 0;
}

int snapshotter_commit(snapshotter *s, const char *name, const char *key, const snap_labels *labels,
                       crimage_error **err)
{
  int r = snap_check_key("the snapshot name", name, false, err);
  if (r == 0)
    r = snap_check_key("the snapshot key", key, false, err);
  if (r == 0)
    r = snap_check_labels(name, labels, err);
  if (r < 0)
    return r;

  uint64_t id;
  cleanup_free char *fs = NULL;
  {
    LOCKED(s);
    snap_record *rec = NULL;
    r = commit_check(s, name, key, &rec, err);
    if (r < 0)
      return r;
    id = rec->id;
    fs = snap_fs_path(s, rec);
  }
  int64_t size = 0, inodes = 0;
  r = snap_disk_usage(fs, &size, &inodes, err);
  if (r == 0)
    r = sync_filesystem(fs, err);
  if (r < 0)
    return crimage_error_wrap(err, "commit `%s`", key);

  LOCKED(s);
  snap_record *rec = NULL;
  r = commit_check(s, name, key, &rec, err);
  if (r < 0)
    return r;
  if (rec->id != id) /* removed and prepared again meanwhile: what was measured is gone */
    return crimage_error_set(err, CRIMAGE_ABORTED, EAGAIN, "active snapshot `%s` was replaced during the commit", key);

  snap_record old = *rec;
  snap_meta_take(&s->meta, rec);
  rec->name = xstrdup(name);
  rec->kind = SNAP_KIND_COMMITTED;
  rec->created_ns = rec->updated_ns = now_realtime_ns();
  /* containerd replaces the labels: an active snapshot's are not inherited. */
  snap_labels_copy(&rec->labels, labels);
  rec->size = size;
  rec->inodes = inodes;
  snap_meta_add(&s->meta, rec);
  r = snap_meta_save(&s->meta, err);
  if (r < 0) {
    snap_meta_take(&s->meta, rec);
    free(rec->name);
    snap_labels_clear(&rec->labels);
    *rec = old;
    snap_meta_add(&s->meta, rec);
    return crimage_error_wrap(err, "commit `%s`", key);
  }
  free(old.name);
  snap_labels_clear(&old.labels);
  log_debug("snapshotter: committed `%s` as `%s` (%" PRId64 " bytes, %" PRId64 " inodes)", key, name, size, inodes);
  return 0;
}

int snapshotter_remove(snapshotter *s, const char *key, crimage_error **err)
{
  int r = snap_check_key("the snapshot key", key, false, err);
  if (r < 0)
    return r;
  snap_record *rec;
  {
    LOCKED(s);
    rec = snap_meta_find(&s->meta, key);
    if (!rec)
      return crimage_error_set(err, CRIMAGE_NOT_FOUND, ENOENT, "snapshot `%s` does not exist", key);
    const snap_record *child = snap_meta_child(&s->meta, key);
    if (child)
      return crimage_error_set(err, CRIMAGE_FAILED_PRECONDITION, ENOTEMPTY,
                               "cannot remove snapshot `%s` with child `%s`", key, child->name);
    snap_meta_take(&s->meta, rec);
    r = snap_meta_save(&s->meta, err);
    if (r < 0) {
      snap_meta_add(&s->meta, rec);
      return crimage_error_wrap(err, "remove `%s`", key);
    }
  }
  /* Out of the lock: the id is no one's any more. A registered layer's directory is not ours to delete. */
  if (!rec->layer_dir)
    discard_directory(s, rec->id);
  else
    layer_alias_remove(s, rec);
  log_debug("snapshotter: removed `%s`%s", key, rec->layer_dir ? " (its layer directory stays)" : "");
  snap_record_free(rec);
  return 0;
}

int snapshotter_stat(snapshotter *s, const char *key, snap_info *ret, crimage_error **err)
{
  int r = snap_check_key("the snapshot key", key, false, err);
  if (r < 0)
    return r;
  LOCKED(s);
  const snap_record *rec = snap_meta_find(&s->meta, key);
  if (!rec)
    return crimage_error_set(err, CRIMAGE_NOT_FOUND, ENOENT, "snapshot `%s` does not exist", key);
  info_from_record(rec, ret);
  return 0;
}

int snapshotter_update(snapshotter *s, const snap_info *info, char *const *paths, size_t n_paths, snap_info *ret,
                       crimage_error **err)
{
  const char *name = info->name;
  int r = snap_check_key("the snapshot name", name, false, err);
  if (r == 0)
    r = snap_check_labels(name, &info->labels, err);
  if (r < 0)
    return r;
  if (n_paths > SNAP_MAX_UPDATE_PATHS)
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, E2BIG, "update of `%s`: %zu paths, more than %d", name,
                             n_paths, SNAP_MAX_UPDATE_PATHS);

  LOCKED(s);
  snap_record *rec = snap_meta_find(&s->meta, name);
  if (!rec)
    return crimage_error_set(err, CRIMAGE_NOT_FOUND, ENOENT, "snapshot `%s` does not exist", name);
  snap_labels labels;
  snap_labels_copy(&labels, &rec->labels);
  for (size_t i = 0; i < n_paths; i++) {
    const char *path = paths[i];
    if (str_has_prefix(path, "labels.")) {
      const char *k = path + strlen("labels.");
      snap_labels_set(&labels, k, snap_labels_get(&info->labels, k));
    } else if (streq(path, "labels")) {
      snap_labels_clear(&labels);
      snap_labels_copy(&labels, &info->labels);
    } else {
      snap_labels_clear(&labels);
      return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, EINVAL, "cannot update \"%.64s\" field on snapshot `%s`",
                               path, name);
    }
  }
  if (n_paths == 0) {
    snap_labels_clear(&labels);
    snap_labels_copy(&labels, &info->labels);
  }
  r = snap_check_labels(name, &labels, err);
  if (r < 0) {
    snap_labels_clear(&labels);
    return r;
  }
  snap_labels old = rec->labels;
  int64_t old_updated = rec->updated_ns;
  rec->labels = labels;
  rec->updated_ns = now_realtime_ns();
  r = snap_meta_save(&s->meta, err);
  if (r < 0) {
    snap_labels_clear(&rec->labels);
    rec->labels = old;
    rec->updated_ns = old_updated;
    return crimage_error_wrap(err, "update `%s`", name);
  }
  snap_labels_clear(&old);
  info_from_record(rec, ret);
  return 0;
}

/* containerd's adaptor for snapshots (storage.adaptSnapshot): kind, name, parent and labels.<key>. */
static const char *record_field(void *userdata, char *const *path, size_t n)
{
  const snap_record *r = userdata;
  if (n == 0)
    return NULL;
  if (streq(path[0], "kind"))
    return r->kind == SNAP_KIND_UNKNOWN ? NULL : snap_kind_name(r->kind);
  if (streq(path[0], "name"))
    return r->name;
  if (streq(path[0], "parent"))
    return r->parent;
  if (streq(path[0], "labels")) {
    if (r->labels.n == 0 || n < 2)
      return NULL;
    if (n == 2)
      return snap_labels_get(&r->labels, path[1]);
    /* labels.a.b names the label "a.b", as an unquoted key with dots is split into fields. */
    size_t len = 0;
    for (size_t i = 1; i < n; i++)
      len += strlen(path[i]) + 1;
    cleanup_free char *key = xmalloc(len);
    char *p = key;
    for (size_t i = 1; i < n; i++) {
      if (i > 1)
        *p++ = '.';
      p = stpcpy(p, path[i]);
    }
    return snap_labels_get(&r->labels, key);
  }
  return NULL;
}

int snapshotter_list(snapshotter *s, char *const *filters, size_t n_filters, snap_info **ret, size_t *ret_n,
                     crimage_error **err)
{
  cleanup_snap_filter snap_filter *f = NULL;
  int r = snap_filter_parse(filters, n_filters, &f, err);
  if (r < 0)
    return r;
  LOCKED(s);
  snap_info *v = NULL;
  size_t n = 0;
  for (size_t i = 0; i < s->meta.n; i++) {
    const snap_record *rec = s->meta.v[i];
    if (!snap_filter_match(f, record_field, (void *) rec))
      continue;
    v = xrealloc(v, (n + 1) * sizeof(*v));
    info_from_record(rec, &v[n++]);
  }
  *ret = v;
  *ret_n = n;
  return 0;
}

int snapshotter_usage(snapshotter *s, const char *key, int64_t *ret_size, int64_t *ret_inodes, crimage_error **err)
{
  int r = snap_check_key("the snapshot key", key, false, err);
  if (r < 0)
    return r;
  cleanup_free char *fs = NULL;
  {
    LOCKED(s);
    const snap_record *rec = snap_meta_find(&s->meta, key);
    if (!rec)
      return crimage_error_set(err, CRIMAGE_NOT_FOUND, ENOENT, "snapshot `%s` does not exist", key);
    if (rec->kind != SNAP_KIND_ACTIVE) {
      *ret_size = rec->kind == SNAP_KIND_COMMITTED ? rec->size : 0;
      *ret_inodes = rec->kind == SNAP_KIND_COMMITTED ? rec->inodes : 0;
      return 0;
    }
    fs = snap_fs_path(s, rec);
  }
  r = snap_disk_usage(fs, ret_size, ret_inodes, err);
  if (r < 0)
    return crimage_error_wrap(err, "usage of `%s`", key);
  return 0;
}

static int id_cmp(const void *a, const void *b)
{
  uint64_t x = *(const uint64_t *) a, y = *(const uint64_t *) b;
  return x < y ? -1 : x > y;
}

int snapshotter_cleanup(snapshotter *s, crimage_error **err)
{
  char **garbage = NULL;
  size_t n = 0;
  {
    LOCKED(s);
    /* The ids of the directories that are ours and in use. */
    cleanup_free uint64_t *ids = xcalloc(s->meta.n + 1, sizeof(*ids));
    size_t n_ids = 0;
    for (size_t i = 0; i < s->meta.n; i++)
      if (!s->meta.v[i]->layer_dir)
        ids[n_ids++] = s->meta.v[i]->id;
    qsort(ids, n_ids, sizeof(*ids), id_cmp);
    DIR *d = opendir(s->snapshots_dir);
    if (!d)
      return crimage_error_set(err, CRIMAGE_INTERNAL, errno, "open `%s`", s->snapshots_dir);
    struct dirent *de;
    while ((de = readdir(d))) {
      if (streq(de->d_name, ".") || streq(de->d_name, ".."))
        continue;
      char *end = NULL;
      errno = 0;
      unsigned long long id = strtoull(de->d_name, &end, 10);
      bool numeric = errno == 0 && end && *end == '\0' && end != de->d_name && de->d_name[0] != '0';
      uint64_t key = id;
      if (numeric && bsearch(&key, ids, n_ids, sizeof(*ids), id_cmp))
        continue;
      garbage = xrealloc(garbage, (n + 1) * sizeof(*garbage));
      garbage[n++] = xasprintf("%s/%s", s->snapshots_dir, de->d_name);
    }
    closedir(d);
  }
  /* What no record holds stays unheld (ids are never reused, and a new snapshot's directory is complete and
   * recorded before the lock is dropped): it can go without the lock. */
  /* As containerd's overlay snapshotter, a directory that cannot go is logged, not an error of the whole call:
   * containerd's GC calls Cleanup after every collection and would report it each time. */
  for (size_t i = 0; i < n; i++) {
    crimage_error *e = NULL;
    if (snap_remove_tree(garbage[i], &e) < 0) {
      log_warn("snapshotter cleanup: %s", e->message);
      crimage_error_clear(&e);
    } else {
      log_info("snapshotter cleanup: removed `%s`", garbage[i]);
    }
    free(garbage[i]);
  }
  free(garbage);
  return 0;
}
