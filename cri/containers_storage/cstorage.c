#include "cstorage.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
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
#include "tree.h"

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

/* ---- the JSON files ---- */

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

/* Whether the file at path holds exactly data (read up to one byte more than data, so nothing larger is read). */
static bool file_holds(const char *path, const char *data, size_t len)
{
  char *old = NULL;
  size_t old_len = 0;
  crimage_error *e = NULL;
  bool same = read_file(path, len + 1, &old, &old_len, &e) == 0 && old_len == len && memcmp(old, data, len) == 0;
  free(old);
  crimage_error_clear(&e);
  return same;
}

/* Replaces a file of the tree unless it already holds data: under the store's lock, with a new last-writer marker
 * once it changed. Returns 1 when written. */
static int replace_locked(cs_lock *lock, const char *path, const char *data, crimage_error **err)
{
  size_t len = strlen(data);
  if (file_holds(path, data, len))
    return 0;
  int r = cs_lock_acquire(lock, err);
  if (r < 0)
    return r;
  r = write_file_atomic(path, data, len, 0600, err);
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
    if (!file_holds(path, bd[i].data, bd[i].len))
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
    if (is_id(de->d_name) && !want_find_layer((want *) w, de->d_name)) {
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
      else if (k == 0 && is_id(de->d_name) && !want_find_image((want *) w, de->d_name) &&
               rm_tree_at(fd, de->d_name) == 0)
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
  want_settle(&w);
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
      const want_layer *p = want_find_layer(&w, l->parent);
      l->lower = p->lower ? xasprintf("l/%s:%s", p->link, p->lower) : xasprintf("l/%s", p->link);
    }
    if (layer_dir_complete(driver_fd, links_fd, l)) {
      l->measured = layer_measured_before(old, l->id);
    } else {
      result = layer_dir_create(driver_fd, links_fd, l, err);
      created = true;
      changes++;
    }
    if (result == 0 && !l->measured)
      l->measured = layer_measure(l->target);
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
      if (id && is_id(id) && !want_find_layer(&w, id) && fstatat(driver_fd, id, &st, AT_SYMLINK_NOFOLLOW) == 0)
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
