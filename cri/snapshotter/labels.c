/* Labels, the small value types of the API, and the checks every input goes through. */
#include <errno.h>

#include "common/util.h"
#include "cri/snapshotter/internal.h"

const char *snap_kind_name(snap_kind k)
{
  switch (k) {
  case SNAP_KIND_VIEW:
    return "view";
  case SNAP_KIND_ACTIVE:
    return "active";
  case SNAP_KIND_COMMITTED:
    return "committed";
  default:
    return "unknown";
  }
}

void snap_labels_clear(snap_labels *l)
{
  for (size_t i = 0; i < l->n; i++) {
    free(l->v[i].key);
    free(l->v[i].value);
  }
  free(l->v);
  *l = (snap_labels){0};
}

/* The index of key, or where it would go (*found false). */
static size_t labels_find(const snap_labels *l, const char *key, bool *found)
{
  size_t lo = 0, hi = l->n;
  while (lo < hi) {
    size_t mid = lo + (hi - lo) / 2;
    int c = strcmp(l->v[mid].key, key);
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

const char *snap_labels_get(const snap_labels *l, const char *key)
{
  bool found;
  size_t i = labels_find(l, key, &found);
  return found ? l->v[i].value : NULL;
}

void snap_labels_set(snap_labels *l, const char *key, const char *value)
{
  bool found;
  size_t i = labels_find(l, key, &found);
  if (str_empty(value)) {
    if (!found)
      return;
    free(l->v[i].key);
    free(l->v[i].value);
    memmove(&l->v[i], &l->v[i + 1], (l->n - i - 1) * sizeof(*l->v));
    l->n--;
    return;
  }
  if (found) {
    free(l->v[i].value);
    l->v[i].value = xstrdup(value);
    return;
  }
  l->v = xrealloc(l->v, (l->n + 1) * sizeof(*l->v));
  memmove(&l->v[i + 1], &l->v[i], (l->n - i) * sizeof(*l->v));
  l->v[i] = (snap_label){xstrdup(key), xstrdup(value)};
  l->n++;
}

void snap_labels_copy(snap_labels *dst, const snap_labels *src)
{
  *dst = (snap_labels){0};
  if (!src || src->n == 0)
    return;
  dst->v = xcalloc(src->n, sizeof(*dst->v));
  for (size_t i = 0; i < src->n; i++)
    dst->v[i] = (snap_label){xstrdup(src->v[i].key), xstrdup(src->v[i].value)};
  dst->n = src->n;
}

void snap_info_clear(snap_info *info)
{
  free(info->name);
  free(info->parent);
  snap_labels_clear(&info->labels);
  *info = (snap_info){0};
}

void snap_info_list_free(snap_info *v, size_t n)
{
  for (size_t i = 0; i < n; i++)
    snap_info_clear(&v[i]);
  free(v);
}

void snap_mounts_clear(snap_mounts *m)
{
  for (size_t i = 0; i < m->n; i++) {
    free(m->v[i].type);
    free(m->v[i].source);
    strv_free(m->v[i].options);
  }
  free(m->v);
  *m = (snap_mounts){0};
}

void snap_record_free(snap_record *r)
{
  if (!r)
    return;
  free(r->name);
  free(r->parent);
  snap_labels_clear(&r->labels);
  free(r->layer_dir);
  free(r);
}

/* Go's proto3 refuses strings that are not UTF-8 (containerd would fail to read a List that held one), and the
 * metadata file is JSON: only well-formed UTF-8 gets in. */
bool snap_utf8_valid(const char *s)
{
  const unsigned char *p = (const unsigned char *) s;
  while (*p) {
    unsigned char c = *p;
    size_t n;
    uint32_t cp;
    if (c < 0x80) {
      p++;
      continue;
    } else if ((c & 0xe0) == 0xc0) {
      n = 1;
      cp = c & 0x1f;
    } else if ((c & 0xf0) == 0xe0) {
      n = 2;
      cp = c & 0x0f;
    } else if ((c & 0xf8) == 0xf0) {
      n = 3;
      cp = c & 0x07;
    } else {
      return false;
    }
    for (size_t i = 1; i <= n; i++) {
      if ((p[i] & 0xc0) != 0x80)
        return false;
      cp = (cp << 6) | (p[i] & 0x3f);
    }
    /* Overlong forms, surrogates and values past U+10FFFF are not UTF-8. */
    if ((n == 1 && cp < 0x80) || (n == 2 && cp < 0x800) || (n == 3 && cp < 0x10000) || cp > 0x10ffff ||
        (cp >= 0xd800 && cp <= 0xdfff))
      return false;
    p += n + 1;
  }
  return true;
}

int snap_check_key(const char *what, const char *key, bool allow_empty, crimage_error **err)
{
  if (!key || !*key) {
    if (allow_empty)
      return 0;
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, EINVAL, "%s must not be empty", what);
  }
  size_t len = strlen(key);
  if (len > SNAP_MAX_KEY)
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, ENAMETOOLONG, "%s is %zu bytes long, more than %d", what,
                             len, SNAP_MAX_KEY);
  if (!snap_utf8_valid(key))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, EILSEQ, "%s is not valid UTF-8", what);
  return 0;
}

int snap_check_labels(const char *what, const snap_labels *labels, crimage_error **err)
{
  if (!labels)
    return 0;
  if (labels->n > SNAP_MAX_LABELS)
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, E2BIG, "%s: %zu labels, more than %d", what, labels->n,
                             SNAP_MAX_LABELS);
  for (size_t i = 0; i < labels->n; i++) {
    const snap_label *l = &labels->v[i];
    size_t klen = strlen(l->key), vlen = strlen(l->value);
    if (klen == 0)
      return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, EINVAL, "%s: a label key is empty", what);
    /* containerd's labels.Validate, with its message: a key and its value together at most 4096 bytes. */
    if (klen + vlen > SNAP_MAX_LABEL)
      return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, E2BIG,
                               "%s: label key and value greater than maximum size (%d bytes), key: %.10s", what,
                               SNAP_MAX_LABEL, l->key);
    if (!snap_utf8_valid(l->key) || !snap_utf8_valid(l->value))
      return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, EILSEQ, "%s: label %.64s is not valid UTF-8", what,
                               snap_utf8_valid(l->key) ? l->key : "(key)");
  }
  return 0;
}
