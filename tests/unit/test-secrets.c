/* Image pull Secrets: kubectl's output, both Secret types, data and stringData, lists and multi-document files,
 * clear errors naming the Secret, the directory loader and its reload. Also yaml_parse_all, which they use. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include "auth/secrets.h"
#include "common/fsutil.h"
#include "common/json.h"
#include "common/util.h"
#include "test-files.h"

static void put_file(const char *dir, const char *name, const char *content)
{
  cleanup_free char *path = xasprintf("%s/%s", dir, name);
  cleanup_free char *tmp = xasprintf("%s/.tmp-%s", dir, name);
  FILE *f = fopen(tmp, "w");
  assert_non_null(f);
  fputs(content, f);
  fclose(f);
  assert_int_equal(rename(tmp, path), 0);
}

static keyring **parse_ok(const char *yaml, size_t *n)
{
  keyring **v = NULL;
  cleanup_error crimage_error *err = NULL;
  if (secrets_parse(yaml, strlen(yaml), "test", &v, n, &err) < 0)
    fail_msg("%s", err->message);
  return v;
}

static char *parse_err(const char *yaml)
{
  keyring **v = NULL;
  size_t n = 0;
  cleanup_error crimage_error *err = NULL;
  assert_true(secrets_parse(yaml, strlen(yaml), "test", &v, &n, &err) < 0);
  assert_null(v);
  assert_non_null(err);
  assert_int_equal(err->status, CRIMAGE_INVALID_ARGUMENT);
  return xstrdup(err->message);
}

static void expect_user(keyring *k, const char *image, const char *user, const char *pass, const char *source)
{
  cleanup_credential_list credential_list l = {0};
  assert_int_equal(keyring_lookup(k, image, &l), 1);
  assert_string_equal(l.items[0]->username, user);
  assert_string_equal(l.items[0]->password, pass);
  assert_string_equal(l.items[0]->source, source);
}

static void check_kubectl_output(const char *yaml)
{
  size_t n = 0;
  keyring **v = parse_ok(yaml, &n);
  assert_int_equal(n, 1);
  expect_user(v[0], "my-registry.io:5000/team/app", "alice", "s3cr:et", "secret team-a/regcred");
  cleanup_credential_list credential_list l = {0};
  assert_int_equal(keyring_lookup(v[0], "my-registry.io/team/app", &l), 0); /* port must match */
  keyring_array_free(v, n);
}

static void test_kubectl_fixture(void **state)
{
  (void) state;
  /* Generated with: kubectl create secret docker-registry regcred --docker-server=my-registry.io:5000
   * --docker-username=alice --docker-password='s3cr:et' --docker-email=alice@example.com -n team-a
   * --dry-run=client -o yaml */
  cleanup_free char *data = NULL;
  size_t len = 0;
  cleanup_error crimage_error *err = NULL;
  assert_int_equal(read_file(TEST_SRCDIR "/data/secret-kubectl.yaml", 1 << 20, &data, &len, &err), 0);
  check_kubectl_output(data);
}

static void test_kubectl_live(void **state)
{
  (void) state;
  if (access("/usr/bin/kubectl", X_OK) != 0) {
    skip();
    return;
  }
  FILE *p = popen("kubectl create secret docker-registry regcred --docker-server=my-registry.io:5000 "
                  "--docker-username=alice --docker-password='s3cr:et' -n team-a --dry-run=client -o yaml",
                  "r");
  assert_non_null(p);
  char buf[8192];
  size_t len = fread(buf, 1, sizeof(buf) - 1, p);
  buf[len] = '\0';
  assert_int_equal(pclose(p), 0);
  check_kubectl_output(buf);

  /* -o json loads too */
  p = popen("kubectl create secret docker-registry regcred --docker-server=my-registry.io:5000 "
            "--docker-username=alice --docker-password='s3cr:et' -n team-a --dry-run=client -o json",
            "r");
  assert_non_null(p);
  len = fread(buf, 1, sizeof(buf) - 1, p);
  buf[len] = '\0';
  assert_int_equal(pclose(p), 0);
  check_kubectl_output(buf);
}

/* {"r.io": {"auth": base64("old:style")}} */
#define DOCKERCFG_B64 "eyJyLmlvIjogeyJhdXRoIjogImIyeGtPbk4wZVd4bCJ9fQ=="

static void test_types_and_string_data(void **state)
{
  (void) state;
  size_t n = 0;
  keyring **v =
      parse_ok("apiVersion: v1\nkind: Secret\nmetadata: {name: legacy}\n"
               "type: kubernetes.io/dockercfg\ndata:\n  .dockercfg: " DOCKERCFG_B64 "\n"
               "---\n"
               "apiVersion: v1\nkind: Secret\nmetadata: {name: plain, namespace: ns2}\n"
               "type: kubernetes.io/dockerconfigjson\nstringData:\n"
               "  .dockerconfigjson: '{\"auths\": {\"s.io\": {\"username\": \"sd\", \"password\": \"pw\"}}}'\n"
               "---\n"
               "{\"apiVersion\": \"v1\", \"kind\": \"Secret\", \"metadata\": {\"name\": \"j\"},"
               " \"type\": \"kubernetes.io/dockercfg\","
               " \"stringData\": {\".dockercfg\": \"{\\\"j.io\\\": {\\\"username\\\": \\\"ju\\\", \\\"password\\\": "
               "\\\"jp\\\"}}\"},"
               " \"data\": {\".dockercfg\": \"!!not-used!!\"}}\n",
               &n);
  assert_int_equal(n, 3);
  expect_user(v[0], "r.io/x", "old", "style", "secret default/legacy");
  expect_user(v[1], "s.io/x", "sd", "pw", "secret ns2/plain");
  expect_user(v[2], "j.io/x", "ju", "jp", "secret default/j"); /* stringData wins over data */
  keyring_array_free(v, n);
}

static void test_lists_keep_order(void **state)
{
  (void) state;
  const char *secret_tpl =
      "{\"apiVersion\": \"v1\", \"kind\": \"Secret\", \"metadata\": {\"name\": \"%s\"},"
      " \"type\": \"kubernetes.io/dockerconfigjson\", \"stringData\": {\".dockerconfigjson\":"
      " \"{\\\"auths\\\": {\\\"r.io\\\": {\\\"username\\\": \\\"%s\\\", \\\"password\\\": \\\"p\\\"}}}\"}}";
  cleanup_free char *a = xasprintf(secret_tpl, "a", "ua");
  cleanup_free char *b = xasprintf(secret_tpl, "b", "ub");
  cleanup_free char *c = xasprintf(secret_tpl, "c", "uc");
  cleanup_free char *d = xasprintf(secret_tpl, "d", "ud");
  cleanup_free char *yaml =
      xasprintf("---\n%s\n---\n{\"apiVersion\": \"v1\", \"kind\": \"List\", \"items\": [%s, %s]}\n"
                "---\n%s\n---\n",
                c, a, d, b);
  size_t n = 0;
  keyring **v = parse_ok(yaml, &n);
  assert_int_equal(n, 4);
  const char *order[] = {"uc", "ua", "ud", "ub"};
  for (size_t i = 0; i < n; i++) {
    cleanup_free char *src = xasprintf("secret default/%c", order[i][1]);
    expect_user(v[i], "r.io/x", order[i], "p", src);
  }
  keyring_array_free(v, n);

  /* SecretList items carry no kind. */
  v = parse_ok("kind: SecretList\napiVersion: v1\nitems:\n- metadata: {name: x}\n  type: kubernetes.io/dockercfg\n"
               "  data: {.dockercfg: " DOCKERCFG_B64 "}\n",
               &n);
  assert_int_equal(n, 1);
  keyring_array_free(v, n);

  /* Empty input: no Secrets. */
  v = parse_ok("---\n", &n);
  assert_int_equal(n, 0);
  keyring_array_free(v, n);
}

static void test_bad_secrets(void **state)
{
  (void) state;
  struct {
    const char *yaml;
    const char *expect[3];
  } cases[] = {
      {"apiVersion: v1\nkind: Secret\nmetadata: {name: opaque, namespace: ns}\ntype: Opaque\ndata: {a: YQ==}\n",
       {"Secret ns/opaque", "type `Opaque`", NULL}},
      {"apiVersion: v1\nkind: Secret\nmetadata: {name: notype}\ndata: {a: YQ==}\n", {"Secret default/notype", NULL}},
      {"apiVersion: v1\nkind: Secret\nmetadata: {name: nokey, namespace: ns}\ntype: kubernetes.io/dockerconfigjson\n"
       "data: {.dockercfg: " DOCKERCFG_B64 "}\n",
       {"Secret ns/nokey", "no `.dockerconfigjson`", NULL}},
      {"apiVersion: v1\nkind: Secret\nmetadata: {name: b64, namespace: ns}\ntype: kubernetes.io/dockerconfigjson\n"
       "data: {.dockerconfigjson: '!!notbase64'}\n",
       {"Secret ns/b64", "not valid base64", NULL}},
      /* base64("{not json") = e25vdCBqc29u */
      {"apiVersion: v1\nkind: Secret\nmetadata: {name: badjson, namespace: ns}\ntype: kubernetes.io/dockerconfigjson\n"
       "data: {.dockerconfigjson: e25vdCBqc29u}\n",
       {"Secret ns/badjson", "invalid JSON", NULL}},
      /* base64('{"x": 1}') = eyJ4IjogMX0= : valid JSON without auths */
      {"apiVersion: v1\nkind: Secret\nmetadata: {name: noauths}\ntype: kubernetes.io/dockerconfigjson\n"
       "data: {.dockerconfigjson: eyJ4IjogMX0=}\n",
       {"Secret default/noauths", "auths", NULL}},
      /* base64('{"auths": {"r.io": {"auth": "xx"}}}') : a bad auth field inside */
      {"apiVersion: v1\nkind: Secret\nmetadata: {name: badauth}\ntype: kubernetes.io/dockerconfigjson\n"
       "data: {.dockerconfigjson: eyJhdXRocyI6IHsici5pbyI6IHsiYXV0aCI6ICJ4eCJ9fX0=}\n",
       {"Secret default/badauth", "r.io", NULL}},
      {"apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cm}\n", {"ConfigMap", "not a Secret", NULL}},
      {"kind: List\napiVersion: v1\n", {"without `items`", NULL}},
      {"- just\n- a list\n", {"Secret", NULL}},
      {"key: [unclosed\n", {"invalid YAML", NULL}},
  };
  for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
    cleanup_free char *msg = parse_err(cases[i].yaml);
    for (size_t j = 0; cases[i].expect[j]; j++)
      if (!strstr(msg, cases[i].expect[j]))
        fail_msg("case %zu: `%s` not in `%s`", i, cases[i].expect[j], msg);
  }
  /* A bad Secret after good ones fails the whole input, naming the bad one. */
  cleanup_free char *msg =
      parse_err("apiVersion: v1\nkind: Secret\nmetadata: {name: good}\ntype: kubernetes.io/dockercfg\n"
                "data: {.dockercfg: " DOCKERCFG_B64 "}\n---\n"
                "apiVersion: v1\nkind: Secret\nmetadata: {name: bad}\ntype: Opaque\n");
  assert_non_null(strstr(msg, "default/bad"));
  /* The password never shows in an error: a dockercfg whose entry has password "topsecret" and a bad auth. */
  cleanup_free char *m2 =
      parse_err("apiVersion: v1\nkind: Secret\nmetadata: {name: s}\ntype: kubernetes.io/dockercfg\n"
                "stringData: {.dockercfg: '{\"r.io\": {\"password\": \"topsecret\", \"auth\": \"topsecret2\"}}'}\n");
  assert_null(strstr(m2, "topsecret"));
}

static void test_load_dir_and_reload(void **state)
{
  (void) state;
  cleanup_free char *dir = test_mkdtemp("secrets");
  const char *tpl =
      "apiVersion: v1\nkind: Secret\nmetadata: {name: %s}\ntype: kubernetes.io/dockerconfigjson\n"
      "stringData:\n  .dockerconfigjson: '{\"auths\": {\"r.io\": {\"username\": \"%s\", \"password\": \"p\"}}}'\n";
  cleanup_free char *s2 = xasprintf(tpl, "two", "u2");
  cleanup_free char *s1 = xasprintf(tpl, "one", "u1");
  cleanup_free char *s3 = xasprintf(tpl, "three", "u3");
  put_file(dir, "20-two.yml", s2);
  put_file(dir, "10-one.yaml", s1);
  put_file(dir, "30-three.json.txt", s3); /* not a manifest name */
  put_file(dir, ".hidden.yaml", s3);
  cleanup_free char *sub = xasprintf("%s/40-dir.yaml", dir);
  assert_int_equal(mkdir(sub, 0700), 0); /* not a regular file */

  keyring **v = NULL;
  size_t n = 0;
  cleanup_error crimage_error *err = NULL;
  assert_int_equal(secrets_load_dir(dir, &v, &n, &err), 0);
  assert_int_equal(n, 2);
  expect_user(v[0], "r.io/a", "u1", "p", "secret default/one");
  expect_user(v[1], "r.io/a", "u2", "p", "secret default/two");
  keyring_array_free(v, n);

  secret_dir *sd = secret_dir_new(dir);
  assert_int_equal(secret_dir_get(sd, &v, &n, &err), 0);
  assert_null(err);
  assert_int_equal(n, 2);
  keyring *first = v[0];
  keyring_array_free(v, n);
  /* Unchanged: the same keyrings. */
  assert_int_equal(secret_dir_get(sd, &v, &n, &err), 0);
  assert_ptr_equal(v[0], first);
  keyring_array_free(v, n);
  /* A new file: reloaded. */
  put_file(dir, "05-three.json", s3);
  assert_int_equal(secret_dir_get(sd, &v, &n, &err), 0);
  assert_int_equal(n, 3);
  expect_user(v[0], "r.io/a", "u3", "p", "secret default/three");
  keyring_array_free(v, n);
  /* A broken file: the error is reported and the previous Secrets stay. */
  put_file(dir, "50-bad.yaml", "apiVersion: v1\nkind: Secret\nmetadata: {name: broken}\ntype: Opaque\n");
  assert_int_equal(secret_dir_get(sd, &v, &n, &err), 0);
  assert_non_null(err);
  assert_non_null(strstr(err->message, "default/broken"));
  crimage_error_clear(&err);
  assert_int_equal(n, 3);
  keyring_array_free(v, n);
  /* Fixed: reloaded again. */
  cleanup_free char *bad = xasprintf("%s/50-bad.yaml", dir);
  assert_int_equal(unlink(bad), 0);
  cleanup_free char *one = xasprintf("%s/10-one.yaml", dir);
  assert_int_equal(unlink(one), 0);
  assert_int_equal(secret_dir_get(sd, &v, &n, &err), 0);
  assert_null(err);
  assert_int_equal(n, 2);
  expect_user(v[1], "r.io/a", "u2", "p", "secret default/two");
  keyring_array_free(v, n);
  secret_dir_free(sd);

  /* A directory that does not exist: no Secrets, no error. */
  test_rm_rf(dir);
  sd = secret_dir_new(dir);
  assert_int_equal(secret_dir_get(sd, &v, &n, &err), 0);
  assert_null(err);
  assert_int_equal(n, 0);
  keyring_array_free(v, n);
  secret_dir_free(sd);
  assert_true(secrets_load_dir(dir, &v, &n, &err) < 0);
  assert_int_equal(err->status, CRIMAGE_NOT_FOUND);
}

static void test_yaml_parse_all(void **state)
{
  (void) state;
  cleanup_error crimage_error *err = NULL;
  json_object *docs = NULL;
  const char *y = "---\na: 1\n---\n---\n- x\n- y\n...\n---\nplain\n";
  assert_int_equal(yaml_parse_all(y, strlen(y), "t", 16, SECRETS_JSON_LIMITS, &docs, &err), 0);
  assert_int_equal(json_object_array_length(docs), 3);
  json_object *a = NULL;
  assert_true(json_object_object_get_ex(json_object_array_get_idx(docs, 0), "a", &a));
  assert_int_equal(json_object_get_int(a), 1);
  assert_int_equal(json_object_array_length(json_object_array_get_idx(docs, 1)), 2);
  assert_string_equal(json_object_get_string(json_object_array_get_idx(docs, 2)), "plain");
  json_object_put(docs);

  assert_int_equal(yaml_parse_all("", 0, "t", 16, SECRETS_JSON_LIMITS, &docs, &err), 0);
  assert_int_equal(json_object_array_length(docs), 0);
  json_object_put(docs);

  docs = NULL;
  const char *three = "a: 1\n---\nb: 2\n---\nc: 3\n";
  assert_true(yaml_parse_all(three, strlen(three), "t", 2, SECRETS_JSON_LIMITS, &docs, &err) < 0);
  assert_null(docs);
  assert_non_null(strstr(err->message, "more than 2"));
  crimage_error_clear(&err);
  const char *broken = "a: 1\n---\nb: [\n";
  assert_true(yaml_parse_all(broken, strlen(broken), "t", 8, SECRETS_JSON_LIMITS, &docs, &err) < 0);
  assert_non_null(strstr(err->message, "document 2"));
  crimage_error_clear(&err);

  /* yaml_parse still reads the first document only, and rejects an empty one. */
  json_object *one = NULL;
  assert_int_equal(yaml_parse(broken, strlen(broken), "t", SECRETS_JSON_LIMITS, &one, &err), 0);
  json_object_put(one);
  assert_true(yaml_parse("---\n", 4, "t", SECRETS_JSON_LIMITS, &one, &err) < 0);
  assert_non_null(strstr(err->message, "empty document"));
}

int main(void)
{
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_kubectl_fixture),       cmocka_unit_test(test_kubectl_live),
      cmocka_unit_test(test_types_and_string_data), cmocka_unit_test(test_lists_keep_order),
      cmocka_unit_test(test_bad_secrets),           cmocka_unit_test(test_load_dir_and_reload),
      cmocka_unit_test(test_yaml_parse_all),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
