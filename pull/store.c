/* The content store: an OCI image layout (oci-layout, index.json, blobs/<alg>/<hex>) plus ingest/ for blobs being
 * written. index.json holds one descriptor per name of an image per runtime handler, with io.crimage.* annotations
 * that carry everything the in-memory index needs, so start-up never reads a blob.
 *
 * Crash safety: a blob reaches blobs/ only by rename() of a fully written, verified and fsynced ingest file; index.json
 * is replaced atomically (write_file_atomic) before a change becomes visible in memory. A killed writer therefore
 * leaves at most a partial file in ingest/ (resumed later) and the old or the new index.json. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <sys/file.h>
#include <sys/stat.h>

#include "common/digest.h"
#include "common/fsutil.h"
#include "common/json.h"
#include "common/log.h"
#include "common/util.h"
#include "pull/store.h"
#include "pull/unpack.h"

/* index.json is read whole and parsed into a tree before its entries are checked: its text and the tree are bounded
 * (json_limits) so that opening a store costs at most about 64 MiB. A descriptor (one name of an image) takes about
 * 1.5 KiB of text and 7 KiB of tree, so the limits hold about 7000 names; index_write refuses an index that would
 * not load again. */
#define INDEX_MAX_SIZE ((size_t) 16 << 20)
#define INDEX_JSON_LIMITS JSON_LIMITS(48u << 20, 65536)
#define RECORD_MAX_LAYERS 4096
#define NAME_MAX_LEN 4096
#define TAG_MAX_LEN 128
#define USER_MAX_LEN 4096
#define MEDIA_TYPE_MAX_LEN 256
#define KEY_MAX_LEN 8192
#define ID_PREFIX_MIN 3
#define INGEST_WRITEBACK_STEP ((uint64_t) 8 << 20)

#define OCI_INDEX_MEDIA_TYPE "application/vnd.oci.image.index.v1+json"
#define ANN_REF_NAME "org.opencontainers.image.ref.name"
#define ANN_HANDLER "io.crimage.runtime-handler"
#define ANN_NAME "io.crimage.image.name"
#define ANN_REPO_DIGEST "io.crimage.repo-digest"
#define ANN_ID "io.crimage.image.id"
#define ANN_SIZE "io.crimage.image.size"
#define ANN_USER "io.crimage.image.user"
#define ANN_PLATFORM "io.crimage.image.platform"
#define PLATFORM_MAX_LEN 100
#define ANN_CREATED "io.crimage.created"
#define ANN_LAYERS "io.crimage.layers"
#define ANN_DIFF_IDS "io.crimage.diff-ids"

typedef struct record {
  char *handler;
  char *id;
  char *manifest_digest;
  char *manifest_media_type;
  uint64_t manifest_size;
  char **repo_tags;    /* never NULL */
  char **repo_digests; /* never NULL */
  char **layers;
  char **diff_ids; /* NULL-terminated, possibly empty */       /* never NULL */
  uint64_t size;
  char *user;
  char *platform; /* what an index was resolved for, "" for a lone manifest, NULL unknown */
  int64_t created_ns;
} record;

typedef struct record_set {
  record **v;
  size_t n;
} record_set;

struct store {
  char *root;
  char *index_path;
  char *ingest_dir;
  /* Serializes every change of the records (and the GC that follows a removal). The records are only written
   * while holding it, so a writer may read them without the rwlock. */
  pthread_mutex_t write_lock;
  /* Guards recs for readers; a writer holds it exclusively only to swap in the new set, never across disk I/O. */
  pthread_rwlock_t lock;
  record_set recs;
  /* Pulls in progress (store_hold) with what each relies on, and the blobs whose deletion waits for them; guarded
   * by write_lock. */
  unsigned holds;
  store_holder *holders;
  char **deferred_gc;
  /* How long and how much unreferenced content is kept (store_options). */
  int64_t retention_ms;
  uint64_t unreferenced_max;
  /* The sweeper thread (store_start_sweeper); sweep_lock guards the flags. */
  pthread_mutex_t sweep_lock;
  pthread_cond_t sweep_cond; /* on CLOCK_MONOTONIC */
  pthread_t sweeper;
  bool sweeper_started, sweeper_stop, sweep_kicked;
  char *layers_dir; /* <root>/layers/sha256 */
  store_layer_keeper_fn keeper;
  void *keeper_userdata;
  /* Usage of each unpacked layer, measured once (a walk of a big layer is expensive and ImageFsInfo is frequent). */
  pthread_mutex_t usage_lock;
  struct layer_usage *usage;
};

typedef struct layer_usage {
  struct layer_usage *next;
  char *diff_id;
  uint64_t bytes, inodes;
} layer_usage;

struct store_holder {
  store_holder *next;
  store *s;
  char **pins; /* digests the sweep leaves alone; NULL-terminated or NULL */
};

struct store_ingest {
  store *s;
  char *digest;
  char *path;
  char *blob_path;
  int fd;
  digester *d;
  uint64_t offset;
  uint64_t flushed; /* writeback started up to here (sync_file_range) */
  int64_t expected;
};

/* ---- records ---- */

static void record_free(record *r)
{
  if (!r)
    return;
  free(r->handler);
  free(r->id);
  free(r->manifest_digest);
  free(r->manifest_media_type);
  strv_free(r->repo_tags);
  strv_free(r->repo_digests);
  strv_free(r->layers);
  strv_free(r->diff_ids);
  free(r->user);
  free(r->platform);
  free(r);
}

static record *record_copy(const record *r)
{
  record *c = xcalloc(1, sizeof(*c));
  c->handler = xstrdup(r->handler);
  c->id = xstrdup(r->id);
  c->manifest_digest = xstrdup(r->manifest_digest);
  c->manifest_media_type = xstrdup(r->manifest_media_type);
  c->manifest_size = r->manifest_size;
  c->repo_tags = strv_copy(r->repo_tags);
  c->repo_digests = strv_copy(r->repo_digests);
  c->layers = strv_copy(r->layers);
  c->diff_ids = strv_copy(r->diff_ids);
  c->size = r->size;
  c->user = xstrdup(r->user);
  c->platform = r->platform ? xstrdup(r->platform) : NULL;
  c->created_ns = r->created_ns;
  return c;
}

static void record_set_clear(record_set *set)
{
  for (size_t i = 0; i < set->n; i++)
    record_free(set->v[i]);
  free(set->v);
  set->v = NULL;
  set->n = 0;
}
static void record_set_clearp(record_set *set) { record_set_clear(set); }
#define cleanup_record_set _cleanup_(record_set_clearp)

static void record_set_append(record_set *set, record *r)
{
  set->v = xrealloc(set->v, (set->n + 1) * sizeof(record *));
  set->v[set->n++] = r;
}

static void record_set_copy(const record_set *from, record_set *to)
{
  to->v = from->n ? xcalloc(from->n, sizeof(record *)) : NULL;
  to->n = from->n;
  for (size_t i = 0; i < from->n; i++)
    to->v[i] = record_copy(from->v[i]);
}

static record *record_set_find_id(const record_set *set, const char *handler, const char *id)
{
  for (size_t i = 0; i < set->n; i++)
    if (streq(set->v[i]->handler, handler) && streq(set->v[i]->id, id))
      return set->v[i];
  return NULL;
}

/* Whether r needs the blob, or the unpacked layer, named digest. */
static bool record_references(const record *r, const char *digest)
{
  return streq(r->manifest_digest, digest) || streq(r->id, digest) || strv_contains(r->layers, digest) ||
         strv_contains(r->diff_ids, digest);
}

static bool record_set_references(const record_set *set, const char *digest)
{
  for (size_t i = 0; i < set->n; i++)
    if (record_references(set->v[i], digest))
      return true;
  return false;
}

static store_image *record_to_image(const record *r)
{
  store_image *img = xcalloc(1, sizeof(*img));
  img->handler = xstrdup(r->handler);
  img->id = xstrdup(r->id);
  img->manifest_digest = xstrdup(r->manifest_digest);
  img->manifest_media_type = xstrdup(r->manifest_media_type);
  img->repo_tags = strv_copy(r->repo_tags);
  img->repo_digests = strv_copy(r->repo_digests);
  img->layers = strv_copy(r->layers);
  img->diff_ids = strv_copy(r->diff_ids);
  img->size = r->size;
  img->user = xstrdup(r->user);
  img->platform = r->platform ? xstrdup(r->platform) : NULL;
  img->created_ns = r->created_ns;
  img->pinned = false;
  return img;
}

void store_image_free(store_image *img)
{
  if (!img)
    return;
  free(img->handler);
  free(img->id);
  free(img->manifest_digest);
  free(img->manifest_media_type);
  strv_free(img->repo_tags);
  strv_free(img->repo_digests);
  strv_free(img->layers);
  strv_free(img->diff_ids);
  free(img->user);
  free(img->platform);
  free(img);
}

void store_image_list_free(store_image **list, size_t n)
{
  if (!list)
    return;
  for (size_t i = 0; i < n; i++)
    store_image_free(list[i]);
  free(list);
}

/* ---- paths ---- */

const char *store_root(const store *s) { return s->root; }

const char *store_layers_dir(const store *s) { return s->layers_dir; }

char *store_layer_path(store *s, const char *diff_id)
{
  /* Only sha256 layers are unpacked: the directory holding them is created for that algorithm alone. */
  if (!digest_valid(diff_id) || !str_has_prefix(diff_id, "sha256:"))
    return NULL;
  return xasprintf("%s/%s", s->layers_dir, digest_hex(diff_id));
}

bool store_layer_exists(store *s, const char *diff_id)
{
  cleanup_free char *dir = store_layer_path(s, diff_id);
  struct stat st;
  return dir && lstat(dir, &st) == 0 && S_ISDIR(st.st_mode);
}

void store_set_layer_keeper(store *s, store_layer_keeper_fn fn, void *userdata)
{
  pthread_mutex_lock(&s->write_lock);
  s->keeper = fn;
  s->keeper_userdata = userdata;
  pthread_mutex_unlock(&s->write_lock);
}

/* "sha256:<hex>" -> "<root>/blobs/sha256/<hex>"; the digest must be valid (it becomes a path). */
static char *blob_path(const store *s, const char *digest)
{
  return xasprintf("%s/blobs/%.*s/%s", s->root, (int) (strchr(digest, ':') - digest), digest, digest_hex(digest));
}

static char *ingest_path(const store *s, const char *digest)
{
  return xasprintf("%s/%.*s-%s", s->ingest_dir, (int) (strchr(digest, ':') - digest), digest, digest_hex(digest));
}

static char *digest_algorithm(const char *digest) { return xstrndup(digest, (size_t) (strchr(digest, ':') - digest)); }

char *store_blob_path(store *s, const char *digest)
{
  if (!digest_valid(digest))
    return NULL;
  return blob_path(s, digest);
}

/* ---- blobs ---- */

bool store_blob_exists(store *s, const char *digest, uint64_t *ret_size)
{
  if (!digest_valid(digest))
    return false;
  cleanup_free char *path = blob_path(s, digest);
  struct stat st;
  if (stat(path, &st) < 0 || !S_ISREG(st.st_mode))
    return false;
  if (ret_size)
    *ret_size = (uint64_t) st.st_size;
  return true;
}

int store_blob_read(store *s, const char *digest, size_t max, char **ret_data, size_t *ret_len, crimage_error **err)
{
  if (!digest_valid(digest))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, EINVAL, "invalid digest `%.80s`", digest ? digest : "");
  cleanup_free char *path = blob_path(s, digest);
  cleanup_free char *data = NULL;
  size_t len = 0;
  int r = read_file(path, max, &data, &len, err);
  if (r < 0)
    return crimage_error_wrap(err, "reading blob %s", digest);

  /* Blobs are verified when stored; checking again is cheap for the small blobs read whole (manifests, configs)
   * and turns silent disk corruption into a clear error. */
  cleanup_free char *algo = digest_algorithm(digest);
  cleanup_digester digester *d = digester_new(algo);
  char actual[DIGEST_MAX_LEN + 1];
  digester_update(d, data, len);
  digester_final(d, actual);
  if (!streq(actual, digest))
    return crimage_error_set(err, CRIMAGE_DATA_LOSS, EIO, "blob %s is corrupt on disk (content hashes to %s)", digest,
                             actual);
  *ret_data = TAKE_PTR(data);
  if (ret_len)
    *ret_len = len;
  return 0;
}

int store_blob_put(store *s, const char *digest, const void *data, size_t len, crimage_error **err)
{
  if (!digest_valid(digest))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, EINVAL, "invalid digest `%.80s`", digest ? digest : "");
  if (store_blob_exists(s, digest, NULL))
    return 0;
  store_ingest *in = NULL;
  int r = store_ingest_begin(s, digest, (int64_t) len, &in, err);
  if (r == -EEXIST)
    return 0;
  if (r < 0)
    return r;
  if (store_ingest_offset(in) > 0) {
    r = store_ingest_truncate(in, err);
    if (r < 0) {
      store_ingest_abort(in, false);
      return r;
    }
  }
  r = store_ingest_write(in, data, len, err);
  if (r < 0) {
    store_ingest_abort(in, false);
    return r;
  }
  return store_ingest_commit(in, err);
}

/* ---- ingest ---- */

static void ingest_free(store_ingest *in)
{
  if (!in)
    return;
  if (in->fd >= 0)
    close(in->fd); /* also drops the flock */
  digester_free(in->d);
  free(in->digest);
  free(in->path);
  free(in->blob_path);
  free(in);
}
static void ingest_freep(store_ingest **in) { ingest_free(*in); }

/* Hashes the bytes already in the partial file so writing can resume after them. */
static int ingest_rehash(store_ingest *in, crimage_error **err)
{
  if (lseek(in->fd, 0, SEEK_SET) < 0)
    return crimage_error_set(err, CRIMAGE_INTERNAL, errno, "seek `%s`", in->path);
  cleanup_free char *buf = xmalloc(1 << 16);
  uint64_t off = 0;
  for (;;) {
    ssize_t n = read(in->fd, buf, 1 << 16);
    if (n < 0 && errno == EINTR)
      continue;
    if (n < 0)
      return crimage_error_set(err, CRIMAGE_INTERNAL, errno, "read `%s`", in->path);
    if (n == 0)
      break;
    digester_update(in->d, buf, (size_t) n);
    off += (uint64_t) n;
  }
  in->offset = off;
  in->flushed = off;
  return 0;
}

static int ingest_reset(store_ingest *in, crimage_error **err)
{
  if (ftruncate(in->fd, 0) < 0)
    return crimage_error_set(err, CRIMAGE_INTERNAL, errno, "truncate `%s`", in->path);
  if (lseek(in->fd, 0, SEEK_SET) < 0)
    return crimage_error_set(err, CRIMAGE_INTERNAL, errno, "seek `%s`", in->path);
  char scratch[DIGEST_MAX_LEN + 1];
  digester_final(in->d, scratch); /* resets the digester */
  in->offset = 0;
  in->flushed = 0;
  return 0;
}

/* Takes the ingest file's lock; with a cancel callback by polling (a blocked flock cannot be interrupted by a
 * cancelled RPC), else by blocking. The wait has no time limit: the writer holding the lock makes its own progress
 * checks. */
static int ingest_lock(int fd, const char *path, store_cancelled_fn cancelled, void *userdata, crimage_error **err)
{
  for (;;) {
    int r = flock(fd, cancelled ? LOCK_EX | LOCK_NB : LOCK_EX);
    if (r == 0)
      return 0;
    if (errno == EINTR)
      continue;
    if (errno != EWOULDBLOCK || !cancelled)
      return crimage_error_set(err, CRIMAGE_INTERNAL, errno, "lock ingest file `%s`", path);
    if (cancelled(userdata))
      return crimage_error_set(err, CRIMAGE_CANCELLED, ECANCELED, "cancelled while waiting for `%s`", path);
    struct timespec ts = {0, 20 * 1000 * 1000};
    nanosleep(&ts, NULL);
  }
}

int store_ingest_begin(store *s, const char *digest, int64_t expected_size, store_ingest **ret, crimage_error **err)
{
  return store_ingest_begin_cancellable(s, digest, expected_size, NULL, NULL, ret, err);
}

int store_ingest_begin_cancellable(store *s, const char *digest, int64_t expected_size, store_cancelled_fn cancelled,
                                   void *userdata, store_ingest **ret, crimage_error **err)
{
  if (!digest_valid(digest))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, EINVAL, "invalid digest `%.80s`", digest ? digest : "");
  if (store_blob_exists(s, digest, NULL))
    return -EEXIST;

  cleanup_free char *algo = digest_algorithm(digest);
  _cleanup_(ingest_freep) store_ingest *in = xcalloc(1, sizeof(*in));
  in->s = s;
  in->fd = -1;
  in->digest = xstrdup(digest);
  in->path = ingest_path(s, digest);
  in->blob_path = blob_path(s, digest);
  in->d = digester_new(algo);
  in->expected = expected_size;

  /* Lock-file dance: the file we locked may have been renamed into blobs/ or deleted by the writer we waited for,
   * so after getting the lock check that the path still names our file, else start over. */
  for (;;) {
    int fd = open(in->path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0644);
    if (fd < 0)
      return crimage_error_set(err, CRIMAGE_INTERNAL, errno, "open ingest file `%s`", in->path);
    in->fd = fd;
    int r = ingest_lock(fd, in->path, cancelled, userdata, err);
    if (r < 0)
      return r;
    struct stat a, b;
    if (fstat(fd, &a) < 0)
      return crimage_error_set(err, CRIMAGE_INTERNAL, errno, "stat `%s`", in->path);
    if (stat(in->path, &b) < 0 || a.st_dev != b.st_dev || a.st_ino != b.st_ino) {
      close(TAKE_FD(in->fd));
      continue;
    }
    if (!S_ISREG(a.st_mode))
      return crimage_error_set(err, CRIMAGE_INTERNAL, EINVAL, "ingest file `%s` is not a regular file", in->path);
    if (store_blob_exists(s, digest, NULL)) {
      /* The writer we waited for committed it; drop the empty file we created (we hold its lock). */
      unlink(in->path);
      return -EEXIST;
    }
    break;
  }

  int r = ingest_rehash(in, err);
  if (r < 0)
    return r;
  if (expected_size >= 0 && in->offset > (uint64_t) expected_size) {
    log_warn("partial blob %s is larger than expected (%" PRIu64 " > %" PRId64 "), restarting it", digest, in->offset,
             expected_size);
    r = ingest_reset(in, err);
    if (r < 0)
      return r;
  }
  if (in->offset > 0)
    log_debug("resuming blob %s at offset %" PRIu64, digest, in->offset);
  *ret = TAKE_PTR(in);
  return 0;
}

uint64_t store_ingest_offset(const store_ingest *in) { return in->offset; }

int store_ingest_write(store_ingest *in, const void *data, size_t len, crimage_error **err)
{
  if (in->expected >= 0 && (len > (uint64_t) in->expected || in->offset > (uint64_t) in->expected - len))
    return crimage_error_set(err, CRIMAGE_DATA_LOSS, EFBIG, "blob %s is larger than its descriptor says (%" PRId64
                             " bytes)", in->digest, in->expected);
  int r = write_all(in->fd, data, len);
  if (r < 0) {
    /* Drop a short write so the file again holds exactly the hashed bytes (a later resume re-hashes it anyway). */
    if (ftruncate(in->fd, (off_t) in->offset) == 0)
      (void) lseek(in->fd, (off_t) in->offset, SEEK_SET);
    return crimage_error_set(err, r == -ENOSPC ? CRIMAGE_RESOURCE_EXHAUSTED : CRIMAGE_INTERNAL, -r,
                             "write ingest file `%s`", in->path);
  }
  digester_update(in->d, data, len);
  in->offset += len;
  if (in->offset - in->flushed >= INGEST_WRITEBACK_STEP) {
    /* Start writing back what has arrived, without waiting: the fsync at commit then finds little left to do,
     * instead of stalling this transfer while a whole layer goes to disk. */
    (void) sync_file_range(in->fd, (off_t) in->flushed, (off_t) (in->offset - in->flushed), SYNC_FILE_RANGE_WRITE);
    in->flushed = in->offset;
  }
  return 0;
}

int store_ingest_truncate(store_ingest *in, crimage_error **err) { return ingest_reset(in, err); }

int store_ingest_replay(store_ingest *in, store_ingest_replay_fn fn, void *userdata, crimage_error **err)
{
  if (in->offset == 0)
    return 0;
  cleanup_free char *buf = xmalloc(1 << 17);
  uint64_t off = 0;
  while (off < in->offset) {
    size_t want = in->offset - off < (1 << 17) ? (size_t) (in->offset - off) : (1 << 17);
    ssize_t n = pread(in->fd, buf, want, (off_t) off);
    if (n < 0 && errno == EINTR)
      continue;
    if (n < 0)
      return crimage_error_set(err, CRIMAGE_INTERNAL, errno, "read `%s`", in->path);
    if (n == 0)
      return crimage_error_set(err, CRIMAGE_INTERNAL, EIO, "`%s` is shorter than its %" PRIu64 " hashed bytes",
                               in->path, in->offset);
    int r = fn(userdata, buf, (size_t) n, err);
    if (r < 0)
      return r;
    off += (uint64_t) n;
  }
  return 0;
}

int store_ingest_commit(store_ingest *in, crimage_error **err)
{
  _cleanup_(ingest_freep) store_ingest *owned = in;
  (void) owned; /* it only frees the ingest on every return (clang counts a cleanup as no use) */
  char actual[DIGEST_MAX_LEN + 1];
  digester_final(in->d, actual);
  if (in->expected >= 0 && in->offset != (uint64_t) in->expected) {
    unlink(in->path);
    return crimage_error_set(err, CRIMAGE_DATA_LOSS, EIO, "blob %s has %" PRIu64 " bytes, expected %" PRId64,
                             in->digest, in->offset, in->expected);
  }
  if (!streq(actual, in->digest)) {
    unlink(in->path);
    return crimage_error_set(err, CRIMAGE_DATA_LOSS, EIO, "blob content hashes to %s, expected %s", actual,
                             in->digest);
  }
  if (fsync(in->fd) < 0)
    return crimage_error_set(err, CRIMAGE_INTERNAL, errno, "fsync `%s`", in->path);
  cleanup_free char *algo = digest_algorithm(in->digest);
  cleanup_free char *dir = xasprintf("%s/blobs/%s", in->s->root, algo);
  int r = mkdir_p(dir, 0700, err);
  if (r < 0)
    return r;
  if (rename(in->path, in->blob_path) < 0)
    return crimage_error_set(err, CRIMAGE_INTERNAL, errno, "move blob %s into place", in->digest);
  /* One directory fsync: the rename is a single journal transaction, so making the new name durable makes the old
   * one's removal durable too (and a stale partial after a crash would only be resumed or swept). */
  r = fsync_dir(dir);
  if (r < 0)
    return crimage_error_set(err, CRIMAGE_INTERNAL, -r, "fsync `%s`", dir);
  return 0;
}

void store_ingest_abort(store_ingest *in, bool keep_partial)
{
  if (!in)
    return;
  /* An empty partial resumes nothing (a blob that always fails would leave one). Still under our lock: nobody else
   * is using this file. */
  if (!keep_partial || in->offset == 0)
    unlink(in->path);
  ingest_free(in);
}

/* ---- index.json ---- */

static void ann_add(json_object *ann, const char *key, const char *value)
{
  json_object_object_add(ann, key, json_object_new_string(value));
}

/* "a,b,c" of a digest list (what parse_layers reads back). */
static char *join_digests(char *const *v)
{
  size_t total = 1;
  for (char *const *l = v; *l; l++)
    total += strlen(*l) + 1;
  char *out = xmalloc(total);
  size_t off = 0;
  for (char *const *l = v; *l; l++)
    off += (size_t) sprintf(out + off, "%s%s", off ? "," : "", *l);
  out[off] = '\0';
  return out;
}

/* One descriptor for name (ref_name for a tag, else NULL) of record r. */
static json_object *descriptor_new(const record *r, const char *ref_name, const char *name, const char *repo_digest)
{
  json_object *desc = json_object_new_object();
  json_object_object_add(desc, "mediaType", json_object_new_string(r->manifest_media_type));
  json_object_object_add(desc, "digest", json_object_new_string(r->manifest_digest));
  json_object_object_add(desc, "size", json_object_new_int64((int64_t) r->manifest_size));
  json_object *ann = json_object_new_object();
  if (ref_name)
    ann_add(ann, ANN_REF_NAME, ref_name);
  ann_add(ann, ANN_HANDLER, r->handler);
  if (name)
    ann_add(ann, ANN_NAME, name);
  if (repo_digest)
    ann_add(ann, ANN_REPO_DIGEST, repo_digest);
  ann_add(ann, ANN_ID, r->id);
  char num[32];
  snprintf(num, sizeof(num), "%" PRIu64, r->size);
  ann_add(ann, ANN_SIZE, num);
  ann_add(ann, ANN_USER, r->user);
  if (r->platform)
    ann_add(ann, ANN_PLATFORM, r->platform);
  snprintf(num, sizeof(num), "%" PRId64, r->created_ns);
  ann_add(ann, ANN_CREATED, num);
  cleanup_free char *layers = join_digests(r->layers);
  ann_add(ann, ANN_LAYERS, layers);
  if (r->diff_ids[0]) {
    cleanup_free char *diff_ids = join_digests(r->diff_ids);
    ann_add(ann, ANN_DIFF_IDS, diff_ids);
  }
  json_object_object_add(desc, "annotations", ann);
  return desc;
}

/* "docker.io/library/busybox:latest" -> "docker.io/library/busybox" (the tag follows the last ':' after the last
 * '/', so a registry port is not mistaken for a tag). */
static char *tag_repo_name(const char *tagged)
{
  const char *slash = strrchr(tagged, '/');
  const char *colon = strrchr(slash ? slash : tagged, ':');
  return colon ? xstrndup(tagged, (size_t) (colon - tagged)) : NULL;
}

static int index_write(store *s, const record_set *set, crimage_error **err)
{
  cleanup_json json_object *idx = json_object_new_object();
  json_object_object_add(idx, "schemaVersion", json_object_new_int(2));
  json_object_object_add(idx, "mediaType", json_object_new_string(OCI_INDEX_MEDIA_TYPE));
  json_object *manifests = json_object_new_array();
  json_object_object_add(idx, "manifests", manifests);
  for (size_t i = 0; i < set->n; i++) {
    const record *r = set->v[i];
    for (char **t = r->repo_tags; *t; t++) {
      cleanup_free char *name = tag_repo_name(*t);
      /* Carry the repo digest pulled under the same name along, so a lone tag descriptor is a complete name. */
      const char *rd = NULL;
      for (char **d = r->repo_digests; name && *d && !rd; d++) {
        size_t nl = strlen(name);
        if (strncmp(*d, name, nl) == 0 && (*d)[nl] == '@')
          rd = *d + nl + 1;
      }
      json_object_array_add(manifests, descriptor_new(r, *t, name, rd));
    }
    for (char **d = r->repo_digests; *d; d++) {
      const char *at = strchr(*d, '@');
      cleanup_free char *name = xstrndup(*d, (size_t) (at - *d));
      json_object_array_add(manifests, descriptor_new(r, NULL, name, at + 1));
    }
    /* An image without any name stays listed (untagged), so it still needs a descriptor. */
    if (!r->repo_tags[0] && !r->repo_digests[0])
      json_object_array_add(manifests, descriptor_new(r, NULL, NULL, NULL));
  }
  size_t len = 0;
  const char *text = json_object_to_json_string_length(idx, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE,
                                                       &len);
  cleanup_error crimage_error *lerr = NULL;
  if (len > INDEX_MAX_SIZE || json_check_limits(text, len, "index.json", INDEX_JSON_LIMITS, &lerr) < 0)
    return crimage_error_set(err, CRIMAGE_RESOURCE_EXHAUSTED, EFBIG,
                             "the image index would be too large to load again (%zu names of images)",
                             json_object_array_length(manifests));
  int r = write_file_atomic(s->index_path, text, len, 0644, err);
  if (r < 0)
    return crimage_error_wrap(err, "updating the image index");
  return 0;
}

/* Digits only: strtoull would also take " -1" (as 2^64-1) or "+5". */
static bool parse_u64(const char *s, uint64_t *ret) { return parse_u64_decimal(s, ret) == 0; }

/* Every string of a record goes into CRI replies: UTF-8 (or every ListImages reply would be invalid protobuf), no
 * control characters, bounded. */
static bool string_ok(const char *s, size_t max)
{
  if (!s)
    return false;
  size_t len = strlen(s);
  if (len > max || !utf8_valid(s, len))
    return false;
  for (const unsigned char *p = (const unsigned char *) s; *p; p++)
    if (*p < 0x20 || *p == 0x7f)
      return false;
  return true;
}

bool store_handler_valid(const char *h)
{
  if (!h)
    return false;
  size_t len = strlen(h);
  if (len == 0)
    return true;
  if (len > STORE_HANDLER_MAX_LEN)
    return false;
  for (size_t i = 0; i < len; i++) {
    char c = h[i];
    bool alnum = (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9');
    if (!alnum && (c != '-' || i == 0 || i == len - 1))
      return false;
  }
  return true;
}

/* Splits "a,b,c" into validated digests. */
static char **parse_layers(const char *s)
{
  char **v = xcalloc(1, sizeof(char *));
  if (!*s)
    return v;
  size_t n = 0;
  const char *p = s;
  for (;;) {
    const char *comma = strchr(p, ',');
    size_t l = comma ? (size_t) (comma - p) : strlen(p);
    cleanup_free char *d = xstrndup(p, l);
    if (!digest_valid(d) || ++n > RECORD_MAX_LAYERS) {
      strv_free(v);
      return NULL;
    }
    /* Layers may repeat (an image can contain the same layer twice): keep order and duplicates. */
    size_t len = strv_length(v);
    v = xrealloc(v, (len + 2) * sizeof(char *));
    v[len] = TAKE_PTR(d);
    v[len + 1] = NULL;
    if (!comma)
      break;
    p = comma + 1;
  }
  return v;
}

/* Merges one descriptor of index.json into set. Returns false (with a reason) for a corrupt entry. */
static bool load_descriptor(record_set *set, json_object *desc, const char **ret_reason)
{
  json_object *ann = json_get_object(desc, "annotations");
  const char *media_type = json_get_string(desc, "mediaType");
  const char *manifest = json_get_string(desc, "digest");
  int64_t msize = -1;
  if (!json_object_is_type(desc, json_type_object) || !ann) {
    *ret_reason = "not a descriptor with annotations";
    return false;
  }
  if (!string_ok(media_type, MEDIA_TYPE_MAX_LEN) || !digest_valid(manifest) || !json_get_int64(desc, "size", &msize) ||
      msize < 0) {
    *ret_reason = "bad mediaType, digest or size";
    return false;
  }
  const char *handler = json_get_string(ann, ANN_HANDLER);
  const char *id = json_get_string(ann, ANN_ID);
  const char *ref_name = json_get_string(ann, ANN_REF_NAME);
  const char *name = json_get_string(ann, ANN_NAME);
  const char *repo_digest = json_get_string(ann, ANN_REPO_DIGEST);
  const char *user = json_get_string(ann, ANN_USER);
  const char *plat = json_get_string(ann, ANN_PLATFORM);
  const char *layers_s = json_get_string(ann, ANN_LAYERS);
  const char *diff_ids_s = json_get_string(ann, ANN_DIFF_IDS);
  uint64_t size, created;
  if (!store_handler_valid(handler) || !digest_valid(id)) {
    *ret_reason = "missing or bad " ANN_HANDLER " / " ANN_ID;
    return false;
  }
  if (!parse_u64(json_get_string(ann, ANN_SIZE), &size) || !parse_u64(json_get_string(ann, ANN_CREATED), &created) ||
      created > INT64_MAX || !string_ok(user, USER_MAX_LEN) || !layers_s) {
    *ret_reason = "missing or bad size, created, user or layers annotation";
    return false;
  }
  cleanup_free char *ref_repo = ref_name ? tag_repo_name(ref_name) : NULL;
  if (ref_name && (!string_ok(ref_name, NAME_MAX_LEN + TAG_MAX_LEN + 1) || !ref_repo)) {
    *ret_reason = "bad " ANN_REF_NAME;
    return false;
  }
  if ((name && !string_ok(name, NAME_MAX_LEN)) || (repo_digest && !digest_valid(repo_digest))) {
    *ret_reason = "bad " ANN_NAME " or " ANN_REPO_DIGEST;
    return false;
  }
  if (plat && !string_ok(plat, PLATFORM_MAX_LEN)) {
    *ret_reason = "bad " ANN_PLATFORM;
    return false;
  }
  cleanup_strv char **layers = parse_layers(layers_s);
  if (!layers) {
    *ret_reason = "bad " ANN_LAYERS;
    return false;
  }
  /* Optional: records written before diff_ids were kept have none. */
  cleanup_strv char **diff_ids = parse_layers(diff_ids_s ? diff_ids_s : "");
  if (!diff_ids || (diff_ids[0] && strv_length(diff_ids) != strv_length(layers))) {
    *ret_reason = "bad " ANN_DIFF_IDS;
    return false;
  }

  record *r = record_set_find_id(set, handler, id);
  if (!r) {
    r = xcalloc(1, sizeof(*r));
    r->handler = xstrdup(handler);
    r->id = xstrdup(id);
    r->manifest_digest = xstrdup(manifest);
    r->manifest_media_type = xstrdup(media_type);
    r->manifest_size = (uint64_t) msize;
    r->repo_tags = xcalloc(1, sizeof(char *));
    r->repo_digests = xcalloc(1, sizeof(char *));
    r->layers = TAKE_PTR(layers);
    r->diff_ids = TAKE_PTR(diff_ids);
    r->size = size;
    r->user = xstrdup(user);
    r->platform = plat ? xstrdup(plat) : NULL;
    r->created_ns = (int64_t) created;
    record_set_append(set, r);
  }
  if (ref_name)
    strv_add_unique(&r->repo_tags, ref_name);
  if (name && repo_digest) {
    cleanup_free char *rd = xasprintf("%s@%s", name, repo_digest);
    strv_add_unique(&r->repo_digests, rd);
  }
  return true;
}

static bool record_blobs_present(store *s, const record *r, const char **ret_missing)
{
  if (!store_blob_exists(s, r->manifest_digest, NULL)) {
    *ret_missing = r->manifest_digest;
    return false;
  }
  if (!store_blob_exists(s, r->id, NULL)) {
    *ret_missing = r->id;
    return false;
  }
  for (char **l = r->layers; *l; l++)
    if (!store_blob_exists(s, *l, NULL)) {
      *ret_missing = *l;
      return false;
    }
  return true;
}

/* Loads index.json into s->recs; *ret_dirty tells that entries were dropped and the file should be rewritten. */
static int index_load(store *s, bool *ret_dirty, crimage_error **err)
{
  cleanup_free char *data = NULL;
  size_t len = 0;
  cleanup_error crimage_error *rerr = NULL;
  int r = read_file(s->index_path, INDEX_MAX_SIZE, &data, &len, &rerr);
  if (r == -ENOENT) {
    *ret_dirty = true;
    return 0;
  }
  if (r < 0)
    return crimage_error_set(err, rerr->status, rerr->errnum, "%s", rerr->message);

  /* The file is replaced atomically, so a document that does not parse is not a torn write but damage from
   * outside; refuse to start rather than forget (and later garbage-collect) every image. */
  cleanup_json json_object *idx = NULL;
  cleanup_error crimage_error *perr = NULL;
  /* Any bytes: an entry whose strings are not UTF-8 is dropped on its own below, the others load. */
  r = json_parse_any_bytes(data, len, "index.json", INDEX_JSON_LIMITS, &idx, &perr);
  if (r == -E2BIG)
    return crimage_error_set(err, CRIMAGE_RESOURCE_EXHAUSTED, E2BIG, "`%s` holds more than a store may (%s)",
                             s->index_path, perr->message);
  if (r < 0)
    return crimage_error_set(err, CRIMAGE_DATA_LOSS, 0, "`%s` is corrupt (%s); move it aside to start empty",
                             s->index_path, perr ? perr->message : "parse error");
  json_object *manifests = json_get_array(idx, "manifests");
  if (!json_object_is_type(idx, json_type_object) || (!manifests && json_object_object_get_ex(idx, "manifests", NULL)))
    return crimage_error_set(err, CRIMAGE_DATA_LOSS, EINVAL, "`%s` is not an OCI image index", s->index_path);

  bool dirty = false;
  cleanup_record_set record_set set = {0};
  size_t n = manifests ? json_object_array_length(manifests) : 0;
  for (size_t i = 0; i < n; i++) {
    const char *reason = NULL;
    if (!load_descriptor(&set, json_object_array_get_idx(manifests, i), &reason)) {
      log_warn("%s: ignoring entry %zu: %s", s->index_path, i, reason);
      dirty = true;
    }
  }
  record_set kept = {0};
  for (size_t i = 0; i < set.n; i++) {
    const char *missing = NULL;
    if (!record_blobs_present(s, set.v[i], &missing)) {
      log_warn("dropping image %s (handler \"%s\"): blob %s is missing", set.v[i]->id, set.v[i]->handler, missing);
      record_free(set.v[i]);
      dirty = true;
    } else {
      record_set_append(&kept, set.v[i]);
    }
    set.v[i] = NULL;
  }
  s->recs = kept;
  *ret_dirty = dirty;
  return 0;
}

/* ---- garbage collection ---- */

/* Deletes the unpacked layer of diff_id unless it is absent or the keeper still uses it. Called with write_lock
 * held. */
static void layer_delete(store *s, const char *diff_id)
{
  cleanup_free char *dir = store_layer_path(s, diff_id);
  if (!dir || access(dir, F_OK) < 0)
    return;
  if (s->keeper && s->keeper(s->keeper_userdata, dir)) {
    log_debug("keeping layer %s: still in use", diff_id);
    return;
  }
  int r = rm_tree_at(AT_FDCWD, dir);
  if (r < 0) {
    log_warn("cannot delete layer %s: %s", diff_id, strerror(-r));
    return;
  }
  log_debug("deleted layer %s", diff_id);
  pthread_mutex_lock(&s->usage_lock);
  for (layer_usage **up = &s->usage; *up; up = &(*up)->next)
    if (streq((*up)->diff_id, diff_id)) {
      layer_usage *u = *up;
      *up = u->next;
      free(u->diff_id);
      free(u);
      break;
    }
  pthread_mutex_unlock(&s->usage_lock);
}

/* Deletes the blobs (and unpacked layers) among candidates that no record of set references. Called with
 * write_lock held. */
static void gc_candidates(store *s, const record_set *set, char *const *candidates)
{
  bool deleted = false;
  for (size_t i = 0; candidates[i]; i++) {
    if (!digest_valid(candidates[i]) || record_set_references(set, candidates[i]))
      continue;
    layer_delete(s, candidates[i]);
    cleanup_free char *path = blob_path(s, candidates[i]);
    if (unlink(path) < 0) {
      if (errno != ENOENT)
        log_warn("cannot delete blob %s: %s", candidates[i], strerror(errno));
      continue;
    }
    log_debug("deleted blob %s", candidates[i]);
    deleted = true;
  }
  if (deleted) {
    cleanup_free char *dir = xasprintf("%s/blobs/sha256", s->root);
    (void) fsync_dir(dir);
  }
}

/* Deletes now, or later when the last pull in progress ends (it may have found one of these blobs present and be
 * about to record an image that uses it). Called with write_lock held, which is all that s->recs needs here. */
static void gc_or_defer(store *s, char *const *candidates)
{
  if (s->holds == 0) {
    gc_candidates(s, &s->recs, candidates);
    return;
  }
  for (size_t i = 0; candidates[i]; i++)
    strv_add_unique(&s->deferred_gc, candidates[i]);
}

static void sweep_kick(store *s);

store_holder *store_hold(store *s)
{
  store_holder *h = xcalloc(1, sizeof(*h));
  h->s = s;
  pthread_mutex_lock(&s->write_lock);
  s->holds++;
  h->next = s->holders;
  s->holders = h;
  pthread_mutex_unlock(&s->write_lock);
  return h;
}

void store_release(store_holder *h)
{
  if (!h)
    return;
  store *s = h->s;
  pthread_mutex_lock(&s->write_lock);
  for (store_holder **hp = &s->holders; *hp; hp = &(*hp)->next)
    if (*hp == h) {
      *hp = h->next;
      break;
    }
  if (s->holds > 0 && --s->holds == 0 && s->deferred_gc) {
    gc_candidates(s, &s->recs, s->deferred_gc);
    strv_free(s->deferred_gc);
    s->deferred_gc = NULL;
  }
  pthread_mutex_unlock(&s->write_lock);
  strv_free(h->pins);
  free(h);
  /* What a failed pull left is now unreferenced and unpinned: the size limit applies to it soon. */
  sweep_kick(s);
}

void store_pin(store_holder *h, const char *digest)
{
  if (!h || !digest_valid(digest))
    return;
  store *s = h->s;
  pthread_mutex_lock(&s->write_lock);
  strv_add_unique(&h->pins, digest);
  /* Its retention starts again: a pull retried within it keeps what its earlier tries brought. A blob's clock is
   * its mtime; an unpacked layer's is its ctime (its mtime is the layer's own, from the tar), which a chown to the
   * same owner moves. Under write_lock, so the sweep sees either the old time and no pin, or both new. */
  cleanup_free char *path = blob_path(s, digest);
  (void) utimensat(AT_FDCWD, path, NULL, AT_SYMLINK_NOFOLLOW);
  cleanup_free char *dir = store_layer_path(s, digest);
  if (dir)
    (void) fchownat(AT_FDCWD, dir, (uid_t) -1, (gid_t) -1, AT_SYMLINK_NOFOLLOW);
  pthread_mutex_unlock(&s->write_lock);
}

/* Called with write_lock held. */
static bool pinned(const store *s, const char *digest)
{
  for (const store_holder *h = s->holders; h; h = h->next)
    if (h->pins && strv_contains(h->pins, digest))
      return true;
  return false;
}

static char **record_blobs(const record *r)
{
  char **v = strv_copy(r->layers);
  for (char **d = r->diff_ids; *d; d++)
    strv_add_unique(&v, *d);
  strv_add_unique(&v, r->manifest_digest);
  strv_add_unique(&v, r->id);
  return v;
}

/* ---- the sweep of unreferenced content ---- */

typedef enum leftover_kind {
  LEFTOVER_BLOB,
  LEFTOVER_INGEST,
  LEFTOVER_LAYER,
} leftover_kind;

/* Something on disk that no record references, found by a sweep. */
typedef struct leftover {
  leftover_kind kind;
  char *digest;   /* the blob's, the partial's or the layer's diff_id; NULL for a file whose name is none */
  char *path;
  int64_t used_ns; /* last written or used by a pull */
  uint64_t bytes;
} leftover;

typedef struct leftovers {
  leftover *v;
  size_t n;
} leftovers;

static void leftovers_clear(leftovers *l)
{
  for (size_t i = 0; i < l->n; i++) {
    free(l->v[i].digest);
    free(l->v[i].path);
  }
  free(l->v);
  *l = (leftovers){0};
}
static void leftovers_clearp(leftovers *l) { leftovers_clear(l); }

static void leftovers_add(leftovers *l, leftover_kind kind, char *digest, char *path, int64_t used_ns, uint64_t bytes)
{
  l->v = xrealloc(l->v, (l->n + 1) * sizeof(*l->v));
  l->v[l->n++] = (leftover){.kind = kind, .digest = digest, .path = path, .used_ns = used_ns, .bytes = bytes};
}

static int64_t timespec_ns(struct timespec ts) { return (int64_t) ts.tv_sec * 1000000000 + ts.tv_nsec; }

/* The usage of the layer directory of diff_id, measured once and remembered (as ImageFsInfo does). */
static uint64_t layer_bytes(store *s, const char *diff_id, const char *dir)
{
  pthread_mutex_lock(&s->usage_lock);
  for (layer_usage *u = s->usage; u; u = u->next)
    if (streq(u->diff_id, diff_id)) {
      uint64_t b = u->bytes;
      pthread_mutex_unlock(&s->usage_lock);
      return b;
    }
  pthread_mutex_unlock(&s->usage_lock);
  uint64_t bytes = 0, inodes = 0;
  cleanup_error crimage_error *e = NULL;
  if (unpack_dir_usage(dir, &bytes, &inodes, &e) < 0)
    return 0;
  layer_usage *u = xcalloc(1, sizeof(*u));
  u->diff_id = xstrdup(diff_id);
  u->bytes = bytes;
  u->inodes = inodes;
  pthread_mutex_lock(&s->usage_lock);
  u->next = s->usage;
  s->usage = u;
  pthread_mutex_unlock(&s->usage_lock);
  return bytes;
}

/* Lists, without the write lock (it is checked again under it), what might be unreferenced: every blob, partial
 * ingest and (with layers) unpacked layer. */
static void leftovers_scan(store *s, bool layers, leftovers *out)
{
  static const char *const algos[] = {"sha256", "sha512"};
  for (size_t a = 0; a < ARRAY_SIZE(algos); a++) {
    cleanup_free char *dir = xasprintf("%s/blobs/%s", s->root, algos[a]);
    DIR *d = opendir(dir);
    struct dirent *de;
    while (d && (de = readdir(d))) {
      struct stat st;
      if (de->d_name[0] == '.' || fstatat(dirfd(d), de->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0)
        continue;
      char *digest = xasprintf("%s:%s", algos[a], de->d_name);
      if (!digest_valid(digest))
        free(TAKE_PTR(digest)); /* not a blob at all: garbage of any age */
      leftovers_add(out, LEFTOVER_BLOB, digest, xasprintf("%s/%s", dir, de->d_name), timespec_ns(st.st_mtim),
                    (uint64_t) st.st_blocks * 512);
    }
    if (d)
      closedir(d);
  }
  DIR *d = opendir(s->ingest_dir);
  struct dirent *de;
  while (d && (de = readdir(d))) {
    struct stat st;
    if (de->d_name[0] == '.' || fstatat(dirfd(d), de->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0 || !S_ISREG(st.st_mode))
      continue;
    char *digest = xstrdup(de->d_name);
    char *dash = strchr(digest, '-');
    if (dash)
      *dash = ':';
    if (!dash || !digest_valid(digest))
      continue; /* remove_leftovers deals with those at open */
    /* An empty partial has nothing to resume: it counts as used long ago. */
    leftovers_add(out, LEFTOVER_INGEST, digest, xasprintf("%s/%s", s->ingest_dir, de->d_name),
                  st.st_size == 0 ? 0 : timespec_ns(st.st_mtim), (uint64_t) st.st_blocks * 512);
  }
  if (d)
    closedir(d);
  d = layers ? opendir(s->layers_dir) : NULL;
  while (d && (de = readdir(d))) {
    struct stat st;
    if (de->d_name[0] == '.' || fstatat(dirfd(d), de->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0 || !S_ISDIR(st.st_mode))
      continue; /* an unpack in progress, or a stale one (unpack_remove_stale) */
    char *diff_id = xasprintf("sha256:%s", de->d_name);
    if (!digest_valid(diff_id)) {
      free(diff_id);
      continue;
    }
    char *dir = xasprintf("%s/%s", s->layers_dir, de->d_name);
    leftovers_add(out, LEFTOVER_LAYER, diff_id, dir, timespec_ns(st.st_ctim), layer_bytes(s, diff_id, dir));
  }
  if (d)
    closedir(d);
}

/* Whether a leftover is still one: no record references it, no holder pinned it, no deferred removal waits for it,
 * no keeper uses it, and for a partial no writer holds it. Called with write_lock held. */
static bool leftover_unused(store *s, const leftover *l)
{
  if (!l->digest)
    return true;
  if (record_set_references(&s->recs, l->digest) || pinned(s, l->digest) ||
      (s->deferred_gc && strv_contains(s->deferred_gc, l->digest)))
    return false;
  if (l->kind == LEFTOVER_LAYER && s->keeper && s->keeper(s->keeper_userdata, l->path))
    return false;
  return true;
}

/* Deletes one leftover; true when it is gone. Called with write_lock held. */
static bool leftover_delete(store *s, const leftover *l)
{
  switch (l->kind) {
  case LEFTOVER_BLOB:
    if (unlink(l->path) < 0 && errno != ENOENT) {
      log_warn("cannot delete `%s`: %s", l->path, strerror(errno));
      return false;
    }
    return true;
  case LEFTOVER_INGEST: {
    /* A writer holds its partial's lock for as long as it writes; one that takes it after us finds the file gone
     * (store_ingest_begin checks the path still names what it locked) and starts a new one. */
    cleanup_close int fd = open(l->path, O_RDWR | O_CLOEXEC | O_NOFOLLOW);
    struct stat a, b;
    if (fd < 0 || flock(fd, LOCK_EX | LOCK_NB) < 0 || fstat(fd, &a) < 0 || stat(l->path, &b) < 0 ||
        a.st_ino != b.st_ino || a.st_dev != b.st_dev)
      return false;
    return unlink(l->path) == 0;
  }
  case LEFTOVER_LAYER:
    layer_delete(s, l->digest);
    return access(l->path, F_OK) < 0;
  }
  return false;
}

static int leftover_by_age(const void *a, const void *b)
{
  const leftover *x = a, *y = b;
  return x->used_ns < y->used_ns ? -1 : x->used_ns > y->used_ns;
}

/* One sweep: what is unused and older than the retention goes, then the oldest of the rest until what is left fits
 * in the size limit. layers: the unpacked layers too (once the keeper is known). */
static void sweep(store *s, bool layers)
{
  _cleanup_(leftovers_clearp) leftovers found = {0};
  leftovers_scan(s, layers, &found);
  pthread_mutex_lock(&s->write_lock);
  int64_t now = now_realtime_ns();
  size_t n_deleted = 0, n_kept = 0;
  uint64_t deleted_bytes = 0, kept_bytes = 0;
  leftovers keep = {0};
  for (size_t i = 0; i < found.n; i++) {
    leftover *l = &found.v[i];
    if (!leftover_unused(s, l))
      continue;
    /* An age beyond the retention ends it; so does a time as far in the future (a clock set back by more than
     * that), so that nothing is kept for longer than twice the retention. */
    int64_t age_ms = (now - l->used_ns) / 1000000;
    if (l->digest && age_ms > -s->retention_ms && age_ms < s->retention_ms) {
      keep.v = xrealloc(keep.v, (keep.n + 1) * sizeof(*keep.v));
      keep.v[keep.n++] = *l;
      kept_bytes += l->bytes;
      continue;
    }
    if (leftover_delete(s, l)) {
      log_debug("deleted unreferenced %s (unused for %" PRId64 " s)", l->path, age_ms / 1000);
      n_deleted++;
      deleted_bytes += l->bytes;
    }
  }
  /* The oldest first, until the rest fits. */
  if (keep.n > 1)
    qsort(keep.v, keep.n, sizeof(*keep.v), leftover_by_age);
  for (size_t i = 0; i < keep.n; i++) {
    if (kept_bytes <= s->unreferenced_max) {
      n_kept++;
      continue;
    }
    if (leftover_delete(s, &keep.v[i])) {
      log_debug("deleted unreferenced %s (over the limit of %" PRIu64 " bytes)", keep.v[i].path, s->unreferenced_max);
      n_deleted++;
      deleted_bytes += keep.v[i].bytes;
      kept_bytes -= keep.v[i].bytes;
    } else {
      n_kept++;
    }
  }
  free(keep.v); /* its entries belong to found */
  pthread_mutex_unlock(&s->write_lock);
  if (n_deleted > 0)
    log_info("deleted %zu unreferenced blobs, partial downloads or layers (%" PRIu64 " KiB); kept %zu (%" PRIu64
             " KiB) for the pulls that may resume them",
             n_deleted, deleted_bytes / 1024, n_kept, kept_bytes / 1024);
}

void store_sweep(store *s) { sweep(s, true); }

static void sweep_kick(store *s)
{
  pthread_mutex_lock(&s->sweep_lock);
  s->sweep_kicked = true;
  pthread_cond_signal(&s->sweep_cond);
  pthread_mutex_unlock(&s->sweep_lock);
}

static struct timespec monotonic_after(int64_t ms)
{
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  ts.tv_sec += ms / 1000;
  ts.tv_nsec += (ms % 1000) * 1000000;
  if (ts.tv_nsec >= 1000000000) {
    ts.tv_sec++;
    ts.tv_nsec -= 1000000000;
  }
  return ts;
}

/* Sweeps every interval, and when kicked (a hold released), but at most once a second: a burst of pulls ending
 * costs one sweep. */
static void *sweeper_main(void *arg)
{
  store *s = arg;
  /* Keeping nothing, a release's kick is all it takes (every write happens under a hold). */
  int64_t interval = s->retention_ms > 0 ? s->retention_ms / 4 : 60 * 1000;
  if (interval > 60 * 1000)
    interval = 60 * 1000;
  if (interval < 1000)
    interval = 1000;
  pthread_mutex_lock(&s->sweep_lock);
  while (!s->sweeper_stop) {
    struct timespec soonest = monotonic_after(1000), latest = monotonic_after(interval);
    while (!s->sweeper_stop && pthread_cond_timedwait(&s->sweep_cond, &s->sweep_lock, &soonest) != ETIMEDOUT)
      ;
    while (!s->sweeper_stop && !s->sweep_kicked &&
           pthread_cond_timedwait(&s->sweep_cond, &s->sweep_lock, &latest) != ETIMEDOUT)
      ;
    if (s->sweeper_stop)
      break;
    s->sweep_kicked = false;
    pthread_mutex_unlock(&s->sweep_lock);
    sweep(s, true);
    pthread_mutex_lock(&s->sweep_lock);
  }
  pthread_mutex_unlock(&s->sweep_lock);
  return NULL;
}

int store_start_sweeper(store *s, crimage_error **err)
{
  sweep(s, true);
  pthread_mutex_lock(&s->sweep_lock);
  if (s->sweeper_started) {
    pthread_mutex_unlock(&s->sweep_lock);
    return 0;
  }
  int r = pthread_create(&s->sweeper, NULL, sweeper_main, s);
  if (r == 0)
    s->sweeper_started = true;
  pthread_mutex_unlock(&s->sweep_lock);
  if (r != 0)
    return crimage_error_set(err, CRIMAGE_INTERNAL, r, "starting the sweep of the store");
  return 0;
}

/* Removes temporary files of interrupted atomic writes, and ingest files whose name is not a digest. */
static void remove_leftovers(store *s)
{
  DIR *d = opendir(s->root);
  if (d) {
    struct dirent *de;
    while ((de = readdir(d)))
      if (str_has_prefix(de->d_name, "index.json.tmp.") || str_has_prefix(de->d_name, "oci-layout.tmp."))
        (void) unlinkat(dirfd(d), de->d_name, 0);
    closedir(d);
  }
  d = opendir(s->ingest_dir);
  if (d) {
    struct dirent *de;
    while ((de = readdir(d))) {
      if (streq(de->d_name, ".") || streq(de->d_name, ".."))
        continue;
      cleanup_free char *digest = xstrdup(de->d_name);
      char *dash = strchr(digest, '-');
      if (dash)
        *dash = ':';
      if (!dash || !digest_valid(digest)) {
        log_warn("removing stray file `%s/%s`", s->ingest_dir, de->d_name);
        (void) unlinkat(dirfd(d), de->d_name, 0);
      }
    }
    closedir(d);
  }
}

/* ---- open/close ---- */

int store_open(const char *root, store **ret, crimage_error **err) { return store_open_opts(root, NULL, ret, err); }

int store_open_opts(const char *root, const store_options *opts, store **ret, crimage_error **err)
{
  if (str_empty(root))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, EINVAL, "empty store root");
  int r = mkdir_p(root, 0700, err);
  if (r < 0)
    return crimage_error_wrap(err, "creating the store");
  char *real = realpath(root, NULL);
  if (!real)
    return crimage_error_set(err, CRIMAGE_INTERNAL, errno, "resolve `%s`", root);

  store *s = xcalloc(1, sizeof(*s));
  s->root = real;
  s->index_path = xasprintf("%s/index.json", real);
  s->ingest_dir = xasprintf("%s/ingest", real);
  s->layers_dir = xasprintf("%s/layers/sha256", real);
  pthread_mutex_init(&s->write_lock, NULL);
  pthread_mutex_init(&s->usage_lock, NULL);
  pthread_rwlock_init(&s->lock, NULL);
  pthread_mutex_init(&s->sweep_lock, NULL);
  pthread_condattr_t ca;
  pthread_condattr_init(&ca);
  pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
  pthread_cond_init(&s->sweep_cond, &ca);
  pthread_condattr_destroy(&ca);
  s->retention_ms = opts ? opts->unreferenced_retention_ms : STORE_DEFAULT_RETENTION_MS;
  s->unreferenced_max = opts ? opts->unreferenced_max_bytes : STORE_DEFAULT_UNREFERENCED_MAX_BYTES;

  cleanup_free char *sha256_dir = xasprintf("%s/blobs/sha256", real);
  cleanup_free char *layout = xasprintf("%s/oci-layout", real);
  bool dirty = false;
  r = mkdir_p(sha256_dir, 0700, err);
  if (r == 0)
    r = mkdir_p(s->ingest_dir, 0700, err);
  if (r == 0)
    r = mkdir_p(s->layers_dir, 0700, err);
  if (r == 0 && access(layout, F_OK) < 0) {
    static const char content[] = "{\"imageLayoutVersion\":\"1.0.0\"}";
    r = write_file_atomic(layout, content, sizeof(content) - 1, 0644, err);
  }
  if (r == 0) {
    remove_leftovers(s);
    r = index_load(s, &dirty, err);
  }
  if (r == 0 && dirty)
    r = index_write(s, &s->recs, err);
  if (r < 0) {
    store_close(s);
    return crimage_error_wrap(err, "opening the store at `%s`", root);
  }
  /* Nothing is being pulled yet. What no record references was left by a failed or interrupted pull, by a crash
   * between committing blobs and recording the image, or by a removal interrupted before its GC: kept within the
   * retention for a pull to resume; the unpacked layers wait for store_sweep, which knows what else uses them. */
  sweep(s, false);
  cleanup_error crimage_error *e = NULL;
  if (unpack_remove_stale(s->layers_dir, &e) < 0)
    log_warn("%s", e->message);
  log_debug("store at %s: %zu image records", real, s->recs.n);
  *ret = s;
  return 0;
}

void store_close(store *s)
{
  if (!s)
    return;
  pthread_mutex_lock(&s->sweep_lock);
  bool started = s->sweeper_started;
  s->sweeper_stop = true;
  pthread_cond_signal(&s->sweep_cond);
  pthread_mutex_unlock(&s->sweep_lock);
  if (started)
    pthread_join(s->sweeper, NULL);
  pthread_cond_destroy(&s->sweep_cond);
  pthread_mutex_destroy(&s->sweep_lock);
  while (s->holders) {
    store_holder *h = s->holders; /* a holder not released (a bug elsewhere): forgotten with the store */
    s->holders = h->next;
    strv_free(h->pins);
    free(h);
  }
  record_set_clear(&s->recs);
  strv_free(s->deferred_gc);
  while (s->usage) {
    layer_usage *u = s->usage;
    s->usage = u->next;
    free(u->diff_id);
    free(u);
  }
  pthread_rwlock_destroy(&s->lock);
  pthread_mutex_destroy(&s->write_lock);
  pthread_mutex_destroy(&s->usage_lock);
  free(s->layers_dir);
  free(s->root);
  free(s->index_path);
  free(s->ingest_dir);
  free(s);
}

/* Makes next durable, then visible. Called with write_lock held; takes ownership of next's records. */
static int commit_records(store *s, record_set *next, crimage_error **err)
{
  int r = index_write(s, next, err);
  if (r < 0)
    return r;
  pthread_rwlock_wrlock(&s->lock);
  record_set old = s->recs;
  s->recs = *next;
  pthread_rwlock_unlock(&s->lock);
  *next = (record_set){0};
  record_set_clear(&old);
  return 0;
}

/* ---- records ---- */

static int validate_record(const store_record *rec, crimage_error **err)
{
  const char *handler = rec->handler ? rec->handler : "";
  if (!store_handler_valid(handler))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, EINVAL, "invalid runtime handler");
  if (str_empty(rec->name) || !string_ok(rec->name, NAME_MAX_LEN) || strchr(rec->name, '@') ||
      strchr(rec->name, ','))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, EINVAL, "invalid image name");
  if (rec->tag && (!*rec->tag || !string_ok(rec->tag, TAG_MAX_LEN) || strpbrk(rec->tag, ":/@,")))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, EINVAL, "invalid tag");
  if (rec->repo_digest && !digest_valid(rec->repo_digest))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, EINVAL, "invalid repo digest");
  if (!rec->tag && !rec->repo_digest)
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, EINVAL, "an image record needs a tag or a repo digest");
  if (!digest_valid(rec->manifest_digest) || !digest_valid(rec->config_digest))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, EINVAL, "invalid manifest or config digest");
  if (!string_ok(rec->manifest_media_type, MEDIA_TYPE_MAX_LEN) || !*rec->manifest_media_type)
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, EINVAL, "invalid manifest media type");
  if (rec->user && !string_ok(rec->user, USER_MAX_LEN))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, EINVAL, "invalid image user");
  if (rec->platform && !string_ok(rec->platform, PLATFORM_MAX_LEN))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, EINVAL, "invalid platform");
  if (rec->manifest_size > INT64_MAX || rec->size > INT64_MAX)
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, EINVAL, "invalid size");
  size_t n = 0;
  for (const char *const *l = rec->layers; l && *l; l++, n++)
    if (!digest_valid(*l))
      return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, EINVAL, "invalid layer digest");
  if (n > RECORD_MAX_LAYERS)
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, E2BIG, "too many layers (%zu, at most %d)", n,
                             RECORD_MAX_LAYERS);
  size_t n_diff = 0;
  for (const char *const *d = rec->diff_ids; d && *d; d++, n_diff++)
    if (!digest_valid(*d))
      return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, EINVAL, "invalid diff_id");
  if (rec->diff_ids && n_diff != n)
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, EINVAL, "%zu diff_ids for %zu layers", n_diff, n);
  return 0;
}

/* True when recording rec would leave the records as they are: the image is there for handler with the same
 * manifest, layers, size and user, and already carries both names. Names are unique per handler (recording takes a
 * name away from any other image), so no other record needs a look. Called with write_lock held. */
/* Two digest lists (NULL: empty) hold the same entries in the same order. */
static bool digests_equal(char *const *a, const char *const *b)
{
  size_t i = 0;
  for (; b && b[i]; i++)
    if (!a[i] || !streq(a[i], b[i]))
      return false;
  return a[i] == NULL;
}

static bool record_unchanged(const record_set *set, const store_record *rec, const char *handler,
                             const char *tag_name, const char *digest_name)
{
  const record *cur = record_set_find_id(set, handler, rec->config_digest);
  if (!cur || !streq(cur->manifest_digest, rec->manifest_digest) ||
      !streq(cur->manifest_media_type, rec->manifest_media_type) || cur->manifest_size != rec->manifest_size ||
      cur->size != rec->size || !streq(cur->user, rec->user ? rec->user : "") ||
      !streq_ptr(cur->platform, rec->platform))
    return false;
  if ((tag_name && !strv_contains(cur->repo_tags, tag_name)) ||
      (digest_name && !strv_contains(cur->repo_digests, digest_name)))
    return false;
  return digests_equal(cur->layers, rec->layers) && digests_equal(cur->diff_ids, rec->diff_ids);
}

int store_record_image(store *s, const store_record *rec, crimage_error **err)
{
  int r = validate_record(rec, err);
  if (r < 0)
    return r;
  const char *handler = rec->handler ? rec->handler : "";

  cleanup_free char *tag_name = rec->tag ? xasprintf("%s:%s", rec->name, rec->tag) : NULL;
  cleanup_free char *digest_name = rec->repo_digest ? xasprintf("%s@%s", rec->name, rec->repo_digest) : NULL;

  pthread_mutex_lock(&s->write_lock);
  /* Blobs are deleted only under write_lock, so once checked here they stay until the record is in place. A removal
   * that ran after the caller saw a blob and before this point makes the caller's pull fail here, not record an
   * image with a missing blob. */
  const char *missing = NULL;
  if (!store_blob_exists(s, rec->manifest_digest, NULL))
    missing = rec->manifest_digest;
  else if (!store_blob_exists(s, rec->config_digest, NULL))
    missing = rec->config_digest;
  for (const char *const *l = rec->layers; !missing && l && *l; l++)
    if (!store_blob_exists(s, *l, NULL))
      missing = *l;
  if (missing) {
    pthread_mutex_unlock(&s->write_lock);
    return crimage_error_set(err, CRIMAGE_FAILED_PRECONDITION, ENOENT, "blob %s of image %s is not stored", missing,
                             rec->config_digest);
  }

  /* Pulling an image that is already recorded exactly so (the usual re-pull) changes nothing: no copy of the
   * records, no index.json rewrite, no fsync. */
  if (record_unchanged(&s->recs, rec, handler, tag_name, digest_name)) {
    pthread_mutex_unlock(&s->write_lock);
    return 0;
  }

  cleanup_record_set record_set next = {0};
  record_set_copy(&s->recs, &next);

  /* A name designates one image per handler: take it away from any other image of this handler. */
  for (size_t i = 0; i < next.n; i++) {
    record *o = next.v[i];
    if (!streq(o->handler, handler) || streq(o->id, rec->config_digest))
      continue;
    if (tag_name)
      strv_remove(o->repo_tags, tag_name);
    if (digest_name)
      strv_remove(o->repo_digests, digest_name);
  }

  cleanup_strv char **garbage = NULL;
  record *cur = record_set_find_id(&next, handler, rec->config_digest);
  if (cur) {
    /* Same image again (perhaps through another manifest): add the name, describe it as last pulled. */
    if (!streq(cur->manifest_digest, rec->manifest_digest)) {
      garbage = xcalloc(2, sizeof(char *));
      garbage[0] = xstrdup(cur->manifest_digest);
    }
    for (char **l = cur->layers; *l; l++)
      strv_add_unique(&garbage, *l);
    for (char **d = cur->diff_ids; *d; d++)
      strv_add_unique(&garbage, *d);
  } else {
    cur = xcalloc(1, sizeof(*cur));
    cur->handler = xstrdup(handler);
    cur->id = xstrdup(rec->config_digest);
    cur->repo_tags = xcalloc(1, sizeof(char *));
    cur->repo_digests = xcalloc(1, sizeof(char *));
    cur->created_ns = now_realtime_ns();
    record_set_append(&next, cur);
  }
  free(cur->manifest_digest);
  cur->manifest_digest = xstrdup(rec->manifest_digest);
  free(cur->manifest_media_type);
  cur->manifest_media_type = xstrdup(rec->manifest_media_type);
  cur->manifest_size = rec->manifest_size;
  strv_free(cur->layers);
  cur->layers = strv_copy((char *const *) rec->layers);
  /* Diff_ids a pull did not learn (an older record's) stay unknown rather than become wrong. */
  if (rec->diff_ids || !cur->diff_ids) {
    strv_free(cur->diff_ids);
    cur->diff_ids = rec->diff_ids ? strv_copy((char *const *) rec->diff_ids) : xcalloc(1, sizeof(char *));
  }
  cur->size = rec->size;
  free(cur->user);
  cur->user = xstrdup(rec->user ? rec->user : "");
  free(cur->platform);
  cur->platform = rec->platform ? xstrdup(rec->platform) : NULL;
  if (tag_name)
    strv_add_unique(&cur->repo_tags, tag_name);
  if (digest_name)
    strv_add_unique(&cur->repo_digests, digest_name);

  r = commit_records(s, &next, err);
  if (r == 0 && garbage)
    gc_or_defer(s, garbage);
  pthread_mutex_unlock(&s->write_lock);
  if (r < 0)
    return crimage_error_wrap(err, "recording image %s", rec->config_digest);
  return 0;
}

static bool all_hex(const char *s)
{
  for (; *s; s++)
    if (!((*s >= '0' && *s <= '9') || (*s >= 'a' && *s <= 'f')))
      return false;
  return true;
}

/* Called with the read lock held. */
static int find_locked(store *s, const char *handler, const char *key, const record **ret, crimage_error **err)
{
  const record_set *set = &s->recs;
  for (size_t i = 0; i < set->n; i++) {
    const record *r = set->v[i];
    if (!streq(r->handler, handler))
      continue;
    if (streq(r->id, key) || strv_contains(r->repo_tags, key) || strv_contains(r->repo_digests, key)) {
      *ret = r;
      return 1;
    }
  }

  /* An id without "sha256:", or a prefix of one (with or without it). */
  const char *hex = str_has_prefix(key, "sha256:") ? key + 7 : key;
  size_t len = strlen(hex);
  if (len < ID_PREFIX_MIN || len > 64 || !all_hex(hex))
    return 0;
  const record *found = NULL;
  for (size_t i = 0; i < set->n; i++) {
    const record *r = set->v[i];
    if (!streq(r->handler, handler) || !str_has_prefix(r->id, "sha256:") || strncmp(r->id + 7, hex, len) != 0)
      continue;
    if (found)
      return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, EINVAL,
                               "image id prefix `%s` is ambiguous (matches %s and %s)", hex, found->id, r->id);
    found = r;
  }
  if (!found)
    return 0;
  *ret = found;
  return 1;
}

int store_find_image(store *s, const char *handler, const char *key, store_image **ret, crimage_error **err)
{
  if (!handler)
    handler = "";
  if (str_empty(key))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, EINVAL, "empty image key");
  if (strlen(key) > KEY_MAX_LEN)
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, EINVAL, "image key longer than %d bytes", KEY_MAX_LEN);
  pthread_rwlock_rdlock(&s->lock);
  const record *r = NULL;
  int found = find_locked(s, handler, key, &r, err);
  store_image *img = found > 0 ? record_to_image(r) : NULL;
  pthread_rwlock_unlock(&s->lock);
  if (found > 0)
    *ret = img;
  return found;
}

int store_list_images(store *s, const char *handler, store_image ***ret, size_t *ret_n, crimage_error **err)
{
  pthread_rwlock_rdlock(&s->lock);
  store_image **list = xcalloc(s->recs.n + 1, sizeof(store_image *));
  size_t n = 0;
  for (size_t i = 0; i < s->recs.n; i++)
    if (!handler || streq(s->recs.v[i]->handler, handler))
      list[n++] = record_to_image(s->recs.v[i]);
  pthread_rwlock_unlock(&s->lock);
  *ret = list;
  *ret_n = n;
  return 0;
}

int store_remove_image(store *s, const char *handler, const char *id, crimage_error **err)
{
  if (!handler)
    handler = "";
  if (!digest_valid(id))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, EINVAL, "invalid image id `%.80s`", id ? id : "");

  pthread_mutex_lock(&s->write_lock);
  if (!record_set_find_id(&s->recs, handler, id)) {
    pthread_mutex_unlock(&s->write_lock);
    return 0;
  }
  cleanup_record_set record_set next = {0};
  cleanup_strv char **garbage = NULL;
  for (size_t i = 0; i < s->recs.n; i++) {
    const record *r = s->recs.v[i];
    if (streq(r->handler, handler) && streq(r->id, id))
      garbage = record_blobs(r);
    else
      record_set_append(&next, record_copy(r));
  }
  int r = commit_records(s, &next, err);
  /* The index no longer references the blobs: a crash from here on leaves garbage the next open sweeps. */
  if (r == 0)
    gc_or_defer(s, garbage);
  pthread_mutex_unlock(&s->write_lock);
  if (r < 0)
    return crimage_error_wrap(err, "removing image %s", id);
  return 0;
}

/* ---- usage ---- */

/* Sums st_blocks * 512 (the space really allocated, as `du` reports) and counts inodes below dirfd. Files that
 * vanish during the walk (a concurrent GC or commit) are skipped. */
/* Adds the usage of every unpacked layer: measured (with unpack_dir_usage, which counts hard links once and has no
 * depth limit) the first time a layer is seen, remembered until it is deleted. */
static void layers_usage(store *s, uint64_t *bytes, uint64_t *inodes)
{
  *inodes += 2; /* layers/ and layers/sha256/ */
  DIR *d = opendir(s->layers_dir);
  if (!d)
    return;
  struct dirent *de;
  while ((de = readdir(d))) {
    if (de->d_name[0] == '.')
      continue; /* an unpack in progress is counted once it is done */
    cleanup_free char *diff_id = xasprintf("sha256:%s", de->d_name);
    pthread_mutex_lock(&s->usage_lock);
    layer_usage *u = s->usage;
    while (u && !streq(u->diff_id, diff_id))
      u = u->next;
    pthread_mutex_unlock(&s->usage_lock);
    if (!u) {
      uint64_t b = 0, n = 0;
      cleanup_free char *dir = xasprintf("%s/%s", s->layers_dir, de->d_name);
      cleanup_error crimage_error *e = NULL;
      if (unpack_dir_usage(dir, &b, &n, &e) < 0)
        continue;
      u = xcalloc(1, sizeof(*u));
      u->diff_id = TAKE_PTR(diff_id);
      u->bytes = b;
      u->inodes = n;
      pthread_mutex_lock(&s->usage_lock);
      u->next = s->usage;
      s->usage = u;
      pthread_mutex_unlock(&s->usage_lock);
    }
    *bytes += u->bytes;
    *inodes += u->inodes;
  }
  closedir(d);
}

static void usage_walk(int dfd, unsigned depth, uint64_t *bytes, uint64_t *inodes)
{
  if (depth > 16) {
    close(dfd);
    return;
  }
  DIR *d = fdopendir(dfd);
  if (!d) {
    close(dfd);
    return;
  }
  struct dirent *de;
  while ((de = readdir(d))) {
    if (streq(de->d_name, ".") || streq(de->d_name, ".."))
      continue;
    /* The unpacked layers are counted by layers_usage, each measured once. */
    if (depth == 0 && streq(de->d_name, "layers"))
      continue;
    struct stat st;
    if (fstatat(dirfd(d), de->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0)
      continue;
    *bytes += (uint64_t) st.st_blocks * 512;
    *inodes += 1;
    if (S_ISDIR(st.st_mode)) {
      int sub = openat(dirfd(d), de->d_name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
      if (sub >= 0)
        usage_walk(sub, depth + 1, bytes, inodes);
    }
  }
  closedir(d);
}

/* Undoes the octal escapes of /proc/self/mountinfo ("\040" for a space). */
static void unescape_octal(char *s)
{
  char *w = s;
  for (char *p = s; *p;) {
    if (p[0] == '\\' && p[1] >= '0' && p[1] <= '7' && p[2] >= '0' && p[2] <= '7' && p[3] >= '0' && p[3] <= '7') {
      *w++ = (char) (((p[1] - '0') << 6) | ((p[2] - '0') << 3) | (p[3] - '0'));
      p += 4;
    } else {
      *w++ = *p++;
    }
  }
  *w = '\0';
}

static bool path_under(const char *path, const char *mnt)
{
  if (streq(mnt, "/"))
    return true;
  size_t l = strlen(mnt);
  return strncmp(path, mnt, l) == 0 && (path[l] == '/' || path[l] == '\0');
}

/* The mount point containing path: the longest mount point of /proc/self/mountinfo that is a prefix of it (field 5
 * of each line); the last one wins among equals, as it is mounted on top. */
static char *find_mountpoint(const char *path)
{
  cleanup_fclose FILE *f = fopen("/proc/self/mountinfo", "re");
  char *best = NULL;
  if (f) {
    cleanup_free char *line = NULL;
    size_t cap = 0;
    while (getline(&line, &cap, f) > 0) {
      char *save = NULL, *field = strtok_r(line, " ", &save);
      for (int i = 1; field && i < 5; i++)
        field = strtok_r(NULL, " ", &save);
      if (!field)
        continue;
      unescape_octal(field);
      if (path_under(path, field) && (!best || strlen(field) >= strlen(best))) {
        free(best);
        best = xstrdup(field);
      }
    }
  }
  return best ? best : xstrdup("/");
}

int store_get_usage(store *s, store_usage *ret, crimage_error **err)
{
  int fd = open(s->root, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0)
    return crimage_error_set(err, CRIMAGE_INTERNAL, errno, "open `%s`", s->root);
  struct stat st;
  if (fstat(fd, &st) < 0) {
    int e = errno;
    close(fd);
    return crimage_error_set(err, CRIMAGE_INTERNAL, e, "stat `%s`", s->root);
  }
  uint64_t bytes = (uint64_t) st.st_blocks * 512, inodes = 1;
  usage_walk(fd, 0, &bytes, &inodes);
  layers_usage(s, &bytes, &inodes);
  ret->mountpoint = find_mountpoint(s->root);
  ret->used_bytes = bytes;
  ret->inodes_used = inodes;
  ret->timestamp_ns = now_realtime_ns();
  return 0;
}

void store_usage_clear(store_usage *u)
{
  if (!u)
    return;
  free(u->mountpoint);
  u->mountpoint = NULL;
}
