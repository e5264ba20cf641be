/* Docker credential helpers (the `docker-credential-<name> get` protocol, with a script helper) and the resolver
 * that puts every source together in kubelet's order. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <sys/stat.h>

#include "auth/credhelper.h"
#include "auth/exec.h"
#include "auth/resolver.h"
#include "auth/secrets.h"
#include "common/fsutil.h"
#include "common/util.h"
#include "test-files.h"

static const char helper_script[] =
    "#!/bin/sh\n"
    "[ \"$1\" = get ] || { echo \"bad action $1\" >&2; exit 1; }\n"
    "server=$(cat)\n"
    "echo \"$server\" >> \"$HELPER_STATE/helper.log\"\n"
    "case \"$server\" in\n"
    "  https://index.docker.io/v1/) printf '{\"ServerURL\":\"%s\",\"Username\":\"hubuser\",\"Secret\":\"hubpass\"}' "
    "\"$server\";;\n"
    "  token.io) printf '{\"ServerURL\":\"%s\",\"Username\":\"<token>\",\"Secret\":\"refresh-tok\"}' \"$server\";;\n"
    "  missing.io) echo 'credentials not found in native keychain'; exit 1;;\n"
    "  broken.io) echo 'SECRET-OUT'; echo 'helper exploded' >&2; exit 2;;\n"
    "  garbage.io) echo 'SECRET-OUT {';;\n"
    "  slow.io) exec sleep 30;;\n"
    "  *) printf '{\"ServerURL\":\"%s\",\"Username\":\"user-%s\",\"Secret\":\"pass\"}' \"$server\" \"$server\";;\n"
    "esac\n";

static const char plugin_script[] =
    "#!/bin/sh\n"
    "cat > /dev/null\n"
    "echo run >> \"$HELPER_STATE/plugin.count\"\n"
    "printf '{\"apiVersion\":\"credentialprovider.kubelet.k8s.io/v1\",\"kind\":\"CredentialProviderResponse\","
    "\"cacheKeyType\":\"Registry\",\"auth\":{\"r.io/team\":{\"username\":\"provider\",\"password\":\"pp\"}}}'\n";

typedef struct fixture {
  char *dir;
} fixture;

static int setup(void **state)
{
  fixture *f = xcalloc(1, sizeof(*f));
  f->dir = test_mkdtemp("credhelper");
  cleanup_free char *helper = xasprintf("%s/docker-credential-test", f->dir);
  test_put(helper, helper_script, 0755);
  cleanup_free char *bin = xasprintf("%s/bin", f->dir);
  assert_int_equal(mkdir(bin, 0755), 0);
  cleanup_free char *plugin = xasprintf("%s/bin/ecr-like", f->dir);
  test_put(plugin, plugin_script, 0755);
  setenv("HELPER_STATE", f->dir, 1);
  *state = f;
  return 0;
}

static int teardown(void **state)
{
  fixture *f = *state;
  test_rm_rf(f->dir);
  free(f->dir);
  free(f);
  return 0;
}

static void test_server_url(void **state)
{
  (void) state;
  const char *cases[][2] = {{"docker.io", "https://index.docker.io/v1/"},
                            {"index.docker.io", "https://index.docker.io/v1/"},
                            {"registry-1.docker.io", "https://index.docker.io/v1/"},
                            {"r.io:5000", "r.io:5000"}};
  for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
    cleanup_free char *u = credhelper_server_url(cases[i][0]);
    assert_string_equal(u, cases[i][1]);
  }
}

static void test_helper_protocol(void **state)
{
  fixture *f = *state;
  cleanup_error crimage_error *err = NULL;
  credential *c = NULL;

  assert_int_equal(credhelper_get("test", f->dir, "r.io:5000", 0, &c, &err), 0);
  assert_non_null(c);
  assert_string_equal(c->username, "user-r.io:5000");
  assert_string_equal(c->password, "pass");
  assert_null(c->identity_token);
  assert_string_equal(c->server_address, "r.io:5000");
  assert_string_equal(c->source, "credential helper docker-credential-test");
  credential_free(c);

  assert_int_equal(credhelper_get("test", f->dir, "docker.io", 0, &c, &err), 0);
  assert_string_equal(c->username, "hubuser");
  credential_free(c);

  /* "<token>" means the secret is an identity token. */
  assert_int_equal(credhelper_get("test", f->dir, "token.io", 0, &c, &err), 0);
  assert_null(c->username);
  assert_null(c->password);
  assert_string_equal(c->identity_token, "refresh-tok");
  credential_free(c);

  /* No entry: no credential, no error. */
  c = (credential *) 1;
  assert_int_equal(credhelper_get("test", f->dir, "missing.io", 0, &c, &err), 0);
  assert_null(c);
  assert_null(err);

  /* The server URL went to stdin. */
  cleanup_free char *log_path = xasprintf("%s/helper.log", f->dir);
  cleanup_free char *log = NULL;
  size_t len = 0;
  assert_int_equal(read_file(log_path, 1 << 20, &log, &len, &err), 0);
  assert_string_equal(log, "r.io:5000\nhttps://index.docker.io/v1/\ntoken.io\nmissing.io\n");
}

static void test_helper_failures(void **state)
{
  fixture *f = *state;
  credential *c = NULL;
  {
    cleanup_error crimage_error *err = NULL;
    assert_true(credhelper_get("test", f->dir, "broken.io", 0, &c, &err) < 0);
    assert_non_null(strstr(err->message, "exited with 2: helper exploded"));
    assert_null(strstr(err->message, "SECRET-OUT"));
  }
  {
    cleanup_error crimage_error *err = NULL;
    assert_true(credhelper_get("test", f->dir, "garbage.io", 0, &c, &err) < 0);
    assert_non_null(strstr(err->message, "invalid JSON"));
    assert_null(strstr(err->message, "SECRET-OUT"));
  }
  {
    cleanup_error crimage_error *err = NULL;
    assert_true(credhelper_get("test", f->dir, "slow.io", 200, &c, &err) < 0);
    if (err->status != CRIMAGE_DEADLINE_EXCEEDED)
      fail_msg("%s", err->message);
  }
  {
    cleanup_error crimage_error *err = NULL;
    assert_true(credhelper_get("nonexistent", f->dir, "r.io", 0, &c, &err) < 0);
    assert_int_equal(err->status, CRIMAGE_NOT_FOUND);
  }
  {
    /* Found through $PATH when no directory is given. */
    cleanup_error crimage_error *err = NULL;
    cleanup_free char *old = xstrdup(getenv("PATH"));
    cleanup_free char *path = xasprintf("/nonexistent:%s:%s", f->dir, old);
    setenv("PATH", path, 1);
    assert_int_equal(credhelper_get("test", NULL, "r.io", 0, &c, &err), 0);
    assert_string_equal(c->username, "user-r.io");
    credential_free(c);
    setenv("PATH", old, 1);
    assert_true(credhelper_get("test", NULL, "r.io", 0, &c, &err) < 0);
  }
}

static keyring *secret_keyring(const char *name, const char *key, const char *user, const char *pass)
{
  cleanup_free char *yaml = xasprintf("apiVersion: v1\nkind: Secret\nmetadata: {name: %s, namespace: ns}\n"
                                      "type: kubernetes.io/dockerconfigjson\nstringData:\n  .dockerconfigjson: "
                                      "'{\"auths\": {\"%s\": {\"username\": \"%s\", \"password\": \"%s\"}}}'\n",
                                      name, key, user, pass);
  keyring **v = NULL;
  size_t n = 0;
  cleanup_error crimage_error *err = NULL;
  assert_int_equal(secrets_parse(yaml, strlen(yaml), "t", &v, &n, &err), 0);
  assert_int_equal(n, 1);
  keyring *k = v[0];
  free(v);
  return k;
}

static void test_resolver_order(void **state)
{
  fixture *f = *state;
  cleanup_free char *cfg = xasprintf("%s/config.json", f->dir);
  test_put(cfg,
      "{\"auths\": {\"r.io\": {\"username\": \"node\", \"password\": \"np\"},"
      " \"https://index.docker.io/v1/\": {\"username\": \"s1\", \"password\": \"sp1\"}},"
      " \"credHelpers\": {\"r.io\": \"test\"}}",
      0600);
  cleanup_free char *pcfg = xasprintf("%s/providers.yaml", f->dir);
  test_put(pcfg,
      "apiVersion: kubelet.config.k8s.io/v1\nkind: CredentialProviderConfig\nproviders:\n"
      "- name: ecr-like\n  apiVersion: credentialprovider.kubelet.k8s.io/v1\n  matchImages: ['r.io']\n"
      "  defaultCacheDuration: 10m\n",
      0644);
  cleanup_free char *bin = xasprintf("%s/bin", f->dir);
  cleanup_free char *missing = xasprintf("%s/missing.json", f->dir);
  char *paths[] = {missing, cfg, NULL};
  auth_resolver_options o = {
      .docker_config_paths = paths,
      .provider_config = pcfg,
      .provider_bin_dir = bin,
      .helper_dir = f->dir,
  };
  cleanup_auth_resolver auth_resolver *r = NULL;
  cleanup_error crimage_error *err = NULL;
  assert_int_equal(auth_resolver_new(&o, &r, &err), 0);

  keyring *secrets[] = {secret_keyring("one", "r.io", "s1", "sp1"), secret_keyring("two", "r.io/team", "s2", "sp2"),
                        secret_keyring("three", "other.io", "s3", "sp3")};
  cleanup_credential_list credential_list l = {0};
  assert_int_equal(auth_resolve(r, "r.io/team/app", NULL, secrets, 3, &l, &err), 0);
  struct {
    const char *user, *source;
  } expect[] = {
      {"s2", "secret ns/two"}, /* Secrets first, merged: the longer key first */
      {"s1", "secret ns/one"},
      {"provider", "provider ecr-like"}, /* node keyring with the providers: r.io/team before r.io */
      {"node", NULL},
      {"user-r.io", "credential helper docker-credential-test"},
  };
  cleanup_free char *node_source = xasprintf("config.json %s", cfg);
  expect[3].source = node_source;
  assert_int_equal(l.n, ARRAY_SIZE(expect));
  for (size_t i = 0; i < l.n; i++) {
    assert_string_equal(l.items[i]->username, expect[i].user);
    assert_string_equal(l.items[i]->source, expect[i].source);
    assert_string_equal(l.items[i]->server_address, "r.io");
  }

  /* Docker Hub: the Secret's credential equals the node's index.docker.io one: kept once, at its first place. */
  keyring *hub_secret[] = {secret_keyring("hub", "https://index.docker.io/v1/", "s1", "sp1")};
  cleanup_credential_list credential_list hub = {0};
  assert_int_equal(auth_resolve(r, "docker.io/library/busybox", "docker.io", hub_secret, 1, &hub, &err), 0);
  assert_int_equal(hub.n, 1);
  assert_string_equal(hub.items[0]->source, "secret ns/hub");
  assert_string_equal(hub.items[0]->server_address, "docker.io");
  keyring_unref(hub_secret[0]);

  /* Nothing for this image anywhere. */
  cleanup_credential_list credential_list none = {0};
  assert_int_equal(auth_resolve(r, "quay.io/x", NULL, NULL, 0, &none, &err), 0);
  assert_int_equal(none.n, 0);

  /* The node config changes: reread. The provider answer stays cached (per registry). */
  test_put(cfg, "{\"auths\": {\"r.io\": {\"username\": \"node2\", \"password\": \"np2\"}}}", 0600);
  cleanup_credential_list credential_list l2 = {0};
  assert_int_equal(auth_resolve(r, "r.io/team/app", "r.io", NULL, 0, &l2, &err), 0);
  assert_int_equal(l2.n, 2);
  assert_string_equal(l2.items[0]->username, "provider");
  assert_string_equal(l2.items[1]->username, "node2");
  cleanup_free char *count_path = xasprintf("%s/plugin.count", f->dir);
  cleanup_free char *count = NULL;
  size_t len = 0;
  assert_int_equal(read_file(count_path, 1024, &count, &len, &err), 0);
  assert_string_equal(count, "run\n");

  for (size_t i = 0; i < ARRAY_SIZE(secrets); i++)
    keyring_unref(secrets[i]);
  assert_true(auth_resolve(r, "", NULL, NULL, 0, &l2, &err) < 0);
}

static void test_resolver_errors(void **state)
{
  fixture *f = *state;
  cleanup_free char *pcfg = xasprintf("%s/providers.yaml", f->dir);
  test_put(pcfg, "apiVersion: kubelet.config.k8s.io/v1\nkind: CredentialProviderConfig\nproviders: []\n", 0644);
  auth_resolver_options o = {.provider_config = pcfg, .provider_bin_dir = f->dir};
  auth_resolver *r = NULL;
  cleanup_error crimage_error *err = NULL;
  assert_true(auth_resolver_new(&o, &r, &err) < 0);
  assert_null(r);
  assert_non_null(strstr(err->message, "credential provider config"));

  /* A helper that fails is skipped: the other candidates are still returned. */
  cleanup_free char *cfg = xasprintf("%s/config.json", f->dir);
  test_put(cfg, "{\"auths\": {\"broken.io\": {\"username\": \"u\", \"password\": \"p\"}}, \"credsStore\": \"test\"}", 0600);
  char *paths[] = {cfg, NULL};
  auth_resolver_options o2 = {.docker_config_paths = paths, .helper_dir = f->dir};
  cleanup_auth_resolver auth_resolver *r2 = NULL;
  cleanup_error crimage_error *err2 = NULL;
  assert_int_equal(auth_resolver_new(&o2, &r2, &err2), 0);
  cleanup_credential_list credential_list l = {0};
  assert_int_equal(auth_resolve(r2, "broken.io/app", NULL, NULL, 0, &l, &err2), 0);
  assert_int_equal(l.n, 1);
  assert_string_equal(l.items[0]->username, "u");
  /* credsStore covers every registry. */
  cleanup_credential_list credential_list l2 = {0};
  assert_int_equal(auth_resolve(r2, "any.io/app", NULL, NULL, 0, &l2, &err2), 0);
  assert_int_equal(l2.n, 1);
  assert_string_equal(l2.items[0]->username, "user-any.io");
}

static void test_exec(void **state)
{
  (void) state;
  /* 1 MiB through stdin and back: more than any pipe or socket buffer. */
  size_t n = 1024 * 1024;
  cleanup_free char *input = xmalloc(n);
  for (size_t i = 0; i < n; i++)
    input[i] = (char) ('a' + i % 26);
  char *cat_argv[] = {(char *) "cat", NULL};
  auth_exec_options o = {.path = "/bin/cat",
                         .argv = cat_argv,
                         .input = input,
                         .input_len = n,
                         .max_stdout = n,
                         .max_stderr = 100};
  _cleanup_(auth_exec_result_clear) auth_exec_result res = {0};
  cleanup_error crimage_error *err = NULL;
  assert_int_equal(auth_exec(&o, &res, &err), 0);
  assert_int_equal(res.exit_status, 0);
  assert_int_equal(res.out_len, n);
  assert_memory_equal(res.out, input, n);
  auth_exec_result_clear(&res);

  /* One byte over the stdout limit. */
  o.max_stdout = n - 1;
  assert_true(auth_exec(&o, &res, &err) < 0);
  assert_int_equal(err->status, CRIMAGE_RESOURCE_EXHAUSTED);
  crimage_error_clear(&err);

  /* A program that never reads its stdin: no SIGPIPE for us, its answer still arrives. */
  char *sh_argv[] = {(char *) "sh", (char *) "-c",
                     (char *) "echo \"$EXTRA_VAR\"; printf 'line1\\nline2\\n%0300d' 0 >&2; exit 7", NULL};
  char *env[] = {(char *) "EXTRA_VAR=from-config", (char *) "PATH=/usr/bin:/bin", NULL};
  auth_exec_options o2 = {
      .path = "/bin/sh", .argv = sh_argv, .env = env, .input = input, .input_len = n, .max_stdout = 1024,
      .max_stderr = 64};
  assert_int_equal(auth_exec(&o2, &res, &err), 0);
  assert_int_equal(res.exit_status, 7);
  assert_string_equal(res.out, "from-config\n");
  /* stderr: bounded, on one line */
  assert_true(strlen(res.err) <= 64);
  assert_true(str_has_prefix(res.err, "line1 line2 000"));

  /* Not there. */
  auth_exec_options o3 = {.path = "/nonexistent/plugin", .max_stdout = 10};
  assert_true(auth_exec(&o3, &res, &err) < 0);
  assert_int_equal(err->status, CRIMAGE_NOT_FOUND);
}

int main(void)
{
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_server_url),
      cmocka_unit_test(test_exec),
      cmocka_unit_test_setup_teardown(test_helper_protocol, setup, teardown),
      cmocka_unit_test_setup_teardown(test_helper_failures, setup, teardown),
      cmocka_unit_test_setup_teardown(test_resolver_order, setup, teardown),
      cmocka_unit_test_setup_teardown(test_resolver_errors, setup, teardown),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
