/* The pull scheduler. One mutex and one condition variable guard everything: the queue holds at most a few
 * thousand jobs and a state change is rare next to the pulls themselves, so a broadcast on every change is
 * cheap and keeps the waiting logic obvious. */
#include <errno.h>
#include <pthread.h>

#include "common/util.h"
#include "pull/scheduler.h"

typedef enum { JOB_QUEUED, JOB_RUNNING, JOB_DONE } job_state;

typedef struct job {
  struct job *prev, *next; /* in the scheduler's FIFO while queued or running */
  char *key;               /* NULL: not shareable */
  char *pod;               /* NULL: no per-pod limit */
  job_state state;
  size_t refs; /* callers still waiting for or reading the outcome */
  int ret;
  void *result;
  crimage_error *err;
  void (*free_result)(void *);
} job;

struct scheduler {
  pthread_mutex_t lock;
  pthread_cond_t changed;
  size_t limit; /* running jobs allowed at once; SIZE_MAX: no limit */
  size_t queue_max;
  bool shutting_down;
  job *head, *tail;
  scheduler_stats stats;
};

void scheduler_options_init(scheduler_options *o)
{
  *o = (scheduler_options){.serialize = false, .max_parallel = 0, .queue_max = 0};
}

int scheduler_options_validate(const scheduler_options *o, crimage_error **err)
{
  if (o->max_parallel < 0) {
    crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0,
                      "invalid configuration: maxParallelImagePulls (%d) must not be negative", o->max_parallel);
    return -EINVAL;
  }
  if (o->serialize && o->max_parallel > 1) {
    crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0,
                      "invalid configuration: maxParallelImagePulls (%d) must be 1 or unset when "
                      "serializeImagePulls is true",
                      o->max_parallel);
    return -EINVAL;
  }
  return 0;
}

int scheduler_new(const scheduler_options *o, scheduler **ret, crimage_error **err)
{
  int r = scheduler_options_validate(o, err);
  if (r < 0)
    return r;
  scheduler *s = xcalloc(1, sizeof(*s));
  pthread_mutex_init(&s->lock, NULL);
  pthread_cond_init(&s->changed, NULL);
  if (o->serialize)
    s->limit = 1;
  else
    s->limit = o->max_parallel > 0 ? (size_t) o->max_parallel : SIZE_MAX;
  s->queue_max = o->queue_max > 0 ? o->queue_max : SCHEDULER_DEFAULT_QUEUE_MAX;
  *ret = s;
  return 0;
}

void scheduler_free(scheduler *s)
{
  if (!s)
    return;
  pthread_cond_destroy(&s->changed);
  pthread_mutex_destroy(&s->lock);
  free(s);
}

static void list_append(scheduler *s, job *j)
{
  j->prev = s->tail;
  j->next = NULL;
  if (s->tail)
    s->tail->next = j;
  else
    s->head = j;
  s->tail = j;
}

static void list_remove(scheduler *s, job *j)
{
  if (j->prev)
    j->prev->next = j->next;
  else
    s->head = j->next;
  if (j->next)
    j->next->prev = j->prev;
  else
    s->tail = j->prev;
  j->prev = j->next = NULL;
}

static bool pod_busy(const scheduler *s, const char *pod)
{
  if (!pod)
    return false;
  for (const job *j = s->head; j; j = j->next)
    if (j->state == JOB_RUNNING && streq(j->pod, pod))
      return true;
  return false;
}

/* Starts queued jobs in FIFO order while the limits allow. Called with the lock held after every change. */
static void dispatch(scheduler *s)
{
  bool started = false;
  for (job *j = s->head; j && s->stats.running < s->limit; j = j->next) {
    if (j->state != JOB_QUEUED || pod_busy(s, j->pod))
      continue;
    j->state = JOB_RUNNING;
    s->stats.queued--;
    s->stats.running++;
    started = true;
  }
  if (started)
    pthread_cond_broadcast(&s->changed);
}

static crimage_error *error_copy(const crimage_error *e)
{
  if (!e)
    return NULL;
  crimage_error *c = xcalloc(1, sizeof(*c));
  c->status = e->status;
  c->errnum = e->errnum;
  c->message = xstrdup(e->message ? e->message : "");
  return c;
}

static void job_free(job *j)
{
  if (j->result && j->free_result)
    j->free_result(j->result);
  crimage_error_free(j->err);
  free(j->key);
  free(j->pod);
  free(j);
}

/* Hands the outcome of a finished job to one caller and drops its reference. Lock held. */
static int collect(job *j, void **ret_result, void *(*copy_result)(const void *), crimage_error **err)
{
  int r = j->ret;
  bool last = --j->refs == 0;
  if (j->err && err && !*err)
    *err = last ? TAKE_PTR(j->err) : error_copy(j->err);
  if (r >= 0 && ret_result) {
    if (last)
      *ret_result = TAKE_PTR(j->result);
    else
      *ret_result = j->result && copy_result ? copy_result(j->result) : NULL;
  }
  if (last)
    job_free(j);
  return r;
}

int scheduler_run(scheduler *s, const char *dedupe_key, const char *pod_uid, scheduler_fn fn, void *ud,
                  void **ret_result, void (*free_result)(void *), void *(*copy_result)(const void *),
                  crimage_error **err)
{
  pthread_mutex_lock(&s->lock);
  if (s->shutting_down) {
    pthread_mutex_unlock(&s->lock);
    crimage_error_set(err, CRIMAGE_UNAVAILABLE, 0, "the pull scheduler is shutting down");
    return -ESHUTDOWN;
  }

  if (!str_empty(dedupe_key)) {
    for (job *j = s->head; j; j = j->next) {
      if (j->key && streq(j->key, dedupe_key)) {
        j->refs++;
        s->stats.joined_total++;
        while (j->state != JOB_DONE)
          pthread_cond_wait(&s->changed, &s->lock);
        int r = collect(j, ret_result, copy_result, err);
        pthread_mutex_unlock(&s->lock);
        return r;
      }
    }
  }

  if (s->stats.queued >= s->queue_max) {
    s->stats.rejected_total++;
    size_t queued = s->stats.queued;
    pthread_mutex_unlock(&s->lock);
    crimage_error_set(err, CRIMAGE_RESOURCE_EXHAUSTED, 0, "the pull queue is full (%zu pulls waiting)", queued);
    return -EAGAIN;
  }

  job *j = xcalloc(1, sizeof(*j));
  j->key = str_empty(dedupe_key) ? NULL : xstrdup(dedupe_key);
  j->pod = str_empty(pod_uid) ? NULL : xstrdup(pod_uid);
  j->state = JOB_QUEUED;
  j->refs = 1;
  j->free_result = free_result;
  list_append(s, j);
  s->stats.queued++;
  dispatch(s);

  while (j->state == JOB_QUEUED && !s->shutting_down)
    pthread_cond_wait(&s->changed, &s->lock);

  if (j->state == JOB_QUEUED) {
    /* Shut down before the job could start. */
    s->stats.queued--;
    list_remove(s, j);
    crimage_error_set(&j->err, CRIMAGE_UNAVAILABLE, 0, "the pull scheduler shut down before the pull could start");
    j->ret = -ESHUTDOWN;
  } else {
    pthread_mutex_unlock(&s->lock);
    void *result = NULL;
    crimage_error *job_err = NULL;
    int r = fn(ud, &result, &job_err);
    pthread_mutex_lock(&s->lock);
    if (r < 0 && result && free_result) {
      free_result(result);
      result = NULL;
    }
    j->ret = r;
    j->result = result;
    j->err = job_err;
    s->stats.running--;
    list_remove(s, j);
    dispatch(s);
  }
  j->state = JOB_DONE;
  pthread_cond_broadcast(&s->changed);
  int r = collect(j, ret_result, copy_result, err);
  pthread_mutex_unlock(&s->lock);
  return r;
}

void scheduler_shutdown(scheduler *s)
{
  pthread_mutex_lock(&s->lock);
  s->shutting_down = true;
  pthread_cond_broadcast(&s->changed);
  pthread_mutex_unlock(&s->lock);
}

void scheduler_get_stats(scheduler *s, scheduler_stats *ret)
{
  pthread_mutex_lock(&s->lock);
  *ret = s->stats;
  pthread_mutex_unlock(&s->lock);
}
