/* Image references: the examples of the Kubernetes "Images" page, docker's normalization rules, and invalid input. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "common/util.h"
#include "pull/reference.h"

#define PAUSE_DIGEST "sha256:1ff6c18fbef2045af6b9c16bf034cc421a29027b800e4f9b68ae9b1cb3e9ae07"

static void check_normalized(const char *in, const char *default_registry, const char *want)
{
  cleanup_error crimage_error *err = NULL;
  cleanup_free char *out = NULL;
  int r = crimage_reference_normalize(in, default_registry, &out, &err);
  if (r < 0)
    fail_msg("%s: unexpected error: %s", in, err ? err->message : "(none)");
  assert_string_equal(out, want);
}

static void test_kubernetes_images_page(void **state)
{
  check_normalized("busybox", NULL, "docker.io/library/busybox:latest");
  check_normalized("busybox:1.32.0", NULL, "docker.io/library/busybox:1.32.0");
  check_normalized("registry.k8s.io/pause:latest", NULL, "registry.k8s.io/pause:latest");
  check_normalized("registry.k8s.io/pause:3.5", NULL, "registry.k8s.io/pause:3.5");
  check_normalized("registry.k8s.io/pause@" PAUSE_DIGEST, NULL, "registry.k8s.io/pause@" PAUSE_DIGEST);
  check_normalized("registry.k8s.io/pause:3.5@" PAUSE_DIGEST, NULL, "registry.k8s.io/pause:3.5@" PAUSE_DIGEST);
  check_normalized("fictional.registry.example:10443/imagename", NULL,
                   "fictional.registry.example:10443/imagename:latest");
}

static void test_parts(void **state)
{
  cleanup_error crimage_error *err = NULL;
  cleanup_reference image_ref *r = NULL;

  assert_int_equal(reference_parse("busybox", NULL, &r, &err), 0);
  assert_string_equal(r->domain, "docker.io");
  assert_string_equal(r->path, "library/busybox");
  assert_string_equal(r->tag, "latest");
  assert_null(r->digest);
  assert_false(r->tag_given);
  cleanup_free char *name = reference_name(r);
  assert_string_equal(name, "docker.io/library/busybox");
  cleanup_free char *tagged = reference_tagged(r);
  assert_string_equal(tagged, "docker.io/library/busybox:latest");
  assert_null(reference_digested(r));
  reference_free(TAKE_PTR(r));

  /* Digest only: no tag is invented. */
  assert_int_equal(reference_parse("registry.k8s.io/pause@" PAUSE_DIGEST, NULL, &r, &err), 0);
  assert_string_equal(r->domain, "registry.k8s.io");
  assert_string_equal(r->path, "pause");
  assert_null(r->tag);
  assert_false(r->tag_given);
  assert_string_equal(r->digest, PAUSE_DIGEST);
  assert_null(reference_tagged(r));
  cleanup_free char *digested = reference_digested(r);
  assert_string_equal(digested, "registry.k8s.io/pause@" PAUSE_DIGEST);
  reference_free(TAKE_PTR(r));

  /* Tag and digest: both kept. */
  assert_int_equal(reference_parse("registry.k8s.io/pause:3.5@" PAUSE_DIGEST, NULL, &r, &err), 0);
  assert_string_equal(r->tag, "3.5");
  assert_true(r->tag_given);
  assert_string_equal(r->digest, PAUSE_DIGEST);
  reference_free(TAKE_PTR(r));

  assert_int_equal(reference_parse("fictional.registry.example:10443/imagename", NULL, &r, &err), 0);
  assert_string_equal(r->domain, "fictional.registry.example:10443");
  assert_string_equal(r->path, "imagename");
  assert_string_equal(r->tag, "latest");
  reference_free(TAKE_PTR(r));

  assert_int_equal(reference_parse("[::1]:5000/team/app:v1", NULL, &r, &err), 0);
  assert_string_equal(r->domain, "[::1]:5000");
  assert_string_equal(r->path, "team/app");
  assert_string_equal(r->tag, "v1");
  assert_null(err);
}

static void test_docker_rules(void **state)
{
  /* Docker Hub: library/ only for one-component names, index.docker.io is docker.io. */
  check_normalized("library/busybox", NULL, "docker.io/library/busybox:latest");
  check_normalized("docker.io/busybox", NULL, "docker.io/library/busybox:latest");
  check_normalized("index.docker.io/busybox:1", NULL, "docker.io/library/busybox:1");
  check_normalized("index.docker.io/team/app", NULL, "docker.io/team/app:latest");
  check_normalized("team/app", NULL, "docker.io/team/app:latest");
  check_normalized("a/b/c/d", NULL, "docker.io/a/b/c/d:latest");
  /* Domain detection. */
  check_normalized("localhost/app", NULL, "localhost/app:latest");
  check_normalized("localhost:5000/app:v2", NULL, "localhost:5000/app:v2");
  check_normalized("127.0.0.1:5000/app", NULL, "127.0.0.1:5000/app:latest");
  check_normalized("Registry.Example/app", NULL, "Registry.Example/app:latest");
  check_normalized("MyHost/app", NULL, "MyHost/app:latest");
  check_normalized("[::1]/app", NULL, "[::1]/app:latest");
  check_normalized("[2001:db8::1]:443/x/y", NULL, "[2001:db8::1]:443/x/y:latest");
  /* No slash: "localhost:5000" is image "localhost" with tag "5000", as docker reads it. */
  check_normalized("localhost:5000", NULL, "docker.io/library/localhost:5000");
  /* Path separators. */
  check_normalized("ab/c.d_e__f--g-h", NULL, "docker.io/ab/c.d_e__f--g-h:latest");
  /* Tags. */
  check_normalized("app:_x", NULL, "docker.io/library/app:_x");
  check_normalized("app:V1.2-rc_3", NULL, "docker.io/library/app:V1.2-rc_3");
  /* sha512 digests. */
  char ref[300];
  char want[300];
  char hex[129];
  memset(hex, 'a', 128);
  hex[128] = '\0';
  snprintf(ref, sizeof(ref), "app@sha512:%s", hex);
  snprintf(want, sizeof(want), "docker.io/library/app@sha512:%s", hex);
  check_normalized(ref, NULL, want);
}

static void test_default_registry(void **state)
{
  check_normalized("busybox", "registry.example:5000", "registry.example:5000/busybox:latest");
  check_normalized("team/app", "registry.example", "registry.example/team/app:latest");
  check_normalized("docker.io/busybox", "registry.example", "docker.io/library/busybox:latest");
  check_normalized("busybox", "index.docker.io", "docker.io/library/busybox:latest");
  check_normalized("busybox", "", "docker.io/library/busybox:latest");

  cleanup_error crimage_error *err = NULL;
  cleanup_free char *out = NULL;
  assert_true(crimage_reference_normalize("busybox", "bad host!", &out, &err) < 0);
  assert_non_null(err);
  assert_int_equal(err->status, CRIMAGE_INVALID_ARGUMENT);
  assert_non_null(strstr(err->message, "default registry"));
  assert_null(out);
}

struct invalid_case {
  const char *input;
  const char *problem; /* substring of the message */
};

static void test_invalid(void **state)
{
  char long_tag[160];
  snprintf(long_tag, sizeof(long_tag), "busybox:%0129d", 0);
  char hex63[128];
  snprintf(hex63, sizeof(hex63), "busybox@sha256:%.63s", PAUSE_DIGEST + 7);
  char long_name[400];
  memset(long_name, 'a', 300);
  long_name[0] = 'x';
  long_name[1] = '/';
  long_name[300] = '\0';
  char huge[3000];
  memset(huge, 'a', sizeof(huge) - 1);
  huge[sizeof(huge) - 1] = '\0';

  const struct invalid_case cases[] = {
      {"Busybox", "repository name must be lowercase"},
      {"docker.io/Library/busybox", "repository name must be lowercase"},
      {long_tag, "tag longer than 128"},
      {"busybox@sha256:xyz", "not lowercase hexadecimal"},
      {"busybox@sha256:1FF6C18FBEF2045AF6B9C16BF034CC421A29027B800E4F9B68AE9B1CB3E9AE07", "not lowercase"},
      {"busybox@", "invalid digest"},
      {"busybox@sha256", "invalid digest"},
      {"busybox@" PAUSE_DIGEST "@" PAUSE_DIGEST, "not lowercase hexadecimal"},
      {hex63, "63 hex digits instead of 64"},
      {"busybox@sha256:", "0 hex digits"},
      {"busybox@md5:d41d8cd98f00b204e9800998ecf8427e", "unsupported digest algorithm \"md5\""},
      {"busybox@sha384:abc", "unsupported digest algorithm"},
      {"", "empty reference"},
      {"//", "empty path component"},
      {"/busybox", "empty path component"},
      {"a//b", "empty path component"},
      {":tag", "missing repository name"},
      {"busybox:", "empty tag"},
      {"busybox/", "empty path component"},
      {"registry.example/", "missing repository name"},
      {"busy box", "whitespace"},
      {" busybox", "whitespace"},
      {"busybox\n", "whitespace"},
      {"busybox:-x", "invalid tag"},
      {"busybox:a/b", "invalid registry host"},
      {"-busybox", "invalid repository name component"},
      {"busybox-", "invalid repository name component"},
      {"busy..box", "invalid repository name component"},
      {"busy___box", "invalid repository name component"},
      {"reg_istry.example:5000/app", "invalid registry host"},
      {"registry.example:/app", "invalid registry host"},
      {"registry.example:50a/app", "invalid registry host"},
      {"-registry.example/app", "invalid registry host"},
      {"[::1/app", "invalid registry host"},
      {"[]:5000/app", "invalid registry host"},
      {"[fe80::1%eth0]/app", "invalid registry host"},
      {PAUSE_DIGEST + 7, "image ID"},
      {long_name, "longer than 255"},
      {huge, "longer than 1024"},
      {"bus\xc3\xa9ybox", "non-ASCII"},
  };

  for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
    cleanup_error crimage_error *err = NULL;
    image_ref *r = NULL;
    int res = reference_parse(cases[i].input, NULL, &r, &err);
    if (res >= 0)
      fail_msg("accepted invalid reference \"%s\"", cases[i].input);
    assert_int_equal(res, -EINVAL);
    assert_null(r);
    assert_non_null(err);
    assert_int_equal(err->status, CRIMAGE_INVALID_ARGUMENT);
    assert_true(str_has_prefix(err->message, "invalid reference \""));
    if (!strstr(err->message, cases[i].problem))
      fail_msg("\"%s\": message \"%s\" does not name \"%s\"", cases[i].input, err->message, cases[i].problem);
    /* Bounded, with control characters escaped. */
    assert_true(strlen(err->message) < 600);
    assert_null(strchr(err->message, '\n'));
  }
}

static void test_exact_message(void **state)
{
  cleanup_error crimage_error *err = NULL;
  cleanup_free char *out = NULL;
  assert_int_equal(crimage_reference_normalize("Busybox", NULL, &out, &err), -EINVAL);
  assert_string_equal(err->message, "invalid reference \"Busybox\": repository name must be lowercase");

  crimage_error_clear(&err);
  assert_int_equal(crimage_reference_normalize(NULL, NULL, &out, &err), -EINVAL);
  assert_string_equal(err->message, "invalid reference \"\": empty reference");
}

static void test_limits(void **state)
{
  /* A 128-character tag and a 255-character name are still valid. */
  char ref[512];
  snprintf(ref, sizeof(ref), "busybox:%0128d", 7);
  cleanup_error crimage_error *err = NULL;
  cleanup_reference image_ref *r = NULL;
  assert_int_equal(reference_parse(ref, NULL, &r, &err), 0);
  assert_int_equal(strlen(r->tag), 128);
  reference_free(TAKE_PTR(r));

  /* "docker.io/" (10) + "x/" (2) + 243 = 255 */
  char name[300] = "x/";
  memset(name + 2, 'a', 243);
  name[245] = '\0';
  assert_int_equal(reference_parse(name, NULL, &r, &err), 0);
  cleanup_free char *n = reference_name(r);
  assert_int_equal(strlen(n), 255);
  reference_free(TAKE_PTR(r));
  name[245] = 'a';
  name[246] = '\0';
  assert_int_equal(reference_parse(name, NULL, &r, &err), -EINVAL);
  assert_non_null(strstr(err->message, "longer than 255"));
}

int main(void)
{
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_kubernetes_images_page),
      cmocka_unit_test(test_parts),
      cmocka_unit_test(test_docker_rules),
      cmocka_unit_test(test_default_registry),
      cmocka_unit_test(test_invalid),
      cmocka_unit_test(test_exact_message),
      cmocka_unit_test(test_limits),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
