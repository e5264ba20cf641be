/* The progress tracker: a pull's life (queued, running, blob events, end), joining identical pulls, pulls that
 * never ran, the history bound, watchers woken by changes, the counters, and concurrent feeding. */
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>
#include <errno.h>

#include "common/util.h"
#include "pull/progress.h"

static progress_pull get(progress_tracker *t, uint64_t id)
{
  progress_pull p = {0};
  assert_int_equal(progress_wait(t, id, UINT64_MAX, 0, &p), 1);
  return p;
}

static void ev(progress_tracker *t, uint64_t id, pull_event_kind kind, const char *digest, uint64_t done,
               uint64_t total)
{
  pull_event e = {.kind = kind, .digest = digest, .done = done, .total = total};
  progress_event(t, id, &e);
}

static void test_lifecycle(void **state)
{
  progress_tracker *t = progress_tracker_new(-1);
  uint64_t id = progress_begin(t, "k1", "docker.io/library/a:1", "runc", "pod-1");
  assert_true(id != 0);
  progress_pull p = get(t, id);
  assert_int_equal(p.state, PROGRESS_QUEUED);
  assert_string_equal(p.reference, "docker.io/library/a:1");
  assert_string_equal(p.handler, "runc");
  assert_string_equal(p.pod_uid, "pod-1");
  assert_int_equal(p.started_ms, 0);
  assert_int_equal(p.waiters, 1);
  progress_pull_clear(&p);
  progress_counters c;
  progress_get_counters(t, &c);
  assert_int_equal(c.queued, 1);
  assert_int_equal(c.running, 0);

  progress_start(t, id);
  ev(t, id, PULL_EVENT_RESOLVED, NULL, 0, 1000);
  ev(t, id, PULL_EVENT_BLOB_DONE, "sha256:aa", 100, 100); /* already present: not downloaded */
  ev(t, id, PULL_EVENT_BLOB_START, "sha256:bb", 0, 900);
  ev(t, id, PULL_EVENT_BLOB_PROGRESS, "sha256:bb", 400, 900);
  p = get(t, id);
  assert_int_equal(p.state, PROGRESS_RUNNING);
  assert_true(p.started_ms > 0);
  assert_int_equal(p.bytes_total, 1000);
  assert_int_equal(p.bytes_done, 500);
  assert_int_equal(p.n_blobs, 2);
  assert_string_equal(p.blobs[0].digest, "sha256:aa");
  assert_true(p.blobs[0].finished);
  assert_false(p.blobs[1].finished);
  assert_int_equal(p.blobs[1].done, 400);
  progress_pull_clear(&p);

  /* A restarted transfer goes back; bytes counted only once they pass the old mark. */
  ev(t, id, PULL_EVENT_BLOB_PROGRESS, "sha256:bb", 100, 900);
  ev(t, id, PULL_EVENT_BLOB_PROGRESS, "sha256:bb", 900, 900);
  ev(t, id, PULL_EVENT_BLOB_DONE, "sha256:bb", 900, 900);
  progress_get_counters(t, &c);
  assert_int_equal(c.bytes, 400 + 800);
  assert_int_equal(c.running, 1);
  assert_int_equal(c.queued, 0);

  assert_int_equal(progress_find(t, "docker.io/library/a:1", "runc"), id);
  assert_int_equal(progress_find(t, "docker.io/library/a:1", ""), 0);

  progress_end(t, id, 0, NULL);
  progress_release(t, id, 0, NULL);
  p = get(t, id);
  assert_int_equal(p.state, PROGRESS_SUCCEEDED);
  assert_true(p.ended_ms >= p.started_ms);
  assert_int_equal(p.bytes_done, 1000);
  assert_int_equal(p.waiters, 0);
  progress_pull_clear(&p);
  assert_int_equal(progress_find(t, "docker.io/library/a:1", "runc"), 0);

  progress_pull *list = NULL;
  size_t n = 0;
  progress_list(t, false, &list, &n);
  assert_int_equal(n, 0);
  progress_pull_list_free(list, n);
  progress_list(t, true, &list, &n);
  assert_int_equal(n, 1);
  progress_pull_list_free(list, n);

  progress_get_counters(t, &c);
  assert_int_equal(c.started, 1);
  assert_int_equal(c.succeeded, 1);
  assert_int_equal(c.duration_count, 1);
  assert_int_equal(c.running, 0);
  progress_tracker_free(t);
}

static void test_join_and_failure(void **state)
{
  progress_tracker *t = progress_tracker_new(-1);
  uint64_t a = progress_begin(t, "same", "r", "", NULL);
  uint64_t b = progress_begin(t, "same", "r", "", NULL);
  uint64_t other = progress_begin(t, "other", "r", "", NULL);
  assert_int_equal(a, b);
  assert_true(other != a);
  progress_pull p = get(t, a);
  assert_int_equal(p.waiters, 2);
  progress_pull_clear(&p);

  progress_start(t, a);
  crimage_error *err = NULL;
  crimage_error_set(&err, CRIMAGE_NOT_FOUND, 0, "manifest unknown");
  progress_end(t, a, -ENOENT, err);
  /* Over: a new call with the same key starts a new pull. */
  uint64_t c2 = progress_begin(t, "same", "r", "", NULL);
  assert_true(c2 != a);
  progress_release(t, a, -ENOENT, err);
  progress_release(t, a, -ENOENT, err);
  p = get(t, a);
  assert_int_equal(p.state, PROGRESS_FAILED);
  assert_string_equal(p.error, "manifest unknown");
  progress_pull_clear(&p);

  /* Never ran (the queue was full): failed, but not a started pull. */
  crimage_error *full = NULL;
  crimage_error_set(&full, CRIMAGE_RESOURCE_EXHAUSTED, 0, "queue full");
  progress_release(t, other, -EAGAIN, full);
  p = get(t, other);
  assert_int_equal(p.state, PROGRESS_FAILED);
  progress_pull_clear(&p);
  progress_release(t, c2, 0, NULL);

  progress_count_backoff(t);
  progress_counters c;
  progress_get_counters(t, &c);
  assert_int_equal(c.started, 1);
  assert_int_equal(c.succeeded, 0);
  assert_int_equal(c.failed[CRIMAGE_NOT_FOUND], 1);
  assert_int_equal(c.failed[CRIMAGE_RESOURCE_EXHAUSTED], 0);
  assert_int_equal(c.backoffs, 1);
  assert_int_equal(c.queued, 0);
  crimage_error_free(err);
  crimage_error_free(full);
  progress_tracker_free(t);
}

static void test_history_bound(void **state)
{
  progress_tracker *t = progress_tracker_new(-1);
  uint64_t first = 0;
  for (int i = 0; i < PROGRESS_HISTORY + 10; i++) {
    cleanup_free char *key = xasprintf("k%d", i);
    uint64_t id = progress_begin(t, key, key, "", NULL);
    if (i == 0)
      first = id;
    progress_start(t, id);
    progress_end(t, id, 0, NULL);
    progress_release(t, id, 0, NULL);
  }
  progress_pull *list = NULL;
  size_t n = 0;
  progress_list(t, true, &list, &n);
  assert_int_equal(n, PROGRESS_HISTORY);
  progress_pull_list_free(list, n);
  progress_pull p = {0};
  assert_int_equal(progress_wait(t, first, 0, 0, &p), 0);
  assert_int_equal(progress_wait(t, 424242, 0, 0, &p), 0);
  /* Unknown ids are ignored everywhere. */
  progress_start(t, 424242);
  ev(t, 424242, PULL_EVENT_RESOLVED, NULL, 0, 1);
  progress_end(t, 424242, 0, NULL);
  progress_release(t, 424242, 0, NULL);
  progress_tracker_free(t);
}

typedef struct feeder {
  progress_tracker *t;
  uint64_t id;
  int n;
  char digest[32];
} feeder;

static void *feed(void *arg)
{
  feeder *f = arg;
  ev(f->t, f->id, PULL_EVENT_BLOB_START, f->digest, 0, (uint64_t) f->n);
  for (int i = 1; i <= f->n; i++)
    ev(f->t, f->id, PULL_EVENT_BLOB_PROGRESS, f->digest, (uint64_t) i, (uint64_t) f->n);
  ev(f->t, f->id, PULL_EVENT_BLOB_DONE, f->digest, (uint64_t) f->n, (uint64_t) f->n);
  return NULL;
}


static void test_concurrent_and_wait(void **state)
{
  progress_tracker *t = progress_tracker_new(-1);
  uint64_t id = progress_begin(t, "k", "r", "", NULL);
  progress_start(t, id);
  progress_pull p = get(t, id);
  uint64_t v0 = p.version;
  progress_pull_clear(&p);

  feeder f[4];
  pthread_t th[4];
  for (int i = 0; i < 4; i++) {
    f[i] = (feeder){.t = t, .id = id, .n = 2000};
    snprintf(f[i].digest, sizeof(f[i].digest), "sha256:%02d", i);
    assert_int_equal(pthread_create(&th[i], NULL, feed, &f[i]), 0);
  }
  /* A watcher sees a newer version. */
  assert_int_equal(progress_wait(t, id, v0, 10000, &p), 1);
  assert_true(p.version > v0);
  progress_pull_clear(&p);
  for (int i = 0; i < 4; i++)
    pthread_join(th[i], NULL);
  p = get(t, id);
  assert_int_equal(p.n_blobs, 4);
  assert_int_equal(p.bytes_done, 8000);
  progress_pull_clear(&p);
  progress_counters c;
  progress_get_counters(t, &c);
  assert_int_equal(c.bytes, 8000);

  /* A wait with no change times out and still returns the pull. */
  p = get(t, id);
  uint64_t v = p.version;
  progress_pull_clear(&p);
  assert_int_equal(progress_wait(t, id, v, 50, &p), 1);
  assert_int_equal(p.version, v);
  progress_pull_clear(&p);
  progress_end(t, id, 0, NULL);
  progress_release(t, id, 0, NULL);
  progress_tracker_free(t);
}

int main(void)
{
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_lifecycle),
      cmocka_unit_test(test_join_and_failure),
      cmocka_unit_test(test_history_bound),
      cmocka_unit_test(test_concurrent_and_wait),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
