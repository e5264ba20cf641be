/* OCI platforms: host detection, parsing, alias normalization and matching. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/utsname.h>

#include <cmocka.h>

#include "common/util.h"
#include "pull/platform.h"

static void check_parse(const char *in, const char *want)
{
  cleanup_error crimage_error *err = NULL;
  platform p;
  char buf[128];
  if (platform_parse(in, &p, &err) < 0)
    fail_msg("%s: %s", in, err->message);
  assert_string_equal(platform_string(&p, buf, sizeof(buf)), want);
}

static void test_parse(void **state)
{
  check_parse("linux/amd64", "linux/amd64");
  check_parse("windows/amd64", "windows/amd64");
  check_parse("linux/arm64", "linux/arm64/v8");
  check_parse("linux/arm64/v8", "linux/arm64/v8");
  check_parse("linux/arm64/8", "linux/arm64/v8");
  check_parse("linux/arm", "linux/arm/v7");
  check_parse("linux/arm/v6", "linux/arm/v6");
  check_parse("linux/arm/7", "linux/arm/v7");
  check_parse("linux/aarch64", "linux/arm64/v8");
  check_parse("linux/x86_64", "linux/amd64");
  check_parse("linux/x86-64", "linux/amd64");
  check_parse("linux/amd64/v1", "linux/amd64");
  check_parse("linux/amd64/v3", "linux/amd64/v3");
  check_parse("linux/armhf", "linux/arm/v7");
  check_parse("linux/armel", "linux/arm/v6");
  check_parse("linux/i686", "linux/386");
  check_parse("Linux/AMD64", "linux/amd64");
  check_parse("linux/ppc64le", "linux/ppc64le");
  check_parse("linux/s390x", "linux/s390x");
  check_parse("linux/riscv64", "linux/riscv64");
}

static void test_parse_invalid(void **state)
{
  const char *bad[] = {"", "linux", "linux/", "/amd64", "linux//v8", "linux/arm64/v8/x", "linux/amd 64",
                       "linux/amd64\n", "linux/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", NULL};
  for (size_t i = 0; bad[i]; i++) {
    cleanup_error crimage_error *err = NULL;
    platform p;
    if (platform_parse(bad[i], &p, &err) >= 0)
      fail_msg("accepted \"%s\"", bad[i]);
    assert_int_equal(err->status, CRIMAGE_INVALID_ARGUMENT);
    assert_non_null(strstr(err->message, "platform"));
  }
  cleanup_error crimage_error *err = NULL;
  platform p;
  assert_int_equal(platform_parse(NULL, &p, &err), -EINVAL);
}

static void test_host(void **state)
{
  platform p;
  platform_host(&p);
  assert_string_equal(p.os, "linux");
  struct utsname u;
  assert_int_equal(uname(&u), 0);
  if (streq(u.machine, "x86_64")) {
    assert_string_equal(p.architecture, "amd64");
    assert_string_equal(p.variant, "");
  } else if (streq(u.machine, "aarch64")) {
    assert_string_equal(p.architecture, "arm64");
    assert_string_equal(p.variant, "v8");
  }
  /* Whatever the machine, the host is a normalized platform that matches itself. */
  platform q = p;
  platform_normalize(&q);
  assert_memory_equal(&p, &q, sizeof(p));
  assert_true(platform_match(&p, &q));
}

static void test_normalize_uname_names(void **state)
{
  static const struct {
    const char *machine, *arch, *variant;
  } table[] = {
      {"x86_64", "amd64", ""}, {"aarch64", "arm64", "v8"}, {"armv7l", "arm", "v7"}, {"armv6l", "arm", "v6"},
      {"i686", "386", ""},     {"ppc64le", "ppc64le", ""}, {"s390x", "s390x", ""},  {"riscv64", "riscv64", ""},
  };
  for (size_t i = 0; i < ARRAY_SIZE(table); i++) {
    platform p = {.os = "linux"};
    snprintf(p.architecture, sizeof(p.architecture), "%s", table[i].machine);
    platform_normalize(&p);
    assert_string_equal(p.architecture, table[i].arch);
    assert_string_equal(p.variant, table[i].variant);
  }
}

static platform P(const char *s)
{
  platform p;
  cleanup_error crimage_error *err = NULL;
  if (platform_parse(s, &p, &err) < 0)
    fail_msg("%s", err->message);
  return p;
}

static void test_match(void **state)
{
  platform want = P("linux/amd64");
  assert_true(platform_match(&want, &(platform){.os = "linux", .architecture = "amd64"}));
  assert_false(platform_match(&want, &(platform){.os = "linux", .architecture = "arm64"}));
  assert_false(platform_match(&want, &(platform){.os = "windows", .architecture = "amd64"}));

  /* An arm64 index entry without a variant is an arm64/v8 image. */
  want = P("linux/arm64/v8");
  assert_true(platform_match(&want, &(platform){.os = "linux", .architecture = "arm64"}));
  assert_true(platform_match(&want, &(platform){.os = "linux", .architecture = "arm64", .variant = "v8"}));
  assert_false(platform_match(&want, &(platform){.os = "linux", .architecture = "arm64", .variant = "v9"}));

  /* arm: exact variant after defaulting, no fallback to older variants. */
  want = P("linux/arm/v7");
  assert_true(platform_match(&want, &(platform){.os = "linux", .architecture = "arm"}));
  assert_true(platform_match(&want, &(platform){.os = "linux", .architecture = "arm", .variant = "v7"}));
  assert_false(platform_match(&want, &(platform){.os = "linux", .architecture = "arm", .variant = "v6"}));
  want = P("linux/arm/v6");
  assert_false(platform_match(&want, &(platform){.os = "linux", .architecture = "arm"}));
  assert_true(platform_match(&want, &(platform){.os = "linux", .architecture = "arm", .variant = "v6"}));

  /* Raw spellings on either side are normalized before comparing. */
  platform raw = {.os = "linux", .architecture = "aarch64"};
  assert_true(platform_match(&raw, &(platform){.os = "linux", .architecture = "arm64", .variant = "v8"}));
}

static void test_string(void **state)
{
  char buf[8];
  platform p = P("linux/arm64");
  assert_string_equal(platform_string(&p, buf, sizeof(buf)), "linux/a");
  char big[64];
  assert_string_equal(platform_string(&p, big, sizeof(big)), "linux/arm64/v8");
}

int main(void)
{
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_parse),          cmocka_unit_test(test_parse_invalid),
      cmocka_unit_test(test_host),           cmocka_unit_test(test_normalize_uname_names),
      cmocka_unit_test(test_match),          cmocka_unit_test(test_string),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
