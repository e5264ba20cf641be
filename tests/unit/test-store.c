/* The content store on real files in a temporary directory: blobs, ingest (resume, concurrency), image records keyed
 * by handler, lookups, tag moves, reload, garbage collection, usage, and crash safety by killing a writer. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <pthread.h>
#include <sched.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>

#include <cmocka.h>

#include "common/digest.h"
#include "common/dynbuf.h"
#include "common/fsutil.h"
#include "common/json.h"
#include "common/util.h"
#include "pull/store.h"

#define MANIFEST_MT "application/vnd.oci.image.manifest.v1+json"
#define BUSYBOX "docker.io/library/busybox"

typedef struct fixture {
  char *root;
} fixture;

static int rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
  return remove(path);
}

static int setup(void **state)
{
  fixture *f = xcalloc(1, sizeof(*f));
  char tmpl[] = "/tmp/crimage-test-store-XXXXXX";
  assert_non_null(mkdtemp(tmpl));
  f->root = xasprintf("%s/root", tmpl);
  *state = f;
  return 0;
}

static int teardown(void **state)
{
  fixture *f = *state;
  cleanup_free char *top = xstrdup(f->root);
  *strrchr(top, '/') = '\0';
  nftw(top, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
  free(f->root);
  free(f);
  return 0;
}

static store *open_store(const char *root)
{
  cleanup_error crimage_error *err = NULL;
  store *s = NULL;
  if (store_open(root, &s, &err) < 0)
    fail_msg("store_open: %s", err ? err->message : "?");
  return s;
}

static store *open_store_keeping(const char *root, int64_t retention_ms, uint64_t max_bytes)
{
  cleanup_error crimage_error *err = NULL;
  store *s = NULL;
  store_options o = {.unreferenced_retention_ms = retention_ms, .unreferenced_max_bytes = max_bytes};
  if (store_open_opts(root, &o, &s, &err) < 0)
    fail_msg("store_open_opts: %s", err ? err->message : "?");
  return s;
}

/* Sets a file's mtime to seconds ago, as if it had been written then. */
static void age_file(const char *path, int64_t seconds)
{
  struct timespec now;
  clock_gettime(CLOCK_REALTIME, &now);
  struct timespec t[2] = {{now.tv_sec - seconds, 0}, {now.tv_sec - seconds, 0}};
  if (utimensat(AT_FDCWD, path, t, AT_SYMLINK_NOFOLLOW) < 0)
    fail_msg("utimensat %s: %s", path, strerror(errno));
}

static char *sha256_of(const void *data, size_t len)
{
  char d[DIGEST_MAX_LEN + 1];
  digest_sha256(data, len, d);
  return xstrdup(d);
}

/* Stores data and returns its digest. */
static char *put(store *s, const char *data)
{
  cleanup_error crimage_error *err = NULL;
  char *d = sha256_of(data, strlen(data));
  if (store_blob_put(s, d, data, strlen(data), &err) < 0)
    fail_msg("store_blob_put: %s", err ? err->message : "?");
  return d;
}

/* An image made of real blobs: config, layers, manifest. */
typedef struct test_image {
  char *config;
  char *manifest;
  char **layers;
  uint64_t manifest_size;
} test_image;

static void test_image_clear(test_image *t)
{
  free(t->config);
  free(t->manifest);
  strv_free(t->layers);
}

/* Builds and stores an image whose config contains seed and whose layers have the given contents. */
static test_image make_image(store *s, const char *seed, const char *const *layer_contents)
{
  test_image t = {0};
  cleanup_free char *config = xasprintf("{\"architecture\":\"amd64\",\"os\":\"linux\",\"config\":{\"User\":\"1002\"},"
                                        "\"seed\":\"%s\"}",
                                        seed);
  t.config = put(s, config);
  t.layers = xcalloc(1, sizeof(char *));
  cleanup_free char *layers_json = xstrdup("");
  for (size_t i = 0; layer_contents[i]; i++) {
    cleanup_free char *d = put(s, layer_contents[i]);
    strv_add_unique(&t.layers, d);
    char *n = xasprintf("%s%s{\"digest\":\"%s\",\"size\":%zu}", layers_json, i ? "," : "", d,
                        strlen(layer_contents[i]));
    free(layers_json);
    layers_json = n;
  }
  cleanup_free char *manifest = xasprintf("{\"schemaVersion\":2,\"mediaType\":\"" MANIFEST_MT "\",\"config\":"
                                          "{\"digest\":\"%s\",\"size\":%zu},\"layers\":[%s]}",
                                          t.config, strlen(config), layers_json);
  t.manifest = put(s, manifest);
  t.manifest_size = strlen(manifest);
  return t;
}

static int record(store *s, const char *handler, const char *name, const char *tag, const char *repo_digest,
                  const test_image *t, crimage_error **err)
{
  store_record rec = {
      .handler = handler,
      .name = name,
      .tag = tag,
      .repo_digest = repo_digest,
      .manifest_digest = t->manifest,
      .manifest_media_type = MANIFEST_MT,
      .manifest_size = t->manifest_size,
      .config_digest = t->config,
      .layers = (const char *const *) t->layers,
      .size = 1234,
      .user = "1002",
  };
  return store_record_image(s, &rec, err);
}

static void record_ok(store *s, const char *handler, const char *name, const char *tag, const char *repo_digest,
                      const test_image *t)
{
  cleanup_error crimage_error *err = NULL;
  if (record(s, handler, name, tag, repo_digest, t, &err) < 0)
    fail_msg("store_record_image: %s", err ? err->message : "?");
}

/* Returns the id of the image found for key, or NULL. */
static char *find_id(store *s, const char *handler, const char *key)
{
  cleanup_error crimage_error *err = NULL;
  cleanup_store_image store_image *img = NULL;
  int r = store_find_image(s, handler, key, &img, &err);
  if (r < 0)
    fail_msg("store_find_image(%s): %s", key, err ? err->message : "?");
  return r > 0 ? xstrdup(img->id) : NULL;
}

static void assert_found(store *s, const char *handler, const char *key, const char *want_id)
{
  cleanup_free char *id = find_id(s, handler, key);
  if (!id)
    fail_msg("%s not found for handler \"%s\"", key, handler);
  assert_string_equal(id, want_id);
}

static void assert_absent(store *s, const char *handler, const char *key)
{
  cleanup_free char *id = find_id(s, handler, key);
  if (id)
    fail_msg("%s unexpectedly found for handler \"%s\" (%s)", key, handler, id);
}

static size_t count_files(const char *dir)
{
  DIR *d = opendir(dir);
  if (!d)
    return 0;
  size_t n = 0;
  struct dirent *de;
  while ((de = readdir(d)))
    if (de->d_name[0] != '.')
      n++;
  closedir(d);
  return n;
}

static char *blobs_dir(const char *root) { return xasprintf("%s/blobs/sha256", root); }

static void test_blob_put_read_exists(void **state)
{
  fixture *f = *state;
  store *s = open_store(f->root);
  cleanup_error crimage_error *err = NULL;
  const char *data = "hello, blob";
  cleanup_free char *d = sha256_of(data, strlen(data));
  uint64_t size = 0;
  assert_false(store_blob_exists(s, d, &size));
  assert_int_equal(store_blob_put(s, d, data, strlen(data), &err), 0);
  assert_true(store_blob_exists(s, d, &size));
  assert_int_equal(size, strlen(data));
  /* Putting it again is a no-op. */
  assert_int_equal(store_blob_put(s, d, data, strlen(data), &err), 0);

  cleanup_free char *back = NULL;
  size_t len = 0;
  assert_int_equal(store_blob_read(s, d, 1024, &back, &len, &err), 0);
  assert_int_equal(len, strlen(data));
  assert_memory_equal(back, data, len);

  /* The read limit is enforced. */
  cleanup_free char *tiny = NULL;
  assert_true(store_blob_read(s, d, 3, &tiny, &len, &err) < 0);
  assert_null(tiny);
  crimage_error_clear(&err);

  cleanup_free char *path = store_blob_path(s, d);
  cleanup_free char *want = xasprintf("%s/blobs/sha256/%s", store_root(s), digest_hex(d));
  assert_string_equal(path, want);
  assert_null(store_blob_path(s, "sha256:nothex"));

  /* The layout is the OCI image layout. */
  cleanup_free char *layout_path = xasprintf("%s/oci-layout", f->root);
  cleanup_free char *layout = NULL;
  assert_int_equal(read_file(layout_path, 4096, &layout, NULL, &err), 0);
  assert_string_equal(layout, "{\"imageLayoutVersion\":\"1.0.0\"}");

  /* A blob corrupted on disk is reported, not returned. */
  FILE *fp = fopen(path, "w");
  assert_non_null(fp);
  fputs("hello, blub", fp);
  fclose(fp);
  cleanup_free char *bad = NULL;
  assert_true(store_blob_read(s, d, 1024, &bad, &len, &err) < 0);
  assert_int_equal(err->status, CRIMAGE_DATA_LOSS);
  store_close(s);
}

static void test_blob_digest_mismatch(void **state)
{
  fixture *f = *state;
  store *s = open_store(f->root);
  cleanup_error crimage_error *err = NULL;
  const char *data = "the real content";
  cleanup_free char *other = sha256_of("something else", 14);
  assert_true(store_blob_put(s, other, data, strlen(data), &err) < 0);
  assert_int_equal(err->status, CRIMAGE_DATA_LOSS);
  crimage_error_clear(&err);
  cleanup_free char *dir = blobs_dir(f->root);
  cleanup_free char *ingest = xasprintf("%s/ingest", f->root);
  assert_int_equal(count_files(dir), 0);
  assert_int_equal(count_files(ingest), 0);
  assert_false(store_blob_exists(s, other, NULL));

  /* Wrong size: more bytes than the descriptor says, and fewer. */
  cleanup_free char *d = sha256_of(data, strlen(data));
  store_ingest *in = NULL;
  assert_int_equal(store_ingest_begin(s, d, 4, &in, &err), 0);
  assert_true(store_ingest_write(in, data, strlen(data), &err) < 0);
  assert_int_equal(err->status, CRIMAGE_DATA_LOSS);
  crimage_error_clear(&err);
  store_ingest_abort(in, false);
  assert_int_equal(store_ingest_begin(s, d, 100, &in, &err), 0);
  assert_int_equal(store_ingest_write(in, data, strlen(data), &err), 0);
  assert_true(store_ingest_commit(in, &err) < 0);
  assert_int_equal(err->status, CRIMAGE_DATA_LOSS);
  crimage_error_clear(&err);
  assert_int_equal(count_files(dir), 0);
  assert_int_equal(count_files(ingest), 0);

  /* Bad digests are rejected. */
  assert_true(store_blob_put(s, "sha256:xyz", data, 3, &err) < 0);
  assert_int_equal(err->status, CRIMAGE_INVALID_ARGUMENT);
  crimage_error_clear(&err);
  assert_true(store_ingest_begin(s, "md5:00", 1, &in, &err) < 0);
  assert_int_equal(err->status, CRIMAGE_INVALID_ARGUMENT);
  crimage_error_clear(&err);
  assert_false(store_blob_exists(s, "../../etc/passwd", NULL));
  store_close(s);
}

static void test_ingest_resume(void **state)
{
  fixture *f = *state;
  cleanup_error crimage_error *err = NULL;
  size_t len = 300000;
  cleanup_free char *data = xmalloc(len);
  for (size_t i = 0; i < len; i++)
    data[i] = (char) (i * 7 + i / 251);
  cleanup_free char *d = sha256_of(data, len);

  store *s = open_store(f->root);
  store_ingest *in = NULL;
  assert_int_equal(store_ingest_begin(s, d, (int64_t) len, &in, &err), 0);
  assert_int_equal(store_ingest_offset(in), 0);
  assert_int_equal(store_ingest_write(in, data, 100000, &err), 0);
  assert_int_equal(store_ingest_offset(in), 100000);
  store_ingest_abort(in, true);
  store_close(s);

  /* A restart: the partial blob is found, re-hashed and continued. */
  s = open_store(f->root);
  assert_false(store_blob_exists(s, d, NULL));
  assert_int_equal(store_ingest_begin(s, d, (int64_t) len, &in, &err), 0);
  assert_int_equal(store_ingest_offset(in), 100000);
  assert_int_equal(store_ingest_write(in, data + 100000, 50000, &err), 0);
  store_ingest_abort(in, true);

  assert_int_equal(store_ingest_begin(s, d, (int64_t) len, &in, &err), 0);
  assert_int_equal(store_ingest_offset(in), 150000);
  assert_int_equal(store_ingest_write(in, data + 150000, len - 150000, &err), 0);
  assert_int_equal(store_ingest_commit(in, &err), 0);
  assert_true(store_blob_exists(s, d, NULL));
  cleanup_free char *back = NULL;
  size_t blen = 0;
  assert_int_equal(store_blob_read(s, d, len, &back, &blen, &err), 0);
  assert_int_equal(blen, len);
  assert_memory_equal(back, data, len);
  /* Once committed, begin says so. */
  assert_int_equal(store_ingest_begin(s, d, (int64_t) len, &in, &err), -EEXIST);
  assert_null(err);

  /* Truncate restarts from 0 (a server that ignored a Range request). */
  const char *small = "0123456789";
  cleanup_free char *sd = sha256_of(small, 10);
  assert_int_equal(store_ingest_begin(s, sd, 10, &in, &err), 0);
  assert_int_equal(store_ingest_write(in, "garbage", 7, &err), 0);
  assert_int_equal(store_ingest_truncate(in, &err), 0);
  assert_int_equal(store_ingest_offset(in), 0);
  assert_int_equal(store_ingest_write(in, small, 10, &err), 0);
  assert_int_equal(store_ingest_commit(in, &err), 0);
  assert_true(store_blob_exists(s, sd, NULL));

  /* A partial blob longer than expected (e.g. garbage) restarts from 0; unknown size (-1) resumes. */
  const char *other = "abcdefghij";
  cleanup_free char *od = sha256_of(other, 10);
  assert_int_equal(store_ingest_begin(s, od, -1, &in, &err), 0);
  assert_int_equal(store_ingest_write(in, "xxxxxxxxxxxxxxxxxxxx", 20, &err), 0);
  store_ingest_abort(in, true);
  assert_int_equal(store_ingest_begin(s, od, 10, &in, &err), 0);
  assert_int_equal(store_ingest_offset(in), 0);
  assert_int_equal(store_ingest_write(in, other, 5, &err), 0);
  store_ingest_abort(in, true);
  assert_int_equal(store_ingest_begin(s, od, -1, &in, &err), 0);
  assert_int_equal(store_ingest_offset(in), 5);
  assert_int_equal(store_ingest_write(in, other + 5, 5, &err), 0);
  assert_int_equal(store_ingest_commit(in, &err), 0);
  assert_true(store_blob_exists(s, od, NULL));
  cleanup_free char *ingest = xasprintf("%s/ingest", f->root);
  assert_int_equal(count_files(ingest), 0);
  store_close(s);
}

typedef struct ingest_thread {
  store *s;
  const char *digest;
  const char *data;
  size_t len;
  int result;
  bool started;
} ingest_thread;

static void *begin_thread(void *arg)
{
  ingest_thread *t = arg;
  cleanup_error crimage_error *err = NULL;
  store_ingest *in = NULL;
  t->result = store_ingest_begin(t->s, t->digest, (int64_t) t->len, &in, &err);
  if (t->result == 0) {
    /* Got it first (cannot happen in the waiting test, which asserts -EEXIST); finish the blob. */
    store_ingest_truncate(in, NULL);
    store_ingest_write(in, t->data, t->len, NULL);
    store_ingest_commit(in, NULL);
  }
  return NULL;
}

/* Writes the blob in small chunks, so concurrent writers would interleave if the lock did not serialize them. */
static void *writer_thread(void *arg)
{
  ingest_thread *t = arg;
  cleanup_error crimage_error *err = NULL;
  store_ingest *in = NULL;
  int r = store_ingest_begin(t->s, t->digest, (int64_t) t->len, &in, &err);
  if (r == -EEXIST) {
    t->result = 1;
    return NULL;
  }
  if (r < 0) {
    t->result = r;
    return NULL;
  }
  if (store_ingest_offset(in) > 0)
    store_ingest_truncate(in, &err);
  for (size_t off = 0; off < t->len; off += 997) {
    size_t n = t->len - off < 997 ? t->len - off : 997;
    if (store_ingest_write(in, t->data + off, n, &err) < 0) {
      store_ingest_abort(in, false);
      t->result = -EIO;
      return NULL;
    }
  }
  t->result = store_ingest_commit(in, &err);
  return NULL;
}

static void test_ingest_concurrent(void **state)
{
  fixture *f = *state;
  cleanup_error crimage_error *err = NULL;
  store *s = open_store(f->root);
  size_t len = 200000;
  cleanup_free char *data = xmalloc(len);
  for (size_t i = 0; i < len; i++)
    data[i] = (char) (i % 253);
  cleanup_free char *d = sha256_of(data, len);

  /* A second begin waits for the first writer and then learns that the blob is there. */
  store_ingest *in = NULL;
  assert_int_equal(store_ingest_begin(s, d, (int64_t) len, &in, &err), 0);
  assert_int_equal(store_ingest_write(in, data, len / 2, &err), 0);
  ingest_thread bt = {.s = s, .digest = d, .data = data, .len = len};
  pthread_t th;
  assert_int_equal(pthread_create(&th, NULL, begin_thread, &bt), 0);
  assert_int_equal(store_ingest_write(in, data + len / 2, len - len / 2, &err), 0);
  assert_int_equal(store_ingest_commit(in, &err), 0);
  pthread_join(th, NULL);
  assert_int_equal(bt.result, -EEXIST);

  /* Many writers of the same digests at once: every blob ends up stored once and intact. */
  enum { NBLOBS = 6, NWRITERS = 4 };
  char *datas[NBLOBS];
  char *digests[NBLOBS];
  for (int b = 0; b < NBLOBS; b++) {
    size_t l = 50000 + (size_t) b * 1000;
    datas[b] = xmalloc(l);
    for (size_t i = 0; i < l; i++)
      datas[b][i] = (char) (i * (size_t) (b + 3));
    digests[b] = sha256_of(datas[b], l);
  }
  ingest_thread wt[NBLOBS * NWRITERS];
  pthread_t wth[NBLOBS * NWRITERS];
  for (int b = 0; b < NBLOBS; b++)
    for (int w = 0; w < NWRITERS; w++) {
      ingest_thread *t = &wt[b * NWRITERS + w];
      *t = (ingest_thread){.s = s, .digest = digests[b], .data = datas[b], .len = 50000 + (size_t) b * 1000};
      assert_int_equal(pthread_create(&wth[b * NWRITERS + w], NULL, writer_thread, t), 0);
    }
  for (int i = 0; i < NBLOBS * NWRITERS; i++)
    pthread_join(wth[i], NULL);
  for (int b = 0; b < NBLOBS; b++) {
    int committed = 0;
    for (int w = 0; w < NWRITERS; w++) {
      int r = wt[b * NWRITERS + w].result;
      assert_true(r == 0 || r == 1);
      committed += r == 0;
    }
    assert_true(committed >= 1);
    cleanup_free char *back = NULL;
    size_t blen = 0;
    assert_int_equal(store_blob_read(s, digests[b], 1 << 20, &back, &blen, &err), 0);
    assert_int_equal(blen, 50000 + (size_t) b * 1000);
    free(datas[b]);
    free(digests[b]);
  }
  cleanup_free char *ingest = xasprintf("%s/ingest", f->root);
  assert_int_equal(count_files(ingest), 0);
  store_close(s);
}

static void test_record_find(void **state)
{
  fixture *f = *state;
  cleanup_error crimage_error *err = NULL;
  store *s = open_store(f->root);
  const char *layers[] = {"layer one", "layer two", NULL};
  test_image t = make_image(s, "find", layers);
  cleanup_free char *repo_digest = sha256_of("the index", 9);
  record_ok(s, "", BUSYBOX, "latest", repo_digest, &t);

  cleanup_free char *tagged = xasprintf("%s:latest", BUSYBOX);
  cleanup_free char *digested = xasprintf("%s@%s", BUSYBOX, repo_digest);
  char prefix3[4], prefix12[13];
  snprintf(prefix3, sizeof(prefix3), "%s", digest_hex(t.config));
  snprintf(prefix12, sizeof(prefix12), "%s", digest_hex(t.config));
  cleanup_free char *prefixed = xasprintf("sha256:%s", prefix12);
  assert_found(s, "", t.config, t.config);
  assert_found(s, "", digest_hex(t.config), t.config);
  assert_found(s, "", prefix3, t.config);
  assert_found(s, "", prefix12, t.config);
  assert_found(s, "", prefixed, t.config);
  assert_found(s, "", tagged, t.config);
  assert_found(s, "", digested, t.config);
  assert_found(s, NULL, tagged, t.config);
  assert_absent(s, "", "ab");                      /* too short for a prefix */
  assert_absent(s, "", BUSYBOX ":other");          /* another tag */
  assert_absent(s, "", "docker.io/library/alpine:latest");
  assert_absent(s, "", t.manifest);                /* the manifest digest is not an id */
  assert_absent(s, "", "busybox");                 /* keys are normalized names */

  cleanup_store_image store_image *img = NULL;
  assert_int_equal(store_find_image(s, "", tagged, &img, &err), 1);
  assert_string_equal(img->handler, "");
  assert_string_equal(img->manifest_digest, t.manifest);
  assert_string_equal(img->manifest_media_type, MANIFEST_MT);
  assert_int_equal(strv_length(img->repo_tags), 1);
  assert_string_equal(img->repo_tags[0], tagged);
  assert_int_equal(strv_length(img->repo_digests), 1);
  assert_string_equal(img->repo_digests[0], digested);
  assert_int_equal(strv_length(img->layers), 2);
  assert_string_equal(img->layers[0], t.layers[0]);
  assert_string_equal(img->layers[1], t.layers[1]);
  assert_int_equal(img->size, 1234);
  assert_string_equal(img->user, "1002");
  assert_true(img->created_ns > 0);
  assert_false(img->pinned);

  /* Pulling by digest only adds a repo digest. */
  cleanup_free char *md = sha256_of("manifest by digest", 18);
  record_ok(s, "", "registry.example:5000/app", NULL, md, &t);
  cleanup_free char *digested2 = xasprintf("registry.example:5000/app@%s", md);
  assert_found(s, "", digested2, t.config);
  assert_absent(s, "", "registry.example:5000/app:latest");

  /* Bad keys and records. */
  assert_true(store_find_image(s, "", "", &img, &err) < 0);
  assert_int_equal(err->status, CRIMAGE_INVALID_ARGUMENT);
  crimage_error_clear(&err);
  assert_true(record(s, "", "", "latest", repo_digest, &t, &err) < 0);
  assert_int_equal(err->status, CRIMAGE_INVALID_ARGUMENT);
  crimage_error_clear(&err);
  assert_true(record(s, "", BUSYBOX, NULL, NULL, &t, &err) < 0);
  assert_int_equal(err->status, CRIMAGE_INVALID_ARGUMENT);
  crimage_error_clear(&err);
  assert_true(record(s, "", BUSYBOX, "bad\ntag", NULL, &t, &err) < 0);
  crimage_error_clear(&err);
  assert_true(record(s, "", BUSYBOX, "latest", "sha256:short", &t, &err) < 0);
  crimage_error_clear(&err);
  /* Every referenced blob must be stored. */
  test_image missing = {.config = xstrdup(t.config), .manifest = xstrdup(t.manifest), .manifest_size = 1};
  missing.layers = xcalloc(2, sizeof(char *));
  missing.layers[0] = sha256_of("not stored", 10);
  assert_true(record(s, "", BUSYBOX, "x", NULL, &missing, &err) < 0);
  assert_int_equal(err->status, CRIMAGE_FAILED_PRECONDITION);
  crimage_error_clear(&err);
  test_image_clear(&missing);
  test_image_clear(&t);
  store_close(s);
}

static void test_prefix_ambiguity(void **state)
{
  fixture *f = *state;
  cleanup_error crimage_error *err = NULL;
  store *s = open_store(f->root);
  /* Find two configs whose digests share the first 3 hex digits (a birthday search over 4096 values). */
  char *seen[4096] = {0};
  char *a = NULL, *b = NULL;
  for (int i = 0; !a && i < 100000; i++) {
    cleanup_free char *seed = xasprintf("%d", i);
    cleanup_free char *config = xasprintf("{\"architecture\":\"amd64\",\"os\":\"linux\",\"config\":{\"User\":\"1002\"},"
                                          "\"seed\":\"%s\"}",
                                          seed);
    cleanup_free char *d = sha256_of(config, strlen(config));
    char p3[4];
    snprintf(p3, sizeof(p3), "%s", digest_hex(d));
    unsigned idx = (unsigned) strtoul(p3, NULL, 16);
    if (seen[idx]) {
      a = seen[idx];
      seen[idx] = NULL;
      b = TAKE_PTR(seed);
    } else {
      seen[idx] = TAKE_PTR(seed);
    }
  }
  assert_non_null(a);
  const char *none[] = {NULL};
  test_image ta = make_image(s, a, none);
  test_image tb = make_image(s, b, none);
  record_ok(s, "runc", "docker.io/library/a", "1", NULL, &ta);
  record_ok(s, "runc", "docker.io/library/b", "1", NULL, &tb);
  char p3[4];
  snprintf(p3, sizeof(p3), "%s", digest_hex(ta.config));
  cleanup_store_image store_image *img = NULL;
  assert_true(store_find_image(s, "runc", p3, &img, &err) < 0);
  assert_int_equal(err->status, CRIMAGE_INVALID_ARGUMENT);
  assert_null(img);
  crimage_error_clear(&err);
  /* A longer prefix tells them apart; the full ids always do. */
  size_t common = 3;
  while (digest_hex(ta.config)[common] == digest_hex(tb.config)[common])
    common++;
  cleanup_free char *pa = xstrndup(digest_hex(ta.config), common + 1);
  cleanup_free char *pb = xstrndup(digest_hex(tb.config), common + 1);
  assert_found(s, "runc", pa, ta.config);
  assert_found(s, "runc", pb, tb.config);
  /* Ambiguity is per handler: for another handler holding only one of them the prefix is unique. */
  record_ok(s, "kata", "docker.io/library/a", "1", NULL, &ta);
  assert_found(s, "kata", p3, ta.config);

  for (size_t i = 0; i < ARRAY_SIZE(seen); i++)
    free(seen[i]);
  free(a);
  free(b);
  test_image_clear(&ta);
  test_image_clear(&tb);
  store_close(s);
}

static size_t count_images(store *s, const char *handler)
{
  cleanup_error crimage_error *err = NULL;
  store_image **list = NULL;
  size_t n = 0;
  assert_int_equal(store_list_images(s, handler, &list, &n, &err), 0);
  store_image_list_free(list, n);
  return n;
}

static void test_handlers(void **state)
{
  fixture *f = *state;
  cleanup_error crimage_error *err = NULL;
  store *s = open_store(f->root);
  const char *layers[] = {"shared base layer", "app layer", NULL};
  test_image t = make_image(s, "handlers", layers);
  cleanup_free char *rd = sha256_of("index", 5);
  cleanup_free char *tagged = xasprintf("%s:latest", BUSYBOX);
  cleanup_free char *dir = blobs_dir(f->root);

  record_ok(s, "runc", BUSYBOX, "latest", rd, &t);
  assert_found(s, "runc", tagged, t.config);
  assert_absent(s, "kata", tagged);
  assert_absent(s, "kata", t.config);
  assert_absent(s, "", tagged);
  assert_int_equal(count_images(s, "runc"), 1);
  assert_int_equal(count_images(s, "kata"), 0);

  /* Pulled for kata too: a second record, the blobs are stored once. */
  record_ok(s, "kata", BUSYBOX, "latest", rd, &t);
  assert_found(s, "kata", tagged, t.config);
  assert_int_equal(count_images(s, NULL), 2);
  assert_int_equal(count_files(dir), 4); /* config, manifest, 2 layers */

  /* Removing for runc keeps kata's record and every blob. */
  assert_int_equal(store_remove_image(s, "runc", t.config, &err), 0);
  assert_absent(s, "runc", tagged);
  assert_found(s, "kata", tagged, t.config);
  assert_true(store_blob_exists(s, t.config, NULL));
  assert_true(store_blob_exists(s, t.manifest, NULL));
  assert_true(store_blob_exists(s, t.layers[0], NULL));
  assert_int_equal(count_files(dir), 4);
  /* Idempotent. */
  assert_int_equal(store_remove_image(s, "runc", t.config, &err), 0);

  /* The last record goes: so do the blobs. */
  assert_int_equal(store_remove_image(s, "kata", t.config, &err), 0);
  assert_int_equal(count_images(s, NULL), 0);
  assert_int_equal(count_files(dir), 0);
  assert_int_equal(store_remove_image(s, "kata", t.config, &err), 0);
  assert_true(store_remove_image(s, "kata", "not-an-id", &err) < 0);
  assert_int_equal(err->status, CRIMAGE_INVALID_ARGUMENT);
  test_image_clear(&t);
  store_close(s);
}

static void test_tag_move_and_merge(void **state)
{
  fixture *f = *state;
  cleanup_error crimage_error *err = NULL;
  store *s = open_store(f->root);
  const char *la[] = {"old layer", NULL};
  const char *lb[] = {"new layer", NULL};
  test_image old = make_image(s, "old", la);
  test_image new = make_image(s, "new", lb);
  cleanup_free char *rd_old = sha256_of("old index", 9);
  cleanup_free char *rd_new = sha256_of("new index", 9);
  cleanup_free char *latest = xasprintf("%s:latest", BUSYBOX);
  cleanup_free char *v1 = xasprintf("%s:1.0", BUSYBOX);
  cleanup_free char *old_digest = xasprintf("%s@%s", BUSYBOX, rd_old);

  record_ok(s, "", BUSYBOX, "latest", rd_old, &old);
  record_ok(s, "", BUSYBOX, "1.0", rd_old, &old);
  record_ok(s, "kata", BUSYBOX, "latest", rd_old, &old);
  /* latest moves to the new image for handler "" only. */
  record_ok(s, "", BUSYBOX, "latest", rd_new, &new);
  assert_found(s, "", latest, new.config);
  assert_found(s, "", v1, old.config);
  assert_found(s, "kata", latest, old.config);

  /* Now 1.0 moves too: the old image stays listed, untagged, with its repo digest. */
  record_ok(s, "", BUSYBOX, "1.0", rd_new, &new);
  assert_int_equal(count_images(s, ""), 2);
  cleanup_store_image store_image *img = NULL;
  assert_int_equal(store_find_image(s, "", old.config, &img, &err), 1);
  assert_int_equal(strv_length(img->repo_tags), 0);
  assert_int_equal(strv_length(img->repo_digests), 1);
  assert_string_equal(img->repo_digests[0], old_digest);
  assert_found(s, "", old_digest, old.config);

  /* Recording the same image again merges names into the existing record. */
  store_image_free(img);
  img = NULL;
  record_ok(s, "", "registry.example/mirror/busybox", "stable", rd_new, &new);
  assert_int_equal(store_find_image(s, "", new.config, &img, &err), 1);
  assert_int_equal(strv_length(img->repo_tags), 3);
  assert_true(strv_contains(img->repo_tags, latest));
  assert_true(strv_contains(img->repo_tags, v1));
  assert_true(strv_contains(img->repo_tags, "registry.example/mirror/busybox:stable"));
  assert_int_equal(strv_length(img->repo_digests), 2);
  assert_int_equal(count_images(s, ""), 2);

  /* Survives a reload. */
  store_close(s);
  s = open_store(f->root);
  store_image_free(img);
  img = NULL;
  assert_int_equal(store_find_image(s, "", old.config, &img, &err), 1);
  assert_int_equal(strv_length(img->repo_tags), 0);
  assert_string_equal(img->repo_digests[0], old_digest);
  assert_found(s, "", "registry.example/mirror/busybox:stable", new.config);
  assert_found(s, "kata", latest, old.config);
  test_image_clear(&old);
  test_image_clear(&new);
  store_close(s);
}

static bool images_equal(const store_image *a, const store_image *b)
{
  if (!streq(a->handler, b->handler) || !streq(a->id, b->id) || !streq(a->manifest_digest, b->manifest_digest) ||
      !streq(a->manifest_media_type, b->manifest_media_type) || a->size != b->size || !streq(a->user, b->user) ||
      a->created_ns != b->created_ns)
    return false;
  char **lists[3][2] = {{a->repo_tags, b->repo_tags}, {a->repo_digests, b->repo_digests}, {a->layers, b->layers}};
  for (int i = 0; i < 3; i++) {
    if (strv_length(lists[i][0]) != strv_length(lists[i][1]))
      return false;
    for (size_t j = 0; lists[i][0][j]; j++)
      if (!streq(lists[i][0][j], lists[i][1][j]))
        return false;
  }
  return true;
}

static void test_reload(void **state)
{
  fixture *f = *state;
  cleanup_error crimage_error *err = NULL;
  store *s = open_store(f->root);
  const char *l1[] = {"base", "mid", "top", NULL};
  const char *l2[] = {"base", NULL};
  test_image a = make_image(s, "a", l1);
  test_image b = make_image(s, "b", l2);
  cleanup_free char *rd = sha256_of("rd", 2);
  record_ok(s, "", BUSYBOX, "latest", rd, &a);
  record_ok(s, "", "localhost:5000/x/y", "v2", NULL, &b);
  record_ok(s, "kata", "localhost:5000/x/y", NULL, rd, &b);
  store_image **before = NULL;
  size_t nb = 0;
  assert_int_equal(store_list_images(s, NULL, &before, &nb, &err), 0);
  assert_int_equal(nb, 3);
  store_close(s);

  /* index.json is an OCI image index naming the tagged images, as skopeo expects. */
  cleanup_free char *index_path = xasprintf("%s/index.json", f->root);
  cleanup_json json_object *idx = NULL;
  assert_int_equal(yaml_parse_file(index_path, 1 << 20, JSON_LIMITS(16u << 20, 1000), &idx, &err), 0);
  int64_t v = 0;
  assert_true(json_get_int64(idx, "schemaVersion", &v));
  assert_int_equal(v, 2);
  json_object *manifests = json_get_array(idx, "manifests");
  assert_non_null(manifests);
  bool saw_ref = false;
  for (size_t i = 0; i < json_object_array_length(manifests); i++) {
    json_object *ann = json_get_object(json_object_array_get_idx(manifests, i), "annotations");
    const char *ref = json_get_string(ann, "org.opencontainers.image.ref.name");
    if (ref && streq(ref, BUSYBOX ":latest"))
      saw_ref = true;
    if (ref)
      assert_true(streq(ref, BUSYBOX ":latest") || streq(ref, "localhost:5000/x/y:v2"));
    assert_non_null(json_get_string(ann, "io.crimage.runtime-handler"));
  }
  assert_true(saw_ref);

  s = open_store(f->root);
  store_image **after = NULL;
  size_t na = 0;
  assert_int_equal(store_list_images(s, NULL, &after, &na, &err), 0);
  assert_int_equal(na, nb);
  for (size_t i = 0; i < nb; i++) {
    bool found = false;
    for (size_t j = 0; j < na && !found; j++)
      found = images_equal(before[i], after[j]);
    if (!found)
      fail_msg("image %s (handler \"%s\") differs after reload", before[i]->id, before[i]->handler);
  }
  store_image_list_free(before, nb);
  store_image_list_free(after, na);
  store_close(s);
  test_image_clear(&a);
  test_image_clear(&b);
}

static void index_stat(const char *root, struct stat *st)
{
  cleanup_free char *path = xasprintf("%s/index.json", root);
  assert_int_equal(stat(path, st), 0);
}

/* index.json is replaced by rename, so a rewrite shows as a new inode (a change of mtime alone could hide in the
 * timestamp granularity). */
static bool index_rewritten(const struct stat *a, const struct stat *b)
{
  return a->st_ino != b->st_ino || a->st_mtim.tv_sec != b->st_mtim.tv_sec ||
         a->st_mtim.tv_nsec != b->st_mtim.tv_nsec;
}

/* Recording what is already recorded writes nothing; any real change still does, and the platform is kept. */
static void test_record_unchanged_no_write(void **state)
{
  fixture *f = *state;
  cleanup_error crimage_error *err = NULL;
  store *s = open_store(f->root);
  const char *l1[] = {"one", "two", NULL};
  test_image a = make_image(s, "a", l1);
  cleanup_free char *rd = sha256_of("index-a", 7);
  store_record rec = {
      .handler = "",
      .name = BUSYBOX,
      .tag = "latest",
      .repo_digest = rd,
      .manifest_digest = a.manifest,
      .manifest_media_type = MANIFEST_MT,
      .manifest_size = a.manifest_size,
      .config_digest = a.config,
      .layers = (const char *const *) a.layers,
      .size = 1234,
      .user = "1002",
      .platform = "linux/arm64/v8",
  };
  assert_int_equal(store_record_image(s, &rec, &err), 0);
  struct stat st0, st1;
  index_stat(f->root, &st0);

  for (int i = 0; i < 3; i++)
    assert_int_equal(store_record_image(s, &rec, &err), 0);
  index_stat(f->root, &st1);
  assert_false(index_rewritten(&st0, &st1));

  /* the same image pulled for another platform is a change (the fast path must not reuse it) */
  rec.platform = "linux/amd64";
  assert_int_equal(store_record_image(s, &rec, &err), 0);
  index_stat(f->root, &st1);
  assert_true(index_rewritten(&st0, &st1));
  st0 = st1;

  /* a new name is a change */
  rec.tag = "stable";
  assert_int_equal(store_record_image(s, &rec, &err), 0);
  index_stat(f->root, &st1);
  assert_true(index_rewritten(&st0, &st1));
  st0 = st1;
  rec.tag = "latest";
  assert_int_equal(store_record_image(s, &rec, &err), 0); /* both names already there */
  index_stat(f->root, &st1);
  assert_false(index_rewritten(&st0, &st1));

  /* another handler is a change */
  rec.handler = "kata";
  assert_int_equal(store_record_image(s, &rec, &err), 0);
  index_stat(f->root, &st1);
  assert_true(index_rewritten(&st0, &st1));

  cleanup_store_image store_image *img = NULL;
  assert_int_equal(store_find_image(s, "", BUSYBOX ":latest", &img, &err), 1);
  assert_string_equal(img->platform, "linux/amd64");
  store_close(s);

  /* the platform survives a reload; a record without one reads back as unknown (NULL) */
  s = open_store(f->root);
  store_image_free(img);
  img = NULL;
  assert_int_equal(store_find_image(s, "", BUSYBOX ":stable", &img, &err), 1);
  assert_string_equal(img->platform, "linux/amd64");
  test_image b = make_image(s, "b", l1);
  rec.handler = "";
  rec.tag = "old";
  rec.repo_digest = NULL;
  rec.manifest_digest = b.manifest;
  rec.manifest_size = b.manifest_size;
  rec.config_digest = b.config;
  rec.platform = NULL;
  assert_int_equal(store_record_image(s, &rec, &err), 0);
  store_close(s);
  s = open_store(f->root);
  store_image_free(img);
  img = NULL;
  assert_int_equal(store_find_image(s, "", BUSYBOX ":old", &img, &err), 1);
  assert_null(img->platform);
  store_close(s);
  test_image_clear(&a);
  test_image_clear(&b);
}

static int replay_collect(void *userdata, const void *data, size_t len, crimage_error **err)
{
  return dynbuf_append(userdata, data, len) < 0 ? crimage_error_set(err, CRIMAGE_INTERNAL, ENOBUFS, "full") : 0;
}

static int replay_fail(void *userdata, const void *data, size_t len, crimage_error **err)
{
  return crimage_error_set(err, CRIMAGE_DATA_LOSS, EBADMSG, "refused");
}

/* A resumed ingest hands its partial bytes back in order, exactly once. */
static void test_ingest_replay(void **state)
{
  fixture *f = *state;
  cleanup_error crimage_error *err = NULL;
  size_t len = 400000;
  cleanup_free char *data = xmalloc(len);
  for (size_t i = 0; i < len; i++)
    data[i] = (char) (i * 13 + i / 509);
  cleanup_free char *d = sha256_of(data, len);
  store *s = open_store(f->root);
  store_ingest *in = NULL;
  assert_int_equal(store_ingest_begin(s, d, (int64_t) len, &in, &err), 0);
  cleanup_dynbuf dynbuf got;
  dynbuf_init(&got, len);
  assert_int_equal(store_ingest_replay(in, replay_collect, &got, &err), 0); /* nothing yet */
  assert_int_equal(got.len, 0);
  assert_int_equal(store_ingest_write(in, data, 300001, &err), 0);
  store_ingest_abort(in, true);

  assert_int_equal(store_ingest_begin(s, d, (int64_t) len, &in, &err), 0);
  assert_int_equal(store_ingest_offset(in), 300001);
  assert_int_equal(store_ingest_replay(in, replay_collect, &got, &err), 0);
  assert_int_equal(got.len, 300001);
  assert_memory_equal(got.data, data, 300001);
  assert_true(store_ingest_replay(in, replay_fail, NULL, &err) < 0);
  assert_int_equal(err->status, CRIMAGE_DATA_LOSS);
  crimage_error_clear(&err);
  /* replay does not move the write position */
  assert_int_equal(store_ingest_write(in, data + 300001, len - 300001, &err), 0);
  assert_int_equal(store_ingest_commit(in, &err), 0);
  assert_true(store_blob_exists(s, d, NULL));
  store_close(s);
}

static bool cancel_on_third_poll(void *userdata)
{
  int *polls = userdata;
  return ++*polls >= 3;
}

static bool never_cancelled(void *userdata) { return false; }

typedef struct late_writer {
  store *s;
  store_ingest *in;
  const char *data;
  size_t len;
} late_writer;

static void *commit_later(void *arg)
{
  late_writer *w = arg;
  struct timespec ts = {0, 100 * 1000 * 1000};
  nanosleep(&ts, NULL);
  cleanup_error crimage_error *err = NULL;
  assert_int_equal(store_ingest_write(w->in, w->data, w->len, &err), 0);
  assert_int_equal(store_ingest_commit(w->in, &err), 0);
  return NULL;
}

/* Waiting for another writer of the same blob: a cancelled waiter gives up with CANCELLED; a patient one finds the
 * blob committed (-EEXIST) and writes nothing itself. */
static void test_ingest_wait_cancellable(void **state)
{
  fixture *f = *state;
  cleanup_error crimage_error *err = NULL;
  const char *data = "shared layer bytes";
  cleanup_free char *d = sha256_of(data, strlen(data));
  store *s = open_store(f->root);
  store_ingest *first = NULL, *second = NULL;
  assert_int_equal(store_ingest_begin(s, d, (int64_t) strlen(data), &first, &err), 0);

  int polls = 0;
  assert_true(store_ingest_begin_cancellable(s, d, (int64_t) strlen(data), cancel_on_third_poll, &polls, &second,
                                             &err) < 0);
  assert_int_equal(err->status, CRIMAGE_CANCELLED);
  assert_int_equal(polls, 3);
  crimage_error_clear(&err);

  late_writer w = {.s = s, .in = first, .data = data, .len = strlen(data)};
  pthread_t t;
  assert_int_equal(pthread_create(&t, NULL, commit_later, &w), 0);
  assert_int_equal(store_ingest_begin_cancellable(s, d, (int64_t) strlen(data), never_cancelled, NULL, &second,
                                                  &err), -EEXIST);
  assert_null(err);
  pthread_join(t, NULL);
  assert_true(store_blob_exists(s, d, NULL));
  store_close(s);
}

static void write_text(const char *path, const char *text)
{
  cleanup_error crimage_error *err = NULL;
  assert_int_equal(write_file_atomic(path, text, strlen(text), 0644, &err), 0);
}

static void test_corrupt_index(void **state)
{
  fixture *f = *state;
  cleanup_error crimage_error *err = NULL;
  store *s = open_store(f->root);
  const char *l1[] = {"layer", NULL};
  const char *l2[] = {"layer 2", NULL};
  test_image a = make_image(s, "a", l1);
  test_image b = make_image(s, "b", l2);
  record_ok(s, "", BUSYBOX, "a", NULL, &a);
  record_ok(s, "", BUSYBOX, "b", NULL, &b);
  store_close(s);

  /* Damage: a garbage entry, an entry with a bad id, and a missing layer blob of image b. */
  cleanup_free char *index_path = xasprintf("%s/index.json", f->root);
  cleanup_free char *text = NULL;
  assert_int_equal(read_file(index_path, 1 << 20, &text, NULL, &err), 0);
  char *open_bracket = strchr(text, '[');
  assert_non_null(open_bracket);
  *open_bracket = '\0';
  cleanup_free char *damaged = xasprintf("%s[42,{\"digest\":\"x\"},{\"mediaType\":\"m\",\"digest\":\"%s\",\"size\":1,"
                                         "\"annotations\":{\"io.crimage.image.id\":\"nope\"}},%s",
                                         text, a.manifest, open_bracket + 1);
  write_text(index_path, damaged);
  cleanup_free char *layer_path = xasprintf("%s/blobs/sha256/%s", f->root, digest_hex(b.layers[0]));
  assert_int_equal(unlink(layer_path), 0);
  /* A leftover temporary file of an interrupted atomic write is cleaned up. */
  cleanup_free char *tmp = xasprintf("%s.tmp.abcdef", index_path);
  write_text(tmp, "{");

  s = open_store(f->root);
  assert_found(s, "", BUSYBOX ":a", a.config);
  assert_absent(s, "", BUSYBOX ":b");
  assert_int_equal(count_images(s, NULL), 1);
  assert_int_equal(access(tmp, F_OK), -1);
  /* b's blobs, unreferenced now, are kept within the retention; a store keeping nothing sweeps them at open. */
  assert_true(store_blob_exists(s, b.config, NULL));
  store_close(s);
  s = open_store_keeping(f->root, 0, 0);
  assert_false(store_blob_exists(s, b.config, NULL));
  assert_false(store_blob_exists(s, b.manifest, NULL));
  assert_true(store_blob_exists(s, a.layers[0], NULL));
  store_close(s);

  /* The rewritten index no longer holds the damaged entries. */
  s = open_store(f->root);
  assert_int_equal(count_images(s, NULL), 1);
  store_close(s);

  /* An index.json that is not JSON at all refuses to open rather than forgetting every image. */
  write_text(index_path, "{\"manifests\": [");
  s = NULL;
  assert_true(store_open(f->root, &s, &err) < 0);
  assert_null(s);
  assert_int_equal(err->status, CRIMAGE_DATA_LOSS);
  crimage_error_clear(&err);
  /* Too deep nesting is refused too (the parser's depth limit), without crashing. */
  size_t depth = 10000;
  cleanup_free char *deep = xmalloc(depth * 2 + 1);
  memset(deep, '[', depth);
  memset(deep + depth, ']', depth);
  deep[depth * 2] = '\0';
  write_text(index_path, deep);
  assert_true(store_open(f->root, &s, &err) < 0);
  crimage_error_clear(&err);
  test_image_clear(&a);
  test_image_clear(&b);
}

/* Replaces the first occurrence of old in root's index.json. */
static void edit_index(const char *root, const char *old, const char *new)
{
  cleanup_error crimage_error *err = NULL;
  cleanup_free char *index_path = xasprintf("%s/index.json", root);
  cleanup_free char *text = NULL;
  assert_int_equal(read_file(index_path, 1 << 20, &text, NULL, &err), 0);
  char *at = strstr(text, old);
  if (!at)
    fail_msg("%s not in index.json", old);
  *at = '\0';
  cleanup_free char *edited = xasprintf("%s%s%s", text, new, at + strlen(old));
  write_text(index_path, edited);
}

/* Numbers in index.json are digits only: strtoull read " -1" as 2^64-1 and "+5" as 5. A record with such a number
 * is dropped (with a warning) and the others load. */
static void test_index_numbers_strict(void **state)
{
  fixture *f = *state;
  store *s = open_store(f->root);
  const char *l1[] = {"layer", NULL};
  const char *l2[] = {"layer 2", NULL};
  test_image a = make_image(s, "a", l1);
  test_image b = make_image(s, "b", l2);
  record_ok(s, "", BUSYBOX, "a", NULL, &a);
  record_ok(s, "", BUSYBOX, "b", NULL, &b);
  store_close(s);
  edit_index(f->root, "\"io.crimage.image.size\":\"1234\"", "\"io.crimage.image.size\":\" -1\"");
  s = open_store(f->root);
  assert_int_equal(count_images(s, NULL), 1);
  store_close(s);
  edit_index(f->root, "\"io.crimage.image.size\":\"1234\"", "\"io.crimage.image.size\":\"+1234\"");
  s = open_store(f->root);
  assert_int_equal(count_images(s, NULL), 0);
  store_close(s);
  test_image_clear(&a);
  test_image_clear(&b);
}

/* Handlers are DNS labels, as RuntimeClass.handler; the store records no other. */
static void test_handler_names(void **state)
{
  fixture *f = *state;
  const char *good[] = {"", "runc", "kata", "kata-qemu", "runhcs-wcow-process", "a", "0", "a1-b2",
                        "abcdefghijklmnopqrstuvwxyzabcdefghijklmnopqrstuvwxyzabcdefghijk"}; /* 63 */
  for (size_t i = 0; i < ARRAY_SIZE(good); i++)
    if (!store_handler_valid(good[i]))
      fail_msg("\"%s\" refused", good[i]);
  const char *bad[] = {"Kata", "kata_qemu", "kata.qemu", "-kata", "kata-", " kata", "k\xc3\xa4ta", "k\xffta",
                       "abcdefghijklmnopqrstuvwxyzabcdefghijklmnopqrstuvwxyzabcdefghijkl", /* 64 */
                       "a/b", "a\tb"};
  for (size_t i = 0; i < ARRAY_SIZE(bad); i++)
    if (store_handler_valid(bad[i]))
      fail_msg("\"%s\" accepted", bad[i]);
  assert_false(store_handler_valid(NULL));

  store *s = open_store(f->root);
  const char *l1[] = {"layer", NULL};
  test_image t = make_image(s, "h", l1);
  for (size_t i = 0; i < ARRAY_SIZE(bad); i++) {
    cleanup_error crimage_error *err = NULL;
    assert_true(record(s, bad[i], BUSYBOX, "latest", NULL, &t, &err) < 0);
    assert_int_equal(err->status, CRIMAGE_INVALID_ARGUMENT);
  }
  assert_int_equal(count_images(s, NULL), 0);
  test_image_clear(&t);
  store_close(s);
}

/* A record whose strings are not UTF-8 (or whose handler is no DNS label) made every ListImages reply invalid
 * protobuf, also after a restart: loading drops that record, and only that one. */
static void test_index_bad_strings(void **state)
{
  fixture *f = *state;
  store *s = open_store(f->root);
  const char *l1[] = {"layer 1", NULL};
  const char *l2[] = {"layer 2", NULL};
  const char *l3[] = {"layer 3", NULL};
  const char *l4[] = {"layer 4", NULL};
  test_image a = make_image(s, "a", l1);
  test_image b = make_image(s, "b", l2);
  test_image c = make_image(s, "c", l3);
  test_image d = make_image(s, "d", l4);
  record_ok(s, "kata", BUSYBOX, "a", NULL, &a);
  record_ok(s, "runc", BUSYBOX, "b", NULL, &b);
  record_ok(s, "", BUSYBOX, "c", NULL, &c);
  store_record rd = {.handler = "", .name = BUSYBOX, .tag = "d", .manifest_digest = d.manifest,
                     .manifest_media_type = MANIFEST_MT, .manifest_size = d.manifest_size, .config_digest = d.config,
                     .layers = (const char *const *) d.layers, .size = 1, .user = "baduser"};
  cleanup_error crimage_error *err = NULL;
  assert_int_equal(store_record_image(s, &rd, &err), 0);
  store_close(s);
  /* what an older version, or a hand edit, may have left: raw bytes (json-c writes them as they are) */
  edit_index(f->root, "\"io.crimage.runtime-handler\":\"kata\"", "\"io.crimage.runtime-handler\":\"k\xffta\"");
  edit_index(f->root, "\"io.crimage.runtime-handler\":\"runc\"", "\"io.crimage.runtime-handler\":\"Run_C\"");
  edit_index(f->root, "\"io.crimage.image.user\":\"baduser\"", "\"io.crimage.image.user\":\"\xc0\xaf\"");
  s = open_store(f->root);
  store_image **list = NULL;
  size_t n = 0;
  assert_int_equal(store_list_images(s, NULL, &list, &n, &err), 0);
  assert_int_equal(n, 1);
  assert_string_equal(list[0]->handler, "");
  for (size_t i = 0; i < n; i++) {
    assert_true(utf8_valid(list[i]->handler, strlen(list[i]->handler)));
    assert_true(utf8_valid(list[i]->user, strlen(list[i]->user)));
  }
  store_image_list_free(list, n);
  store_close(s);
  test_image_clear(&a);
  test_image_clear(&b);
  test_image_clear(&c);
  test_image_clear(&d);
}

static void test_gc(void **state)
{
  fixture *f = *state;
  cleanup_error crimage_error *err = NULL;
  store *s = open_store(f->root);
  const char *l1[] = {"common base", "only in one", NULL};
  const char *l2[] = {"common base", "only in two", NULL};
  test_image one = make_image(s, "one", l1);
  test_image two = make_image(s, "two", l2);
  record_ok(s, "", "docker.io/library/one", "latest", NULL, &one);
  record_ok(s, "", "docker.io/library/two", "latest", NULL, &two);
  cleanup_free char *dir = blobs_dir(f->root);
  assert_int_equal(count_files(dir), 7); /* 2 configs, 2 manifests, 3 distinct layers */

  assert_int_equal(store_remove_image(s, "", one.config, &err), 0);
  assert_false(store_blob_exists(s, one.config, NULL));
  assert_false(store_blob_exists(s, one.manifest, NULL));
  assert_false(store_blob_exists(s, one.layers[1], NULL));
  assert_true(store_blob_exists(s, one.layers[0], NULL)); /* shared with two */
  assert_int_equal(count_files(dir), 4);

  /* Re-recording an image through another manifest drops the old manifest blob once nothing references it. */
  cleanup_free char *other_manifest = put(s, "{\"schemaVersion\":2,\"other\":true}");
  test_image two_b = {.config = xstrdup(two.config), .manifest = xstrdup(other_manifest), .manifest_size = 10,
                      .layers = strv_copy(two.layers)};
  record_ok(s, "", "docker.io/library/two", "b", NULL, &two_b);
  assert_false(store_blob_exists(s, two.manifest, NULL));
  assert_true(store_blob_exists(s, other_manifest, NULL));
  assert_int_equal(count_files(dir), 4);

  /* A blob no record references (left by a failed pull) is kept at the next open, for a pull to resume, and swept
   * at an open after its retention. */
  cleanup_free char *orphan = put(s, "orphan from a failed pull");
  store_close(s);
  s = open_store(f->root);
  assert_true(store_blob_exists(s, orphan, NULL));
  store_close(s);
  cleanup_free char *orphan_path = xasprintf("%s/%s", dir, digest_hex(orphan));
  age_file(orphan_path, 2 * 3600);
  s = open_store(f->root);
  assert_false(store_blob_exists(s, orphan, NULL));
  assert_int_equal(count_files(dir), 4);

  assert_int_equal(store_remove_image(s, "", two.config, &err), 0);
  assert_int_equal(count_files(dir), 0);
  assert_int_equal(count_images(s, NULL), 0);
  test_image_clear(&one);
  test_image_clear(&two);
  test_image_clear(&two_b);
  store_close(s);
}

/* A pull in progress (store_hold) found a shared layer present and skipped it; a removal meanwhile must not delete
 * it before the pull records its image. */
static void test_hold_defers_gc(void **state)
{
  fixture *f = *state;
  cleanup_error crimage_error *err = NULL;
  store *s = open_store(f->root);
  const char *la[] = {"base shared by both", "only old", NULL};
  test_image old = make_image(s, "old", la);
  record_ok(s, "", "docker.io/library/old", "1", NULL, &old);

  store_holder *h1 = store_hold(s);
  store_holder *h2 = store_hold(s); /* holds nest */
  /* The "pull" sees the base layer present and stores only its own blobs. */
  assert_true(store_blob_exists(s, old.layers[0], NULL));
  assert_int_equal(store_remove_image(s, "", old.config, &err), 0);
  assert_absent(s, "", old.config);
  assert_true(store_blob_exists(s, old.layers[0], NULL));
  assert_true(store_blob_exists(s, old.layers[1], NULL)); /* deferred too, deleted at release */
  const char *lb[] = {"base shared by both", "only new", NULL};
  test_image new = make_image(s, "new", lb);
  record_ok(s, "", "docker.io/library/new", "1", NULL, &new);
  store_release(h1);
  assert_true(store_blob_exists(s, old.layers[1], NULL));
  store_release(h2);
  /* Now the old image's own blobs go; the layer the new image uses stays. */
  assert_false(store_blob_exists(s, old.layers[1], NULL));
  assert_false(store_blob_exists(s, old.config, NULL));
  assert_false(store_blob_exists(s, old.manifest, NULL));
  assert_true(store_blob_exists(s, old.layers[0], NULL));
  assert_found(s, "", "docker.io/library/new:1", new.config);
  /* Without a hold, deletion is immediate. */
  assert_int_equal(store_remove_image(s, "", new.config, &err), 0);
  cleanup_free char *dir = blobs_dir(f->root);
  assert_int_equal(count_files(dir), 0);
  store_release(NULL); /* harmless */
  test_image_clear(&old);
  test_image_clear(&new);
  store_close(s);
}

/* What a failed pull committed (blobs), its partial downloads and its unpacked layers stay, also across a restart
 * (the open's sweep deleted them: an interrupted pull downloaded them again), until their retention after their
 * last use has passed: then a sweep deletes them without a restart. ImageFsInfo counts them while they are there.
 * An empty partial, which resumes nothing, goes at once. */
static void test_unreferenced_retention(void **state)
{
  fixture *f = *state;
  cleanup_error crimage_error *err = NULL;
  store *s = open_store(f->root);
  store_usage u0 = {0};
  assert_int_equal(store_get_usage(s, &u0, &err), 0);
  char big[100000];
  memset(big, 'v', sizeof(big) - 1);
  big[sizeof(big) - 1] = '\0';
  cleanup_free char *verified = put(s, big); /* a layer of a pull that failed later */
  cleanup_free char *pd = sha256_of("partial blob", 12);
  store_ingest *in = NULL;
  assert_int_equal(store_ingest_begin(s, pd, 12, &in, &err), 0);
  assert_int_equal(store_ingest_write(in, "partial", 7, &err), 0);
  store_ingest_abort(in, true);
  /* a blob that always fails: nothing arrived, nothing stays */
  cleanup_free char *ed = sha256_of("never", 5);
  assert_int_equal(store_ingest_begin(s, ed, 5, &in, &err), 0);
  store_ingest_abort(in, true);
  cleanup_free char *ingest_dir = xasprintf("%s/ingest", f->root);
  cleanup_free char *partial = xasprintf("%s/sha256-%s", ingest_dir, digest_hex(pd));
  cleanup_free char *empty = xasprintf("%s/sha256-%s", ingest_dir, digest_hex(ed));
  assert_int_equal(access(empty, F_OK), -1);
  assert_int_equal(access(partial, F_OK), 0);
  cleanup_free char *layer = xasprintf("%s/layers/sha256/%s", f->root, digest_hex(verified));
  assert_int_equal(mkdir(layer, 0755), 0);
  cleanup_free char *layer_file = xasprintf("%s/file", layer);
  write_text(layer_file, big);
  store_usage u1 = {0};
  assert_int_equal(store_get_usage(s, &u1, &err), 0);
  assert_true(u1.used_bytes >= u0.used_bytes + 2 * sizeof(big));
  store_close(s);

  /* A restart keeps them. */
  s = open_store(f->root);
  store_sweep(s);
  assert_true(store_blob_exists(s, verified, NULL));
  assert_int_equal(access(partial, F_OK), 0);
  assert_true(store_layer_exists(s, verified));

  /* Past their retention a sweep deletes them, the store still open. A partial a writer holds stays. */
  cleanup_free char *vpath = xasprintf("%s/blobs/sha256/%s", f->root, digest_hex(verified));
  age_file(vpath, 3601);
  age_file(partial, 3601);
  cleanup_free char *held_digest = sha256_of("held partial", 12);
  assert_int_equal(store_ingest_begin(s, held_digest, 12, &in, &err), 0);
  assert_int_equal(store_ingest_write(in, "held", 4, &err), 0);
  cleanup_free char *held = xasprintf("%s/sha256-%s", ingest_dir, digest_hex(held_digest));
  age_file(held, 3601);
  store_sweep(s);
  assert_false(store_blob_exists(s, verified, NULL));
  assert_int_equal(access(partial, F_OK), -1);
  assert_int_equal(access(held, F_OK), 0);
  store_ingest_abort(in, true);
  /* The layer directory's clock is its ctime (its mtime comes from the layer): a store keeping nothing sweeps it. */
  assert_true(store_layer_exists(s, verified));
  store_close(s);
  s = open_store_keeping(f->root, 0, 0);
  store_sweep(s);
  assert_false(store_layer_exists(s, verified));
  assert_int_equal(access(held, F_OK), -1);
  store_usage u2 = {0};
  assert_int_equal(store_get_usage(s, &u2, &err), 0);
  assert_true(u2.used_bytes < u1.used_bytes - 2 * sizeof(big));
  store_usage_clear(&u0);
  store_usage_clear(&u1);
  store_usage_clear(&u2);
  store_close(s);
}

/* Within their retention, unreferenced blobs are kept up to the size limit: the oldest go first. */
static void test_unreferenced_size_limit(void **state)
{
  fixture *f = *state;
  store *s = open_store_keeping(f->root, 3600 * 1000, 150000);
  char data[3][60000];
  char *d[3];
  for (int i = 0; i < 3; i++) {
    memset(data[i], 'a' + i, sizeof(data[i]) - 1);
    data[i][sizeof(data[i]) - 1] = '\0';
    d[i] = put(s, data[i]);
    cleanup_free char *path = xasprintf("%s/blobs/sha256/%s", f->root, digest_hex(d[i]));
    age_file(path, 600 - i * 60); /* d[0] the oldest */
  }
  store_sweep(s);
  assert_false(store_blob_exists(s, d[0], NULL));
  assert_true(store_blob_exists(s, d[1], NULL));
  assert_true(store_blob_exists(s, d[2], NULL));
  store_close(s);
  for (int i = 0; i < 3; i++)
    free(d[i]);
}

/* A pull's pins keep what it is about to use from the sweep (and start its retention again); a blob whose removal
 * waits for the holds is left for the release. */
static void test_unreferenced_pins(void **state)
{
  fixture *f = *state;
  cleanup_error crimage_error *err = NULL;
  store *s = open_store_keeping(f->root, 3600 * 1000, 0);
  cleanup_free char *left = put(s, "left by an earlier try");
  cleanup_free char *path = xasprintf("%s/blobs/sha256/%s", f->root, digest_hex(left));
  age_file(path, 7200);
  store_holder *h = store_hold(s);
  store_pin(h, left);
  struct stat st;
  assert_int_equal(stat(path, &st), 0);
  assert_true(st.st_mtime > time(NULL) - 60); /* its retention starts again */
  store_sweep(s);
  assert_true(store_blob_exists(s, left, NULL));
  /* removed while held: deferred, and the sweep leaves it to the release */
  const char *layers[] = {"layer of a removed image", NULL};
  test_image t = make_image(s, "removed", layers);
  record_ok(s, "", BUSYBOX, "gone", NULL, &t);
  assert_int_equal(store_remove_image(s, "", t.config, &err), 0);
  store_sweep(s);
  assert_true(store_blob_exists(s, t.layers[0], NULL));
  store_release(h);
  assert_false(store_blob_exists(s, t.layers[0], NULL));
  /* unpinned, over the size limit of 0 */
  store_sweep(s);
  assert_false(store_blob_exists(s, left, NULL));
  test_image_clear(&t);
  store_close(s);
}

/* The sweeper thread reclaims without a restart: periodically, and soon after a hold is released. */
static void test_sweeper_thread(void **state)
{
  fixture *f = *state;
  cleanup_error crimage_error *err = NULL;
  store *s = open_store_keeping(f->root, 1000, 1u << 30);
  assert_int_equal(store_start_sweeper(s, &err), 0);
  cleanup_free char *a = put(s, "retained for a second");
  for (int i = 0; i < 100 && store_blob_exists(s, a, NULL); i++) {
    struct timespec ts = {0, 50 * 1000 * 1000};
    nanosleep(&ts, NULL);
  }
  assert_false(store_blob_exists(s, a, NULL));
  store_close(s);

  s = open_store_keeping(f->root, 3600 * 1000, 0);
  assert_int_equal(store_start_sweeper(s, &err), 0);
  store_holder *h = store_hold(s);
  cleanup_free char *b = sha256_of("a failed pull's blob", 20);
  store_pin(h, b);
  assert_int_equal(store_blob_put(s, b, "a failed pull's blob", 20, &err), 0);
  struct timespec ts = {1, 200 * 1000 * 1000};
  nanosleep(&ts, NULL);
  assert_true(store_blob_exists(s, b, NULL)); /* pinned */
  store_release(h);
  for (int i = 0; i < 60 && store_blob_exists(s, b, NULL); i++) {
    ts = (struct timespec){0, 50 * 1000 * 1000};
    nanosleep(&ts, NULL);
  }
  assert_false(store_blob_exists(s, b, NULL));
  store_close(s);
}

static void test_usage(void **state)
{
  fixture *f = *state;
  cleanup_error crimage_error *err = NULL;
  store *s = open_store(f->root);
  store_usage u0 = {0};
  assert_int_equal(store_get_usage(s, &u0, &err), 0);
  assert_true(u0.inodes_used >= 6); /* root, oci-layout, index.json, blobs, blobs/sha256, ingest */
  assert_true(u0.used_bytes > 0);
  assert_true(u0.timestamp_ns > 0);
  assert_non_null(u0.mountpoint);
  assert_true(u0.mountpoint[0] == '/');
  /* The mount point contains the root. */
  size_t ml = strlen(u0.mountpoint);
  assert_true(streq(u0.mountpoint, "/") ||
              (strncmp(store_root(s), u0.mountpoint, ml) == 0 && (store_root(s)[ml] == '/' || !store_root(s)[ml])));
  struct stat a, b;
  assert_int_equal(stat(u0.mountpoint, &a), 0);
  assert_int_equal(stat(store_root(s), &b), 0);
  assert_int_equal(a.st_dev, b.st_dev);

  size_t len = 1 << 20;
  cleanup_free char *big = xmalloc(len);
  for (size_t i = 0; i < len; i++)
    big[i] = (char) (i * 31 + i / 977);
  cleanup_free char *d = sha256_of(big, len);
  assert_int_equal(store_blob_put(s, d, big, len, &err), 0);
  store_usage u1 = {0};
  assert_int_equal(store_get_usage(s, &u1, &err), 0);
  assert_int_equal(u1.inodes_used, u0.inodes_used + 1);
  assert_true(u1.used_bytes >= u0.used_bytes + len);
  store_usage_clear(&u0);
  store_usage_clear(&u1);
  store_close(s);
}

typedef struct rw_state {
  store *s;
  test_image *images;
  size_t n;
  int done; /* guarded by mu */
  pthread_mutex_t mu;
  size_t lookups;
} rw_state;

static bool rw_done(rw_state *st)
{
  pthread_mutex_lock(&st->mu);
  bool d = st->done;
  pthread_mutex_unlock(&st->mu);
  return d;
}

static void *rw_writer(void *arg)
{
  rw_state *st = arg;
  for (int round = 0; round < 6; round++)
    for (size_t i = 0; i < st->n; i++) {
      cleanup_error crimage_error *err = NULL;
      char tag[16];
      snprintf(tag, sizeof(tag), "t%d", round % 3);
      /* A removal deleted the image's own blobs: store them again, as a new pull would. */
      char seed[32], own[48];
      snprintf(seed, sizeof(seed), "rw%zu", i);
      snprintf(own, sizeof(own), "own layer %zu", i);
      const char *layers[] = {"shared layer", own, NULL};
      test_image t = make_image(st->s, seed, layers);
      assert_string_equal(t.config, st->images[i].config);
      if (record(st->s, "runc", BUSYBOX, tag, NULL, &t, &err) < 0)
        fail_msg("record: %s", err->message);
      test_image_clear(&t);
      if ((round + i) % 2 && store_remove_image(st->s, "runc", st->images[i].config, &err) < 0)
        fail_msg("remove: %s", err->message);
    }
  pthread_mutex_lock(&st->mu);
  st->done = 1;
  pthread_mutex_unlock(&st->mu);
  return NULL;
}

static void *rw_reader(void *arg)
{
  rw_state *st = arg;
  size_t lookups = 0;
  while (!rw_done(st)) {
    for (int t = 0; t < 3; t++) {
      char key[64];
      snprintf(key, sizeof(key), BUSYBOX ":t%d", t);
      cleanup_error crimage_error *err = NULL;
      cleanup_store_image store_image *img = NULL;
      int r = store_find_image(st->s, "runc", key, &img, &err);
      assert_true(r >= 0);
      if (r > 0) {
        bool known = false;
        for (size_t i = 0; i < st->n; i++)
          known |= streq(img->id, st->images[i].config);
        assert_true(known);
        assert_true(strv_contains(img->repo_tags, key));
      }
      lookups++;
    }
    store_image **list = NULL;
    size_t n = 0;
    assert_int_equal(store_list_images(st->s, "runc", &list, &n, NULL), 0);
    assert_true(n <= st->n);
    store_image_list_free(list, n);
    sched_yield(); /* under valgrind threads are serialized: let the writer run */
  }
  pthread_mutex_lock(&st->mu);
  st->lookups += lookups;
  pthread_mutex_unlock(&st->mu);
  return NULL;
}

/* Readers keep finding consistent records while a writer records and removes images (shared layers, so the GC of a
 * removal must keep what the others use). */
static void test_concurrent_readers(void **state)
{
  fixture *f = *state;
  store *s = open_store(f->root);
  enum { N = 4 };
  test_image images[N];
  for (size_t i = 0; i < N; i++) {
    char seed[32], own[48];
    snprintf(seed, sizeof(seed), "rw%zu", i);
    snprintf(own, sizeof(own), "own layer %zu", i);
    const char *layers[] = {"shared layer", own, NULL};
    images[i] = make_image(s, seed, layers);
  }
  rw_state st = {.s = s, .images = images, .n = N};
  pthread_mutex_init(&st.mu, NULL);
  pthread_t w, r1, r2;
  assert_int_equal(pthread_create(&r1, NULL, rw_reader, &st), 0);
  assert_int_equal(pthread_create(&r2, NULL, rw_reader, &st), 0);
  assert_int_equal(pthread_create(&w, NULL, rw_writer, &st), 0);
  pthread_join(w, NULL);
  pthread_join(r1, NULL);
  pthread_join(r2, NULL);
  pthread_mutex_destroy(&st.mu);
  for (size_t i = 0; i < N; i++)
    test_image_clear(&images[i]);
  store_close(s);
}

/* ---- crash safety ---- */

/* The writer: records and removes images and writes blobs in a loop, reporting each finished step on fd. */
static __attribute__((noreturn)) void crash_writer(const char *root, int fd, unsigned seed)
{
  cleanup_error crimage_error *err = NULL;
  store *s = NULL;
  if (store_open(root, &s, &err) < 0)
    _exit(3);
  srand(seed);
  for (unsigned i = 0;; i++) {
    char shared[64], own[64], own2[64], seedbuf[64];
    snprintf(shared, sizeof(shared), "shared layer %u", (unsigned) rand() % 4);
    snprintf(own, sizeof(own), "own layer %u.%u", seed, i);
    /* Some large layers, so a kill often lands in the middle of one. */
    size_t biglen = (size_t) (rand() % 300000) + 1;
    char *big = xmalloc(biglen + 1);
    for (size_t j = 0; j < biglen; j++)
      big[j] = (char) ('a' + (j * (i + 1) + seed) % 26);
    big[biglen] = '\0';
    snprintf(own2, sizeof(own2), "x%u", i);
    snprintf(seedbuf, sizeof(seedbuf), "%u.%u", seed, i);
    const char *layers[] = {shared, own, big, NULL};
    test_image t = make_image(s, seedbuf, layers);
    free(big);
    char tag[32];
    snprintf(tag, sizeof(tag), "t%u", (unsigned) rand() % 5);
    const char *handler = rand() % 2 ? "runc" : "kata";
    cleanup_free char *rd = sha256_of(seedbuf, strlen(seedbuf));
    if (record(s, handler, BUSYBOX, tag, rd, &t, &err) < 0)
      _exit(4);
    if (rand() % 3 == 0) {
      store_image **list = NULL;
      size_t n = 0;
      store_list_images(s, NULL, &list, &n, NULL);
      if (n > 0) {
        store_image *victim = list[(size_t) rand() % n];
        store_remove_image(s, victim->handler, victim->id, NULL);
      }
      store_image_list_free(list, n);
    }
    /* An ingest left partial on purpose. */
    cleanup_free char *pd = sha256_of(own2, strlen(own2));
    store_ingest *in = NULL;
    if (store_ingest_begin(s, pd, 1000, &in, NULL) == 0) {
      store_ingest_write(in, "partial", 7, NULL);
      store_ingest_abort(in, true);
    }
    test_image_clear(&t);
    if (write(fd, "x", 1) != 1)
      _exit(5);
  }
}

/* Every file under blobs/ hashes to its name. */
static void verify_blobs_dir(const char *root)
{
  cleanup_free char *dir = blobs_dir(root);
  DIR *d = opendir(dir);
  assert_non_null(d);
  struct dirent *de;
  while ((de = readdir(d))) {
    if (de->d_name[0] == '.')
      continue;
    cleanup_free char *path = xasprintf("%s/%s", dir, de->d_name);
    cleanup_free char *data = NULL;
    size_t len = 0;
    cleanup_error crimage_error *err = NULL;
    assert_int_equal(read_file(path, 1 << 24, &data, &len, &err), 0);
    cleanup_free char *actual = sha256_of(data, len);
    if (!streq(digest_hex(actual), de->d_name))
      fail_msg("blob %s is partial or corrupt (hashes to %s)", de->d_name, actual);
  }
  closedir(d);
}

static size_t verify_store(const char *root)
{
  store *s = open_store(root);
  cleanup_error crimage_error *err = NULL;
  store_image **list = NULL;
  size_t n = 0;
  assert_int_equal(store_list_images(s, NULL, &list, &n, &err), 0);
  for (size_t i = 0; i < n; i++) {
    cleanup_strv char **blobs = strv_copy(list[i]->layers);
    strv_add_unique(&blobs, list[i]->id);
    strv_add_unique(&blobs, list[i]->manifest_digest);
    for (char **b = blobs; *b; b++) {
      cleanup_free char *data = NULL;
      size_t len = 0;
      if (store_blob_read(s, *b, 1 << 24, &data, &len, &err) < 0)
        fail_msg("image %s: blob %s: %s", list[i]->id, *b, err->message);
      cleanup_free char *actual = sha256_of(data, len);
      assert_string_equal(actual, *b);
    }
    /* Every record is reachable by its names. */
    for (char **t = list[i]->repo_tags; *t; t++)
      assert_found(s, list[i]->handler, *t, list[i]->id);
  }
  store_image_list_free(list, n);
  verify_blobs_dir(root);
  store_close(s);
  return n;
}

static void test_crash_safety(void **state)
{
  fixture *f = *state;
  unsigned seed = (unsigned) time(NULL) ^ (unsigned) getpid();
  srand(seed);
  size_t steps = 0;
  for (int round = 0; round < 8; round++) {
    int p[2];
    assert_int_equal(pipe(p), 0);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
      close(p[0]);
      crash_writer(f->root, p[1], seed + (unsigned) round);
    }
    close(p[1]);
    /* Let it finish a few steps, then kill it at an arbitrary point of the next ones. */
    int want = 1 + rand() % 4;
    char c;
    for (int i = 0; i < want; i++) {
      ssize_t n = read(p[0], &c, 1);
      if (n != 1) {
        int status = 0;
        waitpid(pid, &status, 0);
        fail_msg("writer died early (status %d)", status);
      }
      steps++;
    }
    struct timespec ts = {0, (long) (rand() % 20000) * 1000};
    nanosleep(&ts, NULL);
    kill(pid, SIGKILL);
    int status = 0;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFSIGNALED(status));
    close(p[0]);
    verify_store(f->root);
  }
  assert_true(steps >= 8);
  /* The store still works after all that. */
  store *s = open_store(f->root);
  const char *layers[] = {"after the crashes", NULL};
  test_image t = make_image(s, "after", layers);
  record_ok(s, "runc", BUSYBOX, "final", NULL, &t);
  assert_found(s, "runc", BUSYBOX ":final", t.config);
  test_image_clear(&t);
  store_close(s);
  assert_true(verify_store(f->root) >= 1);
}

int main(void)
{
  const struct CMUnitTest tests[] = {
      cmocka_unit_test_setup_teardown(test_blob_put_read_exists, setup, teardown),
      cmocka_unit_test_setup_teardown(test_blob_digest_mismatch, setup, teardown),
      cmocka_unit_test_setup_teardown(test_ingest_resume, setup, teardown),
      cmocka_unit_test_setup_teardown(test_ingest_concurrent, setup, teardown),
      cmocka_unit_test_setup_teardown(test_record_find, setup, teardown),
      cmocka_unit_test_setup_teardown(test_prefix_ambiguity, setup, teardown),
      cmocka_unit_test_setup_teardown(test_handlers, setup, teardown),
      cmocka_unit_test_setup_teardown(test_tag_move_and_merge, setup, teardown),
      cmocka_unit_test_setup_teardown(test_reload, setup, teardown),
      cmocka_unit_test_setup_teardown(test_corrupt_index, setup, teardown),
      cmocka_unit_test_setup_teardown(test_index_numbers_strict, setup, teardown),
      cmocka_unit_test_setup_teardown(test_handler_names, setup, teardown),
      cmocka_unit_test_setup_teardown(test_index_bad_strings, setup, teardown),
      cmocka_unit_test_setup_teardown(test_gc, setup, teardown),
      cmocka_unit_test_setup_teardown(test_hold_defers_gc, setup, teardown),
      cmocka_unit_test_setup_teardown(test_usage, setup, teardown),
      cmocka_unit_test_setup_teardown(test_unreferenced_retention, setup, teardown),
      cmocka_unit_test_setup_teardown(test_unreferenced_size_limit, setup, teardown),
      cmocka_unit_test_setup_teardown(test_unreferenced_pins, setup, teardown),
      cmocka_unit_test_setup_teardown(test_sweeper_thread, setup, teardown),
      cmocka_unit_test_setup_teardown(test_concurrent_readers, setup, teardown),
      cmocka_unit_test_setup_teardown(test_crash_safety, setup, teardown),
      cmocka_unit_test_setup_teardown(test_record_unchanged_no_write, setup, teardown),
      cmocka_unit_test_setup_teardown(test_ingest_replay, setup, teardown),
      cmocka_unit_test_setup_teardown(test_ingest_wait_cancellable, setup, teardown),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
