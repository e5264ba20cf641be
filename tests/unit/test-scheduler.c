/* The pull scheduler with real threads. Assertions are on counts of concurrently running jobs and on start order,
 * never on durations; waits are on condition variables or on the scheduler's own counters. */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include <cmocka.h>

#include "common/util.h"
#include "pull/scheduler.h"

#define MAX_JOBS 64
#define NPODS 4
/* Guards against a hang when the scheduler is wrong; never reached when it is right. */
#define GUARD_SECONDS 20

typedef struct tracker {
  pthread_mutex_t m;
  pthread_cond_t c;
  int current, peak, runs;
  int pod_current[NPODS], pod_peak[NPODS];
  int order[MAX_JOBS];
  int norder;
  bool released; /* gate for jobs with hold = true */
} tracker;

typedef struct call {
  scheduler *s;
  tracker *t;
  int id;
  int pod;       /* -1: none */
  const char *key; /* NULL: none */
  int wait_peak; /* the job waits until this many jobs ran at once (or the guard) */
  bool hold;     /* the job waits until the tracker is released */
  bool fail;
  pthread_t th;
  bool joined;
  int ret;
  char *result;
  crimage_error *err;
} call;

static void tracker_init(tracker *t)
{
  memset(t, 0, sizeof(*t));
  pthread_mutex_init(&t->m, NULL);
  pthread_cond_init(&t->c, NULL);
}

static void tracker_destroy(tracker *t)
{
  pthread_mutex_destroy(&t->m);
  pthread_cond_destroy(&t->c);
}

static struct timespec guard_deadline(void)
{
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  ts.tv_sec += GUARD_SECONDS;
  return ts;
}

static void tracker_release(tracker *t)
{
  pthread_mutex_lock(&t->m);
  t->released = true;
  pthread_cond_broadcast(&t->c);
  pthread_mutex_unlock(&t->m);
}

/* Waits until job `id` has started. */
static void wait_started(tracker *t, int id)
{
  struct timespec dl = guard_deadline();
  pthread_mutex_lock(&t->m);
  for (;;) {
    bool found = false;
    for (int i = 0; i < t->norder; i++)
      found |= t->order[i] == id;
    if (found || pthread_cond_timedwait(&t->c, &t->m, &dl) == ETIMEDOUT)
      break;
  }
  pthread_mutex_unlock(&t->m);
}

static bool started(tracker *t, int id)
{
  bool found = false;
  pthread_mutex_lock(&t->m);
  for (int i = 0; i < t->norder; i++)
    found |= t->order[i] == id;
  pthread_mutex_unlock(&t->m);
  return found;
}

static int job(void *ud, void **ret_result, crimage_error **err)
{
  call *c = ud;
  tracker *t = c->t;
  struct timespec dl = guard_deadline();

  pthread_mutex_lock(&t->m);
  t->current++;
  if (t->current > t->peak)
    t->peak = t->current;
  if (c->pod >= 0) {
    t->pod_current[c->pod]++;
    if (t->pod_current[c->pod] > t->pod_peak[c->pod])
      t->pod_peak[c->pod] = t->pod_current[c->pod];
  }
  t->order[t->norder++] = c->id;
  t->runs++;
  pthread_cond_broadcast(&t->c);
  while ((t->peak < c->wait_peak || (c->hold && !t->released)) &&
         pthread_cond_timedwait(&t->c, &t->m, &dl) != ETIMEDOUT)
    ;
  pthread_mutex_unlock(&t->m);

  usleep(2000); /* lets other jobs overlap with this one if the scheduler (wrongly) allowed it */

  pthread_mutex_lock(&t->m);
  t->current--;
  if (c->pod >= 0)
    t->pod_current[c->pod]--;
  pthread_mutex_unlock(&t->m);

  if (c->fail)
    return crimage_error_set(err, CRIMAGE_NOT_FOUND, 0, "job %d failed", c->id);
  *ret_result = xasprintf("result-%d", c->id);
  return 0;
}

static void *copy_string(const void *p) { return xstrdup(p); }

static void *call_thread(void *arg)
{
  call *c = arg;
  char pod[16];
  if (c->pod >= 0)
    snprintf(pod, sizeof(pod), "pod-%d", c->pod);
  void *result = NULL;
  c->ret = scheduler_run(c->s, c->key, c->pod >= 0 ? pod : NULL, job, c, &result, free, copy_string, &c->err);
  c->result = result;
  return NULL;
}

static void start(call *c) { assert_int_equal(pthread_create(&c->th, NULL, call_thread, c), 0); }

static void join_call(call *c)
{
  assert_false(c->joined);
  assert_int_equal(pthread_join(c->th, NULL), 0);
  c->joined = true;
}

static void finish(call *c)
{
  if (!c->joined)
    join_call(c);
  free(c->result);
  c->result = NULL;
  crimage_error_clear(&c->err);
}

static void wait_stats(scheduler *s, size_t queued, size_t running, uint64_t joined)
{
  for (int i = 0; i < GUARD_SECONDS * 1000; i++) {
    scheduler_stats st;
    scheduler_get_stats(s, &st);
    if (st.queued == queued && st.running == running && st.joined_total == joined)
      return;
    usleep(1000);
  }
  fail_msg("scheduler never reached queued=%zu running=%zu joined=%" PRIu64, queued, running, joined);
}

static scheduler *make(bool serialize, int max_parallel, size_t queue_max)
{
  scheduler_options o;
  scheduler_options_init(&o);
  o.serialize = serialize;
  o.max_parallel = max_parallel;
  o.queue_max = queue_max;
  scheduler *s = NULL;
  cleanup_error crimage_error *err = NULL;
  assert_int_equal(scheduler_new(&o, &s, &err), 0);
  return s;
}

static void run_many(scheduler *s, tracker *t, int n, int wait_peak, int npods)
{
  call c[MAX_JOBS];
  for (int i = 0; i < n; i++) {
    c[i] = (call){.s = s, .t = t, .id = i, .pod = npods ? i % npods : -1, .wait_peak = wait_peak};
    start(&c[i]);
  }
  for (int i = 0; i < n; i++) {
    join_call(&c[i]);
    assert_int_equal(c[i].ret, 0);
    char want[32];
    snprintf(want, sizeof(want), "result-%d", i);
    assert_string_equal(c[i].result, want);
    free(c[i].result);
  }
}

static void test_options(void **state)
{
  scheduler_options o;
  scheduler_options_init(&o);
  /* kubelet schedules its own pulls: by default the service does not serialize them again (as containerd). */
  assert_false(o.serialize);
  assert_int_equal(o.max_parallel, 0);
  cleanup_error crimage_error *err = NULL;
  assert_int_equal(scheduler_options_validate(&o, &err), 0);
  o.serialize = true;
  o.max_parallel = 1;
  assert_int_equal(scheduler_options_validate(&o, &err), 0);
  o.max_parallel = 2;
  assert_int_equal(scheduler_options_validate(&o, &err), -EINVAL);
  assert_int_equal(err->status, CRIMAGE_INVALID_ARGUMENT);
  assert_non_null(strstr(err->message, "serializeImagePulls"));
  assert_non_null(strstr(err->message, "maxParallelImagePulls (2)"));
  crimage_error_clear(&err);
  o.serialize = false;
  assert_int_equal(scheduler_options_validate(&o, &err), 0);
  o.max_parallel = 0;
  assert_int_equal(scheduler_options_validate(&o, &err), 0);
  o.max_parallel = -1;
  scheduler *s = NULL;
  assert_int_equal(scheduler_new(&o, &s, &err), -EINVAL);
  assert_null(s);
  assert_non_null(strstr(err->message, "must not be negative"));
}

static void test_serialized_never_overlaps(void **state)
{
  cleanup_scheduler scheduler *s = make(true, 0, 0);
  tracker t;
  tracker_init(&t);
  run_many(s, &t, 12, 0, 0);
  assert_int_equal(t.runs, 12);
  assert_int_equal(t.peak, 1);
  tracker_destroy(&t);
}

static void test_max_parallel_two(void **state)
{
  cleanup_scheduler scheduler *s = make(false, 2, 0);
  tracker t;
  tracker_init(&t);
  /* Every job waits until two ran at once: the run finishes only if the scheduler allows two. */
  run_many(s, &t, 12, 2, 0);
  assert_int_equal(t.runs, 12);
  assert_int_equal(t.peak, 2);
  tracker_destroy(&t);
}

static void test_unlimited(void **state)
{
  cleanup_scheduler scheduler *s = make(false, 0, 0);
  tracker t;
  tracker_init(&t);
  run_many(s, &t, 6, 6, 0);
  assert_int_equal(t.peak, 6);
  tracker_destroy(&t);
}

static void test_same_pod_never_overlaps(void **state)
{
  cleanup_scheduler scheduler *s = make(false, 0, 0);
  tracker t;
  tracker_init(&t);
  /* 12 jobs over 2 pods with no node limit: the two pods run side by side, each pod one at a time. */
  run_many(s, &t, 12, 2, 2);
  assert_int_equal(t.runs, 12);
  assert_int_equal(t.pod_peak[0], 1);
  assert_int_equal(t.pod_peak[1], 1);
  assert_int_equal(t.peak, 2);
  tracker_destroy(&t);
}

static void test_busy_pod_does_not_block_others(void **state)
{
  cleanup_scheduler scheduler *s = make(false, 2, 0);
  tracker t;
  tracker_init(&t);
  call a1 = {.s = s, .t = &t, .id = 1, .pod = 0, .hold = true};
  call a2 = {.s = s, .t = &t, .id = 2, .pod = 0};
  call b1 = {.s = s, .t = &t, .id = 3, .pod = 1, .hold = true};
  start(&a1);
  wait_started(&t, 1);
  start(&a2);
  wait_stats(s, 1, 1, 0); /* a2 queued behind its own pod */
  start(&b1);
  wait_started(&t, 3); /* b1 starts although a2 is ahead of it */
  assert_true(started(&t, 3));
  assert_false(started(&t, 2));
  wait_stats(s, 1, 2, 0);
  tracker_release(&t);
  finish(&a1);
  finish(&a2);
  finish(&b1);
  assert_int_equal(t.pod_peak[0], 1);
  assert_int_equal(t.order[0], 1);
  assert_int_equal(t.order[1], 3);
  assert_int_equal(t.order[2], 2);
  tracker_destroy(&t);
}

static void test_fifo(void **state)
{
  cleanup_scheduler scheduler *s = make(true, 0, 0);
  tracker t;
  tracker_init(&t);
  call c[6];
  for (int i = 0; i < 6; i++) {
    c[i] = (call){.s = s, .t = &t, .id = i, .pod = -1, .hold = i == 0};
    start(&c[i]);
    if (i == 0)
      wait_started(&t, 0);
    else
      wait_stats(s, (size_t) i, 1, 0);
  }
  tracker_release(&t);
  for (int i = 0; i < 6; i++)
    finish(&c[i]);
  for (int i = 0; i < 6; i++)
    assert_int_equal(t.order[i], i);
  tracker_destroy(&t);
}

static void test_dedupe(void **state)
{
  cleanup_scheduler scheduler *s = make(false, 0, 0);
  tracker t;
  tracker_init(&t);
  call c[4];
  for (int i = 0; i < 4; i++) {
    c[i] = (call){.s = s, .t = &t, .id = i, .pod = i, .key = "runc\x1fimg", .hold = true};
    start(&c[i]);
    if (i == 0)
      wait_started(&t, 0);
    else
      wait_stats(s, 0, 1, (uint64_t) i);
  }
  tracker_release(&t);
  for (int i = 0; i < 4; i++) {
    join_call(&c[i]);
    assert_int_equal(c[i].ret, 0);
    assert_null(c[i].err);
    assert_string_equal(c[i].result, "result-0"); /* everyone gets the one job's result */
  }
  for (int i = 0; i < 4; i++)
    finish(&c[i]);
  assert_int_equal(t.runs, 1);

  /* Once done, the same key runs again. */
  call again = {.s = s, .t = &t, .id = 9, .pod = -1, .key = "runc\x1fimg"};
  start(&again);
  join_call(&again);
  assert_string_equal(again.result, "result-9");
  finish(&again);
  assert_int_equal(t.runs, 2);
  tracker_destroy(&t);
}

static void test_dedupe_error(void **state)
{
  cleanup_scheduler scheduler *s = make(true, 0, 0);
  tracker t;
  tracker_init(&t);
  call c1 = {.s = s, .t = &t, .id = 1, .pod = -1, .key = "k", .hold = true, .fail = true};
  call c2 = {.s = s, .t = &t, .id = 2, .pod = -1, .key = "k"};
  start(&c1);
  wait_started(&t, 1);
  start(&c2);
  wait_stats(s, 0, 1, 1);
  tracker_release(&t);
  join_call(&c1);
  join_call(&c2);
  assert_int_equal(t.runs, 1);
  assert_true(c1.ret < 0);
  assert_int_equal(c2.ret, c1.ret);
  assert_null(c1.result);
  assert_null(c2.result);
  assert_non_null(c1.err);
  assert_non_null(c2.err);
  assert_ptr_not_equal(c1.err, c2.err);
  assert_int_equal(c2.err->status, CRIMAGE_NOT_FOUND);
  assert_string_equal(c1.err->message, "job 1 failed");
  assert_string_equal(c2.err->message, "job 1 failed");
  finish(&c1);
  finish(&c2);
  tracker_destroy(&t);
}

static void test_queue_full(void **state)
{
  cleanup_scheduler scheduler *s = make(true, 0, 2);
  tracker t;
  tracker_init(&t);
  call c[3];
  for (int i = 0; i < 3; i++) {
    c[i] = (call){.s = s, .t = &t, .id = i, .pod = -1, .key = i == 1 ? "dup" : NULL, .hold = i == 0};
    start(&c[i]);
    if (i == 0)
      wait_started(&t, 0);
    else
      wait_stats(s, (size_t) i, 1, 0);
  }
  /* Two waiting, the bound: a new job is refused at once... */
  cleanup_error crimage_error *err = NULL;
  call extra = {.s = s, .t = &t, .id = 7, .pod = -1};
  void *result = NULL;
  assert_int_equal(scheduler_run(s, "other", NULL, job, &extra, &result, free, copy_string, &err), -EAGAIN);
  assert_null(result);
  assert_int_equal(err->status, CRIMAGE_RESOURCE_EXHAUSTED);
  assert_non_null(strstr(err->message, "queue is full"));
  scheduler_stats st;
  scheduler_get_stats(s, &st);
  assert_int_equal(st.rejected_total, 1);

  /* ...but joining a queued identical job takes no slot. */
  call join = {.s = s, .t = &t, .id = 8, .pod = -1, .key = "dup"};
  start(&join);
  wait_stats(s, 2, 1, 1);

  tracker_release(&t);
  for (int i = 0; i < 3; i++)
    finish(&c[i]);
  join_call(&join);
  assert_int_equal(join.ret, 0);
  assert_string_equal(join.result, "result-1");
  finish(&join);
  assert_int_equal(t.runs, 3);
  assert_false(started(&t, 7));
  tracker_destroy(&t);
}

static void test_shutdown(void **state)
{
  cleanup_scheduler scheduler *s = make(true, 0, 0);
  tracker t;
  tracker_init(&t);
  call running = {.s = s, .t = &t, .id = 1, .pod = -1, .hold = true};
  call waiting = {.s = s, .t = &t, .id = 2, .pod = -1, .key = "w"};
  call joiner = {.s = s, .t = &t, .id = 3, .pod = -1, .key = "w"};
  start(&running);
  wait_started(&t, 1);
  start(&waiting);
  wait_stats(s, 1, 1, 0);
  start(&joiner);
  wait_stats(s, 1, 1, 1);
  scheduler_shutdown(s);
  join_call(&waiting);
  join_call(&joiner);
  assert_int_equal(waiting.ret, -ESHUTDOWN);
  assert_int_equal(waiting.err->status, CRIMAGE_UNAVAILABLE);
  assert_int_equal(joiner.ret, -ESHUTDOWN);
  assert_int_equal(joiner.err->status, CRIMAGE_UNAVAILABLE);

  cleanup_error crimage_error *err = NULL;
  assert_int_equal(scheduler_run(s, NULL, NULL, job, &running, NULL, free, copy_string, &err), -ESHUTDOWN);
  assert_int_equal(err->status, CRIMAGE_UNAVAILABLE);

  tracker_release(&t);
  join_call(&running);
  assert_int_equal(running.ret, 0); /* the running job finished normally */
  assert_string_equal(running.result, "result-1");
  finish(&running);
  finish(&waiting);
  finish(&joiner);
  assert_int_equal(t.runs, 1);
  tracker_destroy(&t);
}

int main(void)
{
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_options),
      cmocka_unit_test(test_serialized_never_overlaps),
      cmocka_unit_test(test_max_parallel_two),
      cmocka_unit_test(test_unlimited),
      cmocka_unit_test(test_same_pod_never_overlaps),
      cmocka_unit_test(test_busy_pod_does_not_block_others),
      cmocka_unit_test(test_fifo),
      cmocka_unit_test(test_dedupe),
      cmocka_unit_test(test_dedupe_error),
      cmocka_unit_test(test_queue_full),
      cmocka_unit_test(test_shutdown),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
