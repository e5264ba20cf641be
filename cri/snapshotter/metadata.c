/* The snapshot records and their file, <root>/metadata.json:
 *
 *   {"version": 1, "nextId": 7, "snapshots": [{"id": 3, "name": "...", "kind": "committed", "parent": "...",
 *    "created": <ns>, "updated": <ns>, "labels": {...}, "size": 4096, "inodes": 2, "layerDir": "/..."}, ...]}
 *
 * The whole file is rewritten on every change (write_file_atomic: temporary file, fsync, rename, directory fsync),
 * so after a crash it holds the state before or after the last change. A snapshot is a few hundred bytes and a node
 * has hundreds to a few thousand, so rewriting all of it costs less than the fsyncs it needs anyway. */
#include <errno.h>
#include <inttypes.h>

#include "common/fsutil.h"
#include "common/json.h"
#include "common/util.h"
#include "cri/snapshotter/internal.h"

/* What the tree of metadata.json may cost: the file is the snapshotter's own, bounded at SNAP_MAX_METADATA bytes and
 * SNAP_MAX_SNAPSHOTS entries; a snapshot with its labels takes a few KiB of tree. */
#define SNAP_METADATA_JSON_LIMITS JSON_LIMITS((size_t) 512 << 20, SNAP_MAX_SNAPSHOTS)

#define META_VERSION 1

void snap_meta_clear(snap_meta *m)
{
  for (size_t i = 0; i < m->n; i++)
    snap_record_free(m->v[i]);
  free(m->v);
  free(m->path);
  *m = (snap_meta){0};
}

/* The records are kept sorted by name: lookups are binary searches, and List answers in name order as containerd's
 * own store (a bolt bucket) does. */
static size_t meta_index(const snap_meta *m, const char *name, bool *found)
{
  size_t lo = 0, hi = m->n;
  while (lo < hi) {
    size_t mid = lo + (hi - lo) / 2;
    int c = strcmp(m->v[mid]->name, name);
    if (c == 0) {
      *found = true;
      return mid;
    }
    if (c < 0)
      lo = mid + 1;
    else
      hi = mid;
  }
  *found = false;
  return lo;
}

snap_record *snap_meta_find(const snap_meta *m, const char *name)
{
  bool found;
  size_t i = meta_index(m, name, &found);
  return found ? m->v[i] : NULL;
}

snap_record *snap_meta_child(const snap_meta *m, const char *name)
{
  for (size_t i = 0; i < m->n; i++)
    if (streq(m->v[i]->parent, name))
      return m->v[i];
  return NULL;
}

void snap_meta_add(snap_meta *m, snap_record *r)
{
  bool found;
  size_t i = meta_index(m, r->name, &found);
  m->v = xrealloc(m->v, (m->n + 1) * sizeof(*m->v));
  memmove(&m->v[i + 1], &m->v[i], (m->n - i) * sizeof(*m->v));
  m->v[i] = r;
  m->n++;
}

void snap_meta_take(snap_meta *m, snap_record *r)
{
  bool found;
  size_t i = meta_index(m, r->name, &found);
  if (!found || m->v[i] != r)
    return;
  memmove(&m->v[i], &m->v[i + 1], (m->n - i - 1) * sizeof(*m->v));
  m->n--;
}

static snap_kind kind_parse(const char *s)
{
  if (!s)
    return SNAP_KIND_UNKNOWN;
  if (streq(s, "view"))
    return SNAP_KIND_VIEW;
  if (streq(s, "active"))
    return SNAP_KIND_ACTIVE;
  if (streq(s, "committed"))
    return SNAP_KIND_COMMITTED;
  return SNAP_KIND_UNKNOWN;
}

/* One entry of the file; NULL with *err set (the caller names the file) when it is not well-formed. */
static snap_record *record_parse(json_object *o, size_t index, crimage_error **err)
{
  if (!json_object_is_type(o, json_type_object)) {
    crimage_error_set(err, CRIMAGE_DATA_LOSS, EINVAL, "snapshot #%zu is not an object", index);
    return NULL;
  }
  snap_record *r = xcalloc(1, sizeof(*r));
  int64_t id = 0;
  const char *name = json_get_string(o, "name");
  const char *parent = json_get_string(o, "parent");
  const char *layer_dir = json_get_string(o, "layerDir");
  r->kind = kind_parse(json_get_string(o, "kind"));
  if (!json_get_int64(o, "id", &id) || id <= 0 || (uint64_t) id >= SNAP_MAX_ID) {
    crimage_error_set(err, CRIMAGE_DATA_LOSS, EINVAL, "snapshot #%zu has no valid id", index);
    goto fail;
  }
  r->id = (uint64_t) id;
  if (snap_check_key("its name", name, false, err) < 0 || snap_check_key("its parent", parent, true, err) < 0) {
    crimage_error_wrap(err, "snapshot #%zu", index);
    goto fail;
  }
  r->name = xstrdup(name);
  r->parent = xstrdup(parent ? parent : "");
  if (r->kind == SNAP_KIND_UNKNOWN) {
    crimage_error_set(err, CRIMAGE_DATA_LOSS, EINVAL, "snapshot `%s` has no valid kind", r->name);
    goto fail;
  }
  if (!json_get_int64(o, "created", &r->created_ns) || !json_get_int64(o, "updated", &r->updated_ns)) {
    crimage_error_set(err, CRIMAGE_DATA_LOSS, EINVAL, "snapshot `%s` has no valid times", r->name);
    goto fail;
  }
  if (!json_get_int64(o, "size", &r->size))
    r->size = 0;
  if (!json_get_int64(o, "inodes", &r->inodes))
    r->inodes = 0;
  if (r->size < 0 || r->inodes < 0) {
    crimage_error_set(err, CRIMAGE_DATA_LOSS, EINVAL, "snapshot `%s` has a negative usage", r->name);
    goto fail;
  }
  if (layer_dir) {
    if (layer_dir[0] != '/' || r->kind != SNAP_KIND_COMMITTED || strlen(layer_dir) > SNAP_MAX_KEY) {
      crimage_error_set(err, CRIMAGE_DATA_LOSS, EINVAL, "snapshot `%s` has an invalid layer directory", r->name);
      goto fail;
    }
    r->layer_dir = xstrdup(layer_dir);
  }
  json_object *labels = json_get_object(o, "labels");
  if (labels) {
    json_object_object_foreach(labels, k, v)
    {
      if (!json_object_is_type(v, json_type_string)) {
        crimage_error_set(err, CRIMAGE_DATA_LOSS, EINVAL, "snapshot `%s`: label `%.64s` is not a string", r->name, k);
        goto fail;
      }
      if (r->labels.n >= SNAP_MAX_LABELS) {
        crimage_error_set(err, CRIMAGE_DATA_LOSS, E2BIG, "snapshot `%s` has more than %d labels", r->name,
                          SNAP_MAX_LABELS);
        goto fail;
      }
      snap_labels_set(&r->labels, k, json_object_get_string(v));
    }
  }
  if (snap_check_labels(r->name, &r->labels, err) < 0)
    goto fail;
  return r;
fail:
  snap_record_free(r);
  return NULL;
}

static int record_cmp_name(const void *a, const void *b)
{
  return strcmp((*(snap_record *const *) a)->name, (*(snap_record *const *) b)->name);
}

static int id_cmp(const void *a, const void *b)
{
  uint64_t x = *(const uint64_t *) a, y = *(const uint64_t *) b;
  return x < y ? -1 : x > y;
}

/* Sorts the records loaded and checks them: every name and id once, every parent a committed snapshot, no loop
 * through parents. O(n log n): the file may hold SNAP_MAX_SNAPSHOTS records. */
static int meta_check(snap_meta *m, crimage_error **err)
{
  if (m->n == 0)
    return 0;
  qsort(m->v, m->n, sizeof(*m->v), record_cmp_name);
  cleanup_free uint64_t *ids = xcalloc(m->n, sizeof(*ids));
  for (size_t i = 0; i < m->n; i++) {
    if (i > 0 && streq(m->v[i - 1]->name, m->v[i]->name))
      return crimage_error_set(err, CRIMAGE_DATA_LOSS, EEXIST, "snapshot `%s` is there twice", m->v[i]->name);
    if (m->v[i]->id >= m->next_id)
      return crimage_error_set(err, CRIMAGE_DATA_LOSS, EINVAL, "snapshot `%s` has an id past nextId", m->v[i]->name);
    ids[i] = m->v[i]->id;
  }
  qsort(ids, m->n, sizeof(*ids), id_cmp);
  for (size_t i = 1; i < m->n; i++)
    if (ids[i - 1] == ids[i])
      return crimage_error_set(err, CRIMAGE_DATA_LOSS, EEXIST, "two snapshots have the id %" PRIu64, ids[i]);

  /* 0: not seen, 1: on the walk in progress, 2: its chain of parents is fine. */
  cleanup_free unsigned char *state = xcalloc(m->n, 1);
  cleanup_free size_t *path = xcalloc(m->n, sizeof(*path));
  for (size_t start = 0; start < m->n; start++) {
    size_t depth = 0, i = start;
    for (;;) {
      if (state[i] == 2)
        break;
      if (state[i] == 1)
        return crimage_error_set(err, CRIMAGE_DATA_LOSS, ELOOP, "the parents of snapshot `%s` form a loop",
                                 m->v[i]->name);
      state[i] = 1;
      path[depth++] = i;
      const snap_record *r = m->v[i];
      if (!*r->parent)
        break;
      bool found;
      size_t up = meta_index(m, r->parent, &found);
      if (!found)
        return crimage_error_set(err, CRIMAGE_DATA_LOSS, ENOENT, "the parent `%s` of snapshot `%s` is missing",
                                 r->parent, r->name);
      if (m->v[up]->kind != SNAP_KIND_COMMITTED)
        return crimage_error_set(err, CRIMAGE_DATA_LOSS, EINVAL, "the parent `%s` of snapshot `%s` is not committed",
                                 r->parent, r->name);
      i = up;
    }
    for (size_t k = 0; k < depth; k++)
      state[path[k]] = 2;
  }
  return 0;
}

int snap_meta_load(snap_meta *m, const char *path, crimage_error **err)
{
  *m = (snap_meta){.path = xstrdup(path), .next_id = 1};
  cleanup_free char *data = NULL;
  size_t len = 0;
  crimage_error *rerr = NULL;
  int r = read_file(path, SNAP_MAX_METADATA, &data, &len, &rerr);
  if (r < 0) {
    if (rerr->status == CRIMAGE_NOT_FOUND) {
      crimage_error_clear(&rerr);
      return 0;
    }
    crimage_error_set(err, rerr->status == CRIMAGE_INVALID_ARGUMENT ? CRIMAGE_DATA_LOSS : rerr->status, rerr->errnum,
                      "snapshot metadata: %s", rerr->message);
    crimage_error_clear(&rerr);
    return r;
  }
  cleanup_json json_object *root = NULL;
  r = json_parse(data, len, path, SNAP_METADATA_JSON_LIMITS, &root, &rerr);
  if (r < 0) {
    /* Not the client's fault: the file is damaged. */
    crimage_error_set(err, CRIMAGE_DATA_LOSS, rerr->errnum, "snapshot metadata: %s", rerr->message);
    crimage_error_clear(&rerr);
    return r;
  }
  int64_t version = 0, next_id = 0;
  json_object *list = json_get_array(root, "snapshots");
  if (!json_object_is_type(root, json_type_object) || !json_get_int64(root, "version", &version) || !list ||
      !json_get_int64(root, "nextId", &next_id) || next_id <= 0 || (uint64_t) next_id > SNAP_MAX_ID)
    return crimage_error_set(err, CRIMAGE_DATA_LOSS, EINVAL, "`%s` is not snapshot metadata", path);
  if (version != META_VERSION)
    return crimage_error_set(err, CRIMAGE_DATA_LOSS, EINVAL, "`%s` has version %" PRId64 ", this crimaged reads %d",
                             path, version, META_VERSION);
  size_t n = json_object_array_length(list);
  if (n > SNAP_MAX_SNAPSHOTS)
    return crimage_error_set(err, CRIMAGE_DATA_LOSS, E2BIG, "`%s` holds %zu snapshots, more than %d", path, n,
                             SNAP_MAX_SNAPSHOTS);
  m->next_id = (uint64_t) next_id;
  for (size_t i = 0; i < n; i++) {
    snap_record *rec = record_parse(json_object_array_get_idx(list, i), i, err);
    if (!rec) {
      r = crimage_error_wrap(err, "`%s`", path);
      snap_meta_clear(m);
      return r;
    }
    /* Appended as read; meta_check sorts them. */
    m->v = xrealloc(m->v, (m->n + 1) * sizeof(*m->v));
    m->v[m->n++] = rec;
  }
  r = meta_check(m, err);
  if (r < 0) {
    crimage_error_wrap(err, "`%s`", path);
    snap_meta_clear(m);
  }
  return r;
}

static json_object *record_json(const snap_record *r)
{
  json_object *o = json_object_new_object();
  json_object_object_add(o, "id", json_object_new_int64((int64_t) r->id));
  json_object_object_add(o, "name", json_object_new_string(r->name));
  json_object_object_add(o, "kind", json_object_new_string(snap_kind_name(r->kind)));
  if (*r->parent)
    json_object_object_add(o, "parent", json_object_new_string(r->parent));
  json_object_object_add(o, "created", json_object_new_int64(r->created_ns));
  json_object_object_add(o, "updated", json_object_new_int64(r->updated_ns));
  if (r->labels.n > 0) {
    json_object *labels = json_object_new_object();
    for (size_t i = 0; i < r->labels.n; i++)
      json_object_object_add(labels, r->labels.v[i].key, json_object_new_string(r->labels.v[i].value));
    json_object_object_add(o, "labels", labels);
  }
  if (r->kind == SNAP_KIND_COMMITTED) {
    json_object_object_add(o, "size", json_object_new_int64(r->size));
    json_object_object_add(o, "inodes", json_object_new_int64(r->inodes));
  }
  if (r->layer_dir)
    json_object_object_add(o, "layerDir", json_object_new_string(r->layer_dir));
  return o;
}

int snap_meta_save(const snap_meta *m, crimage_error **err)
{
  cleanup_json json_object *root = json_object_new_object();
  json_object_object_add(root, "version", json_object_new_int(META_VERSION));
  json_object_object_add(root, "nextId", json_object_new_int64((int64_t) m->next_id));
  json_object *list = json_object_new_array_ext((int) m->n);
  for (size_t i = 0; i < m->n; i++)
    json_object_array_add(list, record_json(m->v[i]));
  json_object_object_add(root, "snapshots", list);
  size_t len = 0;
  const char *text = json_object_to_json_string_length(root, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE,
                                                       &len);
  /* The file must stay loadable: what the next start would refuse is refused now. */
  if (len > SNAP_MAX_METADATA)
    return crimage_error_set(err, CRIMAGE_RESOURCE_EXHAUSTED, EFBIG,
                             "the snapshot metadata would grow past %d bytes", SNAP_MAX_METADATA);
  return write_file_atomic(m->path, text, len, 0600, err);
}
