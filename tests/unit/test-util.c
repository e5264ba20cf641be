/* Helpers of common/util: numbers and durations from outside are range-checked before any arithmetic. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "common/util.h"

static void test_parse_u64_decimal(void **state)
{
  uint64_t v = 7;
  assert_int_equal(parse_u64_decimal("0", &v), 0);
  assert_int_equal(v, 0);
  assert_int_equal(parse_u64_decimal("18446744073709551615", &v), 0);
  assert_true(v == UINT64_MAX);
  /* Too large: an error, and the value saturated for a caller that caps. */
  v = 7;
  assert_int_equal(parse_u64_decimal("18446744073709551616", &v), -ERANGE);
  assert_true(v == UINT64_MAX);
  assert_int_equal(parse_u64_decimal("99999999999999999999999999999999999999", &v), -ERANGE);
  assert_true(v == UINT64_MAX);
  /* Digits only: what strtoull would also take is refused. */
  const char *bad[] = {"", "-1", " -1", "+5", " 5", "5 ", "0x10", "1e3", "1.5", "12a", "-0"};
  for (size_t i = 0; i < ARRAY_SIZE(bad); i++) {
    v = 7;
    assert_int_equal(parse_u64_decimal(bad[i], &v), -EINVAL);
    assert_int_equal(v, 7);
  }
  assert_int_equal(parse_u64_decimal(NULL, &v), -EINVAL);
}

static void test_u64_add_sat(void **state)
{
  assert_true(u64_add_sat(1, 2) == 3);
  assert_true(u64_add_sat(UINT64_MAX, 1) == UINT64_MAX);
  assert_true(u64_add_sat((uint64_t) INT64_MAX, (uint64_t) INT64_MAX + 2) == UINT64_MAX);
  assert_true(u64_add_sat(UINT64_MAX - 1, 1) == UINT64_MAX);
}

static void test_parse_duration(void **state)
{
  struct {
    const char *s;
    int64_t ms;
  } good[] = {{"0", 0}, {"10s", 10000}, {"5m", 300000}, {"1h30m", 5400000}, {"300ms", 300},
              {"1.5s", 1500}, {".5s", 500}, {"1.s", 1000}, {"2h45m30.5s", 9930500}};
  for (size_t i = 0; i < ARRAY_SIZE(good); i++) {
    int64_t ms = -1;
    assert_int_equal(parse_duration_ms(good[i].s, &ms), 0);
    assert_int_equal(ms, good[i].ms);
  }
  /* strtod's extras are no Go durations: a NaN would even make the conversion to int64 undefined. */
  const char *bad[] = {"", "s", "10", "nans", "nanms", "infs", "+1s", "-1s", "1e3s", "0x10s", ".s", "1..5s", " 1s",
                       "1s ", "1x"};
  for (size_t i = 0; i < ARRAY_SIZE(bad); i++) {
    int64_t ms = -1;
    assert_true(parse_duration_ms(bad[i], &ms) < 0);
    assert_int_equal(ms, -1);
  }
  int64_t ms = -1;
  assert_int_equal(parse_duration_ms("99999999999999999999999999999999h", &ms), -ERANGE);
  assert_int_equal(parse_duration_ms("3000000000h", &ms), -ERANGE);
  assert_int_equal(ms, -1);
}

static void test_utf8(void **state)
{
  struct {
    const char *s;
    size_t len;
    bool ok;
  } cases[] = {
      {"", 0, true},
      {"plain ascii", 11, true},
      {"\xc3\xa4", 2, true},             /* U+00E4 */
      {"\xe2\x82\xac", 3, true},         /* U+20AC */
      {"\xf0\x9f\x90\xb3", 4, true},     /* U+1F433 */
      {"\xf4\x8f\xbf\xbf", 4, true},     /* U+10FFFF, the last */
      {"\xed\x9f\xbf", 3, true},         /* U+D7FF, just below the surrogates */
      {"a\0b", 3, true},                 /* a NUL is UTF-8; the wire check refuses it on its own */
      {"\xc0", 1, false},                /* a lone lead byte */
      {"\x80", 1, false},                /* a lone continuation byte */
      {"\xc0\xaf", 2, false},            /* overlong "/" */
      {"\xc1\xbf", 2, false},            /* overlong */
      {"\xe0\x80\xaf", 3, false},        /* overlong "/" */
      {"\xf0\x80\x80\xaf", 4, false},    /* overlong "/" */
      {"\xed\xa0\x80", 3, false},        /* U+D800, a surrogate */
      {"\xf4\x90\x80\x80", 4, false},    /* U+110000 */
      {"\xf5\x80\x80\x80", 4, false},
      {"\xff", 1, false},
      {"\xe2\x82", 2, false},            /* cut short */
      {"\xe2\x28\xa1", 3, false},        /* a bad continuation */
  };
  for (size_t i = 0; i < ARRAY_SIZE(cases); i++)
    if (utf8_valid(cases[i].s, cases[i].len) != cases[i].ok)
      fail_msg("case %zu: expected %s", i, cases[i].ok ? "valid" : "invalid");
}

static void test_utf8_repair(void **state)
{
  char a[] = "ok \xc3\xa4 \xf0\x9f\x90\xb3";
  assert_int_equal(utf8_repair(a), 0);
  assert_string_equal(a, "ok \xc3\xa4 \xf0\x9f\x90\xb3");
  char b[] = "k\xffta \xc0\xaf \xe2\x82 end\xed\xa0\x80";
  assert_int_equal(utf8_repair(b), 8);
  assert_string_equal(b, "k?ta ?? ?? end???");
  assert_true(utf8_valid(b, strlen(b)));
}

int main(void)
{
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_utf8),
      cmocka_unit_test(test_utf8_repair),
      cmocka_unit_test(test_parse_u64_decimal),
      cmocka_unit_test(test_u64_add_sat),
      cmocka_unit_test(test_parse_duration),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
