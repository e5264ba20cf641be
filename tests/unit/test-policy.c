/* Pull policies: Kubernetes defaulting, parsing and names, through the internal and the public API. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "common/util.h"
#include "pull/policy.h"

#define DIGEST "sha256:1ff6c18fbef2045af6b9c16bf034cc421a29027b800e4f9b68ae9b1cb3e9ae07"

static void test_default(void **state)
{
  static const struct {
    const char *image;
    pull_policy want;
  } table[] = {
      {"busybox", PULL_POLICY_ALWAYS},
      {"busybox:latest", PULL_POLICY_ALWAYS},
      {"registry.k8s.io/pause", PULL_POLICY_ALWAYS},
      {"registry.k8s.io/pause:latest", PULL_POLICY_ALWAYS},
      {"busybox:1.32.0", PULL_POLICY_IF_NOT_PRESENT},
      {"registry.k8s.io/pause:3.5", PULL_POLICY_IF_NOT_PRESENT},
      {"fictional.registry.example:10443/imagename", PULL_POLICY_ALWAYS},
      {"fictional.registry.example:10443/imagename:v1", PULL_POLICY_IF_NOT_PRESENT},
      {"registry.k8s.io/pause@" DIGEST, PULL_POLICY_IF_NOT_PRESENT},
      {"registry.k8s.io/pause:3.5@" DIGEST, PULL_POLICY_IF_NOT_PRESENT},
      {"registry.k8s.io/pause:latest@" DIGEST, PULL_POLICY_IF_NOT_PRESENT},
      {"busybox:Latest", PULL_POLICY_IF_NOT_PRESENT}, /* tags are case-sensitive */
  };
  for (size_t i = 0; i < ARRAY_SIZE(table); i++) {
    cleanup_error crimage_error *err = NULL;
    pull_policy p = PULL_POLICY_NEVER;
    assert_int_equal(pull_policy_default(table[i].image, &p, &err), 0);
    if (p != table[i].want)
      fail_msg("%s: got %s, want %s", table[i].image, pull_policy_name(p), pull_policy_name(table[i].want));

    crimage_pull_policy cp = CRIMAGE_PULL_NEVER;
    assert_int_equal(crimage_pull_policy_default(table[i].image, &cp, &err), 0);
    assert_int_equal((int) cp, (int) table[i].want);
  }
}

static void test_default_invalid(void **state)
{
  cleanup_error crimage_error *err = NULL;
  crimage_pull_policy p = CRIMAGE_PULL_NEVER;
  assert_int_equal(crimage_pull_policy_default("Busybox", &p, &err), -EINVAL);
  assert_int_equal(p, CRIMAGE_PULL_NEVER); /* untouched on failure */
  assert_int_equal(err->status, CRIMAGE_INVALID_ARGUMENT);
  assert_non_null(strstr(err->message, "must be lowercase"));
}

static void test_parse_and_names(void **state)
{
  const char *names[] = {"Always", "IfNotPresent", "Never"};
  for (int i = 0; i < 3; i++) {
    pull_policy p;
    assert_int_equal(pull_policy_parse(names[i], &p), 0);
    assert_int_equal(p, i);
    assert_string_equal(pull_policy_name(p), names[i]);
    crimage_pull_policy cp;
    assert_int_equal(crimage_pull_policy_parse(names[i], &cp), 0);
    assert_int_equal(cp, i);
    assert_string_equal(crimage_pull_policy_name(cp), names[i]);
  }
  const char *bad[] = {"", "always", "ifnotpresent", "IfNotPresent ", "Sometimes", NULL};
  for (size_t i = 0; bad[i]; i++) {
    pull_policy p = PULL_POLICY_NEVER;
    assert_int_equal(pull_policy_parse(bad[i], &p), -EINVAL);
    assert_int_equal(p, PULL_POLICY_NEVER);
  }
  pull_policy p;
  assert_int_equal(pull_policy_parse(NULL, &p), -EINVAL);
  assert_string_equal(pull_policy_name((pull_policy) 42), "Unknown");
}

int main(void)
{
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_default),
      cmocka_unit_test(test_default_invalid),
      cmocka_unit_test(test_parse_and_names),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
