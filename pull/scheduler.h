/* The pull scheduler: decides when a pull may start. Jobs are opaque callbacks, so the scheduler knows nothing
 * about pulling. Rules, in this order:
 *   - a call whose dedupe key equals that of a queued or running job joins it: the job runs once and every caller
 *     gets its return value, a copy of its error and a copy of its result;
 *   - jobs start in FIFO order, at most 1 at a time when serialized, at most max_parallel otherwise (0 = no limit);
 *   - two jobs with the same non-empty pod uid never run at the same time; a job whose pod is busy waits without
 *     holding back later jobs of other pods;
 *   - at most queue_max jobs wait; a further one fails at once with RESOURCE_EXHAUSTED.
 * Each job runs on the thread of the caller that created it; callers block until their job is done. */
#ifndef CRIMAGE_PULL_SCHEDULER_H
#define CRIMAGE_PULL_SCHEDULER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/error.h"

#define SCHEDULER_DEFAULT_QUEUE_MAX 1024

typedef struct scheduler_options {
  bool serialize;   /* serializeImagePulls; default false (kubelet already schedules its pulls) */
  int max_parallel; /* maxParallelImagePulls; used when !serialize: n >= 1, 0 = unlimited; default 0 */
  size_t queue_max; /* jobs allowed to wait (running ones not counted); 0 = SCHEDULER_DEFAULT_QUEUE_MAX */
} scheduler_options;

typedef struct scheduler_stats {
  size_t queued;           /* jobs waiting to start */
  size_t running;          /* jobs running */
  uint64_t joined_total;   /* calls that joined an identical job instead of running their own */
  uint64_t rejected_total; /* calls refused because the queue was full */
} scheduler_stats;

typedef struct scheduler scheduler;

/* Runs the job: returns >= 0 and may set *ret_result on success, or a negative errno and sets *err. */
typedef int (*scheduler_fn)(void *ud, void **ret_result, crimage_error **err);

/* The defaults: not serialized, unlimited parallelism, default queue bound. */
void scheduler_options_init(scheduler_options *o);
/* Refuses the combinations kubelet refuses: max_parallel < 0, and serialize with max_parallel > 1. */
int scheduler_options_validate(const scheduler_options *o, crimage_error **err);

int scheduler_new(const scheduler_options *o, scheduler **ret, crimage_error **err);
/* Only once every scheduler_run call has returned (call scheduler_shutdown first to make waiting ones return). */
void scheduler_free(scheduler *s);
static inline void scheduler_freep(scheduler **s) { scheduler_free(*s); }
#define cleanup_scheduler __attribute__((cleanup(scheduler_freep)))

/* Runs fn(ud) under the rules above and blocks until it is done. dedupe_key NULL or "" never joins; pod_uid NULL or
 * "" has no per-pod limit. Returns the job's return value. On success *ret_result (if non-NULL) receives the
 * result: the last caller of a shared job gets the job's own result, every other caller a copy_result() of it (NULL
 * when copy_result is NULL). When ret_result is NULL a result is released with free_result. */
int scheduler_run(scheduler *s, const char *dedupe_key, const char *pod_uid, scheduler_fn fn, void *ud,
                  void **ret_result, void (*free_result)(void *), void *(*copy_result)(const void *),
                  crimage_error **err);

/* Makes jobs that have not started fail with UNAVAILABLE and refuses new ones; running jobs finish normally. */
void scheduler_shutdown(scheduler *s);

void scheduler_get_stats(scheduler *s, scheduler_stats *ret);

#endif
