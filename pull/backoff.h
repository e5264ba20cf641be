/* Back-off after failed pulls, kubelet style: the first failure of a key opens a window of `initial` ms, each
 * further failure doubles it up to `max`; a success resets the key. Keys are opaque strings (the daemon uses
 * "handler\x1fimage"). Time is passed in by the caller (monotonic ms), so the table never reads a clock. */
#ifndef CRIMAGE_PULL_BACKOFF_H
#define CRIMAGE_PULL_BACKOFF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define BACKOFF_DEFAULT_INITIAL_MS 10000
#define BACKOFF_DEFAULT_MAX_MS 300000
#define BACKOFF_DEFAULT_MAX_ENTRIES 4096
/* Stored error messages are cut to this many bytes. */
#define BACKOFF_ERROR_MAX 1024

typedef struct backoff backoff;

/* 0 for any argument selects its default. max_ms below initial_ms is raised to initial_ms. */
backoff *backoff_new(int64_t initial_ms, int64_t max_ms, size_t max_entries);
void backoff_free(backoff *b);
static inline void backoff_freep(backoff **b) { backoff_free(*b); }
#define cleanup_backoff __attribute__((cleanup(backoff_freep)))

/* Records a failure at now_ms and returns the time from which a retry is allowed. Entries idle for more than
 * 2*max are dropped first; when the table is full the entry updated longest ago is evicted. */
int64_t backoff_fail(backoff *b, const char *key, int64_t now_ms, const char *last_error);
/* True when key is inside its back-off window at now_ms; then *ret_retry_at_ms (if non-NULL) gets the end of the
 * window and *ret_last_error (if non-NULL) a copy of the last error (NULL when none was given), to free. */
bool backoff_check(backoff *b, const char *key, int64_t now_ms, int64_t *ret_retry_at_ms, char **ret_last_error);
/* Forgets key (a pull succeeded). */
void backoff_success(backoff *b, const char *key);
/* Number of keys currently tracked (for metrics and tests). */
size_t backoff_count(backoff *b);

#endif
