/* kubelet exec credential providers, run for real: small plugin scripts written into a temporary bin dir prove
 * config validation, matchImages, the request and the environment, response validation, caching per
 * cacheKeyType, timeouts, output limits, error reporting without stdout, and that concurrent identical requests
 * run the plugin once. */
#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <sys/stat.h>

#include "auth/provider.h"
#include "common/fsutil.h"
#include "common/json.h"
#include "common/util.h"
#include "test-files.h"

#define API "credentialprovider.kubelet.k8s.io/v1"

static const char plugin_script[] =
    "#!/bin/sh\n"
    "name=$(basename \"$0\")\n"
    "cat > \"$STATE_DIR/$name.req\"\n"
    "echo \"$*\" > \"$STATE_DIR/$name.args\"\n"
    "echo run >> \"$STATE_DIR/$name.count\"\n"
    "case \"$name\" in\n"
    "  sleeper) exec sleep 30 ;;\n"
    "  badjson) echo 'SECRET-STDOUT {not json'; echo 'plugin says hello' >&2; exit 0 ;;\n"
    "  failer) echo 'SECRET-STDOUT'; echo 'no credentials for you' >&2; exit 3 ;;\n"
    "  bigout) head -c 2000000 /dev/zero | tr '\\0' a; exit 0 ;;\n"
    "  waiter) i=0; while [ ! -e \"$STATE_DIR/go\" ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done ;;\n"
    "esac\n"
    "api=${API:-" API "}\n"
    "kind=${KIND:-CredentialProviderResponse}\n"
    "dur=''\n"
    "[ \"$2\" != none ] && dur=\"\\\"cacheDuration\\\":\\\"$2\\\",\"\n"
    "runs=$(wc -l < \"$STATE_DIR/$name.count\" | tr -d ' ')\n"
    "printf '{\"apiVersion\":\"%s\",\"kind\":\"%s\",\"cacheKeyType\":\"%s\",%s\"auth\":{"
    "\"*.example.io\":{\"username\":\"%s\",\"password\":\"pw-%s\"},"
    "\"other.io:5000\":{\"username\":\"o\",\"password\":\"x\"}}}' "
    "\"$api\" \"$kind\" \"$1\" \"$dur\" \"${USER_PREFIX}$name\" \"$runs\"\n";

typedef struct fixture {
  char *dir;
  char *bin;
  char *state;
} fixture;

static const char *const plugin_names[] = {"image",    "registry", "global",  "zero",     "nodur",
                                           "wrongapi", "badkind",  "badtype", "sleeper",  "badjson",
                                           "failer",   "bigout",   "waiter",  "expiring", "other"};

static int setup(void **state)
{
  fixture *f = xcalloc(1, sizeof(*f));
  f->dir = test_mkdtemp("provider");
  f->bin = xasprintf("%s/bin", f->dir);
  f->state = xasprintf("%s/state", f->dir);
  assert_int_equal(mkdir(f->bin, 0755), 0);
  assert_int_equal(mkdir(f->state, 0755), 0);
  cleanup_free char *main_path = xasprintf("%s/plugin.sh", f->dir);
  test_put(main_path, plugin_script, 0755);
  for (size_t i = 0; i < ARRAY_SIZE(plugin_names); i++) {
    cleanup_free char *link = xasprintf("%s/%s", f->bin, plugin_names[i]);
    assert_int_equal(symlink(main_path, link), 0);
  }
  *state = f;
  return 0;
}

static int teardown(void **state)
{
  fixture *f = *state;
  test_rm_rf(f->dir);
  free(f->dir);
  free(f->bin);
  free(f->state);
  free(f);
  return 0;
}

/* A provider entry: name, matchImages (comma-separated), cacheKeyType and cacheDuration args, extra env. */
static char *provider_yaml(const fixture *f, const char *name, const char *match, const char *key_type, const char *dur,
                           const char *default_dur, const char *extra_env)
{
  cleanup_free char *images = xstrdup("");
  cleanup_strv char **parts = NULL;
  char *copy = xstrdup(match), *save = NULL;
  for (char *t = strtok_r(copy, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
    char *n = xasprintf("%s      - \"%s\"\n", images, t);
    free(images);
    images = n;
  }
  free(copy);
  return xasprintf("  - name: %s\n"
                   "    apiVersion: " API "\n"
                   "    matchImages:\n%s"
                   "    defaultCacheDuration: \"%s\"\n"
                   "    args: [\"%s\", \"%s\"]\n"
                   "    env:\n"
                   "      - {name: STATE_DIR, value: \"%s\"}\n"
                   "      - {name: USER_PREFIX, value: \"u-\"}\n%s",
                   name, images, default_dur, key_type, dur, f->state, extra_env ? extra_env : "");
}

static provider_set *load(const fixture *f, int64_t timeout_ms, const char *providers_yaml)
{
  cleanup_free char *cfg = xasprintf("apiVersion: kubelet.config.k8s.io/v1\nkind: CredentialProviderConfig\n"
                                     "providers:\n%s",
                                     providers_yaml);
  provider_set *ps = NULL;
  cleanup_error crimage_error *err = NULL;
  if (provider_set_parse(cfg, strlen(cfg), "config", f->bin, timeout_ms, &ps, &err) < 0)
    fail_msg("%s", err->message);
  return ps;
}

static int runs(const fixture *f, const char *name)
{
  cleanup_free char *path = xasprintf("%s/%s.count", f->state, name);
  FILE *fp = fopen(path, "r");
  if (!fp)
    return 0;
  int n = 0, c;
  while ((c = fgetc(fp)) != EOF)
    if (c == '\n')
      n++;
  fclose(fp);
  return n;
}

static char *state_file(const fixture *f, const char *name, const char *ext)
{
  cleanup_free char *path = xasprintf("%s/%s.%s", f->state, name, ext);
  char *data = NULL;
  size_t len = 0;
  cleanup_error crimage_error *err = NULL;
  assert_int_equal(read_file(path, 1 << 20, &data, &len, &err), 0);
  return data;
}

/* Runs provide and returns the credentials for image as the keyring lookup gives them. */
static int provide(provider_set *ps, const char *image, credential_list *l, crimage_error **err)
{
  cleanup_keyring keyring *k = keyring_new();
  int r = provider_set_provide(ps, image, k, err);
  keyring_lookup(k, image, l);
  return r;
}

static void test_config_validation(void **state)
{
  fixture *f = *state;
  cleanup_free char *good = provider_yaml(f, "image", "*.example.io", "Image", "5m", "1m", NULL);
  provider_set *ps = load(f, 0, good);
  assert_int_equal(provider_set_size(ps), 1);
  provider_set_free(ps);

  /* JSON works too. */
  cleanup_free char *json =
      xasprintf("{\"apiVersion\": \"kubelet.config.k8s.io/v1\", \"kind\": \"CredentialProviderConfig\", \"providers\": "
                "[{\"name\": \"image\", \"apiVersion\": \"" API "\", \"matchImages\": [\"x.io\"], "
                "\"defaultCacheDuration\": \"10s\"}]}");
  cleanup_error crimage_error *err = NULL;
  assert_int_equal(provider_set_parse(json, strlen(json), "json", f->bin, 0, &ps, &err), 0);
  provider_set_free(ps);

  const char *hdr = "apiVersion: kubelet.config.k8s.io/v1\nkind: CredentialProviderConfig\n";
  struct {
    const char *body;
    const char *expect;
  } bad[] = {
      {"providers: []\n", "at least 1 item in providers"},
      {"", "at least 1 item in providers"},
      {"providers:\n- {name: image, apiVersion: " API ", matchImages: [a.io], defaultCacheDuration: 1m}\n"
       "- {name: image, apiVersion: " API ", matchImages: [b.io], defaultCacheDuration: 1m}\n",
       "duplicate provider name `image`"},
      {"providers:\n- {name: a/b, apiVersion: " API ", matchImages: [a.io], defaultCacheDuration: 1m}\n", "`a/b`"},
      {"providers:\n- {name: '..', apiVersion: " API ", matchImages: [a.io], defaultCacheDuration: 1m}\n", "`..`"},
      {"providers:\n- {name: 'a b', apiVersion: " API ", matchImages: [a.io], defaultCacheDuration: 1m}\n", "`a b`"},
      {"providers:\n- {apiVersion: " API ", matchImages: [a.io], defaultCacheDuration: 1m}\n", "name is required"},
      {"providers:\n- {name: image, matchImages: [a.io], defaultCacheDuration: 1m}\n", "apiVersion is required"},
      {"providers:\n- {name: image, apiVersion: credentialprovider.kubelet.k8s.io/v2, matchImages: [a.io], "
       "defaultCacheDuration: 1m}\n",
       "not supported"},
      {"providers:\n- {name: image, apiVersion: " API ", matchImages: [], defaultCacheDuration: 1m}\n",
       "at least 1 item in matchImages"},
      {"providers:\n- {name: image, apiVersion: " API ", defaultCacheDuration: 1m}\n",
       "at least 1 item in matchImages"},
      {"providers:\n- {name: image, apiVersion: " API ", matchImages: ['bad host'], defaultCacheDuration: 1m}\n",
       "matchImages[0] `bad host` is invalid"},
      {"providers:\n- {name: image, apiVersion: " API ", matchImages: ['a.io:port'], defaultCacheDuration: 1m}\n",
       "is invalid"},
      {"providers:\n- {name: image, apiVersion: " API ", matchImages: [a.io]}\n", "defaultCacheDuration is required"},
      {"providers:\n- {name: image, apiVersion: " API ", matchImages: [a.io], defaultCacheDuration: -1m}\n",
       "defaultCacheDuration must be"},
      {"providers:\n- {name: image, apiVersion: " API ", matchImages: [a.io], defaultCacheDuration: soon}\n",
       "defaultCacheDuration must be"},
      {"providers:\n- {name: missing, apiVersion: " API ", matchImages: [a.io], defaultCacheDuration: 1m}\n",
       "plugin binary"},
      {"providers:\n- {name: image, apiVersion: " API ", matchImages: [a.io], defaultCacheDuration: 1m, "
       "env: [{value: x}]}\n",
       "env[0].name"},
      {"providers:\n- {name: image, apiVersion: " API ", matchImages: [a.io], defaultCacheDuration: 1m, args: [1]}\n",
       "args[0]"},
  };
  for (size_t i = 0; i < ARRAY_SIZE(bad); i++) {
    cleanup_free char *cfg = xasprintf("%s%s", hdr, bad[i].body);
    cleanup_error crimage_error *e = NULL;
    ps = NULL;
    assert_true(provider_set_parse(cfg, strlen(cfg), "cfg", f->bin, 0, &ps, &e) < 0);
    assert_null(ps);
    if (!strstr(e->message, bad[i].expect))
      fail_msg("case %zu: `%s` not in `%s`", i, bad[i].expect, e->message);
  }
  /* The config's own kind and apiVersion. */
  const char *wrong[] = {
      "apiVersion: kubelet.config.k8s.io/v1\nkind: KubeletConfiguration\nproviders: []\n",
      "apiVersion: v1\nkind: CredentialProviderConfig\nproviders: []\n",
      "[]\n",
  };
  for (size_t i = 0; i < ARRAY_SIZE(wrong); i++) {
    cleanup_error crimage_error *e = NULL;
    assert_true(provider_set_parse(wrong[i], strlen(wrong[i]), "cfg", f->bin, 0, &ps, &e) < 0);
  }
  /* From a file. */
  cleanup_free char *path = xasprintf("%s/config.yaml", f->dir);
  cleanup_free char *cfg = xasprintf("%sproviders:\n%s", hdr, good);
  assert_int_equal(write_file_atomic(path, cfg, strlen(cfg), 0644, &err), 0);
  assert_int_equal(provider_set_load(path, f->bin, 0, &ps, &err), 0);
  provider_set_free(ps);
}

static void test_request_env_args_and_matching(void **state)
{
  fixture *f = *state;
  cleanup_free char *p = provider_yaml(f, "image", "*.example.io,registry.local:5000/team", "Image", "5m", "1m",
                                       "      - {name: USER_PREFIX, value: \"configured-\"}\n");
  provider_set *ps = load(f, 0, p);

  /* No matchImages pattern matches: the plugin is not run. */
  cleanup_credential_list credential_list none = {0};
  assert_int_equal(provide(ps, "example.io/app", &none, NULL), 0);
  assert_int_equal(provide(ps, "a.b.example.io/app", &none, NULL), 0);
  assert_int_equal(provide(ps, "registry.local/team/app", &none, NULL), 0);
  assert_int_equal(runs(f, "image"), 0);

  cleanup_credential_list credential_list l = {0};
  cleanup_error crimage_error *err = NULL;
  assert_int_equal(provide(ps, "a.example.io/app", &l, &err), 0);
  assert_int_equal(runs(f, "image"), 1);
  assert_int_equal(l.n, 1);
  /* The configured env overrides one of the same name. */
  assert_string_equal(l.items[0]->username, "configured-image");
  assert_string_equal(l.items[0]->password, "pw-1");
  assert_string_equal(l.items[0]->source, "provider image");

  cleanup_free char *req = state_file(f, "image", "req");
  cleanup_json json_object *o = NULL;
  assert_int_equal(json_parse(req, strlen(req), "req", JSON_LIMITS(1u << 20, 1000), &o, &err), 0);
  assert_string_equal(json_get_string(o, "apiVersion"), API);
  assert_string_equal(json_get_string(o, "kind"), "CredentialProviderRequest");
  assert_string_equal(json_get_string(o, "image"), "a.example.io/app");
  cleanup_free char *args = state_file(f, "image", "args");
  assert_string_equal(args, "Image 5m\n");

  /* The auth keys are match patterns: the credential for other.io:5000 is there but matches only that. */
  cleanup_keyring keyring *k = keyring_new();
  assert_int_equal(provider_set_provide(ps, "registry.local:5000/team/app", k, &err), 0);
  assert_int_equal(keyring_size(k), 2);
  cleanup_credential_list credential_list l2 = {0};
  assert_int_equal(keyring_lookup(k, "registry.local:5000/team/app", &l2), 0);
  assert_int_equal(keyring_lookup(k, "other.io:5000/x", &l2), 1);
  assert_string_equal(l2.items[0]->username, "o");
  provider_set_free(ps);
}

static void test_cache_key_types(void **state)
{
  fixture *f = *state;
  cleanup_free char *p1 = provider_yaml(f, "image", "*.example.io", "Image", "5m", "1m", NULL);
  cleanup_free char *p2 = provider_yaml(f, "registry", "*.example.io", "Registry", "5m", "1m", NULL);
  cleanup_free char *p3 = provider_yaml(f, "global", "*.example.io", "Global", "5m", "1m", NULL);
  cleanup_free char *p4 = provider_yaml(f, "zero", "*.example.io", "Image", "0s", "1m", NULL);
  cleanup_free char *p5 = provider_yaml(f, "nodur", "*.example.io", "Image", "none", "1h", NULL);
  cleanup_free char *all = xasprintf("%s%s%s%s%s", p1, p2, p3, p4, p5);
  provider_set *ps = load(f, 0, all);

  const char *images[] = {"a.example.io/one", "a.example.io/one", "a.example.io/two", "b.example.io/one",
                          "b.example.io/one"};
  for (size_t i = 0; i < ARRAY_SIZE(images); i++) {
    cleanup_credential_list credential_list l = {0};
    cleanup_error crimage_error *err = NULL;
    assert_int_equal(provide(ps, images[i], &l, &err), 0);
    /* Every provider contributes, in config order, all with the same key "*.example.io". */
    assert_int_equal(l.n, 5);
    assert_string_equal(l.items[0]->username, "u-image");
    assert_string_equal(l.items[1]->username, "u-registry");
    assert_string_equal(l.items[2]->username, "u-global");
    assert_string_equal(l.items[3]->username, "u-zero");
    assert_string_equal(l.items[4]->username, "u-nodur");
    /* Cached answers are those of the first run. */
    assert_string_equal(l.items[2]->password, "pw-1");
  }
  assert_int_equal(runs(f, "image"), 3);    /* a/one, a/two, b/one */
  assert_int_equal(runs(f, "registry"), 2); /* a.example.io, b.example.io */
  assert_int_equal(runs(f, "global"), 1);
  assert_int_equal(runs(f, "zero"), 5);  /* "0s": never cached */
  assert_int_equal(runs(f, "nodur"), 3); /* no cacheDuration: the default (1h), keyed by image */
  provider_set_free(ps);

  /* A default of 0 and no cacheDuration: not cached. */
  cleanup_free char *p6 = provider_yaml(f, "other", "*.example.io", "Image", "none", "0s", NULL);
  ps = load(f, 0, p6);
  for (int i = 0; i < 2; i++) {
    cleanup_credential_list credential_list l = {0};
    assert_int_equal(provide(ps, "a.example.io/x", &l, NULL), 0);
  }
  assert_int_equal(runs(f, "other"), 2);
  provider_set_free(ps);

  /* An entry expires after its duration. */
  cleanup_free char *p7 = provider_yaml(f, "expiring", "*.example.io", "Image", "50ms", "1h", NULL);
  ps = load(f, 0, p7);
  cleanup_credential_list credential_list l1 = {0}, l2 = {0}, l3 = {0};
  assert_int_equal(provide(ps, "a.example.io/x", &l1, NULL), 0);
  assert_int_equal(provide(ps, "a.example.io/x", &l2, NULL), 0);
  int before = runs(f, "expiring");
  assert_true(before >= 1 && before <= 2);
  usleep(200 * 1000);
  assert_int_equal(provide(ps, "a.example.io/x", &l3, NULL), 0);
  assert_int_equal(runs(f, "expiring"), before + 1);
  provider_set_free(ps);
}

static void test_bad_responses(void **state)
{
  fixture *f = *state;
  struct {
    const char *name, *key_type, *env, *expect;
    crimage_status status;
  } cases[] = {
      {"wrongapi", "Image", "      - {name: API, value: credentialprovider.kubelet.k8s.io/v1beta1}\n",
       "another apiVersion than `" API "`", CRIMAGE_INVALID_ARGUMENT},
      {"badkind", "Image", "      - {name: KIND, value: CredentialProviderRequest}\n",
       "another kind than CredentialProviderResponse", CRIMAGE_INVALID_ARGUMENT},
      {"badtype", "Forever", NULL, "cacheKeyType other than Image, Registry or Global", CRIMAGE_INVALID_ARGUMENT},
      {"badjson", "Image", NULL, "plugin says hello", CRIMAGE_INVALID_ARGUMENT},
      {"failer", "Image", NULL, "exited with status 3; stderr: no credentials for you", CRIMAGE_UNAVAILABLE},
      {"bigout", "Image", NULL, "wrote more than", CRIMAGE_RESOURCE_EXHAUSTED},
  };
  for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
    cleanup_free char *bad =
        provider_yaml(f, cases[i].name, "*.example.io", cases[i].key_type, "5m", "1m", cases[i].env);
    /* A good provider after the bad one still contributes. */
    cleanup_free char *good = provider_yaml(f, "image", "*.example.io", "Global", "0s", "1m", NULL);
    cleanup_free char *both = xasprintf("%s%s", bad, good);
    provider_set *ps = load(f, 0, both);
    for (int attempt = 0; attempt < 2; attempt++) {
      cleanup_credential_list credential_list l = {0};
      cleanup_error crimage_error *err = NULL;
      assert_true(provide(ps, "a.example.io/app", &l, &err) < 0);
      assert_non_null(err);
      if (!strstr(err->message, cases[i].expect))
        fail_msg("%s: `%s` not in `%s`", cases[i].name, cases[i].expect, err->message);
      assert_non_null(strstr(err->message, cases[i].name));
      assert_int_equal(err->status, cases[i].status);
      /* stdout holds secrets: never in an error */
      assert_null(strstr(err->message, "SECRET-STDOUT"));
      assert_null(strstr(err->message, "pw-"));
      assert_int_equal(l.n, 1);
      assert_string_equal(l.items[0]->username, "u-image");
    }
    /* Failures are not cached. */
    assert_int_equal(runs(f, cases[i].name), 2);
    provider_set_free(ps);
  }
}

static void test_timeout(void **state)
{
  fixture *f = *state;
  cleanup_free char *p = provider_yaml(f, "sleeper", "*.example.io", "Image", "5m", "1m", NULL);
  provider_set *ps = load(f, 300, p);
  cleanup_credential_list credential_list l = {0};
  cleanup_error crimage_error *err = NULL;
  int64_t start = now_monotonic_ms();
  assert_true(provide(ps, "a.example.io/app", &l, &err) < 0);
  assert_int_equal(err->status, CRIMAGE_DEADLINE_EXCEEDED);
  assert_non_null(strstr(err->message, "did not finish within 300 ms"));
  assert_int_equal(l.n, 0);
  /* Killed, not waited for: far below the plugin's 30 s. */
  assert_true(now_monotonic_ms() - start < 25000);
  provider_set_free(ps);
}

typedef struct worker {
  provider_set *ps;
  int result;
  char *user;
  char *password;
} worker;

static void *worker_run(void *arg)
{
  worker *w = arg;
  cleanup_credential_list credential_list l = {0};
  cleanup_error crimage_error *err = NULL;
  w->result = provide(w->ps, "a.example.io/app", &l, &err);
  if (w->result == 0 && l.n == 1) {
    w->user = xstrdup(l.items[0]->username);
    w->password = xstrdup(l.items[0]->password);
  }
  return NULL;
}

static void test_concurrent_requests_run_once(void **state)
{
  fixture *f = *state;
  /* "0s": nothing is cached, so only sharing the run can explain a single invocation. */
  cleanup_free char *p = provider_yaml(f, "waiter", "*.example.io", "Image", "0s", "1m", NULL);
  provider_set *ps = load(f, 0, p);
  worker w[8];
  pthread_t t[8];
  for (size_t i = 0; i < 8; i++) {
    w[i] = (worker){.ps = ps};
    assert_int_equal(pthread_create(&t[i], NULL, worker_run, &w[i]), 0);
  }
  /* The plugin waits for the "go" file: release it once all 8 callers are in, one running, 7 waiting. */
  for (int i = 0; i < 6000 && provider_set_pending(ps, "a.example.io/app") < 8; i++)
    usleep(10 * 1000);
  assert_int_equal(provider_set_pending(ps, "a.example.io/app"), 8);
  cleanup_free char *go = xasprintf("%s/go", f->state);
  cleanup_error crimage_error *err = NULL;
  assert_int_equal(write_file_atomic(go, "", 0, 0644, &err), 0);
  for (size_t i = 0; i < 8; i++) {
    assert_int_equal(pthread_join(t[i], NULL), 0);
    assert_int_equal(w[i].result, 0);
    assert_string_equal(w[i].user, "u-waiter");
    assert_string_equal(w[i].password, "pw-1");
    free(w[i].user);
    free(w[i].password);
  }
  assert_int_equal(runs(f, "waiter"), 1);
  assert_int_equal(provider_set_pending(ps, "a.example.io/app"), 0);
  /* Not cached: the next request runs it again. */
  cleanup_credential_list credential_list l = {0};
  assert_int_equal(provide(ps, "a.example.io/app", &l, NULL), 0);
  assert_int_equal(runs(f, "waiter"), 2);
  provider_set_free(ps);
}

int main(void)
{
  const struct CMUnitTest tests[] = {
      cmocka_unit_test_setup_teardown(test_config_validation, setup, teardown),
      cmocka_unit_test_setup_teardown(test_request_env_args_and_matching, setup, teardown),
      cmocka_unit_test_setup_teardown(test_cache_key_types, setup, teardown),
      cmocka_unit_test_setup_teardown(test_bad_responses, setup, teardown),
      cmocka_unit_test_setup_teardown(test_timeout, setup, teardown),
      cmocka_unit_test_setup_teardown(test_concurrent_requests_run_once, setup, teardown),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
