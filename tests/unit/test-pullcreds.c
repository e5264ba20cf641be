/* The daemon's credential sequence for pulls without AuthConfig: anonymous only when nothing matched, each
 * candidate in order until one works, CANCELLED ends it, and a failure of all lists every one without a secret;
 * resolution from a directory of Secrets and a node config file, Secrets first. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <cmocka.h>

#include "common/fsutil.h"
#include "common/util.h"
#include "cri/pull_credentials.h"

typedef struct script {
  int n_calls;
  char *users[8];             /* username of each try ("" = anonymous) */
  const char *works_for;      /* username whose try succeeds; NULL = none */
  crimage_status fail_status; /* status of a failing try */
  int cancel_at;              /* 1-based try that is CANCELLED; 0 = none */
} script;

static int attempt(void *userdata, const credential *cred, void **ret_result, crimage_error **err)
{
  script *s = userdata;
  s->users[s->n_calls++] = xstrdup(cred ? cred->username : "");
  if (s->cancel_at == s->n_calls)
    return crimage_error_set(err, CRIMAGE_CANCELLED, 0, "the client went away");
  if (cred && s->works_for && streq(cred->username, s->works_for)) {
    *ret_result = xstrdup("sha256:ok");
    return 0;
  }
  return crimage_error_set(err, s->fail_status, 0, "registry said no to %s", cred ? cred->username : "nobody");
}

static void script_clear(script *s)
{
  for (int i = 0; i < s->n_calls; i++)
    free(s->users[i]);
}

static credential *cred(const char *user, const char *password, const char *source)
{
  credential *c = credential_new();
  c->username = xstrdup(user);
  c->password = xstrdup(password);
  c->source = xstrdup(source);
  return c;
}

static void test_anonymous_when_none(void **state)
{
  (void) state;
  credential_list l = {0};
  script s = {.fail_status = CRIMAGE_UNAUTHENTICATED};
  crimage_error *err = NULL;
  void *res = NULL;
  assert_true(pull_credentials_try(&l, attempt, &s, &res, &err) < 0);
  assert_int_equal(s.n_calls, 1);
  assert_string_equal(s.users[0], "");
  /* The anonymous try's own error, not a list. */
  assert_string_equal(err->message, "registry said no to nobody");
  crimage_error_free(err);
  script_clear(&s);
}

static void test_in_order_until_one_works(void **state)
{
  (void) state;
  credential_list l = {0};
  credential_list_add(&l, cred("a", "pw-a", "secret ns/a"));
  credential_list_add(&l, cred("b", "pw-b", "config.json /x"));
  credential_list_add(&l, cred("c", "pw-c", "config.json /x"));
  script s = {.fail_status = CRIMAGE_UNAUTHENTICATED, .works_for = "b"};
  crimage_error *err = NULL;
  void *res = NULL;
  assert_int_equal(pull_credentials_try(&l, attempt, &s, &res, &err), 0);
  assert_null(err);
  assert_string_equal(res, "sha256:ok");
  free(res);
  assert_int_equal(s.n_calls, 2);
  assert_string_equal(s.users[0], "a");
  assert_string_equal(s.users[1], "b");
  script_clear(&s);
  credential_list_clear(&l);
}

static void test_all_fail(void **state)
{
  (void) state;
  credential_list l = {0};
  credential_list_add(&l, cred("a", "pw-a", "secret ns/a"));
  credential_list_add(&l, cred("b", "pw-b", "config.json /x"));
  script s = {.fail_status = CRIMAGE_PERMISSION_DENIED};
  crimage_error *err = NULL;
  void *res = NULL;
  assert_true(pull_credentials_try(&l, attempt, &s, &res, &err) < 0);
  assert_null(res);
  assert_int_equal(s.n_calls, 2);
  assert_int_equal(err->status, CRIMAGE_PERMISSION_DENIED);
  assert_non_null(strstr(err->message, "2 tried"));
  assert_non_null(
      strstr(err->message, "[1] user a (password) from secret ns/a: PERMISSION_DENIED: registry said no to a"));
  assert_non_null(strstr(err->message, "[2] user b (password) from config.json /x"));
  assert_null(strstr(err->message, "pw-"));
  crimage_error_free(err);
  script_clear(&s);
  credential_list_clear(&l);
}

static void test_cancelled_stops(void **state)
{
  (void) state;
  credential_list l = {0};
  credential_list_add(&l, cred("a", "pw-a", "s1"));
  credential_list_add(&l, cred("b", "pw-b", "s2"));
  credential_list_add(&l, cred("c", "pw-c", "s3"));
  script s = {.fail_status = CRIMAGE_UNAUTHENTICATED, .works_for = "c", .cancel_at = 2};
  crimage_error *err = NULL;
  void *res = NULL;
  assert_true(pull_credentials_try(&l, attempt, &s, &res, &err) < 0);
  assert_int_equal(s.n_calls, 2);
  assert_int_equal(err->status, CRIMAGE_CANCELLED);
  crimage_error_free(err);
  script_clear(&s);
  credential_list_clear(&l);
}

static void test_resolve_secrets_first(void **state)
{
  (void) state;
  char dir[] = "/tmp/test-pullcreds-XXXXXX";
  assert_non_null(mkdtemp(dir));
  cleanup_free char *sdir = xasprintf("%s/secrets", dir);
  cleanup_free char *cfg = xasprintf("%s/config.json", dir);
  cleanup_free char *secret = xasprintf("%s/regcred.json", sdir);
  crimage_error *err = NULL;
  assert_int_equal(mkdir_p(sdir, 0700, &err), 0);
  /* {"auths":{"reg.example:5000":{"username":"sam","password":"pw-s"}}} */
  const char *secret_json =
      "{\"apiVersion\":\"v1\",\"kind\":\"Secret\",\"metadata\":{\"name\":\"regcred\",\"namespace\":\"ns\"},"
      "\"type\":\"kubernetes.io/dockerconfigjson\",\"stringData\":{\".dockerconfigjson\":"
      "\"{\\\"auths\\\":{\\\"reg.example:5000\\\":{\\\"username\\\":\\\"sam\\\",\\\"password\\\":\\\"pw-s\\\"}}}\"}}";
  assert_int_equal(write_file_atomic(secret, secret_json, strlen(secret_json), 0600, &err), 0);
  const char *node = "{\"auths\":{\"reg.example:5000/app\":{\"auth\":\"bm9kZTpwdy1u\"}}}"; /* node:pw-n */
  assert_int_equal(write_file_atomic(cfg, node, strlen(node), 0600, &err), 0);

  char *paths[] = {cfg, NULL};
  pull_credentials_options o = {.docker_config_paths = paths, .secrets_dir = sdir};
  pull_credentials *pc = NULL;
  assert_int_equal(pull_credentials_new(&o, &pc, &err), 0);
  image_ref *ref = NULL;
  assert_int_equal(reference_parse("reg.example:5000/app/web:v1", NULL, &ref, &err), 0);
  credential_list l = {0};
  assert_int_equal(pull_credentials_resolve(pc, ref, &l, &err), 0);
  assert_int_equal(l.n, 2);
  assert_string_equal(l.items[0]->username, "sam");
  assert_string_equal(l.items[0]->source, "secret ns/regcred");
  assert_string_equal(l.items[1]->username, "node");
  assert_string_equal(l.items[1]->password, "pw-n");
  credential_list_clear(&l);

  /* Another registry: nothing, so the pull goes anonymous. */
  reference_free(ref);
  assert_int_equal(reference_parse("other.example/app/web:v1", NULL, &ref, &err), 0);
  assert_int_equal(pull_credentials_resolve(pc, ref, &l, &err), 0);
  assert_int_equal(l.n, 0);
  reference_free(ref);
  pull_credentials_free(pc);

  unlink(secret);
  unlink(cfg);
  rmdir(sdir);
  rmdir(dir);
}

int main(void)
{
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_anonymous_when_none),
      cmocka_unit_test(test_in_order_until_one_works),
      cmocka_unit_test(test_all_fail),
      cmocka_unit_test(test_cancelled_stops),
      cmocka_unit_test(test_resolve_secrets_first),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
