/* The back-off table: window growth, cap, reset, expiry, bounded size, concurrent use. Time is passed in. */
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "common/util.h"
#include "pull/backoff.h"

#define KEY "runc\x1f" "docker.io/library/busybox:latest"

static void test_doubling_and_cap(void **state)
{
  cleanup_backoff backoff *b = backoff_new(0, 0, 0); /* defaults: 10 s doubling to 300 s */
  int64_t t = 1000000;
  assert_false(backoff_check(b, KEY, t, NULL, NULL));

  const int64_t want[] = {10000, 20000, 40000, 80000, 160000, 300000, 300000};
  for (size_t i = 0; i < ARRAY_SIZE(want); i++) {
    int64_t retry_at = backoff_fail(b, KEY, t, "manifest unknown");
    assert_int_equal(retry_at, t + want[i]);

    int64_t at = 0;
    cleanup_free char *last = NULL;
    assert_true(backoff_check(b, KEY, t, &at, &last));
    assert_int_equal(at, t + want[i]);
    assert_string_equal(last, "manifest unknown");
    assert_true(backoff_check(b, KEY, t + want[i] - 1, NULL, NULL));
    /* The window is half-open: at retry_at a new try is allowed. */
    assert_false(backoff_check(b, KEY, t + want[i], NULL, NULL));
    t += want[i];
  }
  assert_int_equal(backoff_count(b), 1);
}

static void test_success_resets(void **state)
{
  cleanup_backoff backoff *b = backoff_new(1000, 8000, 0);
  assert_int_equal(backoff_fail(b, KEY, 0, NULL), 1000);
  assert_int_equal(backoff_fail(b, KEY, 1000, NULL), 3000);

  int64_t at = -1;
  char *last = (char *) "untouched";
  assert_true(backoff_check(b, KEY, 1500, &at, &last));
  assert_null(last); /* no error text was given */
  assert_int_equal(at, 3000);

  backoff_success(b, KEY);
  assert_false(backoff_check(b, KEY, 1500, NULL, NULL));
  assert_int_equal(backoff_count(b), 0);
  assert_int_equal(backoff_fail(b, KEY, 2000, "x"), 3000); /* starts over at the initial delay */
  backoff_success(b, "unknown key");                       /* harmless */
}

static void test_keys_independent(void **state)
{
  cleanup_backoff backoff *b = backoff_new(1000, 60000, 0);
  backoff_fail(b, "runc\x1fimg", 0, "a");
  backoff_fail(b, "runc\x1fimg", 0, "b");
  assert_int_equal(backoff_fail(b, "kata\x1fimg", 0, "c"), 1000);
  cleanup_free char *last = NULL;
  int64_t at;
  assert_true(backoff_check(b, "runc\x1fimg", 1500, &at, &last));
  assert_int_equal(at, 2000);
  assert_string_equal(last, "b");
  assert_false(backoff_check(b, "kata\x1fimg", 1500, NULL, NULL));
  assert_false(backoff_check(b, "other", 0, NULL, NULL));
}

static void test_expiry(void **state)
{
  cleanup_backoff backoff *b = backoff_new(1000, 4000, 0);
  for (int i = 0; i < 5; i++)
    backoff_fail(b, KEY, 0, NULL);
  /* An entry idle for more than 2*max is forgotten: the next failure starts at the initial delay again. */
  assert_int_equal(backoff_fail(b, KEY, 8000, NULL), 8000 + 4000);
  assert_int_equal(backoff_fail(b, KEY, 16001, NULL), 16001 + 1000);

  /* Garbage collection on fail drops other idle keys. */
  backoff_fail(b, "old", 20000, NULL);
  assert_int_equal(backoff_count(b), 2);
  backoff_fail(b, "new", 28001, NULL);
  assert_int_equal(backoff_count(b), 1);
  /* A check also drops an expired key. */
  assert_false(backoff_check(b, "new", 40000, NULL, NULL));
  assert_int_equal(backoff_count(b), 0);
}

static void test_bounded(void **state)
{
  cleanup_backoff backoff *b = backoff_new(1000, 100000, 3);
  backoff_fail(b, "a", 1, NULL);
  backoff_fail(b, "b", 2, NULL);
  backoff_fail(b, "c", 3, NULL);
  backoff_fail(b, "a", 4, NULL); /* "a" is now the most recently updated */
  backoff_fail(b, "d", 5, NULL); /* evicts "b", updated longest ago */
  assert_int_equal(backoff_count(b), 3);
  assert_false(backoff_check(b, "b", 6, NULL, NULL));
  assert_true(backoff_check(b, "a", 6, NULL, NULL));
  assert_true(backoff_check(b, "c", 6, NULL, NULL));
  assert_true(backoff_check(b, "d", 6, NULL, NULL));
}

static void test_long_error_truncated(void **state)
{
  cleanup_backoff backoff *b = backoff_new(0, 0, 0);
  char *big = xmalloc(10000);
  memset(big, 'e', 9999);
  big[9999] = '\0';
  backoff_fail(b, KEY, 0, big);
  free(big);
  cleanup_free char *last = NULL;
  assert_true(backoff_check(b, KEY, 0, NULL, &last));
  assert_int_equal(strlen(last), BACKOFF_ERROR_MAX);
}

struct worker {
  backoff *b;
  int id;
};

static void *hammer(void *arg)
{
  struct worker *w = arg;
  char key[32];
  for (int i = 0; i < 2000; i++) {
    snprintf(key, sizeof(key), "k%d", (w->id * 7 + i) % 50);
    backoff_fail(w->b, key, i, "boom");
    char *last = NULL;
    if (backoff_check(w->b, key, i, NULL, &last))
      free(last);
    if (i % 3 == 0)
      backoff_success(w->b, key);
  }
  return NULL;
}

static void test_threads(void **state)
{
  cleanup_backoff backoff *b = backoff_new(1000, 10000, 40);
  pthread_t t[4];
  struct worker w[4];
  for (int i = 0; i < 4; i++) {
    w[i] = (struct worker){b, i};
    assert_int_equal(pthread_create(&t[i], NULL, hammer, &w[i]), 0);
  }
  for (int i = 0; i < 4; i++)
    pthread_join(t[i], NULL);
  assert_true(backoff_count(b) <= 40);
}

int main(void)
{
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_doubling_and_cap), cmocka_unit_test(test_success_resets),
      cmocka_unit_test(test_keys_independent), cmocka_unit_test(test_expiry),
      cmocka_unit_test(test_bounded),          cmocka_unit_test(test_long_error_truncated),
      cmocka_unit_test(test_threads),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
