#include "tree.h"

#include <errno.h>
#include <fcntl.h>
#include <fts.h>
#include <limits.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/fsutil.h"
#include "common/log.h"
#include "common/util.h"

/* Reads a small file under dirfd into buf (NUL-terminated); -errno on failure, -EFBIG when it does not fit. */
static int read_small(int dirfd, const char *name, char *buf, size_t size)
{
  cleanup_close int fd = openat(dirfd, name, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  if (fd < 0)
    return -errno;
  ssize_t n = read(fd, buf, size);
  if (n < 0)
    return -errno;
  if ((size_t) n == size)
    return -EFBIG;
  buf[n] = '\0';
  return 0;
}

static bool link_matches(int dirfd, const char *name, const char *target)
{
  char buf[PATH_MAX];
  ssize_t n = readlinkat(dirfd, name, buf, sizeof(buf) - 1);
  if (n < 0)
    return false;
  buf[n] = '\0';
  return streq(buf, target);
}

/* Whether overlay/<id> is the complete layer l is to be; its link name and age go into l then. */
bool layer_dir_complete(int driver_fd, int links_fd, want_layer *l)
{
  cleanup_close int fd = openat(driver_fd, l->id, O_RDONLY | O_DIRECTORY | O_CLOEXEC | O_NOFOLLOW);
  if (fd < 0)
    return false;
  char link[CS_LINK_LEN + 2];
  if (read_small(fd, "link", link, sizeof(link)) < 0 || strlen(link) != CS_LINK_LEN ||
      strspn(link, "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567") != CS_LINK_LEN || !link_matches(fd, "diff", l->target))
    return false;
  /* Room for the expected content and one byte more, so that a longer file does not compare equal. */
  size_t lower_size = (l->lower ? strlen(l->lower) : 0) + 2;
  cleanup_free char *lower = xmalloc(lower_size);
  int r = read_small(fd, "lower", lower, lower_size);
  if (l->lower ? r < 0 || !streq(lower, l->lower) : r != -ENOENT)
    return false;
  cleanup_free char *back = xasprintf("../%s/diff", l->id);
  if (!link_matches(links_fd, link, back))
    return false;
  struct stat st;
  if (fstatat(fd, "link", &st, 0) < 0)
    return false;
  memcpy(l->link, link, sizeof(l->link));
  l->created_ns = (int64_t) st.st_mtim.tv_sec * 1000000000 + st.st_mtim.tv_nsec;
  return true;
}

static int write_small(int dirfd, const char *name, const char *data, mode_t mode)
{
  cleanup_close int fd = openat(dirfd, name, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode);
  if (fd < 0)
    return -errno;
  return write_all(fd, data, strlen(data));
}

/* The overlay driver's files of a layer, as its create() leaves them: diff (here a symlink to crimage's unpacked
 * layer), link with the short name, l/<short name> pointing back at diff, lower with the parents' short names,
 * work and merged, and empty for a base layer. Nothing lists it before it is complete. */
int layer_dir_create(int driver_fd, int links_fd, want_layer *l, crimage_error **err)
{
  int r = rm_tree_at(driver_fd, l->id);
  if (r == 0 && mkdirat(driver_fd, l->id, 0700) < 0)
    r = -errno;
  if (r < 0)
    return crimage_error_set(err, CRIMAGE_INTERNAL, -r, "create layer directory %s", l->id);
  cleanup_close int fd = openat(driver_fd, l->id, O_RDONLY | O_DIRECTORY | O_CLOEXEC | O_NOFOLLOW);
  if (fd < 0)
    return crimage_error_set(err, CRIMAGE_INTERNAL, errno, "open layer directory %s", l->id);
  r = cs_new_link(l->link, err);
  if (r < 0)
    return r;
  cleanup_free char *back = xasprintf("../%s/diff", l->id);
  r = symlinkat(l->target, fd, "diff") < 0 ? -errno : 0;
  if (r == 0)
    r = write_small(fd, "link", l->link, 0644);
  if (r == 0 && l->lower)
    r = write_small(fd, "lower", l->lower, 0644);
  if (r == 0 && mkdirat(fd, "work", 0700) < 0)
    r = -errno;
  if (r == 0 && mkdirat(fd, "merged", 0700) < 0)
    r = -errno;
  if (r == 0 && !l->lower && mkdirat(fd, "empty", 0700) < 0)
    r = -errno;
  if (r == 0 && symlinkat(back, links_fd, l->link) < 0)
    r = -errno;
  if (r < 0)
    return crimage_error_set(err, CRIMAGE_INTERNAL, -r, "write layer directory %s", l->id);
  l->created_ns = now_realtime_ns();
  return 0;
}


/* At most this many distinct owners are listed per layer (containers/storage sizes user namespaces by them). */
#define CS_MAX_IDS 65536

/* The owners seen in a walk: appended as they come and sorted and made unique whenever the buffer fills, so a
 * layer of a million files with as many owners costs a few sorts, never a search per file. */
typedef struct id_set {
  uint32_t *v;
  size_t n, cap;
} id_set;

static int cmp_u32(const void *a, const void *b)
{
  uint32_t x = *(const uint32_t *) a, y = *(const uint32_t *) b;
  return x < y ? -1 : x > y;
}

static void id_set_compact(id_set *s)
{
  if (s->n == 0)
    return;
  qsort(s->v, s->n, sizeof(*s->v), cmp_u32);
  size_t k = 1;
  for (size_t i = 1; i < s->n; i++)
    if (s->v[i] != s->v[k - 1])
      s->v[k++] = s->v[i];
  s->n = k < CS_MAX_IDS ? k : CS_MAX_IDS;
}

static void id_set_add(id_set *s, uint32_t id)
{
  if (s->n && s->v[s->n - 1] == id) /* the files of a layer mostly share their owner */
    return;
  if (s->n == s->cap) {
    if (s->cap >= 2 * CS_MAX_IDS) {
      id_set_compact(s);
    } else {
      s->cap = s->cap ? 2 * s->cap : 64;
      s->v = xrealloc(s->v, s->cap * sizeof(*s->v));
    }
  }
  s->v[s->n++] = id;
}

static json_object *id_array(id_set *s)
{
  id_set_compact(s);
  json_object *a = json_object_new_array();
  for (size_t i = 0; i < s->n; i++)
    json_object_array_add(a, json_object_new_int64(s->v[i]));
  return a;
}

/* What containers/storage records of a layer's content when it stores one: its size (here the bytes of its files
 * and link targets: the tar stream it came from is gone) and the owners of its files. The walk never follows a
 * symlink. */
json_object *layer_measure(const char *dir)
{
  char *paths[] = {(char *) dir, NULL};
  FTS *fts = fts_open(paths, FTS_PHYSICAL | FTS_NOCHDIR, NULL);
  uint64_t size = 0;
  id_set uids = {0}, gids = {0};
  for (FTSENT *e; fts && (e = fts_read(fts));) {
    if (e->fts_info == FTS_DP || !e->fts_statp)
      continue;
    const struct stat *st = e->fts_statp;
    if (S_ISREG(st->st_mode) || S_ISLNK(st->st_mode))
      size = u64_add_sat(size, (uint64_t) st->st_size);
    if (e->fts_level > 0) {
      id_set_add(&uids, st->st_uid);
      id_set_add(&gids, st->st_gid);
    }
  }
  if (fts)
    fts_close(fts);
  json_object *o = json_object_new_object();
  json_object_object_add(o, "diff-size", json_object_new_int64(size > INT64_MAX ? INT64_MAX : (int64_t) size));
  if (uids.n)
    json_object_object_add(o, "uidset", id_array(&uids));
  if (gids.n)
    json_object_object_add(o, "gidset", id_array(&gids));
  free(uids.v);
  free(gids.v);
  return o;
}

/* The measurements of a layer kept in the tree's layers.json, when they are there. */
json_object *layer_measured_before(json_object *old_layers, const char *id)
{
  for (size_t i = 0; i < json_object_array_length(old_layers); i++) {
    json_object *e = json_object_array_get_idx(old_layers, i);
    const char *eid = json_get_string(e, "id");
    json_object *size = NULL;
    if (!eid || !streq(eid, id) || !json_object_object_get_ex(e, "diff-size", &size) ||
        !json_object_is_type(size, json_type_int))
      continue;
    json_object *o = json_object_new_object();
    json_object_object_add(o, "diff-size", json_object_get(size));
    const char *sets[] = {"uidset", "gidset"};
    for (size_t k = 0; k < ARRAY_SIZE(sets); k++) {
      json_object *a = json_get_array(e, sets[k]);
      if (a)
        json_object_object_add(o, sets[k], json_object_get(a));
    }
    return o;
  }
  return NULL;
}
