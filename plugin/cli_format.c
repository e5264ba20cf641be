#include <inttypes.h>

#include "cli_format.h"
#include "common/util.h"

void cli_format_size(uint64_t bytes, char *buf, size_t len)
{
  static const char *const units[] = {"B", "kB", "MB", "GB", "TB", "PB", "EB"};
  double v = (double) bytes;
  size_t i = 0;
  while (v >= 1000 && i + 1 < ARRAY_SIZE(units)) {
    v /= 1000;
    i++;
  }
  /* 999.7kB would print as "1e+03kB" with three significant digits: it is 1MB. */
  if (v >= 999.5 && i + 1 < ARRAY_SIZE(units)) {
    v /= 1000;
    i++;
  }
  snprintf(buf, len, "%.3g%s", v, units[i]);
}

char *cli_short_id(const char *id)
{
  if (!id)
    return xstrdup("");
  if (str_has_prefix(id, "sha256:"))
    id += strlen("sha256:");
  return xstrndup(id, CLI_SHORT_ID_LEN);
}

void cli_split_repo_tag(const char *repo_tag, char **ret_repo, char **ret_tag)
{
  /* A digest is no tag: "name@sha256:..." has none, "name:tag@sha256:..." has "tag". */
  const char *at = strchr(repo_tag, '@');
  size_t len = at ? (size_t) (at - repo_tag) : strlen(repo_tag);
  const char *slash = memrchr(repo_tag, '/', len);
  const char *start = slash ? slash : repo_tag;
  const char *colon = memchr(start, ':', len - (size_t) (start - repo_tag));
  if (!colon) {
    *ret_repo = xstrndup(repo_tag, len);
    *ret_tag = xstrdup(CLI_NONE);
    return;
  }
  *ret_repo = xstrndup(repo_tag, (size_t) (colon - repo_tag));
  *ret_tag = xstrndup(colon + 1, len - (size_t) (colon + 1 - repo_tag));
}

char *cli_repo_from_digests(char *const *repo_digests)
{
  if (!repo_digests || !repo_digests[0])
    return xstrdup(CLI_NONE);
  const char *at = strchr(repo_digests[0], '@');
  if (!at || at == repo_digests[0])
    return xstrdup(CLI_NONE);
  return xstrndup(repo_digests[0], (size_t) (at - repo_digests[0]));
}

char *cli_printable(const char *s)
{
  char *out = xstrdup(s ? s : "");
  for (char *p = out; *p; p++)
    if ((unsigned char) *p < 0x20 || *p == 0x7f)
      *p = '?';
  return out;
}

struct cli_table {
  size_t ncols;
  size_t nrows; /* rows[0] is the header */
  size_t cap;
  char ***rows;
};

cli_table *cli_table_new(size_t ncols, const char *const *headers)
{
  cli_table *t = xcalloc(1, sizeof(*t));
  t->ncols = ncols;
  cli_table_add_row(t, headers);
  return t;
}

void cli_table_add_row(cli_table *t, const char *const *cells)
{
  if (t->nrows == t->cap) {
    t->cap = t->cap ? t->cap * 2 : 16;
    t->rows = xrealloc(t->rows, t->cap * sizeof(char **));
  }
  char **row = xcalloc(t->ncols, sizeof(char *));
  for (size_t i = 0; i < t->ncols; i++)
    row[i] = cli_printable(cells[i]);
  t->rows[t->nrows++] = row;
}

static int row_cmp(const void *a, const void *b, void *ncols)
{
  char *const *ra = *(char **const *) a;
  char *const *rb = *(char **const *) b;
  for (size_t c = 0; c < *(size_t *) ncols; c++) {
    int r = strcmp(ra[c], rb[c]);
    if (r)
      return r;
  }
  return 0;
}

void cli_table_sort(cli_table *t)
{
  if (t->nrows > 2)
    qsort_r(t->rows + 1, t->nrows - 1, sizeof(char **), row_cmp, &t->ncols);
}

void cli_table_print(const cli_table *t, FILE *f)
{
  cleanup_free size_t *width = xcalloc(t->ncols, sizeof(size_t));
  for (size_t r = 0; r < t->nrows; r++)
    for (size_t c = 0; c < t->ncols; c++) {
      size_t l = strlen(t->rows[r][c]);
      if (l > width[c])
        width[c] = l;
    }
  for (size_t r = 0; r < t->nrows; r++) {
    for (size_t c = 0; c < t->ncols; c++) {
      if (c + 1 == t->ncols)
        fprintf(f, "%s\n", t->rows[r][c]);
      else
        fprintf(f, "%-*s   ", (int) width[c], t->rows[r][c]);
    }
  }
}

void cli_table_free(cli_table *t)
{
  if (!t)
    return;
  for (size_t r = 0; r < t->nrows; r++) {
    for (size_t c = 0; c < t->ncols; c++)
      free(t->rows[r][c]);
    free(t->rows[r]);
  }
  free(t->rows);
  free(t);
}

static json_object *strv_to_json(char *const *v)
{
  json_object *a = json_object_new_array();
  for (size_t i = 0; v && v[i]; i++)
    json_object_array_add(a, json_object_new_string(v[i]));
  return a;
}

static json_object *u64_string(uint64_t v)
{
  char buf[32];
  snprintf(buf, sizeof(buf), "%" PRIu64, v);
  return json_object_new_string(buf);
}

static json_object *i64_string(int64_t v)
{
  char buf[32];
  snprintf(buf, sizeof(buf), "%" PRId64, v);
  return json_object_new_string(buf);
}

/* {"value": "<n>"}: the JSON of the CRI wrapper messages Int64Value and UInt64Value. */
static json_object *value_object(json_object *v)
{
  json_object *o = json_object_new_object();
  json_object_object_add(o, "value", v);
  return o;
}

json_object *cli_image_to_json(const crimage_image *img)
{
  json_object *o = json_object_new_object();
  json_object_object_add(o, "id", json_object_new_string(img->id ? img->id : ""));
  json_object_object_add(o, "repoTags", strv_to_json(img->repo_tags));
  json_object_object_add(o, "repoDigests", strv_to_json(img->repo_digests));
  json_object_object_add(o, "size", u64_string(img->size));
  json_object_object_add(o, "uid", img->has_uid ? value_object(i64_string(img->uid)) : NULL);
  json_object_object_add(o, "username", json_object_new_string(img->username ? img->username : ""));
  json_object *spec = NULL;
  if (img->has_spec) {
    spec = json_object_new_object();
    json_object_object_add(spec, "image", json_object_new_string(img->spec_image ? img->spec_image : ""));
    json_object_object_add(spec, "runtimeHandler",
                           json_object_new_string(img->runtime_handler ? img->runtime_handler : ""));
  }
  json_object_object_add(o, "spec", spec);
  json_object_object_add(o, "pinned", json_object_new_boolean(img->pinned));
  return o;
}

json_object *cli_fs_usage_to_json(const crimage_fs_usage *usage, size_t n)
{
  json_object *fss = json_object_new_array();
  for (size_t i = 0; i < n; i++) {
    json_object *u = json_object_new_object();
    json_object_object_add(u, "timestamp", i64_string(usage[i].timestamp_ns));
    json_object *fs_id = json_object_new_object();
    json_object_object_add(fs_id, "mountpoint", json_object_new_string(usage[i].mountpoint ? usage[i].mountpoint : ""));
    json_object_object_add(u, "fsId", fs_id);
    json_object_object_add(u, "usedBytes", value_object(u64_string(usage[i].used_bytes)));
    json_object_object_add(u, "inodesUsed", value_object(u64_string(usage[i].inodes_used)));
    json_object_array_add(fss, u);
  }
  json_object *status = json_object_new_object();
  json_object_object_add(status, "imageFilesystems", fss);
  json_object_object_add(status, "containerFilesystems", json_object_new_array());
  json_object *o = json_object_new_object();
  json_object_object_add(o, "status", status);
  return o;
}

void cli_json_print(json_object *o, FILE *f)
{
  fprintf(f, "%s\n",
          json_object_to_json_string_ext(o, JSON_C_TO_STRING_PRETTY | JSON_C_TO_STRING_SPACED |
                                                JSON_C_TO_STRING_NOSLASHESCAPE));
}
