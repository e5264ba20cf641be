#include "cstorage.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <fts.h>
#include <limits.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/digest.h"
#include "common/fsutil.h"
#include "common/json.h"
#include "common/log.h"
#include "common/util.h"
#include "format.h"
#include "pull/manifest.h"

/* The tree's own files are crimage's output, but they are read back from a disk anyone with root could edit:
 * bounded like any outside input. */
#define CS_JSON_MAX_SIZE ((size_t) 256 << 20)
#define CS_JSON_LIMITS JSON_LIMITS((size_t) 2 << 30, 1000000)
#define CS_DRIVER "overlay"

struct cstorage {
  char *root;
  char *images_dir; /* overlay-images */
  char *layers_dir; /* overlay-layers */
  char *driver_dir; /* overlay */
  int own_lock_fd;  /* crimage.lock: one writer */
  cs_lock images_lock;
  cs_lock layers_lock;
  pthread_mutex_t sync_lock;
  /* The layer directories of crimage's the tree's layers stand on. A leaf lock: the store's keeper asks while it
   * holds the store's lock, and a sync holds sync_lock while it reads the store. */
  pthread_mutex_t in_use_lock;
  char **in_use;
};

const char *cstorage_root(const cstorage *cs) { return cs->root; }

void cstorage_free(cstorage *cs)
{
  if (!cs)
    return;
  cs_lock_close(&cs->images_lock);
  cs_lock_close(&cs->layers_lock);
  if (cs->own_lock_fd >= 0)
    close(cs->own_lock_fd);
  pthread_mutex_destroy(&cs->sync_lock);
  pthread_mutex_destroy(&cs->in_use_lock);
  strv_free(cs->in_use);
  free(cs->root);
  free(cs->images_dir);
  free(cs->layers_dir);
  free(cs->driver_dir);
  free(cs);
}

int cstorage_open(const char *root, cstorage **ret, crimage_error **err)
{
  if (str_empty(root) || root[0] != '/')
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, EINVAL,
                             "containersStorage.root must be an absolute path, not \"%s\"", root ? root : "");
  cstorage *cs = xcalloc(1, sizeof(*cs));
  cs->own_lock_fd = -1;
  cs->images_lock.fd = cs->layers_lock.fd = -1;
  pthread_mutex_init(&cs->sync_lock, NULL);
  pthread_mutex_init(&cs->in_use_lock, NULL);
  cs->in_use = xcalloc(1, sizeof(char *));
  cs->root = xstrdup(root);
  cs->images_dir = xasprintf("%s/" CS_DRIVER "-images", root);
  cs->layers_dir = xasprintf("%s/" CS_DRIVER "-layers", root);
  cs->driver_dir = xasprintf("%s/" CS_DRIVER, root);
  cleanup_free char *links = xasprintf("%s/l", cs->driver_dir);
  cleanup_free char *own = xasprintf("%s/crimage.lock", root);
  cleanup_free char *ilock = xasprintf("%s/images.lock", cs->images_dir);
  cleanup_free char *llock = xasprintf("%s/layers.lock", cs->layers_dir);
  int r = mkdir_p(root, 0755, err);
  if (r == 0)
    r = mkdir_p(cs->images_dir, 0700, err);
  if (r == 0)
    r = mkdir_p(cs->layers_dir, 0700, err);
  if (r == 0)
    r = mkdir_p(cs->driver_dir, 0700, err);
  if (r == 0)
    r = mkdir_p(links, 0755, err);
  if (r == 0) {
    cs->own_lock_fd = open(own, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (cs->own_lock_fd < 0)
      r = crimage_error_set(err, CRIMAGE_INTERNAL, errno, "open `%s`", own);
    else if (flock(cs->own_lock_fd, LOCK_EX | LOCK_NB) < 0)
      r = crimage_error_set(err, CRIMAGE_FAILED_PRECONDITION, errno,
                            "containers-storage tree %s is written by another crimaged", root);
  }
  if (r == 0)
    r = cs_lock_open(ilock, &cs->images_lock, err);
  if (r == 0)
    r = cs_lock_open(llock, &cs->layers_lock, err);
  if (r < 0) {
    cstorage_free(cs);
    return crimage_error_wrap(err, "containers-storage tree %s", root);
  }
  *ret = cs;
  return 0;
}

bool cstorage_layer_in_use(cstorage *cs, const char *dir)
{
  pthread_mutex_lock(&cs->in_use_lock);
  bool used = strv_contains(cs->in_use, dir);
  pthread_mutex_unlock(&cs->in_use_lock);
  return used;
}

static void set_in_use(cstorage *cs, char **dirs)
{
  pthread_mutex_lock(&cs->in_use_lock);
  strv_free(cs->in_use);
  cs->in_use = dirs;
  pthread_mutex_unlock(&cs->in_use_lock);
}

/* ---- what the tree is to hold ---- */

typedef struct want_layer {
  char id[CS_ID_LEN + 1];
  char parent[CS_ID_LEN + 1]; /* "" for a base layer */
  char *diff_id;
  char *blob; /* the compressed blob's digest and size, as the manifest gives them */
  int64_t blob_size;
  int compression; /* containers/storage's archive.Compression: 0 none, 2 gzip, 4 zstd */
  char *target;    /* crimage's unpacked layer directory */
  char link[CS_LINK_LEN + 1];
  char *lower; /* the overlay driver's lower file: the parents' links, nearest first; NULL for a base layer */
  int64_t created_ns;
  json_object *measured; /* diff-size, uidset and gidset, as measured when the layer entered the tree */
} want_layer;

typedef struct want_image {
  char id[CS_ID_LEN + 1];
  char *digest;
  char **names;
  char top[CS_ID_LEN + 1];
  char *created;
  char *manifest;
  size_t manifest_len;
  char *manifest_digest;
  char *config;
  size_t config_len;
  char *config_digest;
  int64_t record_ns;
} want_image;

typedef struct want {
  want_layer *layers;
  size_t n_layers;
  want_image *images;
  size_t n_images;
} want;

static void want_clear(want *w)
{
  for (size_t i = 0; i < w->n_layers; i++) {
    free(w->layers[i].diff_id);
    free(w->layers[i].blob);
    free(w->layers[i].target);
    free(w->layers[i].lower);
    json_object_put(w->layers[i].measured);
  }
  for (size_t i = 0; i < w->n_images; i++) {
    want_image *im = &w->images[i];
    free(im->digest);
    strv_free(im->names);
    free(im->created);
    free(im->manifest);
    free(im->manifest_digest);
    free(im->config);
    free(im->config_digest);
  }
  free(w->layers);
  free(w->images);
}

static want_layer *find_layer(want *w, const char *id)
{
  for (size_t i = 0; i < w->n_layers; i++)
    if (streq(w->layers[i].id, id))
      return &w->layers[i];
  return NULL;
}

static want_image *find_image(want *w, const char *id)
{
  for (size_t i = 0; i < w->n_images; i++)
    if (streq(w->images[i].id, id))
      return &w->images[i];
  return NULL;
}

static int compression_of(const char *media_type)
{
  if (str_has_suffix(media_type, "+gzip") || str_has_suffix(media_type, ".gzip"))
    return 2;
  if (str_has_suffix(media_type, "+zstd") || str_has_suffix(media_type, ".zstd"))
    return 4;
  return 0;
}

/* The names containers/image would give the image: its tags, and name@digest for a repository it has no tag of
 * (pulled by digest). */
static char **names_of(const store_image *img)
{
  char **names = xcalloc(1, sizeof(char *));
  for (char **t = img->repo_tags; t && *t; t++)
    strv_add_unique(&names, *t);
  for (char **d = img->repo_digests; d && *d; d++) {
    const char *at = strchr(*d, '@');
    if (!at)
      continue;
    size_t repo_len = (size_t) (at - *d);
    bool tagged = false;
    for (char **t = img->repo_tags; t && *t && !tagged; t++)
      tagged = strncmp(*t, *d, repo_len) == 0 && (*t)[repo_len] == ':' && !strchr(*t + repo_len + 1, '/');
    if (!tagged)
      strv_add_unique(&names, *d);
  }
  return names;
}

/* The config's creation time, as containers/image takes it; the record's when the config has none. */
static char *created_of(const char *config, size_t len, int64_t record_ns)
{
  cleanup_json json_object *o = NULL;
  crimage_error *e = NULL;
  const char *c = NULL;
  if (json_parse(config, len, "image config", IMAGE_CONFIG_JSON_LIMITS, &o, &e) == 0)
    c = json_get_string(o, "created");
  crimage_error_clear(&e);
  return cs_time_valid(c) ? xstrdup(c) : cs_time_string(record_ns);
}

/* Adds the image of one record (its layers first), or says why it cannot be in the tree. */
static int want_add(want *w, const cstorage_source *s, crimage_error **err)
{
  const store_image *img = s->img;
  if (!str_has_prefix(img->id, "sha256:") || !digest_valid(img->id))
    return crimage_error_set(err, CRIMAGE_FAILED_PRECONDITION, 0, "image %s: not a sha256 image ID", img->id);
  size_t n = strv_length(img->layers);
  if (strv_length(img->diff_ids) != n)
    return crimage_error_set(err, CRIMAGE_FAILED_PRECONDITION, 0,
                             "image %s: the layers' uncompressed digests are not recorded (pull it again)", img->id);
  char *manifest_data = NULL, *config_data = NULL;
  size_t manifest_len = 0, config_len = 0;
  int r = store_blob_read(s->st, img->manifest_digest, MANIFEST_MAX_SIZE, &manifest_data, &manifest_len, err);
  if (r < 0)
    return crimage_error_wrap(err, "image %s", img->id);
  cleanup_free char *mdata = manifest_data;
  cleanup_manifest manifest *m = NULL;
  r = manifest_parse(mdata, manifest_len, img->manifest_media_type, &m, err);
  if (r < 0)
    return crimage_error_wrap(err, "image %s", img->id);
  if (m->kind != MANIFEST_KIND_IMAGE || m->n_layers != n)
    return crimage_error_set(err, CRIMAGE_FAILED_PRECONDITION, 0, "image %s: its manifest lists other layers",
                             img->id);
  r = store_blob_read(s->st, img->id, IMAGE_CONFIG_MAX_SIZE, &config_data, &config_len, err);
  if (r < 0)
    return crimage_error_wrap(err, "image %s", img->id);
  cleanup_free char *cdata = config_data;
  char *targets[n + 1];
  size_t n_targets = 0;
  int result = 0;
  for (size_t i = 0; i < n && result == 0; i++) {
    targets[i] = store_layer_path(s->st, img->diff_ids[i]);
    n_targets++;
    if (!targets[i] || !store_layer_exists(s->st, img->diff_ids[i]))
      result = crimage_error_set(err, CRIMAGE_FAILED_PRECONDITION, 0,
                                 "image %s: layer %s is not unpacked (pulled before its handler had a tree: the "
                                 "next pull of it unpacks it)",
                                 img->id, img->diff_ids[i]);
  }
  char id[CS_ID_LEN + 1] = "";
  for (size_t i = 0; i < n && result == 0; i++) {
    char parent[CS_ID_LEN + 1];
    memcpy(parent, id, sizeof(id));
    cs_layer_id(parent, img->diff_ids[i], id);
    if (find_layer(w, id))
      continue;
    w->layers = xrealloc(w->layers, (w->n_layers + 1) * sizeof(*w->layers));
    want_layer *l = &w->layers[w->n_layers++];
    *l = (want_layer){.blob_size = m->layers[i].size, .compression = compression_of(m->layers[i].media_type)};
    memcpy(l->id, id, sizeof(id));
    memcpy(l->parent, parent, sizeof(parent));
    l->diff_id = xstrdup(img->diff_ids[i]);
    l->blob = xstrdup(img->layers[i]);
    l->target = TAKE_PTR(targets[i]);
  }
  for (size_t i = 0; i < n_targets; i++)
    free(targets[i]);
  if (result < 0)
    return result;

  want_image *im = find_image(w, digest_hex(img->id));
  if (im) {
    /* Another handler's record of the same image: one image with the names of both. */
    cleanup_strv char **more = names_of(img);
    for (char **p = more; *p; p++)
      strv_add_unique(&im->names, *p);
    if (img->created_ns > im->record_ns)
      im->record_ns = img->created_ns;
    return 0;
  }
  w->images = xrealloc(w->images, (w->n_images + 1) * sizeof(*w->images));
  im = &w->images[w->n_images++];
  *im = (want_image){.record_ns = img->created_ns, .manifest_len = manifest_len, .config_len = config_len};
  snprintf(im->id, sizeof(im->id), "%s", digest_hex(img->id));
  memcpy(im->top, id, sizeof(id));
  const char *rd = img->repo_digests && img->repo_digests[0] ? strchr(img->repo_digests[0], '@') : NULL;
  im->digest = xstrdup(rd ? rd + 1 : img->manifest_digest);
  im->names = names_of(img);
  im->created = created_of(cdata, config_len, img->created_ns);
  im->manifest = TAKE_PTR(mdata);
  im->manifest_digest = xstrdup(img->manifest_digest);
  im->config = TAKE_PTR(cdata);
  im->config_digest = xstrdup(img->id);
  return 0;
}

/* containers/storage refuses a store in which two images share a name: the newer record keeps it. */
static void settle_names(want *w)
{
  for (size_t i = 0; i < w->n_images; i++) {
    want_image *a = &w->images[i];
    char **keep = xcalloc(strv_length(a->names) + 1, sizeof(char *));
    size_t k = 0;
    for (char **p = a->names; *p; p++) {
      bool lost = false;
      for (size_t j = 0; j < w->n_images && !lost; j++) {
        const want_image *b = &w->images[j];
        lost = j != i && strv_contains(b->names, *p) &&
               (b->record_ns > a->record_ns || (b->record_ns == a->record_ns && j < i));
      }
      if (lost)
        log_warn("containers-storage: name %s goes to another image than %s", *p, a->id);
      else
        keep[k++] = xstrdup(*p);
    }
    strv_free(a->names);
    a->names = keep;
  }
}

static int cmp_image(const void *x, const void *y)
{
  return strcmp(((const want_image *) x)->id, ((const want_image *) y)->id);
}

/* ---- layer directories ---- */

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
static bool layer_dir_complete(int driver_fd, int links_fd, want_layer *l)
{
  cleanup_close int fd = openat(driver_fd, l->id, O_RDONLY | O_DIRECTORY | O_CLOEXEC | O_NOFOLLOW);
  if (fd < 0)
    return false;
  char link[CS_LINK_LEN + 2];
  if (read_small(fd, "link", link, sizeof(link)) < 0 || strlen(link) != CS_LINK_LEN ||
      strspn(link, "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567") != CS_LINK_LEN || !link_matches(fd, "diff", l->target))
    return false;
  char lower[8192];
  int r = read_small(fd, "lower", lower, sizeof(lower));
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
static int layer_dir_create(int driver_fd, int links_fd, want_layer *l, crimage_error **err)
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

/* ---- the JSON files ---- */

/* At most this many distinct owners are listed per layer (containers/storage sizes user namespaces by them). */
#define CS_MAX_IDS 65536

static void add_id(uint32_t **ids, size_t *n, uint32_t id)
{
  for (size_t i = 0; i < *n; i++)
    if ((*ids)[i] == id)
      return;
  if (*n >= CS_MAX_IDS)
    return;
  *ids = xrealloc(*ids, (*n + 1) * sizeof(**ids));
  (*ids)[(*n)++] = id;
}

static int cmp_u32(const void *a, const void *b)
{
  uint32_t x = *(const uint32_t *) a, y = *(const uint32_t *) b;
  return x < y ? -1 : x > y;
}

static json_object *id_array(uint32_t *ids, size_t n)
{
  qsort(ids, n, sizeof(*ids), cmp_u32);
  json_object *a = json_object_new_array();
  for (size_t i = 0; i < n; i++)
    json_object_array_add(a, json_object_new_int64(ids[i]));
  return a;
}

/* What containers/storage records of a layer's content when it stores one: its size (here the bytes of its files
 * and link targets: the tar stream it came from is gone) and the owners of its files. The walk never follows a
 * symlink. */
static json_object *measure_layer(const char *dir)
{
  char *paths[] = {(char *) dir, NULL};
  FTS *fts = fts_open(paths, FTS_PHYSICAL | FTS_NOCHDIR, NULL);
  uint64_t size = 0;
  uint32_t *uids = NULL, *gids = NULL;
  size_t n_uids = 0, n_gids = 0;
  for (FTSENT *e; fts && (e = fts_read(fts));) {
    if (e->fts_info == FTS_DP || !e->fts_statp)
      continue;
    const struct stat *st = e->fts_statp;
    if (S_ISREG(st->st_mode) || S_ISLNK(st->st_mode))
      size = u64_add_sat(size, (uint64_t) st->st_size);
    if (e->fts_level > 0) {
      add_id(&uids, &n_uids, st->st_uid);
      add_id(&gids, &n_gids, st->st_gid);
    }
  }
  if (fts)
    fts_close(fts);
  json_object *o = json_object_new_object();
  json_object_object_add(o, "diff-size", json_object_new_int64(size > INT64_MAX ? INT64_MAX : (int64_t) size));
  if (n_uids)
    json_object_object_add(o, "uidset", id_array(uids, n_uids));
  if (n_gids)
    json_object_object_add(o, "gidset", id_array(gids, n_gids));
  free(uids);
  free(gids);
  return o;
}

/* The measurements of a layer kept in the tree's layers.json, when they are there. */
static json_object *measured_before(json_object *old_layers, const char *id)
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

static json_object *layer_json(const want_layer *l)
{
  json_object *o = json_object_new_object();
  json_object_object_add(o, "id", json_object_new_string(l->id));
  if (*l->parent)
    json_object_object_add(o, "parent", json_object_new_string(l->parent));
  cleanup_free char *created = cs_time_string(l->created_ns);
  json_object_object_add(o, "created", json_object_new_string(created));
  json_object_object_add(o, "compressed-diff-digest", json_object_new_string(l->blob));
  if (l->blob_size > 0)
    json_object_object_add(o, "compressed-size", json_object_new_int64(l->blob_size));
  json_object_object_add(o, "diff-digest", json_object_new_string(l->diff_id));
  json_object_object_foreach(l->measured, k, v)
  {
    json_object_object_add(o, k, json_object_get(v));
  }
  if (l->compression)
    json_object_object_add(o, "compression", json_object_new_int(l->compression));
  return o;
}

/* The big-data items containers/image stores with an image: the config under its digest, the manifest under
 * "manifest-<digest>" and under "manifest". */
#define CS_N_BIG_DATA 3
typedef struct big_data {
  char *key;
  const char *data;
  size_t len;
  const char *digest;
} big_data;

static void big_data_of(const want_image *im, big_data out[CS_N_BIG_DATA])
{
  out[0] = (big_data){xstrdup(im->config_digest), im->config, im->config_len, im->config_digest};
  out[1] = (big_data){xasprintf("manifest-%s", im->manifest_digest), im->manifest, im->manifest_len,
                      im->manifest_digest};
  out[2] = (big_data){xstrdup("manifest"), im->manifest, im->manifest_len, im->manifest_digest};
}

static void big_data_clear(big_data bd[CS_N_BIG_DATA])
{
  for (int i = 0; i < CS_N_BIG_DATA; i++)
    free(bd[i].key);
}

static json_object *image_json(const want_image *im)
{
  json_object *o = json_object_new_object();
  json_object_object_add(o, "id", json_object_new_string(im->id));
  json_object_object_add(o, "digest", json_object_new_string(im->digest));
  if (im->names[0]) {
    json_object *names = json_object_new_array();
    for (char **p = im->names; *p; p++)
      json_object_array_add(names, json_object_new_string(*p));
    json_object_object_add(o, "names", names);
  }
  if (*im->top)
    json_object_object_add(o, "layer", json_object_new_string(im->top));
  big_data bd[CS_N_BIG_DATA];
  big_data_of(im, bd);
  json_object *names = json_object_new_array(), *sizes = json_object_new_object(),
              *digests = json_object_new_object();
  for (int i = 0; i < CS_N_BIG_DATA; i++) {
    json_object_array_add(names, json_object_new_string(bd[i].key));
    json_object_object_add(sizes, bd[i].key, json_object_new_int64((int64_t) bd[i].len));
    json_object_object_add(digests, bd[i].key, json_object_new_string(bd[i].digest));
  }
  big_data_clear(bd);
  json_object_object_add(o, "big-data-names", names);
  json_object_object_add(o, "big-data-sizes", sizes);
  json_object_object_add(o, "big-data-digests", digests);
  json_object_object_add(o, "created", json_object_new_string(im->created));
  return o;
}

static const char *json_text(json_object *o)
{
  return json_object_to_json_string_ext(o, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE);
}

/* Replaces a file of the tree unless it already holds data: under the store's lock, with a new last-writer marker
 * once it changed. Returns 1 when written. */
static int replace_locked(cs_lock *lock, const char *path, const char *data, crimage_error **err)
{
  char *old = NULL;
  size_t old_len = 0;
  crimage_error *e = NULL;
  bool same = read_file(path, CS_JSON_MAX_SIZE, &old, &old_len, &e) == 0 && old_len == strlen(data) &&
              memcmp(old, data, old_len) == 0;
  free(old);
  crimage_error_clear(&e);
  if (same)
    return 0;
  int r = cs_lock_acquire(lock, err);
  if (r < 0)
    return r;
  r = write_file_atomic(path, data, strlen(data), 0600, err);
  if (r == 0)
    r = cs_lock_touch(lock, err);
  cs_lock_release(lock);
  return r < 0 ? r : 1;
}

/* The entries of layers.json as it is (an unreadable one counts as empty: the tree is rebuilt from the records). */
static json_object *load_layers(const cstorage *cs)
{
  cleanup_free char *path = xasprintf("%s/layers.json", cs->layers_dir);
  char *data = NULL;
  size_t len = 0;
  crimage_error *e = NULL;
  json_object *o = NULL;
  if (read_file(path, CS_JSON_MAX_SIZE, &data, &len, &e) == 0 &&
      json_parse_any_bytes(data, len, "layers.json", CS_JSON_LIMITS, &o, &e) == 0 &&
      !json_object_is_type(o, json_type_array)) {
    json_object_put(o);
    o = NULL;
  }
  if (e && e->status != CRIMAGE_NOT_FOUND)
    log_warn("containers-storage: %s: %s; rebuilt from crimage's records", path, e->message);
  crimage_error_clear(&e);
  free(data);
  return o ? o : json_object_new_array();
}

static bool is_id(const char *s) { return strlen(s) == CS_ID_LEN && strspn(s, "0123456789abcdef") == CS_ID_LEN; }

/* Writes an image's big-data files that differ from what it is to hold. */
static int write_big_data(const cstorage *cs, const want_image *im, crimage_error **err)
{
  cleanup_free char *dir = xasprintf("%s/%s", cs->images_dir, im->id);
  if (mkdir(dir, 0700) < 0 && errno != EEXIST)
    return crimage_error_set(err, CRIMAGE_INTERNAL, errno, "create `%s`", dir);
  big_data bd[CS_N_BIG_DATA];
  big_data_of(im, bd);
  int r = 0;
  for (int i = 0; i < CS_N_BIG_DATA && r == 0; i++) {
    cleanup_free char *file = cs_big_data_file(bd[i].key);
    cleanup_free char *path = xasprintf("%s/%s", dir, file);
    char *old = NULL;
    size_t old_len = 0;
    crimage_error *e = NULL;
    bool same = read_file(path, bd[i].len + 1, &old, &old_len, &e) == 0 && old_len == bd[i].len &&
                memcmp(old, bd[i].data, old_len) == 0;
    free(old);
    crimage_error_clear(&e);
    if (!same)
      r = write_file_atomic(path, bd[i].data, bd[i].len, 0600, err);
  }
  big_data_clear(bd);
  return r;
}

/* Removes what the tree no longer lists: layer directories, short links and image directories no entry names,
 * and temporary files a crash left. Returns the number of layers and images removed. */
static size_t prune(const cstorage *cs, const want *w, int driver_fd, int links_fd)
{
  size_t removed = 0;
  DIR *d = fdopendir(dup(driver_fd));
  for (struct dirent *de; d && (de = readdir(d));) {
    if (is_id(de->d_name) && !find_layer((want *) w, de->d_name)) {
      int r = rm_tree_at(driver_fd, de->d_name);
      if (r < 0)
        log_warn("containers-storage: cannot remove layer %s: %s", de->d_name, strerror(-r));
      else
        removed++;
    }
  }
  if (d)
    closedir(d);
  d = fdopendir(dup(links_fd));
  for (struct dirent *de; d && (de = readdir(d));) {
    if (de->d_name[0] == '.')
      continue;
    bool keep = false;
    for (size_t i = 0; i < w->n_layers && !keep; i++)
      keep = streq(w->layers[i].link, de->d_name);
    if (!keep)
      unlinkat(links_fd, de->d_name, 0);
  }
  if (d)
    closedir(d);
  const char *dirs[] = {cs->images_dir, cs->layers_dir};
  for (size_t k = 0; k < ARRAY_SIZE(dirs); k++) {
    cleanup_close int fd = open(dirs[k], O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    d = fd >= 0 ? fdopendir(dup(fd)) : NULL;
    for (struct dirent *de; d && (de = readdir(d));) {
      if (strstr(de->d_name, ".json.tmp."))
        unlinkat(fd, de->d_name, 0);
      else if (k == 0 && is_id(de->d_name) && !find_image((want *) w, de->d_name) && rm_tree_at(fd, de->d_name) == 0)
        removed++;
    }
    if (d)
      closedir(d);
  }
  return removed;
}

int cstorage_sync(cstorage *cs, const cstorage_source *src, size_t n, const char *required_id, crimage_error **err)
{
  want w = {0};
  crimage_error *required_err = NULL;
  for (size_t i = 0; i < n; i++) {
    crimage_error *e = NULL;
    if (want_add(&w, &src[i], &e) < 0) {
      if (required_id && streq(src[i].img->id, required_id) && !required_err)
        required_err = TAKE_PTR(e);
      else
        log_warn("containers-storage %s: left out: %s", cs->root, e->message);
      crimage_error_clear(&e);
    }
  }
  settle_names(&w);
  if (w.n_images)
    qsort(w.images, w.n_images, sizeof(*w.images), cmp_image);
  char **dirs = xcalloc(w.n_layers + 1, sizeof(char *));
  for (size_t i = 0; i < w.n_layers; i++)
    dirs[i] = xstrdup(w.layers[i].target);

  pthread_mutex_lock(&cs->sync_lock);
  /* What the new layers stand on is in use from now on; what only the old ones used, once they are gone. */
  pthread_mutex_lock(&cs->in_use_lock);
  for (size_t i = 0; i < w.n_layers; i++)
    strv_add_unique(&cs->in_use, w.layers[i].target);
  pthread_mutex_unlock(&cs->in_use_lock);

  int result = 0;
  size_t changes = 0;
  cleanup_close int driver_fd = open(cs->driver_dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  cleanup_close int links_fd = driver_fd >= 0 ? openat(driver_fd, "l", O_RDONLY | O_DIRECTORY | O_CLOEXEC) : -1;
  if (links_fd < 0)
    result = crimage_error_set(err, CRIMAGE_INTERNAL, errno, "open `%s/l`", cs->driver_dir);

  /* 1. The layer directories, parents first (the layers of each image were added base first). */
  cleanup_json json_object *old = result == 0 ? load_layers(cs) : NULL;
  bool created = false;
  for (size_t i = 0; i < w.n_layers && result == 0; i++) {
    want_layer *l = &w.layers[i];
    if (*l->parent) {
      const want_layer *p = find_layer(&w, l->parent);
      l->lower = p->lower ? xasprintf("l/%s:%s", p->link, p->lower) : xasprintf("l/%s", p->link);
    }
    if (layer_dir_complete(driver_fd, links_fd, l)) {
      l->measured = measured_before(old, l->id);
    } else {
      result = layer_dir_create(driver_fd, links_fd, l, err);
      created = true;
      changes++;
    }
    if (result == 0 && !l->measured)
      l->measured = measure_layer(l->target);
  }
  /* Durable before layers.json names them. */
  if (result == 0 && created && syncfs(driver_fd) < 0)
    result = crimage_error_set(err, CRIMAGE_INTERNAL, errno, "sync `%s`", cs->root);

  /* 2. layers.json: the new layers and the old ones, which images.json may still name. */
  cleanup_free char *layers_path = xasprintf("%s/layers.json", cs->layers_dir);
  cleanup_free char *images_path = xasprintf("%s/images.json", cs->images_dir);
  cleanup_json json_object *wanted_layers = json_object_new_array();
  for (size_t i = 0; i < w.n_layers; i++)
    json_object_array_add(wanted_layers, layer_json(&w.layers[i]));
  if (result == 0) {
    cleanup_json json_object *both = json_object_new_array();
    for (size_t i = 0; i < w.n_layers; i++)
      json_object_array_add(both, json_object_get(json_object_array_get_idx(wanted_layers, i)));
    for (size_t i = 0; i < json_object_array_length(old); i++) {
      json_object *e = json_object_array_get_idx(old, i);
      const char *id = json_get_string(e, "id");
      struct stat st;
      if (id && is_id(id) && !find_layer(&w, id) && fstatat(driver_fd, id, &st, AT_SYMLINK_NOFOLLOW) == 0)
        json_object_array_add(both, json_object_get(e));
    }
    int r = replace_locked(&cs->layers_lock, layers_path, json_text(both), err);
    result = r < 0 ? r : 0;
  }

  /* 3. The images: their big-data files, then images.json. */
  for (size_t i = 0; i < w.n_images && result == 0; i++)
    result = write_big_data(cs, &w.images[i], err);
  if (result == 0) {
    cleanup_json json_object *images = json_object_new_array();
    for (size_t i = 0; i < w.n_images; i++)
      json_object_array_add(images, image_json(&w.images[i]));
    int r = replace_locked(&cs->images_lock, images_path, json_text(images), err);
    result = r < 0 ? r : 0;
  }

  /* 4. layers.json without the layers no image needs, then their directories. */
  if (result == 0) {
    int r = replace_locked(&cs->layers_lock, layers_path, json_text(wanted_layers), err);
    result = r < 0 ? r : 0;
  }
  if (result == 0) {
    changes += prune(cs, &w, driver_fd, links_fd);
    set_in_use(cs, TAKE_PTR(dirs));
  }
  pthread_mutex_unlock(&cs->sync_lock);
  strv_free(dirs);
  want_clear(&w);
  if (result < 0) {
    crimage_error_clear(&required_err);
    return crimage_error_wrap(err, "containers-storage tree %s", cs->root);
  }
  if (required_err) {
    *err = required_err;
    return crimage_error_wrap(err, "containers-storage tree %s", cs->root);
  }
  return (int) (changes > INT_MAX ? INT_MAX : changes);
}
