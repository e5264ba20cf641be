/* Layers crimage unpacked itself, registered as committed snapshots whose filesystem is the layer directory, and
 * the question crimage's store asks before deleting one. With the ref label they carry, containerd's unpacker
 * finds them through the remote-snapshot protocol (snapshotter_prepare answers ALREADY_EXISTS for them). */
#include <errno.h>
#include <inttypes.h>
#include <sys/stat.h>

#include "common/log.h"
#include "common/util.h"
#include "cri/snapshotter/internal.h"

/* dir without trailing slashes; NULL when it is not an absolute path overlay can take as a lower directory. */
static char *layer_dir_normalize(const char *dir)
{
  if (!dir || dir[0] != '/' || strlen(dir) > SNAP_MAX_KEY || strpbrk(dir, ",:") || !snap_utf8_valid(dir))
    return NULL;
  char *d = xstrdup(dir);
  size_t len = strlen(d);
  while (len > 1 && d[len - 1] == '/')
    d[--len] = '\0';
  if (len <= 1) {
    free(d);
    return NULL;
  }
  return d;
}

/* The snapshot standing for chain ID parent: the one named so, else a committed one labelled with it (a layer
 * containerd unpacked and committed under a name of its own). The lock is held. */
static const snap_record *resolve_chain(const snapshotter *s, const char *chain_id)
{
  const snap_record *r = snap_meta_find(&s->meta, chain_id);
  if (r && r->kind == SNAP_KIND_COMMITTED)
    return r;
  for (size_t i = 0; i < s->meta.n; i++) {
    r = s->meta.v[i];
    if (r->kind == SNAP_KIND_COMMITTED && streq_ptr(snap_labels_get(&r->labels, SNAP_LABEL_REF), chain_id))
      return r;
  }
  return NULL;
}

int snapshotter_add_layer(snapshotter *s, const char *chain_id, const char *parent_chain_id, const char *dir,
                          crimage_error **err)
{
  if (!parent_chain_id)
    parent_chain_id = "";
  int r = snap_check_key("the chain ID", chain_id, false, err);
  if (r == 0)
    r = snap_check_key("the parent chain ID", parent_chain_id, true, err);
  if (r < 0)
    return r;
  if (strlen(chain_id) + strlen(SNAP_LABEL_REF) > SNAP_MAX_LABEL)
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, E2BIG, "the chain ID is too long for a label");
  cleanup_free char *d = layer_dir_normalize(dir);
  if (!d)
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, EINVAL,
                             "layer `%s`: `%s` is not an absolute directory path overlay can use", chain_id,
                             dir ? dir : "");
  struct stat st;
  if (stat(d, &st) < 0)
    return crimage_error_set(err, errno == ENOENT ? CRIMAGE_NOT_FOUND : CRIMAGE_INTERNAL, errno, "layer `%s`: `%s`",
                             chain_id, d);
  if (!S_ISDIR(st.st_mode))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, ENOTDIR, "layer `%s`: `%s` is not a directory", chain_id,
                             d);
  /* The snapshotter's own directories come and go with its records: a layer there would be removed with them. */
  size_t own = strlen(s->snapshots_dir);
  if (strncmp(d, s->snapshots_dir, own) == 0 && (d[own] == '/' || d[own] == '\0'))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, EINVAL, "layer `%s`: `%s` is inside the snapshotter's own "
                             "directory", chain_id, d);

  /* Measured once, now: a layer does not change after it was unpacked. */
  int64_t size = 0, inodes = 0;
  r = snap_disk_usage(d, &size, &inodes, err);
  if (r < 0)
    return crimage_error_wrap(err, "layer `%s`", chain_id);

  LOCKED(s);
  const char *parent = "";
  if (*parent_chain_id) {
    const snap_record *p = resolve_chain(s, parent_chain_id);
    if (!p)
      return crimage_error_set(err, CRIMAGE_NOT_FOUND, ENOENT, "layer `%s`: its parent `%s` is not known", chain_id,
                               parent_chain_id);
    parent = p->name;
  }
  const snap_record *old = snap_meta_find(&s->meta, chain_id);
  if (old) {
    if (old->layer_dir && streq(old->layer_dir, d) && streq(old->parent, parent))
      return 0; /* registered again, as after a restart */
    return crimage_error_set(err, CRIMAGE_ALREADY_EXISTS, EEXIST,
                             "snapshot `%s` already exists with another directory or parent", chain_id);
  }
  if (s->meta.n >= SNAP_MAX_SNAPSHOTS || s->meta.next_id >= SNAP_MAX_ID)
    return crimage_error_set(err, CRIMAGE_RESOURCE_EXHAUSTED, ENOSPC, "layer `%s`: there are %d snapshots already",
                             chain_id, SNAP_MAX_SNAPSHOTS);
  snap_record *rec = xcalloc(1, sizeof(*rec));
  rec->id = s->meta.next_id++;
  rec->name = xstrdup(chain_id);
  rec->parent = xstrdup(parent);
  rec->kind = SNAP_KIND_COMMITTED;
  rec->created_ns = rec->updated_ns = now_realtime_ns();
  snap_labels_set(&rec->labels, SNAP_LABEL_REF, chain_id);
  rec->size = size;
  rec->inodes = inodes;
  rec->layer_dir = TAKE_PTR(d);
  snap_meta_add(&s->meta, rec);
  r = snap_meta_save(&s->meta, err);
  if (r < 0) {
    snap_meta_take(&s->meta, rec);
    snap_record_free(rec);
    return crimage_error_wrap(err, "layer `%s`", chain_id);
  }
  log_debug("snapshotter: layer `%s` on `%s` is %s", chain_id, parent, rec->layer_dir);
  return 0;
}

bool snapshotter_layer_in_use(snapshotter *s, const char *dir)
{
  cleanup_free char *d = layer_dir_normalize(dir);
  if (!d)
    return false;
  LOCKED(s);
  for (size_t i = 0; i < s->meta.n; i++)
    if (s->meta.v[i]->layer_dir && streq(s->meta.v[i]->layer_dir, d))
      return true;
  return false;
}
