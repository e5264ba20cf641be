/* The pull engine end to end against a real registry (Debian's docker-registry) with images pushed by skopeo:
 * OCI and Docker media types, a multi-arch index, pulls by tag and by digest, the unchanged fast path, runtime
 * handlers, resumption of a partial ingest, a corrupt partial, cancellation and errors; the `Always` fast path (one
 * HEAD, no GET), diff_id checks, and concurrent pulls sharing one download (counted in the registry's access log). */
#include <errno.h>
#include <pthread.h>
#include <sys/stat.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "common/digest.h"
#include "common/dynbuf.h"
#include "common/util.h"
#include "pull/manifest.h"
#include "pull/puller.h"
#include "pull/registry.h"
#include "registry-fixture.h"

typedef struct fixture {
  test_registry reg;
  test_registry areg; /* htpasswd (Basic) */
  test_registry treg; /* token auth (Bearer) */
  test_fault_proxy fault; /* in front of reg */
  registry_host hosts[4];
  char store_dir[256];
  store *store;
  puller *puller;
} fixture;

static int group_setup(void **state)
{
  fixture *f = xcalloc(1, sizeof(*f));
  *state = f;
  if (test_registry_start(&f->reg) < 0 || test_registry_start_auth(&f->areg, "bob", "pa:ss word") < 0 ||
      test_push_image(&f->areg, "priv/app", "v1", "--layers 2 --user www-data", "") < 0 ||
      test_registry_start_mode(&f->treg, "token", NULL, NULL) < 0 ||
      test_push_image(&f->treg, "tok/app", "v1", "--layers 5 --arch amd64 --arch arm64", "--all") < 0)
    return -1;
  if (test_push_image(&f->reg, "lib/oci", "v1", "--layers 3 --user 1002", "") < 0 ||
      test_push_image(&f->reg, "lib/docker", "v1", "--layers 2 --user 1003:1004", "--format v2s2") < 0 ||
      test_push_image(&f->reg, "lib/multi", "v1", "--layers 2 --arch amd64 --arch arm64/v8", "--all") < 0 ||
      test_push_image(&f->reg, "lib/resume", "v1", "--layers 2", "") < 0 ||
      test_push_image(&f->reg, "lib/corrupt", "v1", "--layers 1", "") < 0 ||
      test_push_image(&f->reg, "lib/cancel", "v1", "--layers 1", "") < 0 ||
      test_push_image(&f->reg, "lib/fault", "v1", "--layers 2", "") < 0 ||
      test_push_image(&f->reg, "lib/always", "v1", "--layers 2", "") < 0 ||
      test_push_image(&f->reg, "lib/baddiff", "v1", "--layers 2 --bad-diff-id 1", "") < 0 ||
      test_push_image(&f->reg, "lib/members", "v1", "--layers 2 --layer-bytes 300000 --multi-member", "") < 0 ||
      test_push_image(&f->reg, "lib/shared", "v1", "--layers 3 --layer-bytes 3000000", "") < 0 ||
      test_push_image(&f->reg, "lib/cfgarray", "v1", "--layers 1 --config-array", "") < 0 ||
      test_push_image(&f->reg, "lib/cfgjunk", "v1", "--layers 1 --config-empty-objects 100000", "") < 0 ||
      test_fault_proxy_start(&f->reg, "dave", "pw", &f->fault) < 0)
    return -1;
  snprintf(f->store_dir, sizeof(f->store_dir), "/tmp/crimage-test-pull-XXXXXX");
  if (!mkdtemp(f->store_dir))
    return -1;
  crimage_error *err = NULL;
  if (store_open(f->store_dir, &f->store, &err) < 0) {
    fprintf(stderr, "store_open: %s\n", err->message);
    return -1;
  }
  f->hosts[0].host = f->reg.host;
  f->hosts[0].insecure = true;
  f->hosts[1].host = f->areg.host;
  f->hosts[1].insecure = true;
  f->hosts[2].host = f->treg.host;
  f->hosts[2].insecure = true;
  f->hosts[3].host = f->fault.host;
  f->hosts[3].insecure = true;
  puller_options o = {.hosts = f->hosts, .n_hosts = 4, .max_concurrent_downloads = 3, .progress_timeout_ms = 60000};
  return puller_new(f->store, &o, &f->puller, &err) < 0 ? -1 : 0;
}

static int group_teardown(void **state)
{
  fixture *f = *state;
  if (!f)
    return 0;
  puller_free(f->puller);
  store_close(f->store);
  test_fault_proxy_stop(&f->fault);
  test_registry_stop(&f->reg);
  test_registry_stop(&f->areg);
  test_registry_stop(&f->treg);
  if (f->store_dir[0]) {
    char cmd[512];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", f->store_dir);
    (void) test_run(cmd);
  }
  free(f);
  return 0;
}

typedef struct events {
  int resolved, started, done;
  uint64_t total;
  bool cancel;
  const char *watch;         /* a blob digest whose first progress event is recorded */
  uint64_t watch_first_done; /* bytes of it present at its first progress event */
} events;

static void on_event(void *ud, const pull_event *ev)
{
  events *e = ud;
  /* called from several transfer threads */
  switch (ev->kind) {
  case PULL_EVENT_RESOLVED:
    __atomic_add_fetch(&e->resolved, 1, __ATOMIC_SEQ_CST);
    e->total = ev->total;
    break;
  case PULL_EVENT_BLOB_START:
    __atomic_add_fetch(&e->started, 1, __ATOMIC_SEQ_CST);
    break;
  case PULL_EVENT_BLOB_PROGRESS:
    if (e->watch && streq(ev->digest, e->watch) && e->watch_first_done == 0)
      e->watch_first_done = ev->done;
    break;
  case PULL_EVENT_BLOB_DONE:
    __atomic_add_fetch(&e->done, 1, __ATOMIC_SEQ_CST);
    break;
  default:
    break;
  }
}

static bool on_cancelled(void *ud) { return ((events *) ud)->cancel; }

static int do_pull(fixture *f, const char *image, const char *handler, const platform *plat, pull_result *res,
                   events *ev, crimage_error **err)
{
  char full[256];
  snprintf(full, sizeof(full), "%s/%s", f->reg.host, image);
  image_ref *ref = NULL;
  if (reference_parse(full, NULL, &ref, err) < 0)
    return -1;
  events dummy = {0};
  pull_request req = {.ref = ref, .handler = handler, .platform = plat, .progress = on_event,
                      .cancelled = on_cancelled, .userdata = ev ? ev : &dummy};
  memset(res, 0, sizeof(*res));
  int r = puller_pull(f->puller, &req, res, err);
  reference_free(ref);
  return r;
}

static const platform amd64 = {.os = "linux", .architecture = "amd64"};

static void assert_blobs_present(fixture *f, const store_image *img)
{
  assert_true(store_blob_exists(f->store, img->id, NULL));
  assert_true(store_blob_exists(f->store, img->manifest_digest, NULL));
  for (char **l = img->layers; *l; l++) {
    uint64_t size = 0;
    assert_true(store_blob_exists(f->store, *l, &size));
    /* the stored bytes hash to their name */
    char *data = NULL;
    size_t len = 0;
    crimage_error *err = NULL;
    assert_int_equal(store_blob_read(f->store, *l, 64u << 20, &data, &len, &err), 0);
    char got[DIGEST_MAX_LEN + 1];
    digest_sha256(data, len, got);
    assert_string_equal(got, *l);
    free(data);
  }
}

static void test_pull_oci(void **state)
{
  fixture *f = *state;
  pull_result res;
  events ev = {0};
  crimage_error *err = NULL;
  if (do_pull(f, "lib/oci:v1", "", &amd64, &res, &ev, &err) < 0)
    fail_msg("%s", err->message);
  char want_manifest[80], want_config[80];
  assert_int_equal(test_remote_digest(&f->reg, "lib/oci", "v1", "--raw", want_manifest, sizeof(want_manifest)), 0);
  assert_int_equal(test_remote_digest(&f->reg, "lib/oci", "v1", "--config --raw", want_config, sizeof(want_config)), 0);
  assert_string_equal(res.image_id, want_config);
  assert_string_equal(res.repo_digest, want_manifest);
  assert_string_equal(res.manifest_digest, want_manifest);
  assert_false(res.unchanged);
  assert_int_equal(ev.resolved, 1);
  assert_int_equal(ev.started, 4); /* config + 3 layers */
  assert_int_equal(ev.done, 4);

  store_image *img = NULL;
  char key[256];
  snprintf(key, sizeof(key), "%s/lib/oci:v1", f->reg.host);
  assert_int_equal(store_find_image(f->store, "", key, &img, &err), 1);
  assert_string_equal(img->id, want_config);
  assert_string_equal(img->manifest_media_type, MEDIA_TYPE_OCI_MANIFEST);
  assert_string_equal(img->user, "1002");
  assert_int_equal(strv_length(img->layers), 3);
  assert_int_equal(img->size, ev.total);
  char rd[256];
  snprintf(rd, sizeof(rd), "%s/lib/oci@%s", f->reg.host, want_manifest);
  assert_true(strv_contains(img->repo_digests, rd));
  assert_blobs_present(f, img);
  store_image_free(img);
  pull_result_clear(&res);

  /* again: unchanged, and no blob is transferred */
  events ev2 = {0};
  assert_int_equal(do_pull(f, "lib/oci:v1", "", &amd64, &res, &ev2, &err), 0);
  assert_true(res.unchanged);
  assert_string_equal(res.image_id, want_config);
  assert_int_equal(ev2.started, 0);
  pull_result_clear(&res);

  /* by digest */
  char by_digest[200];
  snprintf(by_digest, sizeof(by_digest), "lib/oci@%s", want_manifest);
  assert_int_equal(do_pull(f, by_digest, "", &amd64, &res, NULL, &err), 0);
  assert_string_equal(res.image_id, want_config);
  assert_string_equal(res.repo_digest, want_manifest);
  pull_result_clear(&res);

  /* another runtime handler gets its own record; the blobs are already there */
  events ev3 = {0};
  assert_int_equal(store_find_image(f->store, "kata", key, &img, &err), 0);
  assert_int_equal(do_pull(f, "lib/oci:v1", "kata", &amd64, &res, &ev3, &err), 0);
  assert_false(res.unchanged);
  assert_int_equal(ev3.started, 0);
  assert_int_equal(store_find_image(f->store, "kata", key, &img, &err), 1);
  store_image_free(img);
  pull_result_clear(&res);
}

static void test_pull_docker(void **state)
{
  fixture *f = *state;
  pull_result res;
  crimage_error *err = NULL;
  if (do_pull(f, "lib/docker:v1", "", &amd64, &res, NULL, &err) < 0)
    fail_msg("%s", err->message);
  char want_config[80];
  assert_int_equal(test_remote_digest(&f->reg, "lib/docker", "v1", "--config --raw", want_config, sizeof(want_config)),
                   0);
  assert_string_equal(res.image_id, want_config);
  store_image *img = NULL;
  assert_int_equal(store_find_image(f->store, "", res.image_id, &img, &err), 1);
  assert_string_equal(img->manifest_media_type, MEDIA_TYPE_DOCKER_MANIFEST);
  assert_string_equal(img->user, "1003:1004");
  assert_int_equal(strv_length(img->layers), 2);
  assert_blobs_present(f, img);
  store_image_free(img);
  pull_result_clear(&res);
}

static void test_pull_multiarch(void **state)
{
  fixture *f = *state;
  pull_result res;
  crimage_error *err = NULL;
  char index_digest[80], arm_config[80], amd_config[80];
  assert_int_equal(test_remote_digest(&f->reg, "lib/multi", "v1", "--raw", index_digest, sizeof(index_digest)), 0);
  assert_int_equal(test_remote_digest(&f->reg, "lib/multi", "v1", "--config --raw --override-arch arm64 "
                                      "--override-variant v8", arm_config, sizeof(arm_config)), 0);
  assert_int_equal(test_remote_digest(&f->reg, "lib/multi", "v1", "--config --raw --override-arch amd64",
                                      amd_config, sizeof(amd_config)), 0);
  assert_string_not_equal(arm_config, amd_config);

  /* arm64 without a variant picks the arm64/v8 entry */
  platform arm = {.os = "linux", .architecture = "arm64"};
  if (do_pull(f, "lib/multi:v1", "", &arm, &res, NULL, &err) < 0)
    fail_msg("%s", err->message);
  assert_string_equal(res.image_id, arm_config);
  assert_string_equal(res.repo_digest, index_digest);
  assert_string_not_equal(res.manifest_digest, index_digest);
  pull_result_clear(&res);

  /* another handler on amd64 */
  assert_int_equal(do_pull(f, "lib/multi:v1", "amd", &amd64, &res, NULL, &err), 0);
  assert_string_equal(res.image_id, amd_config);
  pull_result_clear(&res);

  /* no match: the error lists what there is */
  platform s390x = {.os = "linux", .architecture = "s390x"};
  assert_true(do_pull(f, "lib/multi:v1", "", &s390x, &res, NULL, &err) < 0);
  assert_int_equal(err->status, CRIMAGE_INVALID_ARGUMENT);
  assert_non_null(strstr(err->message, "linux/s390x"));
  assert_non_null(strstr(err->message, "linux/amd64, linux/arm64/v8"));
  crimage_error_clear(&err);
}

static void test_pull_errors(void **state)
{
  fixture *f = *state;
  pull_result res;
  crimage_error *err = NULL;
  assert_true(do_pull(f, "lib/oci:nope", "", &amd64, &res, NULL, &err) < 0);
  assert_int_equal(err->status, CRIMAGE_NOT_FOUND);
  assert_non_null(strstr(err->message, "MANIFEST_UNKNOWN"));
  assert_non_null(strstr(err->message, f->reg.host));
  crimage_error_clear(&err);

  assert_true(do_pull(f, "lib/oci@sha256:0000000000000000000000000000000000000000000000000000000000000000", "",
                      &amd64, &res, NULL, &err) < 0);
  assert_int_equal(err->status, CRIMAGE_NOT_FOUND);
  crimage_error_clear(&err);

  /* a registry not configured insecure is spoken to over TLS: a plain HTTP one then fails as unavailable */
  puller *p = NULL;
  puller_options o = {.progress_timeout_ms = 10000};
  assert_int_equal(puller_new(f->store, &o, &p, &err), 0);
  char full[256];
  snprintf(full, sizeof(full), "%s/lib/oci:v1", f->reg.host);
  image_ref *ref = NULL;
  assert_int_equal(reference_parse(full, NULL, &ref, &err), 0);
  pull_request req = {.ref = ref, .handler = "", .platform = &amd64};
  assert_true(puller_pull(p, &req, &res, &err) < 0);
  assert_int_equal(err->status, CRIMAGE_UNAVAILABLE);
  crimage_error_clear(&err);
  reference_free(ref);
  puller_free(p);
}

/* The parsed manifest of name:v1, straight from the registry. */
static manifest *fetch_manifest(fixture *f, const char *name)
{
  registry_client *c = NULL;
  registry_repo *r = NULL;
  crimage_error *err = NULL;
  char ep[128];
  snprintf(ep, sizeof(ep), "http://%s", f->reg.host);
  assert_int_equal(registry_client_new(NULL, &c, &err), 0);
  assert_int_equal(registry_repo_new(c, ep, false, f->reg.host, name, NULL, &r, &err), 0);
  char *body = NULL, *ct = NULL;
  size_t len = 0;
  assert_int_equal(registry_get_manifest(r, "v1", MANIFEST_MAX_SIZE, NULL, &body, &len, &ct, &err), 0);
  manifest *m = NULL;
  assert_int_equal(manifest_parse(body, len, ct, &m, &err), 0);
  free(body);
  free(ct);
  registry_repo_free(r);
  registry_client_free(c);
  return m;
}

/* A layer's digest, and an empty buffer for its bytes, to prepare partial ingests. */
static void fetch_layer(fixture *f, const char *name, size_t idx, char **ret_digest, dynbuf *out)
{
  manifest *m = fetch_manifest(f, name);
  assert_true(idx < m->n_layers);
  *ret_digest = xstrdup(m->layers[idx].digest);
  dynbuf_init(out, 16u << 20);
  manifest_free(m);
}

static int dyn_write(void *ud, const void *data, size_t n, crimage_error **err)
{
  return dynbuf_append(ud, data, n) < 0 ? crimage_error_set(err, CRIMAGE_INTERNAL, ENOBUFS, "full") : 0;
}

static void get_blob(fixture *f, const char *name, const char *digest, dynbuf *out)
{
  registry_client *c = NULL;
  registry_repo *r = NULL;
  crimage_error *err = NULL;
  char ep[128];
  snprintf(ep, sizeof(ep), "http://%s", f->reg.host);
  assert_int_equal(registry_client_new(NULL, &c, &err), 0);
  assert_int_equal(registry_repo_new(c, ep, false, f->reg.host, name, NULL, &r, &err), 0);
  registry_sink sink = {.write = dyn_write, .userdata = out};
  assert_int_equal(registry_get_blob(r, digest, 0, -1, &sink, NULL, &err), 0);
  registry_repo_free(r);
  registry_client_free(c);
}

static void test_pull_resume(void **state)
{
  fixture *f = *state;
  char *digest = NULL;
  dynbuf data;
  fetch_layer(f, "lib/resume", 1, &digest, &data);
  get_blob(f, "lib/resume", digest, &data);
  assert_true(data.len > 10);

  /* a partial ingest holding the first half, as a broken transfer leaves it */
  store_ingest *in = NULL;
  crimage_error *err = NULL;
  assert_int_equal(store_ingest_begin(f->store, digest, (int64_t) data.len, &in, &err), 0);
  assert_int_equal(store_ingest_write(in, data.data, data.len / 2, &err), 0);
  store_ingest_abort(in, true);
  assert_false(store_blob_exists(f->store, digest, NULL));

  pull_result res;
  events ev = {.watch = digest};
  if (do_pull(f, "lib/resume:v1", "", &amd64, &res, &ev, &err) < 0)
    fail_msg("%s", err->message);
  /* The first bytes that arrived continued the partial (a Range request), not a download from 0. */
  assert_true(ev.watch_first_done > data.len / 2);
  assert_true(store_blob_exists(f->store, digest, NULL));
  char *stored = NULL;
  size_t len = 0;
  assert_int_equal(store_blob_read(f->store, digest, 16u << 20, &stored, &len, &err), 0);
  assert_int_equal(len, data.len);
  assert_memory_equal(stored, data.data, len);
  free(stored);
  pull_result_clear(&res);
  free(digest);
  dynbuf_free(&data);
}

/* The config digest of name:v1. */
static char *config_digest_of(fixture *f, const char *name)
{
  manifest *m = fetch_manifest(f, name);
  char *d = xstrdup(m->config.digest);
  manifest_free(m);
  return d;
}

static void write_junk_partial(fixture *f, const char *digest, size_t size)
{
  store_ingest *in = NULL;
  crimage_error *err = NULL;
  assert_int_equal(store_ingest_begin(f->store, digest, (int64_t) size, &in, &err), 0);
  char *junk = xmalloc(size / 2);
  memset(junk, 'x', size / 2);
  assert_int_equal(store_ingest_write(in, junk, size / 2, &err), 0);
  free(junk);
  store_ingest_abort(in, true);
}

static void test_pull_corrupt_partial(void **state)
{
  fixture *f = *state;
  crimage_error *err = NULL;
  pull_result res;
  char key[256];
  snprintf(key, sizeof(key), "%s/lib/corrupt:v1", f->reg.host);
  store_image *img = NULL;

  /* A partial config whose bytes are wrong: the resumed blob cannot match its digest. */
  char *config = config_digest_of(f, "lib/corrupt");
  dynbuf cdata;
  dynbuf_init(&cdata, 1u << 20);
  get_blob(f, "lib/corrupt", config, &cdata);
  write_junk_partial(f, config, cdata.len);
  assert_true(do_pull(f, "lib/corrupt:v1", "", &amd64, &res, NULL, &err) < 0);
  assert_int_equal(err->status, CRIMAGE_DATA_LOSS);
  crimage_error_clear(&err);
  assert_false(store_blob_exists(f->store, config, NULL));
  assert_int_equal(store_find_image(f->store, "", key, &img, &err), 0);

  /* A partial gzip layer with junk in it is caught before any byte is fetched (the inflater catching up on the
   * partial fails) and downloaded again: the pull recovers at once. */
  char *digest = NULL;
  dynbuf data;
  fetch_layer(f, "lib/corrupt", 0, &digest, &data);
  get_blob(f, "lib/corrupt", digest, &data);
  write_junk_partial(f, digest, data.len);
  if (do_pull(f, "lib/corrupt:v1", "", &amd64, &res, NULL, &err) < 0)
    fail_msg("%s", err->message);
  assert_true(store_blob_exists(f->store, digest, NULL));
  assert_true(store_blob_exists(f->store, config, NULL));
  char *stored = NULL;
  size_t len = 0;
  assert_int_equal(store_blob_read(f->store, digest, 16u << 20, &stored, &len, &err), 0);
  assert_int_equal(len, data.len);
  assert_memory_equal(stored, data.data, len);
  free(stored);
  assert_int_equal(store_find_image(f->store, "", key, &img, &err), 1);
  store_image_free(img);
  pull_result_clear(&res);
  free(digest);
  free(config);
  dynbuf_free(&data);
  dynbuf_free(&cdata);
}

static void test_pull_cancel(void **state)
{
  fixture *f = *state;
  pull_result res;
  events ev = {.cancel = true};
  crimage_error *err = NULL;
  assert_true(do_pull(f, "lib/cancel:v1", "", &amd64, &res, &ev, &err) < 0);
  assert_int_equal(err->status, CRIMAGE_CANCELLED);
  crimage_error_clear(&err);
  char key[256];
  snprintf(key, sizeof(key), "%s/lib/cancel:v1", f->reg.host);
  store_image *img = NULL;
  assert_int_equal(store_find_image(f->store, "", key, &img, &err), 0);
}

static int pull_cred(fixture *f, const char *image, const credential *cred, pull_result *res, crimage_error **err)
{
  char full[256];
  snprintf(full, sizeof(full), "%s/%s", f->areg.host, image);
  image_ref *ref = NULL;
  if (reference_parse(full, NULL, &ref, err) < 0)
    return -1;
  pull_request req = {.ref = ref, .handler = "", .platform = &amd64, .cred = cred};
  memset(res, 0, sizeof(*res));
  int r = puller_pull(f->puller, &req, res, err);
  reference_free(ref);
  return r;
}

static void test_pull_basic_auth(void **state)
{
  fixture *f = *state;
  pull_result res;
  crimage_error *err = NULL;

  assert_true(pull_cred(f, "priv/app:v1", NULL, &res, &err) < 0);
  assert_int_equal(err->status, CRIMAGE_UNAUTHENTICATED);
  assert_non_null(strstr(err->message, f->areg.host));
  crimage_error_clear(&err);

  credential *c = credential_new();
  c->username = xstrdup("bob");
  c->password = xstrdup("pa:ss word");
  /* a credential for another registry is not sent */
  c->server_address = xstrdup("https://other.example:5000/v1/");
  assert_true(pull_cred(f, "priv/app:v1", c, &res, &err) < 0);
  assert_int_equal(err->status, CRIMAGE_UNAUTHENTICATED);
  crimage_error_clear(&err);

  free(c->server_address);
  c->server_address = xstrdup(f->areg.host);
  if (pull_cred(f, "priv/app:v1", c, &res, &err) < 0)
    fail_msg("%s", err->message);
  char key[256];
  snprintf(key, sizeof(key), "%s/priv/app:v1", f->areg.host);
  store_image *img = NULL;
  assert_int_equal(store_find_image(f->store, "", key, &img, &err), 1);
  assert_string_equal(img->id, res.image_id);
  assert_string_equal(img->user, "www-data");
  assert_blobs_present(f, img);
  store_image_free(img);
  pull_result_clear(&res);

  free(c->password);
  c->password = xstrdup("wrong");
  c->server_address[0] = 0;
  assert_true(pull_cred(f, "priv/app:v1", c, &res, &err) < 0);
  assert_int_equal(err->status, CRIMAGE_UNAUTHENTICATED);
  assert_null(strstr(err->message, "wrong"));
  crimage_error_clear(&err);
  credential_free(c);
}

/* The Docker Hub flow: an index behind Bearer tokens obtained anonymously; layers fetched in parallel. */
static void test_pull_bearer(void **state)
{
  fixture *f = *state;
  char full[256];
  snprintf(full, sizeof(full), "%s/tok/app:v1", f->treg.host);
  image_ref *ref = NULL;
  crimage_error *err = NULL;
  assert_int_equal(reference_parse(full, NULL, &ref, &err), 0);
  events ev = {0};
  pull_request req = {.ref = ref, .handler = "", .platform = &amd64, .progress = on_event, .userdata = &ev};
  pull_result res = {0};
  if (puller_pull(f->puller, &req, &res, &err) < 0)
    fail_msg("%s", err->message);
  assert_int_equal(ev.done, 6);
  char want_config[80];
  assert_int_equal(test_remote_digest(&f->treg, "tok/app", "v1", "--config --raw --override-arch amd64", want_config,
                                      sizeof(want_config)), 0);
  assert_string_equal(res.image_id, want_config);
  store_image *img = NULL;
  assert_int_equal(store_find_image(f->store, "", full, &img, &err), 1);
  assert_int_equal(strv_length(img->layers), 5);
  assert_blobs_present(f, img);
  store_image_free(img);
  pull_result_clear(&res);
  reference_free(ref);
}

/* Mirrors: a mirror that is down is skipped, the next one serves the image; when every endpoint failed the error
 * names each one's result and takes the status of the most telling (the mirror that answered that the manifest is
 * unknown, not the upstream that could not be reached). The image is recorded under the name asked for, not the
 * mirror's. A registry served by its mirrors only is never asked itself. The upstream is a closed local port. */
static void test_pull_mirrors(void **state)
{
  fixture *f = *state;
  char upstream[64], dead_mirror[96], good_mirror[96];
  snprintf(upstream, sizeof(upstream), "127.0.0.1:%d", test_free_port());
  snprintf(dead_mirror, sizeof(dead_mirror), "http://127.0.0.1:%d", test_free_port());
  snprintf(good_mirror, sizeof(good_mirror), "http://%s", f->reg.host);
  registry_mirror mirrors[2] = {{.endpoint = dead_mirror}, {.endpoint = good_mirror}};
  registry_host h = {.host = upstream, .insecure = true, .mirrors = mirrors, .n_mirrors = 2};
  puller_options o = {.hosts = &h, .n_hosts = 1, .progress_timeout_ms = 10000};
  puller *p = NULL;
  crimage_error *err = NULL;
  assert_int_equal(puller_new(f->store, &o, &p, &err), 0);

  char full[256];
  snprintf(full, sizeof(full), "%s/lib/docker:v1", upstream);
  image_ref *ref = NULL;
  assert_int_equal(reference_parse(full, NULL, &ref, &err), 0);
  pull_request req = {.ref = ref, .handler = "", .platform = &amd64};
  pull_result res = {0};
  if (puller_pull(p, &req, &res, &err) < 0)
    fail_msg("%s", err->message);
  char want_config[80];
  assert_int_equal(test_remote_digest(&f->reg, "lib/docker", "v1", "--config --raw", want_config, sizeof(want_config)),
                   0);
  assert_string_equal(res.image_id, want_config);
  store_image *img = NULL;
  assert_int_equal(store_find_image(f->store, "", full, &img, &err), 1);
  store_image_free(img);
  pull_result_clear(&res);
  reference_free(ref);

  /* nothing has it: NOT_FOUND from the mirror that answered, every endpoint's result in the message */
  snprintf(full, sizeof(full), "%s/lib/absent:v1", upstream);
  assert_int_equal(reference_parse(full, NULL, &ref, &err), 0);
  req.ref = ref;
  assert_true(puller_pull(p, &req, &res, &err) < 0);
  assert_int_equal(err->status, CRIMAGE_NOT_FOUND);
  char want[256];
  snprintf(want, sizeof(want), "every endpoint failed: mirror %s: UNAVAILABLE: ", dead_mirror);
  assert_non_null(strstr(err->message, want));
  snprintf(want, sizeof(want), "; mirror %s: NOT_FOUND: registry %s: ", good_mirror, f->reg.host);
  assert_non_null(strstr(err->message, want));
  assert_non_null(strstr(err->message, "MANIFEST_UNKNOWN"));
  snprintf(want, sizeof(want), "; upstream %s: UNAVAILABLE: registry %s: ", upstream, upstream);
  assert_non_null(strstr(err->message, want));
  crimage_error_clear(&err);
  reference_free(ref);
  puller_free(p);

  /* Mirrors only: the image comes from the mirror; what it lacks is NOT_FOUND with its answer alone; with the
   * mirror down the error names it and nothing else was tried. */
  registry_mirror good[1] = {{.endpoint = good_mirror}}, dead[1] = {{.endpoint = dead_mirror}};
  registry_host only = {.host = upstream, .insecure = true, .mirrors = good, .n_mirrors = 1, .mirrors_only = true};
  o.hosts = &only;
  assert_int_equal(puller_new(f->store, &o, &p, &err), 0);
  snprintf(full, sizeof(full), "%s/lib/oci:v1", upstream);
  assert_int_equal(reference_parse(full, NULL, &ref, &err), 0);
  req.ref = ref;
  if (puller_pull(p, &req, &res, &err) < 0)
    fail_msg("%s", err->message);
  pull_result_clear(&res);
  reference_free(ref);
  snprintf(full, sizeof(full), "%s/lib/absent:v1", upstream);
  assert_int_equal(reference_parse(full, NULL, &ref, &err), 0);
  req.ref = ref;
  assert_true(puller_pull(p, &req, &res, &err) < 0);
  assert_int_equal(err->status, CRIMAGE_NOT_FOUND);
  snprintf(want, sizeof(want), "registry %s: ", f->reg.host);
  assert_non_null(strstr(err->message, want));
  assert_null(strstr(err->message, "upstream"));
  snprintf(want, sizeof(want), "registry %s:", upstream);
  assert_null(strstr(err->message, want));
  crimage_error_clear(&err);
  puller_free(p);
  only.mirrors = dead;
  assert_int_equal(puller_new(f->store, &o, &p, &err), 0);
  assert_true(puller_pull(p, &req, &res, &err) < 0);
  assert_int_equal(err->status, CRIMAGE_UNAVAILABLE);
  snprintf(want, sizeof(want), "registry 127.0.0.1:%s:", strrchr(dead_mirror, ':') + 1);
  assert_non_null(strstr(err->message, want));
  snprintf(want, sizeof(want), "registry %s:", upstream);
  assert_null(strstr(err->message, want));
  crimage_error_clear(&err);
  puller_free(p);
  /* and without any mirror there is nowhere to pull from */
  only.n_mirrors = 0;
  assert_int_equal(puller_new(f->store, &o, &p, &err), 0);
  assert_true(puller_pull(p, &req, &res, &err) < 0);
  assert_int_equal(err->status, CRIMAGE_FAILED_PRECONDITION);
  assert_non_null(strstr(err->message, "served by its mirrors only"));
  crimage_error_clear(&err);
  reference_free(ref);
  puller_free(p);
}

static size_t count_lines(const char *path, const char *needle)
{
  FILE *fp = fopen(path, "r");
  if (!fp)
    return 0;
  char line[2048];
  size_t n = 0;
  while (fgets(line, sizeof(line), fp))
    if (strstr(line, needle))
      n++;
  fclose(fp);
  return n;
}

/* A registry that answers 503 (Retry-After) once per manifest, wants Basic auth, and redirects blobs to another
 * host name: the pull retries, authenticates, and never sends Authorization to the other host. */
static void test_pull_faults(void **state)
{
  fixture *f = *state;
  char full[256];
  snprintf(full, sizeof(full), "%s/lib/fault:v1", f->fault.host);
  image_ref *ref = NULL;
  crimage_error *err = NULL;
  assert_int_equal(reference_parse(full, NULL, &ref, &err), 0);
  credential *c = credential_new();
  c->username = xstrdup("dave");
  c->password = xstrdup("pw");
  events ev = {0};
  pull_request req = {.ref = ref, .handler = "", .platform = &amd64, .cred = c, .progress = on_event,
                      .userdata = &ev};
  pull_result res = {0};
  if (puller_pull(f->puller, &req, &res, &err) < 0)
    fail_msg("%s", err->message);
  char want_config[80];
  assert_int_equal(test_remote_digest(&f->reg, "lib/fault", "v1", "--config --raw", want_config, sizeof(want_config)),
                   0);
  assert_string_equal(res.image_id, want_config);
  assert_int_equal(ev.started, 3);

  assert_true(count_lines(f->fault.log, "\"kind\": \"503\"") >= 1);
  assert_true(count_lines(f->fault.log, "\"kind\": \"challenge\"") >= 1);
  /* config + 2 layers went through the redirect, none of them with credentials */
  assert_int_equal(count_lines(f->fault.log, "\"kind\": \"redirect\""), 3);
  assert_int_equal(count_lines(f->fault.log, "\"kind\": \"redirected\""), 3);
  /* the requests to the registry's own host carried the credential (so the redirect had one to leak) */
  assert_true(count_lines(f->fault.log, "\"kind\": \"redirect\"") > 0);
  {
    FILE *fp = fopen(f->fault.log, "r");
    assert_non_null(fp);
    char line[2048];
    while (fgets(line, sizeof(line), fp))
      if (strstr(line, "\"kind\": \"redirect\""))
        assert_non_null(strstr(line, "\"auth\": true}"));
    fclose(fp);
  }
  {
    FILE *fp = fopen(f->fault.log, "r");
    assert_non_null(fp);
    char line[2048];
    while (fgets(line, sizeof(line), fp))
      if (strstr(line, "\"kind\": \"redirected\""))
        assert_non_null(strstr(line, "\"auth\": false}"));
    fclose(fp);
  }
  store_image *img = NULL;
  assert_int_equal(store_find_image(f->store, "", full, &img, &err), 1);
  assert_blobs_present(f, img);
  store_image_free(img);
  pull_result_clear(&res);
  credential_free(c);
  reference_free(ref);
}

static size_t count_lines(const char *path, const char *needle);

/* Lines of the registry's access log holding needle, once at least `want` are there (the registry writes a line
 * after it has answered, so it may trail the client by a moment; waits up to 10 s, then counts what there is). */
static size_t log_count(fixture *f, const char *needle, size_t want)
{
  char path[300];
  snprintf(path, sizeof(path), "%s/registry.log", f->reg.dir);
  size_t n = 0;
  for (int i = 0; i < 200; i++) {
    n = count_lines(path, needle);
    if (n >= want)
      break;
    struct timespec ts = {0, 50 * 1000 * 1000};
    nanosleep(&ts, NULL);
  }
  return n;
}

static void settle(void)
{
  struct timespec ts = {0, 300 * 1000 * 1000};
  nanosleep(&ts, NULL);
}

static void index_stat(fixture *f, struct stat *st)
{
  char path[300];
  snprintf(path, sizeof(path), "%s/index.json", f->store_dir);
  assert_int_equal(stat(path, st), 0);
}

/* `Always` on a stored tag: one manifest HEAD, no GET, no blob request, no store write. When the tag moves, the
 * HEAD sees another digest and the pull fetches the manifest and the new blobs only. */
static void test_pull_always_fast_path(void **state)
{
  fixture *f = *state;
  pull_result res;
  crimage_error *err = NULL;
  const char *head = "\"HEAD /v2/lib/always/manifests/v1 ";
  const char *get_manifest = "\"GET /v2/lib/always/manifests/";
  const char *get_blob = "\"GET /v2/lib/always/blobs/";
  if (do_pull(f, "lib/always:v1", "", &amd64, &res, NULL, &err) < 0)
    fail_msg("%s", err->message);
  assert_false(res.unchanged);
  char *first_id = xstrdup(res.image_id);
  char *first_rd = xstrdup(res.repo_digest);
  pull_result_clear(&res);
  assert_int_equal(log_count(f, get_blob, 3), 3); /* config + 2 layers */
  assert_int_equal(log_count(f, get_manifest, 1), 1);
  assert_int_equal(log_count(f, head, 0), 0); /* nothing stored yet: no HEAD first */

  struct stat st0, st1;
  index_stat(f, &st0);
  for (int i = 1; i <= 3; i++) {
    events ev = {0};
    if (do_pull(f, "lib/always:v1", "", &amd64, &res, &ev, &err) < 0)
      fail_msg("%s", err->message);
    assert_true(res.unchanged);
    assert_string_equal(res.image_id, first_id);
    assert_string_equal(res.repo_digest, first_rd);
    assert_int_equal(ev.started, 0);
    pull_result_clear(&res);
    assert_int_equal(log_count(f, head, (size_t) i), (size_t) i);
  }
  settle();
  assert_int_equal(log_count(f, get_manifest, 1), 1);
  assert_int_equal(log_count(f, get_blob, 3), 3);
  index_stat(f, &st1);
  assert_true(st0.st_ino == st1.st_ino && st0.st_mtim.tv_sec == st1.st_mtim.tv_sec &&
              st0.st_mtim.tv_nsec == st1.st_mtim.tv_nsec);

  /* Another handler has no record yet: a full resolution (GET), no blob download (all present). */
  assert_int_equal(do_pull(f, "lib/always:v1", "gvisor", &amd64, &res, NULL, &err), 0);
  assert_false(res.unchanged);
  pull_result_clear(&res);
  assert_int_equal(log_count(f, get_manifest, 2), 2);

  /* The tag moves to another image (same layers, another config). */
  assert_int_equal(test_push_image(&f->reg, "lib/always", "v1", "--layers 2 --user moved", ""), 0);
  if (do_pull(f, "lib/always:v1", "", &amd64, &res, NULL, &err) < 0)
    fail_msg("%s", err->message);
  assert_false(res.unchanged);
  assert_string_not_equal(res.image_id, first_id);
  assert_string_not_equal(res.repo_digest, first_rd);
  pull_result_clear(&res);
  assert_int_equal(log_count(f, head, 4), 4);
  assert_int_equal(log_count(f, get_manifest, 3), 3);
  assert_int_equal(log_count(f, get_blob, 4), 4); /* only the new config */
  char key[256];
  snprintf(key, sizeof(key), "%s/lib/always:v1", f->reg.host);
  store_image *img = NULL;
  assert_int_equal(store_find_image(f->store, "", key, &img, &err), 1);
  assert_string_equal(img->user, "moved");
  store_image_free(img);
  free(first_id);
  free(first_rd);
}

/* A registry that does not answer HEAD (the fault proxy answers 501): the pull falls back to GET and still finds
 * the image unchanged. */
static void test_pull_always_head_unsupported(void **state)
{
  fixture *f = *state;
  char full[256];
  snprintf(full, sizeof(full), "%s/lib/fault:v1", f->fault.host);
  image_ref *ref = NULL;
  crimage_error *err = NULL;
  assert_int_equal(reference_parse(full, NULL, &ref, &err), 0);
  credential *c = credential_new();
  c->username = xstrdup("dave");
  c->password = xstrdup("pw");
  pull_request req = {.ref = ref, .handler = "", .platform = &amd64, .cred = c};
  pull_result res = {0};
  /* stored by test_pull_faults */
  store_image *img = NULL;
  assert_int_equal(store_find_image(f->store, "", full, &img, &err), 1);
  store_image_free(img);
  size_t proxied = count_lines(f->fault.log, "\"kind\": \"proxy\"");
  if (puller_pull(f->puller, &req, &res, &err) < 0)
    fail_msg("%s", err->message);
  assert_true(res.unchanged);
  assert_true(count_lines(f->fault.log, "\"kind\": \"proxy\"") > proxied); /* the manifest GET */
  pull_result_clear(&res);
  credential_free(c);
  reference_free(ref);
}

/* A layer whose uncompressed content is not the config's diff_id: DATA_LOSS, the layer is not stored, no partial
 * is kept and no image is recorded. */
static void test_pull_diff_id_mismatch(void **state)
{
  fixture *f = *state;
  pull_result res;
  crimage_error *err = NULL;
  assert_true(do_pull(f, "lib/baddiff:v1", "", &amd64, &res, NULL, &err) < 0);
  assert_int_equal(err->status, CRIMAGE_DATA_LOSS);
  assert_non_null(strstr(err->message, "diff_id"));
  crimage_error_clear(&err);
  char key[256];
  snprintf(key, sizeof(key), "%s/lib/baddiff:v1", f->reg.host);
  store_image *img = NULL;
  assert_int_equal(store_find_image(f->store, "", key, &img, &err), 0);
  char *digest = NULL;
  dynbuf data;
  fetch_layer(f, "lib/baddiff", 1, &digest, &data);
  assert_false(store_blob_exists(f->store, digest, NULL));
  char partial[512];
  snprintf(partial, sizeof(partial), "%s/ingest/sha256-%s", f->store_dir, digest_hex(digest));
  struct stat st;
  assert_true(stat(partial, &st) < 0);
  free(digest);
  dynbuf_free(&data);
}

/* An image config is checked (its shape, and what parsing it costs) before it is stored: one that is a JSON array, or
 * 300 KB of empty objects (100,000 of them: about 80 MB of tree; accepted before), never becomes a blob, and no
 * layer is downloaded. */
static void test_pull_bad_config_not_stored(void **state)
{
  fixture *f = *state;
  const struct {
    const char *name, *why;
  } cases[] = {
      {"lib/cfgarray", "image config is not a JSON object"},
      {"lib/cfgjunk", "an array `junk` has more than 10000 elements"},
  };
  for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
    char image[64], config[80];
    snprintf(image, sizeof(image), "%s:v1", cases[i].name);
    assert_int_equal(test_remote_digest(&f->reg, cases[i].name, "v1", "--config --raw", config, sizeof(config)), 0);
    pull_result res;
    events ev = {0};
    crimage_error *err = NULL;
    assert_true(do_pull(f, image, "", &amd64, &res, &ev, &err) < 0);
    assert_int_equal(err->status, CRIMAGE_INVALID_ARGUMENT);
    if (!strstr(err->message, cases[i].why))
      fail_msg("%s: \"%s\" does not say \"%s\"", image, err->message, cases[i].why);
    crimage_error_clear(&err);
    assert_false(store_blob_exists(f->store, config, NULL));
    assert_int_equal(ev.started, 1); /* the config only */
    manifest *m = fetch_manifest(f, cases[i].name);
    assert_false(store_blob_exists(f->store, m->layers[0].digest, NULL));
    manifest_free(m);
  }
}

/* Layers of two concatenated gzip members inflate as one stream: the diff_id covers both. */
static void test_pull_multi_member_gzip(void **state)
{
  fixture *f = *state;
  pull_result res;
  crimage_error *err = NULL;
  if (do_pull(f, "lib/members:v1", "", &amd64, &res, NULL, &err) < 0)
    fail_msg("%s", err->message);
  store_image *img = NULL;
  assert_int_equal(store_find_image(f->store, "", res.image_id, &img, &err), 1);
  assert_int_equal(strv_length(img->layers), 2);
  assert_blobs_present(f, img);
  store_image_free(img);
  pull_result_clear(&res);
}

typedef struct concurrent_pull {
  fixture *f;
  pthread_barrier_t *start;
  int r;
  pull_result res;
  crimage_error *err;
} concurrent_pull;

static void *concurrent_pull_thread(void *arg)
{
  concurrent_pull *c = arg;
  pthread_barrier_wait(c->start);
  c->r = do_pull(c->f, "lib/shared:v1", "", &amd64, &c->res, NULL, &c->err);
  return NULL;
}

/* Two pulls of the same image at once: every blob is requested from the registry once; the other pull waits for
 * the download in progress and uses its result. */
static void test_pull_concurrent_shared(void **state)
{
  fixture *f = *state;
  pthread_barrier_t start;
  pthread_barrier_init(&start, NULL, 2);
  concurrent_pull a = {.f = f, .start = &start}, b = {.f = f, .start = &start};
  pthread_t ta, tb;
  assert_int_equal(pthread_create(&ta, NULL, concurrent_pull_thread, &a), 0);
  assert_int_equal(pthread_create(&tb, NULL, concurrent_pull_thread, &b), 0);
  pthread_join(ta, NULL);
  pthread_join(tb, NULL);
  pthread_barrier_destroy(&start);
  if (a.r < 0 || b.r < 0)
    fail_msg("%s", a.err ? a.err->message : b.err->message);
  assert_string_equal(a.res.image_id, b.res.image_id);

  char *config = config_digest_of(f, "lib/shared");
  char needle[256];
  snprintf(needle, sizeof(needle), "\"GET /v2/lib/shared/blobs/%s ", config);
  assert_int_equal(log_count(f, needle, 1), 1);
  for (size_t i = 0; i < 3; i++) {
    char *digest = NULL;
    dynbuf data;
    fetch_layer(f, "lib/shared", i, &digest, &data);
    snprintf(needle, sizeof(needle), "\"GET /v2/lib/shared/blobs/%s ", digest);
    assert_int_equal(log_count(f, needle, 1), 1);
    assert_true(store_blob_exists(f->store, digest, NULL));
    free(digest);
    dynbuf_free(&data);
  }
  settle();
  assert_int_equal(log_count(f, "\"GET /v2/lib/shared/blobs/", 4), 4);
  free(config);
  pull_result_clear(&a.res);
  pull_result_clear(&b.res);
}

int main(void)
{
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_pull_oci),    cmocka_unit_test(test_pull_docker),
      cmocka_unit_test(test_pull_multiarch), cmocka_unit_test(test_pull_errors),
      cmocka_unit_test(test_pull_resume), cmocka_unit_test(test_pull_corrupt_partial),
      cmocka_unit_test(test_pull_cancel), cmocka_unit_test(test_pull_basic_auth),
      cmocka_unit_test(test_pull_bearer),
      cmocka_unit_test(test_pull_mirrors),
      cmocka_unit_test(test_pull_faults),
      cmocka_unit_test(test_pull_always_fast_path),
      cmocka_unit_test(test_pull_always_head_unsupported),
      cmocka_unit_test(test_pull_diff_id_mismatch),
      cmocka_unit_test(test_pull_multi_member_gzip),
      cmocka_unit_test(test_pull_bad_config_not_stored),
      cmocka_unit_test(test_pull_concurrent_shared),
  };
  return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
