/* The progress tracker: which pulls are queued or running, how far each has got, and the counters behind the
 * daemon's metrics. Thread-safe: PullImage handlers feed it (begin, start, blob events, end, release) while the
 * progress service and the metrics listener read snapshots.
 *
 * A pull is one scheduler job. Every PullImage call begins it (calls with the same key while it is not over join
 * the same entry, as they join the same scheduler job), the job that runs it starts it, feeds it the puller's
 * events and ends it, and every call releases it. Ended pulls stay readable in a bounded history so a watcher that
 * comes late still sees how a pull ended, and tests can compare when pulls ran. */
#ifndef CRIMAGE_PULL_PROGRESS_H
#define CRIMAGE_PULL_PROGRESS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/error.h"
#include "pull/puller.h"

#define PROGRESS_MAX_BLOBS 512       /* blobs tracked per pull; events about more are ignored */
#define PROGRESS_HISTORY 64          /* ended pulls kept */
#define PROGRESS_MAX_ACTIVE 8192     /* pulls tracked at once (the scheduler queue is bounded below this) */
#define PROGRESS_LOG_INTERVAL_MS 10000
/* Upper bounds (seconds) of the pull duration histogram; +Inf is implied. */
#define PROGRESS_DURATION_BUCKETS {1, 5, 10, 30, 60, 120, 300, 600, 1800}
#define PROGRESS_N_DURATION_BUCKETS 9

typedef enum progress_state {
  PROGRESS_QUEUED,
  PROGRESS_RUNNING,
  PROGRESS_SUCCEEDED,
  PROGRESS_FAILED,
} progress_state;

typedef struct progress_blob {
  char *digest;
  uint64_t done;
  uint64_t total;
  bool finished;
} progress_blob;

/* A snapshot of one pull (a deep copy the caller owns; free with progress_pull_clear). */
typedef struct progress_pull {
  uint64_t id;
  char *reference;
  char *handler;
  char *pod_uid; /* "" when none */
  progress_state state;
  int64_t created_ms; /* wall clock, ms since the epoch */
  int64_t started_ms; /* 0 while queued */
  int64_t ended_ms;   /* 0 until over */
  uint64_t bytes_done;
  uint64_t bytes_total; /* 0 until resolved */
  progress_blob *blobs;
  size_t n_blobs;
  unsigned waiters; /* calls that began and have not released it */
  char *error;      /* FAILED: the message; else NULL */
  uint64_t version; /* grows on every change */
} progress_pull;

/* Counters for the metrics. Failures are counted by gRPC status. */
typedef struct progress_counters {
  uint64_t started;
  uint64_t succeeded;
  uint64_t failed[CRIMAGE_UNAUTHENTICATED + 1];
  uint64_t bytes; /* downloaded, i.e. not already present */
  uint64_t backoffs;
  uint64_t duration_buckets[PROGRESS_N_DURATION_BUCKETS]; /* non-cumulative counts per bucket */
  uint64_t duration_count;
  double duration_sum_s;
  size_t queued;
  size_t running;
} progress_counters;

typedef struct progress_tracker progress_tracker;

/* log_interval_ms: a running pull logs its progress at info this often (0 = PROGRESS_LOG_INTERVAL_MS, <0 never). */
progress_tracker *progress_tracker_new(int64_t log_interval_ms);
void progress_tracker_free(progress_tracker *t);

/* A PullImage call wants (reference, handler). key tells pulls apart as the scheduler's dedupe key does: a call
 * whose key matches a pull not yet over joins it. Returns the pull's id (never 0), or 0 when PROGRESS_MAX_ACTIVE
 * pulls are tracked already (every other call then accepts id 0 and does nothing). */
uint64_t progress_begin(progress_tracker *t, const char *key, const char *reference, const char *handler,
                        const char *pod_uid);
/* The job left the queue. A pull that was already over (a new job raced with the end of the old one) runs again. */
void progress_start(progress_tracker *t, uint64_t id);
/* A puller event (from any transfer thread). */
void progress_event(progress_tracker *t, uint64_t id, const pull_event *ev);
/* The job is over: r >= 0 success, else err says why. Counts it. */
void progress_end(progress_tracker *t, uint64_t id, int r, const crimage_error *err);
/* A call is done with the pull. The last release of a pull that never ran (a full queue, a shutdown) ends it as
 * as failed (r < 0, err says why), without counting it as a started pull. */
void progress_release(progress_tracker *t, uint64_t id, int r, const crimage_error *err);
/* A call was refused by the back-off. */
void progress_count_backoff(progress_tracker *t);

/* Snapshots of the pulls not over (and with include_ended, of the history too), oldest first. */
int progress_list(progress_tracker *t, bool include_ended, progress_pull **ret, size_t *ret_n);
/* The id of the newest pull of (reference, handler) that is not over; 0 when none. */
uint64_t progress_find(progress_tracker *t, const char *reference, const char *handler);
/* Waits up to timeout_ms for pull id to reach a version above after_version (or be over), then copies it into
 * *ret whatever the version. Returns 1, or 0 when the id is unknown (never existed or left the history). */
int progress_wait(progress_tracker *t, uint64_t id, uint64_t after_version, int64_t timeout_ms, progress_pull *ret);
void progress_get_counters(progress_tracker *t, progress_counters *ret);

void progress_pull_clear(progress_pull *p);
void progress_pull_list_free(progress_pull *list, size_t n);

#endif
