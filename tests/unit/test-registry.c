/* The registry client: the WWW-Authenticate tokenizer, error mapping, and transfers against a real registry
 * (Debian's docker-registry, anonymous and with htpasswd Basic auth). */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "common/digest.h"
#include "common/dynbuf.h"
#include "common/util.h"
#include "pull/manifest.h"
#include "pull/registry.h"
#include "registry-fixture.h"

/* ---- WWW-Authenticate ---- */

static void test_challenge_bearer(void **state)
{
  auth_challenge ch[REGISTRY_MAX_CHALLENGES];
  size_t n = 0;
  crimage_error *err = NULL;
  const char *h = "Bearer realm=\"https://auth.example/token\",service=\"registry.example\","
                  "scope=\"repository:a/b:pull,push\"";
  assert_int_equal(auth_challenges_parse(h, ch, &n, &err), 0);
  assert_int_equal(n, 1);
  assert_string_equal(ch[0].scheme, "bearer");
  assert_int_equal(ch[0].n_params, 3);
  assert_string_equal(auth_challenge_param(&ch[0], "realm"), "https://auth.example/token");
  assert_string_equal(auth_challenge_param(&ch[0], "SERVICE"), "registry.example");
  /* the comma inside the quoted string is part of the value */
  assert_string_equal(auth_challenge_param(&ch[0], "scope"), "repository:a/b:pull,push");
  assert_null(auth_challenge_param(&ch[0], "error"));
  auth_challenges_clear(ch, n);
}

static void test_challenge_several(void **state)
{
  auth_challenge ch[REGISTRY_MAX_CHALLENGES];
  size_t n = 0;
  crimage_error *err = NULL;
  /* Two challenges in one header, a token68 one, odd spacing, an escaped quote and a token value. */
  const char *h = "Basic realm=\"a \\\"quoted\\\" realm, with comma\" , charset=UTF-8,  NEGOTIATE abc+/==, "
                  "Bearer realm = \"https://t.example/x?a=1\" ,error=insufficient_scope";
  assert_int_equal(auth_challenges_parse(h, ch, &n, &err), 0);
  assert_int_equal(n, 3);
  assert_string_equal(ch[0].scheme, "basic");
  assert_string_equal(auth_challenge_param(&ch[0], "realm"), "a \"quoted\" realm, with comma");
  assert_string_equal(auth_challenge_param(&ch[0], "charset"), "UTF-8");
  assert_string_equal(ch[1].scheme, "negotiate");
  assert_string_equal(ch[1].token68, "abc+/==");
  assert_int_equal(ch[1].n_params, 0);
  assert_string_equal(ch[2].scheme, "bearer");
  assert_string_equal(auth_challenge_param(&ch[2], "realm"), "https://t.example/x?a=1");
  assert_string_equal(auth_challenge_param(&ch[2], "error"), "insufficient_scope");
  auth_challenges_clear(ch, n);

  /* a second header value appended to the same list */
  n = 0;
  assert_int_equal(auth_challenges_parse("Basic realm=x", ch, &n, &err), 0);
  assert_int_equal(auth_challenges_parse("Bearer realm=\"y\"", ch, &n, &err), 0);
  assert_int_equal(n, 2);
  assert_string_equal(ch[1].scheme, "bearer");
  auth_challenges_clear(ch, n);

  /* a scheme with no parameters */
  n = 0;
  assert_int_equal(auth_challenges_parse("Bearer", ch, &n, &err), 0);
  assert_int_equal(n, 1);
  assert_int_equal(ch[0].n_params, 0);
  auth_challenges_clear(ch, n);
}

static void challenge_bad(const char *h)
{
  auth_challenge ch[REGISTRY_MAX_CHALLENGES];
  size_t n = 0;
  crimage_error *err = NULL;
  int r = auth_challenges_parse(h, ch, &n, &err);
  if (r >= 0)
    fail_msg("accepted: %s", h);
  assert_non_null(err);
  assert_non_null(strstr(err->message, "WWW-Authenticate"));
  crimage_error_free(err);
  auth_challenges_clear(ch, n);
}

static void test_challenge_bad(void **state)
{
  challenge_bad("Bearer realm=\"unterminated");
  challenge_bad("Bearer realm=\"x\" junk");
  challenge_bad("=realm");
  challenge_bad("Bearer realm=\"x\\");
  challenge_bad("B\x01 realm=x");
  /* too many challenges */
  dynbuf b;
  dynbuf_init(&b, 4096);
  for (int i = 0; i < REGISTRY_MAX_CHALLENGES + 1; i++)
    dynbuf_printf(&b, "%sBasic realm=r%d", i ? ", " : "", i);
  challenge_bad(b.data);
  dynbuf_free(&b);
}

static void test_status_codes(void **state)
{
  assert_int_equal(registry_status_from_code("MANIFEST_UNKNOWN", 404), CRIMAGE_NOT_FOUND);
  assert_int_equal(registry_status_from_code("UNAUTHORIZED", 401), CRIMAGE_UNAUTHENTICATED);
  assert_int_equal(registry_status_from_code("DENIED", 403), CRIMAGE_PERMISSION_DENIED);
  assert_int_equal(registry_status_from_code("TOOMANYREQUESTS", 429), CRIMAGE_RESOURCE_EXHAUSTED);
  assert_int_equal(registry_status_from_code(NULL, 503), CRIMAGE_UNAVAILABLE);
  assert_int_equal(registry_status_from_code(NULL, 429), CRIMAGE_RESOURCE_EXHAUSTED);
  assert_int_equal(registry_status_from_code("SOMETHING_NEW", 404), CRIMAGE_NOT_FOUND);
}

/* Numbers of response headers: range-checked, capped, never negative, never overflowing. */
static void test_header_numbers(void **state)
{
  const int64_t now = 1700000000; /* Tue, 14 Nov 2023 22:13:20 GMT */
  const int64_t cap = REGISTRY_MAX_RETRY_AFTER_MS;
  assert_int_equal(registry_retry_after_ms("0", now), 0);
  assert_int_equal(registry_retry_after_ms("1", now), 1000);
  assert_int_equal(registry_retry_after_ms("29", now), 29000);
  assert_int_equal(registry_retry_after_ms("30", now), cap);
  assert_int_equal(registry_retry_after_ms("31", now), cap);
  /* v * 1000 of these overflowed int64 (UBSan) and gave a negative delay: an immediate retry */
  assert_int_equal(registry_retry_after_ms("9300000000000000", now), cap);
  assert_int_equal(registry_retry_after_ms("9223372036854775807", now), cap);
  assert_int_equal(registry_retry_after_ms("18446744073709551616", now), cap);
  assert_int_equal(registry_retry_after_ms("999999999999999999999999999999999999999999", now), cap);
  /* An HTTP-date: the time left until then, capped; a past date means now. */
  assert_int_equal(registry_retry_after_ms("Tue, 14 Nov 2023 22:13:30 GMT", now), 10000);
  assert_int_equal(registry_retry_after_ms("Tue, 14 Nov 2023 23:13:20 GMT", now), cap);
  assert_int_equal(registry_retry_after_ms("Fri, 31 Dec 9999 23:59:59 GMT", now), cap);
  assert_int_equal(registry_retry_after_ms("Wed, 21 Oct 2015 07:28:00 GMT", now), 0);
  /* Neither: the caller's own back-off applies. */
  const char *bad[] = {"", "-1", "-9300000000000000", "+5", "1.5", "5s", "soon"};
  for (size_t i = 0; i < ARRAY_SIZE(bad); i++)
    assert_int_equal(registry_retry_after_ms(bad[i], now), -1);
  assert_int_equal(registry_retry_after_ms(NULL, now), -1);

  assert_int_equal(registry_content_length("0"), 0);
  assert_int_equal(registry_content_length("1234"), 1234);
  assert_int_equal(registry_content_length("9223372036854775807"), INT64_MAX);
  const char *bad_len[] = {"9223372036854775808", "99999999999999999999999", "-1", " -1", "+1", "1e3", "", "12 34"};
  for (size_t i = 0; i < ARRAY_SIZE(bad_len); i++)
    assert_int_equal(registry_content_length(bad_len[i]), -1);
  assert_int_equal(registry_content_length(NULL), -1);

  uint64_t first = 7;
  assert_true(registry_content_range_first("bytes 100-199/200", &first));
  assert_int_equal(first, 100);
  assert_true(registry_content_range_first("Bytes 0-0/1", &first));
  assert_int_equal(first, 0);
  const char *bad_range[] = {"bytes -5-10/20", "bytes 99999999999999999999999-1/2", "bytes 5", "items 1-2/3",
                             "bytes  1-2/3", "bytes +1-2/3", ""};
  for (size_t i = 0; i < ARRAY_SIZE(bad_range); i++)
    assert_false(registry_content_range_first(bad_range[i], &first));
  assert_false(registry_content_range_first(NULL, &first));
}

/* ---- against a real registry ---- */

typedef struct fixture {
  test_registry reg;  /* anonymous */
  test_registry areg; /* htpasswd */
  test_registry treg; /* token auth */
  test_registry treg2; /* token auth: no OAuth2 POST (404), 2 s tokens, a refresh token */
  registry_client *client;
  char endpoint[128];
  char aendpoint[128];
} fixture;

static int group_setup(void **state)
{
  fixture *f = xcalloc(1, sizeof(*f));
  *state = f;
  if (test_registry_start(&f->reg) < 0 || test_registry_start_auth(&f->areg, "alice", "s3cret:with:colons") < 0)
    return -1;
  if (test_registry_start_mode(&f->treg, "token", "carol", "t0ken pass") < 0)
    return -1;
  setenv("TOKEN_POST", "404", 1);
  setenv("TOKEN_EXPIRES", "2", 1);
  setenv("TOKEN_REFRESH", "rt-secret-1", 1);
  int r2 = test_registry_start_mode(&f->treg2, "token", "dave", "pw&2=x");
  unsetenv("TOKEN_POST");
  unsetenv("TOKEN_EXPIRES");
  unsetenv("TOKEN_REFRESH");
  if (r2 < 0)
    return -1;
  if (test_push_image(&f->reg, "test/alpha", "v1", "--layers 3 --user 1002", "") < 0 ||
      test_push_image(&f->treg, "tok/img", "v1", "--layers 2", "") < 0 ||
      test_push_image(&f->treg, "tok/other", "v1", "--layers 1", "") < 0 ||
      test_push_image(&f->reg, "test/big", "v1", "--layers 1 --layer-bytes 65536", "") < 0 ||
      test_push_image(&f->treg2, "tok2/img", "v1", "--layers 1", "") < 0 ||
      test_push_image(&f->areg, "private/img", "v1", "--layers 1", "") < 0)
    return -1;
  snprintf(f->endpoint, sizeof(f->endpoint), "http://%s", f->reg.host);
  snprintf(f->aendpoint, sizeof(f->aendpoint), "http://%s", f->areg.host);
  registry_client_options o = {.progress_timeout_ms = 60000};
  crimage_error *err = NULL;
  return registry_client_new(&o, &f->client, &err) < 0 ? -1 : 0;
}

static int group_teardown(void **state)
{
  fixture *f = *state;
  if (!f)
    return 0;
  registry_client_free(f->client);
  test_registry_stop(&f->reg);
  test_registry_stop(&f->areg);
  test_registry_stop(&f->treg);
  test_registry_stop(&f->treg2);
  free(f);
  return 0;
}

static registry_repo *repo_open(fixture *f, const char *endpoint, const char *host, const char *name,
                                const credential *cred)
{
  registry_repo *r = NULL;
  crimage_error *err = NULL;
  if (registry_repo_new(f->client, endpoint, false, host, name, cred, &r, &err) < 0)
    fail_msg("repo: %s", err->message);
  return r;
}

static void test_get_manifest(void **state)
{
  fixture *f = *state;
  registry_repo *r = repo_open(f, f->endpoint, f->reg.host, "test/alpha", NULL);
  char *body = NULL, *ct = NULL;
  size_t len = 0;
  crimage_error *err = NULL;
  if (registry_get_manifest(r, "v1", MANIFEST_MAX_SIZE, NULL, &body, &len, &ct, &err) < 0)
    fail_msg("%s", err->message);
  assert_non_null(ct);
  assert_string_equal(ct, MEDIA_TYPE_OCI_MANIFEST);
  char want[80], got[DIGEST_MAX_LEN + 1];
  assert_int_equal(test_remote_digest(&f->reg, "test/alpha", "v1", "--raw", want, sizeof(want)), 0);
  digest_sha256(body, len, got);
  assert_string_equal(got, want);
  manifest *m = NULL;
  assert_int_equal(manifest_parse(body, len, ct, &m, &err), 0);
  assert_int_equal(m->n_layers, 3);
  free(body);
  free(ct);

  /* by digest */
  assert_int_equal(registry_get_manifest(r, want, MANIFEST_MAX_SIZE, NULL, &body, &len, &ct, &err), 0);
  digest_sha256(body, len, got);
  assert_string_equal(got, want);
  free(body);
  free(ct);

  /* a manifest over the caller's limit */
  assert_true(registry_get_manifest(r, "v1", 10, NULL, &body, &len, &ct, &err) < 0);
  assert_int_equal(err->status, CRIMAGE_INVALID_ARGUMENT);
  assert_non_null(strstr(err->message, "limit"));
  crimage_error_clear(&err);

  manifest_free(m);
  registry_repo_free(r);
}

/* A sink into a dynbuf. */
static int buf_write(void *ud, const void *data, size_t n, crimage_error **err)
{
  return dynbuf_append(ud, data, n) < 0 ? crimage_error_set(err, CRIMAGE_INTERNAL, ENOBUFS, "buffer full") : 0;
}

static int buf_restart(void *ud, crimage_error **err)
{
  dynbuf_reset(ud);
  return 0;
}

static void test_get_blob_range(void **state)
{
  fixture *f = *state;
  registry_repo *r = repo_open(f, f->endpoint, f->reg.host, "test/alpha", NULL);
  char *body = NULL, *ct = NULL;
  size_t len = 0;
  crimage_error *err = NULL;
  assert_int_equal(registry_get_manifest(r, "v1", MANIFEST_MAX_SIZE, NULL, &body, &len, &ct, &err), 0);
  manifest *m = NULL;
  assert_int_equal(manifest_parse(body, len, ct, &m, &err), 0);
  const manifest_descriptor *l = &m->layers[2];

  dynbuf whole, tail;
  dynbuf_init(&whole, 1 << 20);
  dynbuf_init(&tail, 1 << 20);
  registry_sink s1 = {.write = buf_write, .restart = buf_restart, .userdata = &whole};
  if (registry_get_blob(r, l->digest, 0, l->size, &s1, NULL, &err) < 0)
    fail_msg("%s", err->message);
  assert_int_equal(whole.len, (size_t) l->size);
  char got[DIGEST_MAX_LEN + 1];
  digest_sha256(whole.data, whole.len, got);
  assert_string_equal(got, l->digest);

  uint64_t off = (uint64_t) l->size / 3;
  registry_sink s2 = {.write = buf_write, .restart = buf_restart, .userdata = &tail};
  assert_int_equal(registry_get_blob(r, l->digest, off, l->size, &s2, NULL, &err), 0);
  assert_int_equal(tail.len, (size_t) l->size - off);
  assert_memory_equal(tail.data, whole.data + off, tail.len);

  /* a blob larger than the manifest says is refused as DATA_LOSS */
  dynbuf_reset(&tail);
  assert_true(registry_get_blob(r, l->digest, 0, l->size - 1, &s2, NULL, &err) < 0);
  assert_int_equal(err->status, CRIMAGE_DATA_LOSS);
  crimage_error_clear(&err);

  /* an unknown blob: NOT_FOUND with the registry's code */
  assert_true(registry_get_blob(r, "sha256:0000000000000000000000000000000000000000000000000000000000000000", 0, 10,
                                &s2, NULL, &err) < 0);
  assert_int_equal(err->status, CRIMAGE_NOT_FOUND);
  assert_non_null(strstr(err->message, "BLOB_UNKNOWN"));
  crimage_error_clear(&err);

  dynbuf_free(&whole);
  dynbuf_free(&tail);
  manifest_free(m);
  free(body);
  free(ct);
  registry_repo_free(r);
}

static void test_manifest_unknown(void **state)
{
  fixture *f = *state;
  registry_repo *r = repo_open(f, f->endpoint, f->reg.host, "test/alpha", NULL);
  char *body = NULL, *ct = NULL;
  size_t len = 0;
  crimage_error *err = NULL;
  assert_true(registry_get_manifest(r, "nope", MANIFEST_MAX_SIZE, NULL, &body, &len, &ct, &err) < 0);
  assert_int_equal(err->status, CRIMAGE_NOT_FOUND);
  assert_non_null(strstr(err->message, f->reg.host));
  assert_non_null(strstr(err->message, "HTTP 404"));
  assert_non_null(strstr(err->message, "MANIFEST_UNKNOWN"));
  crimage_error_clear(&err);
  /* a path-unsafe reference never reaches the wire */
  assert_true(registry_get_manifest(r, "../x", MANIFEST_MAX_SIZE, NULL, &body, &len, &ct, &err) < 0);
  assert_int_equal(err->status, CRIMAGE_INVALID_ARGUMENT);
  crimage_error_clear(&err);
  registry_repo_free(r);
}

static void test_unreachable(void **state)
{
  fixture *f = *state;
  int port = test_free_port();
  char ep[128], host[64];
  snprintf(host, sizeof(host), "127.0.0.1:%d", port);
  snprintf(ep, sizeof(ep), "http://%s", host);
  registry_repo *r = repo_open(f, ep, host, "a/b", NULL);
  char *body = NULL, *ct = NULL;
  size_t len = 0;
  crimage_error *err = NULL;
  assert_true(registry_get_manifest(r, "v1", MANIFEST_MAX_SIZE, NULL, &body, &len, &ct, &err) < 0);
  assert_int_equal(err->status, CRIMAGE_UNAVAILABLE);
  assert_non_null(strstr(err->message, host));
  crimage_error_clear(&err);
  registry_repo_free(r);
}

static bool always_cancelled(void *ud) { return true; }

static void test_cancel(void **state)
{
  fixture *f = *state;
  registry_repo *r = repo_open(f, f->endpoint, f->reg.host, "test/alpha", NULL);
  char *body = NULL, *ct = NULL;
  size_t len = 0;
  crimage_error *err = NULL;
  registry_xfer x = {.cancelled = always_cancelled};
  assert_true(registry_get_manifest(r, "v1", MANIFEST_MAX_SIZE, &x, &body, &len, &ct, &err) < 0);
  assert_int_equal(err->status, CRIMAGE_CANCELLED);
  crimage_error_clear(&err);
  registry_repo_free(r);
}

static void test_basic_auth(void **state)
{
  fixture *f = *state;
  char *body = NULL, *ct = NULL;
  size_t len = 0;
  crimage_error *err = NULL;

  /* anonymous: refused with UNAUTHENTICATED */
  registry_repo *r = repo_open(f, f->aendpoint, f->areg.host, "private/img", NULL);
  assert_true(registry_get_manifest(r, "v1", MANIFEST_MAX_SIZE, NULL, &body, &len, &ct, &err) < 0);
  assert_int_equal(err->status, CRIMAGE_UNAUTHENTICATED);
  assert_non_null(strstr(err->message, f->areg.host));
  crimage_error_clear(&err);
  registry_repo_free(r);

  /* the right credential (a password with ':' in it) */
  credential *c = credential_new();
  c->username = xstrdup("alice");
  c->password = xstrdup("s3cret:with:colons");
  r = repo_open(f, f->aendpoint, f->areg.host, "private/img", c);
  if (registry_get_manifest(r, "v1", MANIFEST_MAX_SIZE, NULL, &body, &len, &ct, &err) < 0)
    fail_msg("%s", err->message);
  free(body);
  free(ct);
  /* the auth state is kept: the next request succeeds too */
  assert_int_equal(registry_get_manifest(r, "v1", MANIFEST_MAX_SIZE, NULL, &body, &len, &ct, &err), 0);
  free(body);
  free(ct);
  registry_repo_free(r);

  /* a wrong password: UNAUTHENTICATED, and the password is not in the message */
  free(c->password);
  c->password = xstrdup("wrong-password");
  r = repo_open(f, f->aendpoint, f->areg.host, "private/img", c);
  assert_true(registry_get_manifest(r, "v1", MANIFEST_MAX_SIZE, NULL, &body, &len, &ct, &err) < 0);
  assert_int_equal(err->status, CRIMAGE_UNAUTHENTICATED);
  assert_null(strstr(err->message, "wrong-password"));
  crimage_error_clear(&err);
  registry_repo_free(r);
  credential_free(c);
}

static char *read_all(const char *path)
{
  FILE *fp = fopen(path, "r");
  if (!fp)
    return xstrdup("");
  dynbuf b;
  dynbuf_init(&b, 1 << 20);
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), fp)) > 0)
    dynbuf_append(&b, buf, n);
  fclose(fp);
  return b.data ? dynbuf_take(&b, NULL) : xstrdup("");
}

static size_t count(const char *hay, const char *needle)
{
  size_t n = 0;
  for (const char *p = strstr(hay, needle); p; p = strstr(p + 1, needle))
    n++;
  return n;
}

static void test_bearer_token(void **state)
{
  fixture *f = *state;
  char ep[128];
  snprintf(ep, sizeof(ep), "http://%s", f->treg.host);
  char *body = NULL, *ct = NULL;
  size_t len = 0;
  crimage_error *err = NULL;
  const char *anon_line = "\"query\": \"service=crimage-test-registry&scope=repository%3Atok%2Fimg%3Apull\", "
                          "\"auth\": \"\"";
  const char *post_line = "\"method\": \"POST\", \"grant_type\": \"password\", \"client_id\": \"crimage\", "
                          "\"service\": \"crimage-test-registry\", \"scope\": \"repository:tok/img:pull\", "
                          "\"username\": \"carol\"";

  /* anonymous: the challenge leads to an anonymous token GET with service and scope URL-encoded */
  registry_repo *r = repo_open(f, ep, f->treg.host, "tok/img", NULL);
  if (registry_get_manifest(r, "v1", MANIFEST_MAX_SIZE, NULL, &body, &len, &ct, &err) < 0)
    fail_msg("%s", err->message);
  manifest *m = NULL;
  assert_int_equal(manifest_parse(body, len, ct, &m, &err), 0);
  free(body);
  free(ct);
  char *log = read_all(f->treg.token_log);
  assert_int_equal(count(log, anon_line), 1);
  free(log);

  /* the token is reused for the blobs: no second token request */
  dynbuf b;
  dynbuf_init(&b, 1 << 20);
  registry_sink sink = {.write = buf_write, .restart = buf_restart, .userdata = &b};
  for (size_t i = 0; i < m->n_layers; i++) {
    dynbuf_reset(&b);
    if (registry_get_blob(r, m->layers[i].digest, 0, m->layers[i].size, &sink, NULL, &err) < 0)
      fail_msg("%s", err->message);
    assert_int_equal(b.len, (size_t) m->layers[i].size);
  }
  log = read_all(f->treg.token_log);
  assert_int_equal(count(log, anon_line), 1);
  free(log);
  dynbuf_free(&b);
  manifest_free(m);
  registry_repo_free(r);

  /* with a credential: the OAuth2 POST (grant_type=password), no GET */
  credential *c = credential_new();
  c->username = xstrdup("carol");
  c->password = xstrdup("t0ken pass");
  r = repo_open(f, ep, f->treg.host, "tok/img", c);
  if (registry_get_manifest(r, "v1", MANIFEST_MAX_SIZE, NULL, &body, &len, &ct, &err) < 0)
    fail_msg("%s", err->message);
  free(body);
  free(ct);
  log = read_all(f->treg.token_log);
  assert_int_equal(count(log, post_line), 1);
  assert_int_equal(count(log, "\"auth\": \"Basic\""), 0);
  /* (skopeo's push asked for "pull,push" tokens; ours is the anonymous GET above) */
  assert_int_equal(count(log, "\"method\": \"GET\", \"scope\": \"repository:tok/img:pull\"}"), 1);
  free(log);
  registry_repo_free(r);

  /* a wrong password: the token server refuses, the error says so without the secret */
  free(c->password);
  c->password = xstrdup("bad-secret");
  r = repo_open(f, ep, f->treg.host, "tok/img", c);
  assert_true(registry_get_manifest(r, "v1", MANIFEST_MAX_SIZE, NULL, &body, &len, &ct, &err) < 0);
  assert_int_equal(err->status, CRIMAGE_UNAUTHENTICATED);
  assert_non_null(strstr(err->message, "token request"));
  assert_non_null(strstr(err->message, "credentials"));
  assert_non_null(strstr(err->message, "HTTP 401"));
  assert_null(strstr(err->message, "bad-secret"));
  crimage_error_clear(&err);
  registry_repo_free(r);
  credential_free(c);
}

static void get_ok(registry_repo *r, const char *ref)
{
  char *body = NULL, *ct = NULL;
  size_t len = 0;
  crimage_error *err = NULL;
  if (registry_get_manifest(r, ref, MANIFEST_MAX_SIZE, NULL, &body, &len, &ct, &err) < 0)
    fail_msg("%s", err->message);
  free(body);
  free(ct);
}

/* Tokens are cached per client across repos, keyed by scope: another repository needs its own token, the same
 * repository through a new repo object does not. */
static void test_token_scope_cache(void **state)
{
  fixture *f = *state;
  char ep[128];
  snprintf(ep, sizeof(ep), "http://%s", f->treg.host);
  char *log0 = read_all(f->treg.token_log);
  size_t before_img = count(log0, "\"scope\": \"repository:tok/img:pull\"");
  size_t before_other = count(log0, "\"scope\": \"repository:tok/other:pull\"");
  free(log0);

  registry_repo *r = repo_open(f, ep, f->treg.host, "tok/other", NULL);
  get_ok(r, "v1");
  registry_repo_free(r);
  r = repo_open(f, ep, f->treg.host, "tok/other", NULL);
  get_ok(r, "v1");
  registry_repo_free(r);
  r = repo_open(f, ep, f->treg.host, "tok/img", NULL); /* anonymous token of test_bearer_token, cached */
  get_ok(r, "v1");
  registry_repo_free(r);

  char *log = read_all(f->treg.token_log);
  assert_int_equal(count(log, "\"scope\": \"repository:tok/other:pull\""), before_other + 1);
  assert_int_equal(count(log, "\"scope\": \"repository:tok/img:pull\""), before_img);
  free(log);

  /* a credential is part of the key: the same scope with a password is a new token */
  credential *c = credential_new();
  c->username = xstrdup("carol");
  c->password = xstrdup("t0ken pass");
  c->source = xstrdup("unit test");
  r = repo_open(f, ep, f->treg.host, "tok/other", c);
  get_ok(r, "v1");
  registry_repo_free(r);
  credential_free(c);
  log = read_all(f->treg.token_log);
  assert_int_equal(count(log, "\"scope\": \"repository:tok/other:pull\""), before_other + 2);
  free(log);
}

/* A token server without OAuth2: the POST is answered 404 and the client falls back to GET with Basic auth. Tokens
 * of 2 s expire and are fetched again. */
static void test_token_get_fallback_and_expiry(void **state)
{
  fixture *f = *state;
  registry_client *client = NULL;
  crimage_error *err = NULL;
  assert_int_equal(registry_client_new(NULL, &client, &err), 0);
  char ep[128];
  snprintf(ep, sizeof(ep), "http://%s", f->treg2.host);
  credential *c = credential_new();
  c->username = xstrdup("dave");
  c->password = xstrdup("pw&2=x");
  registry_repo *r = NULL;
  assert_int_equal(registry_repo_new(client, ep, false, f->treg2.host, "tok2/img", c, &r, &err), 0);
  get_ok(r, "v1");
  char *log = read_all(f->treg2.token_log);
  assert_int_equal(count(log, "\"method\": \"POST\", \"grant_type\": \"password\""), 1);
  assert_int_equal(count(log, "\"auth\": \"Basic\", \"method\": \"GET\""), 1);
  free(log);

  /* still valid: no new request */
  get_ok(r, "v1");
  log = read_all(f->treg2.token_log);
  assert_int_equal(count(log, "\"auth\": \"Basic\", \"method\": \"GET\""), 1);
  free(log);

  /* expired: fetched again */
  struct timespec ts = {2, 600 * 1000 * 1000};
  nanosleep(&ts, NULL);
  get_ok(r, "v1");
  log = read_all(f->treg2.token_log);
  assert_int_equal(count(log, "\"auth\": \"Basic\", \"method\": \"GET\""), 2);
  free(log);
  registry_repo_free(r);
  credential_free(c);
  registry_client_free(client);
}

/* An identity token is an OAuth2 refresh token: POST grant_type=refresh_token, never a GET. */
static void test_token_refresh_grant(void **state)
{
  fixture *f = *state;
  /* treg2's POST answers 404; use a server that does OAuth2 with the refresh token */
  test_registry t;
  setenv("TOKEN_REFRESH", "rt-secret-1", 1);
  int rs = test_registry_start_mode(&t, "token", NULL, NULL);
  unsetenv("TOKEN_REFRESH");
  assert_int_equal(rs, 0);
  assert_int_equal(test_push_image(&t, "tok3/img", "v1", "--layers 1", ""), 0);
  char ep[128];
  snprintf(ep, sizeof(ep), "http://%s", t.host);
  credential *c = credential_new();
  c->identity_token = xstrdup("rt-secret-1");
  registry_repo *r = repo_open(f, ep, t.host, "tok3/img", c);
  get_ok(r, "v1");
  registry_repo_free(r);
  char *log = read_all(t.token_log);
  assert_int_equal(count(log, "\"grant_type\": \"refresh_token\", \"client_id\": \"crimage\""), 1);
  assert_int_equal(count(log, "\"method\": \"GET\", \"scope\": \"repository:tok3/img:pull\"}"), 0);
  assert_null(strstr(log, "rt-secret-1"));
  free(log);

  /* a refused refresh token: UNAUTHENTICATED naming the grant, without the secret */
  free(c->identity_token);
  c->identity_token = xstrdup("rt-wrong-2");
  r = repo_open(f, ep, t.host, "tok3/img", c);
  char *body = NULL, *ct = NULL;
  size_t len = 0;
  crimage_error *err = NULL;
  assert_true(registry_get_manifest(r, "v1", MANIFEST_MAX_SIZE, NULL, &body, &len, &ct, &err) < 0);
  assert_int_equal(err->status, CRIMAGE_UNAUTHENTICATED);
  assert_non_null(strstr(err->message, "refresh_token"));
  assert_non_null(strstr(err->message, t.host));
  assert_null(strstr(err->message, "rt-wrong-2"));
  crimage_error_clear(&err);
  registry_repo_free(r);
  credential_free(c);
  test_registry_stop(&t);
}

/* A trickling blob (512 B/s) under a floor of 4 KiB/s over 1 s fails with a message saying so; the same floor does
 * not disturb a normal transfer. */
static void test_throughput_floor(void **state)
{
  fixture *f = *state;
  test_fault_proxy fp;
  assert_int_equal(test_fault_proxy_start(&f->reg, "u", "p", &fp), 0);
  registry_client_options o = {.progress_timeout_ms = 60000, .min_speed_bytes_per_s = 4096,
                               .min_speed_window_ms = 1000};
  registry_client *client = NULL;
  crimage_error *err = NULL;
  assert_int_equal(registry_client_new(&o, &client, &err), 0);

  registry_repo *direct = NULL;
  assert_int_equal(registry_repo_new(client, f->endpoint, false, f->reg.host, "test/big", NULL, &direct, &err), 0);
  char *body = NULL, *ct = NULL;
  size_t len = 0;
  assert_int_equal(registry_get_manifest(direct, "v1", MANIFEST_MAX_SIZE, NULL, &body, &len, &ct, &err), 0);
  manifest *m = NULL;
  assert_int_equal(manifest_parse(body, len, ct, &m, &err), 0);
  free(body);
  free(ct);
  const manifest_descriptor *l = &m->layers[0];
  for (size_t i = 1; i < m->n_layers; i++)
    if (m->layers[i].size > l->size)
      l = &m->layers[i];
  assert_true(l->size > 2048);
  dynbuf b;
  dynbuf_init(&b, 1 << 20);
  registry_sink sink = {.write = buf_write, .restart = buf_restart, .userdata = &b};
  assert_int_equal(registry_get_blob(direct, l->digest, 0, l->size, &sink, NULL, &err), 0);
  assert_int_equal(b.len, (size_t) l->size);

  char ep[128];
  snprintf(ep, sizeof(ep), "http://%s/trickle", fp.host);
  registry_repo *slow = NULL;
  assert_int_equal(registry_repo_new(client, ep, false, fp.host, "test/big", NULL, &slow, &err), 0);
  dynbuf_reset(&b);
  assert_true(registry_get_blob(slow, l->digest, 0, l->size, &sink, NULL, &err) < 0);
  assert_int_equal(err->status, CRIMAGE_UNAVAILABLE);
  assert_non_null(strstr(err->message, "slower than 4096 bytes/s over 1 s"));
  assert_non_null(strstr(err->message, fp.host));
  assert_true(b.len < (size_t) l->size);
  crimage_error_clear(&err);

  dynbuf_free(&b);
  manifest_free(m);
  registry_repo_free(slow);
  registry_repo_free(direct);
  registry_client_free(client);
  test_fault_proxy_stop(&fp);
}

/* The token cache is bounded: after more scopes than it holds, the oldest token is gone and fetched again while a
 * recent one is still served from the cache. */
static void test_token_cache_bounded(void **state)
{
  fixture *f = *state;
  registry_client *client = NULL;
  crimage_error *err = NULL;
  assert_int_equal(registry_client_new(NULL, &client, &err), 0);
  char ep[128];
  snprintf(ep, sizeof(ep), "http://%s", f->treg.host);
  const int n = REGISTRY_TOKEN_CACHE_SIZE + 4;
  for (int i = 0; i <= n; i++) {
    char name[64];
    snprintf(name, sizeof(name), "bound/r%d", i == n ? n - 1 : i); /* the last one repeats a recent name */
    registry_repo *r = NULL;
    assert_int_equal(registry_repo_new(client, ep, false, f->treg.host, name, NULL, &r, &err), 0);
    char *body = NULL, *ct = NULL;
    size_t len = 0;
    /* the repository does not exist: the registry answers NAME_UNKNOWN once the token is presented */
    assert_true(registry_get_manifest(r, "v1", MANIFEST_MAX_SIZE, NULL, &body, &len, &ct, &err) < 0);
    assert_int_equal(err->status, CRIMAGE_NOT_FOUND);
    crimage_error_clear(&err);
    registry_repo_free(r);
  }
  char *log = read_all(f->treg.token_log);
  char line[128];
  snprintf(line, sizeof(line), "\"scope\": \"repository:bound/r%d:pull\"}", n - 1);
  assert_int_equal(count(log, line), 1);
  free(log);

  registry_repo *r = NULL;
  assert_int_equal(registry_repo_new(client, ep, false, f->treg.host, "bound/r0", NULL, &r, &err), 0);
  char *body = NULL, *ct = NULL;
  size_t len = 0;
  assert_true(registry_get_manifest(r, "v1", MANIFEST_MAX_SIZE, NULL, &body, &len, &ct, &err) < 0);
  crimage_error_clear(&err);
  registry_repo_free(r);
  log = read_all(f->treg.token_log);
  assert_int_equal(count(log, "\"scope\": \"repository:bound/r0:pull\"}"), 2);
  free(log);
  registry_client_free(client);
}

/* Handles are pooled and reset between requests: one idle handle serves a sequence of requests, and nothing of one
 * request (credentials, HEAD, Range, the sink) leaks into the next. */
static void test_handle_reuse(void **state)
{
  fixture *f = *state;
  registry_client *client = NULL;
  crimage_error *err = NULL;
  assert_int_equal(registry_client_new(NULL, &client, &err), 0);
  assert_int_equal(registry_client_idle_handles(client), 0);
  char *body = NULL, *ct = NULL;
  size_t len = 0;

  /* with a credential, then without: the second is refused (the reused handle forgot the password) */
  credential *c = credential_new();
  c->username = xstrdup("alice");
  c->password = xstrdup("s3cret:with:colons");
  registry_repo *r = NULL;
  assert_int_equal(registry_repo_new(client, f->aendpoint, false, f->areg.host, "private/img", c, &r, &err), 0);
  if (registry_get_manifest(r, "v1", MANIFEST_MAX_SIZE, NULL, &body, &len, &ct, &err) < 0)
    fail_msg("%s", err->message);
  free(body);
  free(ct);
  registry_repo_free(r);
  credential_free(c);
  assert_int_equal(registry_client_idle_handles(client), 1);
  assert_int_equal(registry_repo_new(client, f->aendpoint, false, f->areg.host, "private/img", NULL, &r, &err), 0);
  assert_true(registry_get_manifest(r, "v1", MANIFEST_MAX_SIZE, NULL, &body, &len, &ct, &err) < 0);
  assert_int_equal(err->status, CRIMAGE_UNAUTHENTICATED);
  crimage_error_clear(&err);
  registry_repo_free(r);

  /* HEAD, a ranged GET, then a whole GET of a 64 KiB blob on the same handle: every byte arrives */
  assert_int_equal(registry_repo_new(client, f->endpoint, false, f->reg.host, "test/big", NULL, &r, &err), 0);
  char *digest = NULL;
  int64_t size = -1;
  assert_int_equal(registry_head_manifest(r, "v1", NULL, &digest, NULL, &size, &err), 0);
  assert_non_null(digest);
  assert_true(size > 0);
  free(digest);
  assert_int_equal(registry_get_manifest(r, "v1", MANIFEST_MAX_SIZE, NULL, &body, &len, &ct, &err), 0);
  manifest *m = NULL;
  assert_int_equal(manifest_parse(body, len, ct, &m, &err), 0);
  const manifest_descriptor *l = &m->layers[0];
  dynbuf b;
  dynbuf_init(&b, 1 << 20);
  registry_sink s = {.write = buf_write, .restart = buf_restart, .userdata = &b};
  assert_int_equal(registry_get_blob(r, l->digest, (uint64_t) l->size - 100, l->size, &s, NULL, &err), 0);
  assert_int_equal(b.len, 100);
  dynbuf_reset(&b);
  assert_int_equal(registry_get_blob(r, l->digest, 0, l->size, &s, NULL, &err), 0);
  assert_int_equal(b.len, (size_t) l->size);
  char got[DIGEST_MAX_LEN + 1];
  digest_sha256(b.data, b.len, got);
  assert_string_equal(got, l->digest);
  assert_int_equal(registry_client_idle_handles(client), 1);
  dynbuf_free(&b);
  manifest_free(m);
  free(body);
  free(ct);
  registry_repo_free(r);
  registry_client_free(client);
}

int main(void)
{
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_challenge_bearer), cmocka_unit_test(test_challenge_several),
      cmocka_unit_test(test_challenge_bad),    cmocka_unit_test(test_status_codes),
      cmocka_unit_test(test_header_numbers),
  };
  const struct CMUnitTest live[] = {
      cmocka_unit_test(test_get_manifest),  cmocka_unit_test(test_get_blob_range), cmocka_unit_test(test_manifest_unknown),
      cmocka_unit_test(test_unreachable),   cmocka_unit_test(test_cancel),         cmocka_unit_test(test_basic_auth),
      cmocka_unit_test(test_bearer_token), cmocka_unit_test(test_token_scope_cache),
      cmocka_unit_test(test_token_get_fallback_and_expiry), cmocka_unit_test(test_token_refresh_grant),
      cmocka_unit_test(test_throughput_floor), cmocka_unit_test(test_token_cache_bounded),
      cmocka_unit_test(test_handle_reuse),
  };
  int failed = cmocka_run_group_tests_name("parsing", tests, NULL, NULL);
  failed += cmocka_run_group_tests_name("registry", live, group_setup, group_teardown);
  return failed;
}
