/* kubelet's docker keyring: the URL matcher with every example of the Kubernetes "Images" page, config.json and
 * .dockercfg parsing, lookup order, the Docker Hub fallback and the node file search. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <sys/stat.h>

#include "auth/keyring.h"
#include "auth/match.h"
#include "common/fsutil.h"
#include "common/util.h"
#include "test-files.h"

static void put_file(const char *dir, const char *name, const char *content)
{
  cleanup_free char *path = xasprintf("%s/%s", dir, name);
  FILE *f = fopen(path, "w");
  assert_non_null(f);
  fputs(content, f);
  fclose(f);
}

static void test_match_kubernetes_examples(void **state)
{
  (void) state;
  /* The examples of https://kubernetes.io/docs/concepts/containers/images/ (config.json keys). */
  assert_false(auth_url_match("*.kubernetes.io", "kubernetes.io"));
  assert_true(auth_url_match("*.kubernetes.io", "abc.kubernetes.io"));
  assert_false(auth_url_match("*.*.kubernetes.io", "abc.kubernetes.io"));
  assert_true(auth_url_match("*.*.kubernetes.io", "abc.def.kubernetes.io"));
  assert_true(auth_url_match("prefix.*.io", "prefix.kubernetes.io"));
  assert_true(auth_url_match("*-good.kubernetes.io", "prefix-good.kubernetes.io"));

  const char *const patterns[] = {"my-registry.io/images", "*.my-registry.io/images"};
  const char *const yes[] = {"my-registry.io/images", "my-registry.io/images/my-image",
                             "my-registry.io/images/another-image", "sub.my-registry.io/images/my-image"};
  const char *const no[] = {"a.sub.my-registry.io/images/my-image", "a.b.sub.my-registry.io/images/my-image"};
  for (size_t i = 0; i < ARRAY_SIZE(yes); i++) {
    bool any = false;
    for (size_t j = 0; j < ARRAY_SIZE(patterns); j++)
      any = any || auth_url_match(patterns[j], yes[i]);
    assert_true(any);
  }
  for (size_t i = 0; i < ARRAY_SIZE(no); i++)
    for (size_t j = 0; j < ARRAY_SIZE(patterns); j++)
      assert_false(auth_url_match(patterns[j], no[i]));
}

static void test_match_rules(void **state)
{
  (void) state;
  /* Ports: equal, and no port matches only no port. */
  assert_true(auth_url_match("registry.io:5000", "registry.io:5000/app"));
  assert_false(auth_url_match("registry.io:5000", "registry.io/app"));
  assert_false(auth_url_match("registry.io", "registry.io:5000/app"));
  assert_false(auth_url_match("registry.io:5000", "registry.io:5001/app"));
  assert_true(auth_url_match("*.io:5000", "registry.io:5000/app"));
  /* Same number of labels; a wildcard never crosses a '.'. */
  assert_false(auth_url_match("*", "registry.io/app"));
  assert_true(auth_url_match("*", "localhost/app"));
  assert_false(auth_url_match("*.io", "a.b.io/x"));
  assert_false(auth_url_match("reg*", "registry.io"));
  assert_true(auth_url_match("reg*.io", "registry.io"));
  /* '?' and bracket expressions, per label. */
  assert_true(auth_url_match("registr?.io", "registry.io/x"));
  assert_false(auth_url_match("registr?.io", "registr.io/x"));
  assert_true(auth_url_match("reg[0-9].io", "reg7.io/x"));
  assert_false(auth_url_match("reg[0-9].io", "regx.io/x"));
  assert_true(auth_url_match("reg[!0-9].io", "regx.io/x"));
  /* The path is a plain string prefix of the image path. */
  assert_true(auth_url_match("registry.io/team", "registry.io/team/app"));
  assert_true(auth_url_match("registry.io/team", "registry.io/teamwork/app"));
  assert_false(auth_url_match("registry.io/team/app", "registry.io/team"));
  assert_false(auth_url_match("registry.io/Team", "registry.io/team/app"));
  assert_true(auth_url_match("registry.io", "registry.io"));
  assert_false(auth_url_match("registry.io/team", "other.io/team/app"));
  /* IPv6 literal with a port. */
  assert_true(auth_url_match("[::1]:5000", "[::1]:5000/app"));
  assert_false(auth_url_match("[::1]:5000", "[::1]:5001/app"));
  assert_true(auth_url_match("[::1]", "[::1]/app"));
  assert_false(auth_url_match("[::1]", "[::1]:5000/app"));
  assert_true(auth_url_match("[a-z]eg.io", "reg.io/app"));
  assert_false(auth_url_match(NULL, "x"));
}

static void test_match_pattern_valid(void **state)
{
  (void) state;
  assert_true(auth_url_pattern_valid("*.registry.io"));
  assert_true(auth_url_pattern_valid("registry.io:5000/path"));
  assert_true(auth_url_pattern_valid("reg[0-9].io"));
  assert_false(auth_url_pattern_valid(""));
  assert_false(auth_url_pattern_valid(NULL));
  assert_false(auth_url_pattern_valid("registry io"));
  assert_false(auth_url_pattern_valid("registry.io:port"));
  assert_false(auth_url_pattern_valid("/just/a/path"));
  assert_false(auth_url_pattern_valid("reg[0-9.io"));
}

static void check_norm(const char *key, const char *expect)
{
  cleanup_free char *n = auth_config_key_normalize(key);
  if (!expect) {
    assert_null(n);
    return;
  }
  assert_non_null(n);
  assert_string_equal(n, expect);
}

static void test_key_normalize(void **state)
{
  (void) state;
  check_norm("https://index.docker.io/v1/", "index.docker.io");
  check_norm("index.docker.io/v1/", "index.docker.io");
  check_norm("http://registry.io/v2/", "registry.io");
  check_norm("registry.io/v2/team", "registry.io/team");
  check_norm("registry.io/v1/team/app", "registry.io/team/app");
  check_norm("registry.io:5000", "registry.io:5000");
  check_norm("registry.io:5000/", "registry.io:5000");
  check_norm("registry.io/v2", "registry.io/v2"); /* only a leading "/v2/" is dropped */
  check_norm("registry.io/images", "registry.io/images");
  check_norm("https://user@registry.io/x", "registry.io/x");
  check_norm("https://", NULL);
  check_norm("/v1/", NULL);
}

static void test_docker_hub(void **state)
{
  (void) state;
  assert_true(auth_image_is_docker_hub("docker.io/library/busybox"));
  assert_true(auth_image_is_docker_hub("index.docker.io/library/busybox"));
  assert_true(auth_image_is_docker_hub("busybox"));
  assert_true(auth_image_is_docker_hub("library/busybox"));
  assert_false(auth_image_is_docker_hub("quay.io/app"));
  assert_false(auth_image_is_docker_hub("localhost:5000/app"));
  assert_false(auth_image_is_docker_hub(""));
  cleanup_free char *r = auth_image_registry("registry.io:5000/a/b");
  assert_string_equal(r, "registry.io:5000");
}

static keyring *parse_config(const char *json)
{
  keyring *k = keyring_new();
  cleanup_error crimage_error *err = NULL;
  int r = keyring_add_docker_config_json(k, json, strlen(json), "config.json test", "test", &err);
  if (r < 0)
    fail_msg("%s", err->message);
  return k;
}

static void test_config_json_fields(void **state)
{
  (void) state;
  /* base64("padded:pw1") = cGFkZGVkOnB3MQ== ; base64("unpadded:pw2") = dW5wYWRkZWQ6cHcy (no padding needed) ;
   * base64("nopad:p") = bm9wYWQ6cA (padding stripped) */
  cleanup_keyring keyring *k = parse_config("{\"auths\": {"
                                            "\"a.io\": {\"auth\": \"cGFkZGVkOnB3MQ==\", \"email\": \"x@y\"},"
                                            "\"b.io\": {\"auth\": \"bm9wYWQ6cA\"},"
                                            "\"c.io\": {\"username\": \"cu\", \"password\": \"cp\"},"
                                            "\"d.io\": {\"identitytoken\": \"refresh-token\"},"
                                            "\"e.io\": {\"registrytoken\": \"bearer-token\"},"
                                            "\"f.io\": {\"username\": \"ignored\", \"auth\": \"dW5wYWRkZWQ6cHcy\"},"
                                            "\"g.io\": {}, \"h.io\": {\"email\": \"only@mail\"}"
                                            "}}");
  assert_int_equal(keyring_size(k), 6); /* entries with no credential are skipped */
  struct {
    const char *image, *user, *pass, *id, *reg;
  } cases[] = {
      {"a.io/x", "padded", "pw1", NULL, NULL},      {"b.io/x", "nopad", "p", NULL, NULL},
      {"c.io/x", "cu", "cp", NULL, NULL},           {"d.io/x", NULL, NULL, "refresh-token", NULL},
      {"e.io/x", NULL, NULL, NULL, "bearer-token"}, {"f.io/x", "unpadded", "pw2", NULL, NULL},
  };
  for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
    cleanup_credential_list credential_list l = {0};
    assert_int_equal(keyring_lookup(k, cases[i].image, &l), 1);
    credential *c = l.items[0];
    if (cases[i].user)
      assert_string_equal(c->username, cases[i].user);
    if (cases[i].pass)
      assert_string_equal(c->password, cases[i].pass);
    if (cases[i].id)
      assert_string_equal(c->identity_token, cases[i].id);
    else
      assert_null(c->identity_token);
    if (cases[i].reg)
      assert_string_equal(c->registry_token, cases[i].reg);
    else
      assert_null(c->registry_token);
    assert_string_equal(c->source, "config.json test");
  }
  cleanup_credential_list credential_list none = {0};
  assert_int_equal(keyring_lookup(k, "g.io/x", &none), 0);
  assert_int_equal(keyring_lookup(k, "z.io/x", &none), 0);
}

static void test_config_json_invalid(void **state)
{
  (void) state;
  const char *bad[] = {
      "not json",
      "[1,2]",
      "{\"auths\": []}",
      "{\"auths\": {\"a.io\": \"str\"}}",
      "{\"auths\": {\"a.io\": {\"auth\": \"bm9jb2xvbg==\"}}}", /* "nocolon" */
      "{\"auths\": {\"a.io\": {\"auth\": \"!!!\"}}}",
      "{\"auths\": {\"a.io\": {\"password\": 5}}}",
      "{\"credHelpers\": {\"a.io\": \"../evil\"}}",
      "{\"credsStore\": \"a b\"}",
      "{\"auths\": {}} trailing",
  };
  for (size_t i = 0; i < ARRAY_SIZE(bad); i++) {
    cleanup_keyring keyring *k = keyring_new();
    cleanup_error crimage_error *err = NULL;
    assert_true(keyring_add_docker_config_json(k, bad[i], strlen(bad[i]), "s", "cfg", &err) < 0);
    assert_non_null(err);
    assert_int_equal(err->status, CRIMAGE_INVALID_ARGUMENT);
    assert_true(str_has_prefix(err->message, "cfg"));
    assert_int_equal(keyring_size(k), 0);
  }
  /* Keys that are no registry URL are skipped, as kubelet does; the rest of the file is used. */
  {
    cleanup_keyring keyring *k = keyring_new();
    cleanup_error crimage_error *err = NULL;
    const char *j = "{\"auths\": {\"https://\": {\"username\": \"u\", \"password\": \"p\"},"
                    " \"bad host\": {\"username\": \"u\", \"password\": \"p\"},"
                    " \"good.io\": {\"username\": \"u\", \"password\": \"p\"}}}";
    assert_int_equal(keyring_add_docker_config_json(k, j, strlen(j), "s", "cfg", &err), 0);
    assert_int_equal(keyring_size(k), 1);
  }
  /* The error never quotes a credential. */
  cleanup_keyring keyring *k = keyring_new();
  cleanup_error crimage_error *err = NULL;
  const char *j = "{\"auths\": {\"a.io\": {\"username\": \"u\", \"password\": \"hunter2\", \"auth\": \"@@\"}}}";
  assert_true(keyring_add_docker_config_json(k, j, strlen(j), "s", "cfg", &err) < 0);
  assert_null(strstr(err->message, "hunter2"));
  assert_null(strstr(err->message, "@@"));
}

static void test_lookup_order_and_all_matches(void **state)
{
  (void) state;
  /* The last example of the Kubernetes page: both keys match, the more specific one first. */
  cleanup_keyring keyring *k =
      parse_config("{\"auths\": {"
                   "\"my-registry.io/images\": {\"username\": \"general\", \"password\": \"p1\"},"
                   "\"my-registry.io/images/subpath\": {\"username\": \"specific\", \"password\": \"p2\"},"
                   "\"*.my-registry.io/images\": {\"username\": \"wild\", \"password\": \"p3\"},"
                   "\"other.io\": {\"username\": \"other\", \"password\": \"p4\"}"
                   "}}");
  cleanup_credential_list credential_list l = {0};
  assert_int_equal(keyring_lookup(k, "my-registry.io/images/subpath/my-image", &l), 2);
  assert_string_equal(l.items[0]->username, "specific");
  assert_string_equal(l.items[1]->username, "general");

  cleanup_credential_list credential_list l2 = {0};
  assert_int_equal(keyring_lookup(k, "sub.my-registry.io/images/my-image", &l2), 1);
  assert_string_equal(l2.items[0]->username, "wild");
  cleanup_credential_list credential_list l3 = {0};
  assert_int_equal(keyring_lookup(k, "a.sub.my-registry.io/images/my-image", &l3), 0);

  /* Two configs adding the same key keep their order under that key; keys sort in reverse byte order. */
  cleanup_keyring keyring *k2 = keyring_new();
  cleanup_credential credential *c = credential_new();
  c->username = xstrdup("first");
  c->password = xstrdup("x");
  assert_int_equal(keyring_add(k2, "https://r.io/v2/", c, "one"), 0);
  free(c->username);
  c->username = xstrdup("second");
  assert_int_equal(keyring_add(k2, "r.io", c, "two"), 0);
  free(c->username);
  c->username = xstrdup("path");
  assert_int_equal(keyring_add(k2, "r.io/a", c, "three"), 0);
  free(c->username);
  c->username = xstrdup("glob");
  assert_int_equal(keyring_add(k2, "*.io", c, "four"), 0);
  assert_int_equal(keyring_add(k2, "https://", c, "bad"), -EINVAL);
  cleanup_credential_list credential_list l4 = {0};
  assert_int_equal(keyring_lookup(k2, "r.io/a/b", &l4), 4);
  assert_string_equal(l4.items[0]->username, "path");   /* "r.io/a" */
  assert_string_equal(l4.items[1]->username, "first");  /* "r.io" */
  assert_string_equal(l4.items[2]->username, "second"); /* "r.io", added later */
  assert_string_equal(l4.items[3]->username, "glob");   /* "*.io" sorts last */
  assert_string_equal(l4.items[0]->source, "three");
}

static void test_docker_hub_fallback(void **state)
{
  (void) state;
  cleanup_keyring keyring *k =
      parse_config("{\"auths\": {"
                   "\"https://index.docker.io/v1/\": {\"username\": \"hub\", \"password\": \"p\"},"
                   "\"quay.io\": {\"username\": \"quay\", \"password\": \"q\"}}}");
  cleanup_credential_list credential_list l = {0};
  assert_int_equal(keyring_lookup(k, "docker.io/library/busybox", &l), 1);
  assert_string_equal(l.items[0]->username, "hub");
  cleanup_credential_list credential_list l2 = {0};
  assert_int_equal(keyring_lookup(k, "index.docker.io/library/busybox", &l2), 1);
  cleanup_credential_list credential_list l3 = {0};
  assert_int_equal(keyring_lookup(k, "ghcr.io/app", &l3), 0);

  /* A direct docker.io match wins: no fallback then. */
  cleanup_keyring keyring *k2 =
      parse_config("{\"auths\": {"
                   "\"https://index.docker.io/v1/\": {\"username\": \"hub\", \"password\": \"p\"},"
                   "\"docker.io/team\": {\"username\": \"team\", \"password\": \"t\"}}}");
  cleanup_credential_list credential_list l4 = {0};
  assert_int_equal(keyring_lookup(k2, "docker.io/team/app", &l4), 1);
  assert_string_equal(l4.items[0]->username, "team");
  cleanup_credential_list credential_list l5 = {0};
  assert_int_equal(keyring_lookup(k2, "docker.io/library/busybox", &l5), 1);
  assert_string_equal(l5.items[0]->username, "hub");
}

static void test_dockercfg_and_files(void **state)
{
  (void) state;
  cleanup_free char *dir = test_mkdtemp("keyring");
  put_file(dir, ".dockercfg", "{\"legacy.io\": {\"auth\": \"bGVnOmFjeQ==\", \"email\": \"e\"}}");
  put_file(dir, "config.json", "{\"auths\": {\"new.io\": {\"auth\": \"bmV3OnB3\"}}}");
  cleanup_free char *p1 = xasprintf("%s/.dockercfg", dir);
  cleanup_free char *p2 = xasprintf("%s/config.json", dir);
  cleanup_keyring keyring *k1 = NULL, *k2 = NULL;
  cleanup_error crimage_error *err = NULL;
  assert_int_equal(keyring_load_file(p1, &k1, &err), 0);
  assert_int_equal(keyring_load_file(p2, &k2, &err), 0);
  cleanup_credential_list credential_list l = {0};
  assert_int_equal(keyring_lookup(k1, "legacy.io/x", &l), 1);
  assert_string_equal(l.items[0]->username, "leg");
  assert_string_equal(l.items[0]->password, "acy");
  cleanup_free char *src1 = xasprintf(".dockercfg %s", p1);
  assert_string_equal(l.items[0]->source, src1);
  assert_int_equal(keyring_lookup(k2, "new.io/x", &l), 1);
  cleanup_free char *src2 = xasprintf("config.json %s", p2);
  assert_string_equal(l.items[1]->source, src2);
  assert_string_equal(keyring_origin(k2), p2);

  /* Size limit. */
  cleanup_free char *big = xmalloc(KEYRING_MAX_FILE_SIZE + 2);
  memset(big, ' ', KEYRING_MAX_FILE_SIZE + 1);
  big[KEYRING_MAX_FILE_SIZE + 1] = '\0';
  put_file(dir, "big.json", big);
  cleanup_free char *p3 = xasprintf("%s/big.json", dir);
  keyring *k3 = NULL;
  cleanup_error crimage_error *err3 = NULL;
  assert_true(keyring_load_file(p3, &k3, &err3) < 0);
  assert_null(k3);
  assert_non_null(strstr(err3->message, "larger than"));
  test_rm_rf(dir);
}

static void test_node_search(void **state)
{
  (void) state;
  cleanup_free char *root = test_mkdtemp("keyring");
  cleanup_free char *home = test_mkdtemp("keyring");
  cleanup_free char *cwd = test_mkdtemp("keyring");
  cleanup_free char *old_home = getenv("HOME") ? xstrdup(getenv("HOME")) : NULL;
  char old_cwd[4096];
  assert_non_null(getcwd(old_cwd, sizeof(old_cwd)));
  setenv("HOME", home, 1);
  assert_int_equal(chdir(cwd), 0);

  cleanup_strv char **paths = keyring_node_search_paths(root);
  cleanup_free char *e0 = xasprintf("%s/config.json", root);
  cleanup_free char *e1 = xasprintf("%s/config.json", cwd);
  cleanup_free char *e2 = xasprintf("%s/.docker/config.json", home);
  cleanup_free char *e4 = xasprintf("%s/.dockercfg", root);
  cleanup_free char *e6 = xasprintf("%s/.dockercfg", home);
  assert_int_equal(strv_length(paths), 8);
  assert_string_equal(paths[0], e0);
  assert_string_equal(paths[1], e1);
  assert_string_equal(paths[2], e2);
  assert_string_equal(paths[3], "/.docker/config.json");
  assert_string_equal(paths[4], e4);
  assert_string_equal(paths[6], e6);
  assert_string_equal(paths[7], "/.dockercfg");

  /* Nothing there: an empty keyring, no file. */
  keyring *k = NULL;
  char *used = NULL;
  assert_int_equal(keyring_load_node(paths, &k, &used), 0);
  assert_null(used);
  assert_int_equal(keyring_size(k), 0);
  keyring_unref(k);

  /* .dockercfg in the kubelet root, config.json in $HOME/.docker: config.json wins though later in the dirs. */
  put_file(root, ".dockercfg", "{\"r.io\": {\"username\": \"legacy\", \"password\": \"p\"}}");
  cleanup_free char *dotdocker = xasprintf("%s/.docker", home);
  assert_int_equal(mkdir(dotdocker, 0700), 0);
  put_file(dotdocker, "config.json", "{\"auths\": {\"r.io\": {\"username\": \"home\", \"password\": \"p\"}}}");
  assert_int_equal(keyring_load_node(paths, &k, &used), 0);
  assert_string_equal(used, e2);
  free(used);
  keyring_unref(k);

  /* An invalid file is skipped: the next valid one wins. */
  put_file(root, "config.json", "{\"auths\": {\"r.io\": {\"auth\": \"###\"}}}");
  put_file(cwd, "config.json", "{\"auths\": {\"r.io\": {\"username\": \"cwd\", \"password\": \"p\"}}}");
  assert_int_equal(keyring_load_node(paths, &k, &used), 0);
  assert_string_equal(used, e1);
  cleanup_credential_list credential_list l = {0};
  assert_int_equal(keyring_lookup(k, "r.io/app", &l), 1);
  assert_string_equal(l.items[0]->username, "cwd");
  free(used);
  keyring_unref(k);

  /* The first valid file wins even when it has no credential for the image. */
  put_file(root, "config.json", "{\"auths\": {}}");
  assert_int_equal(keyring_load_node(paths, &k, &used), 0);
  assert_string_equal(used, e0);
  free(used);
  keyring_unref(k);

  assert_int_equal(chdir(old_cwd), 0);
  if (old_home)
    setenv("HOME", old_home, 1);
  test_rm_rf(root);
  test_rm_rf(home);
  test_rm_rf(cwd);
}

static void test_cred_helpers_config(void **state)
{
  (void) state;
  cleanup_keyring keyring *k = parse_config("{\"credHelpers\": {\"gcr.io\": \"gcloud\", "
                                            "\"https://index.docker.io/v1/\": \"hub\", \"r.io:5000\": \"ported\"},"
                                            "\"credsStore\": \"pass\"}");
  assert_string_equal(keyring_cred_helper(k, "gcr.io"), "gcloud");
  assert_string_equal(keyring_cred_helper(k, "docker.io"), "hub");
  assert_string_equal(keyring_cred_helper(k, "r.io:5000"), "ported");
  assert_string_equal(keyring_cred_helper(k, "r.io"), "pass");
  assert_string_equal(keyring_cred_helper(k, "quay.io"), "pass");
  cleanup_keyring keyring *k2 = parse_config("{\"credHelpers\": {\"gcr.io\": \"gcloud\"}}");
  assert_null(keyring_cred_helper(k2, "quay.io"));
  assert_null(keyring_cred_helper(k2, NULL));
}

static void test_limits(void **state)
{
  (void) state;
  /* More entries than allowed. */
  cleanup_free char *json = NULL;
  size_t cap = (KEYRING_MAX_ENTRIES + 2) * 64 + 64, len = 0;
  json = xmalloc(cap);
  len += (size_t) snprintf(json + len, cap - len, "{\"auths\": {");
  for (int i = 0; i <= KEYRING_MAX_ENTRIES; i++)
    len += (size_t) snprintf(json + len, cap - len, "%s\"r%d.io\": {\"username\": \"u\"}", i ? "," : "", i);
  len += (size_t) snprintf(json + len, cap - len, "}}");
  cleanup_keyring keyring *k = keyring_new();
  cleanup_error crimage_error *err = NULL;
  assert_true(keyring_add_docker_config_json(k, json, len, "s", "many", &err) < 0);
  assert_non_null(strstr(err->message, "more than"));
}

int main(void)
{
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_match_kubernetes_examples),
      cmocka_unit_test(test_match_rules),
      cmocka_unit_test(test_match_pattern_valid),
      cmocka_unit_test(test_key_normalize),
      cmocka_unit_test(test_docker_hub),
      cmocka_unit_test(test_config_json_fields),
      cmocka_unit_test(test_config_json_invalid),
      cmocka_unit_test(test_lookup_order_and_all_matches),
      cmocka_unit_test(test_docker_hub_fallback),
      cmocka_unit_test(test_dockercfg_and_files),
      cmocka_unit_test(test_node_search),
      cmocka_unit_test(test_cred_helpers_config),
      cmocka_unit_test(test_limits),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
