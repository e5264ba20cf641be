/* The back-off table. A flat array searched linearly: it is bounded (max_entries), touched once per pull, and
 * holds only images that failed recently, so a hash table would buy nothing measurable. */
#include <pthread.h>

#include "common/util.h"
#include "pull/backoff.h"

typedef struct backoff_entry {
  char *key;
  char *last_error;
  int64_t last_fail_ms; /* when the last failure was recorded */
  int64_t delay_ms;     /* current window length */
} backoff_entry;

struct backoff {
  pthread_mutex_t lock;
  int64_t initial_ms;
  int64_t max_ms;
  size_t max_entries;
  backoff_entry *entries;
  size_t n;
};

backoff *backoff_new(int64_t initial_ms, int64_t max_ms, size_t max_entries)
{
  backoff *b = xcalloc(1, sizeof(*b));
  pthread_mutex_init(&b->lock, NULL);
  b->initial_ms = initial_ms > 0 ? initial_ms : BACKOFF_DEFAULT_INITIAL_MS;
  b->max_ms = max_ms > 0 ? max_ms : BACKOFF_DEFAULT_MAX_MS;
  if (b->max_ms < b->initial_ms)
    b->max_ms = b->initial_ms;
  b->max_entries = max_entries > 0 ? max_entries : BACKOFF_DEFAULT_MAX_ENTRIES;
  b->entries = xcalloc(b->max_entries, sizeof(*b->entries));
  return b;
}

static void entry_clear(backoff_entry *e)
{
  free(e->key);
  free(e->last_error);
}

static void remove_at(backoff *b, size_t i)
{
  entry_clear(&b->entries[i]);
  b->entries[i] = b->entries[--b->n];
}

void backoff_free(backoff *b)
{
  if (!b)
    return;
  for (size_t i = 0; i < b->n; i++)
    entry_clear(&b->entries[i]);
  free(b->entries);
  pthread_mutex_destroy(&b->lock);
  free(b);
}

/* Like kubelet: an entry untouched for twice the maximum window starts over from the initial delay. */
static bool expired(const backoff *b, const backoff_entry *e, int64_t now_ms)
{
  return now_ms - e->last_fail_ms > 2 * b->max_ms;
}

static void gc(backoff *b, int64_t now_ms)
{
  for (size_t i = 0; i < b->n;) {
    if (expired(b, &b->entries[i], now_ms))
      remove_at(b, i);
    else
      i++;
  }
}

static backoff_entry *find(backoff *b, const char *key)
{
  for (size_t i = 0; i < b->n; i++)
    if (streq(b->entries[i].key, key))
      return &b->entries[i];
  return NULL;
}

int64_t backoff_fail(backoff *b, const char *key, int64_t now_ms, const char *last_error)
{
  pthread_mutex_lock(&b->lock);
  gc(b, now_ms);
  backoff_entry *e = find(b, key);
  if (e) {
    e->delay_ms = e->delay_ms > b->max_ms / 2 ? b->max_ms : e->delay_ms * 2;
  } else {
    if (b->n == b->max_entries) {
      size_t oldest = 0;
      for (size_t i = 1; i < b->n; i++)
        if (b->entries[i].last_fail_ms < b->entries[oldest].last_fail_ms)
          oldest = i;
      remove_at(b, oldest);
    }
    e = &b->entries[b->n++];
    *e = (backoff_entry){.key = xstrdup(key), .delay_ms = b->initial_ms};
  }
  e->last_fail_ms = now_ms;
  free(e->last_error);
  e->last_error = last_error ? xstrndup(last_error, BACKOFF_ERROR_MAX) : NULL;
  int64_t retry_at = now_ms + e->delay_ms;
  pthread_mutex_unlock(&b->lock);
  return retry_at;
}

bool backoff_check(backoff *b, const char *key, int64_t now_ms, int64_t *ret_retry_at_ms, char **ret_last_error)
{
  bool in_window = false;
  pthread_mutex_lock(&b->lock);
  backoff_entry *e = find(b, key);
  if (e && expired(b, e, now_ms)) {
    remove_at(b, (size_t) (e - b->entries));
  } else if (e && now_ms < e->last_fail_ms + e->delay_ms) {
    in_window = true;
    if (ret_retry_at_ms)
      *ret_retry_at_ms = e->last_fail_ms + e->delay_ms;
    if (ret_last_error)
      *ret_last_error = e->last_error ? xstrdup(e->last_error) : NULL;
  }
  pthread_mutex_unlock(&b->lock);
  return in_window;
}

void backoff_success(backoff *b, const char *key)
{
  pthread_mutex_lock(&b->lock);
  backoff_entry *e = find(b, key);
  if (e)
    remove_at(b, (size_t) (e - b->entries));
  pthread_mutex_unlock(&b->lock);
}

size_t backoff_count(backoff *b)
{
  pthread_mutex_lock(&b->lock);
  size_t n = b->n;
  pthread_mutex_unlock(&b->lock);
  return n;
}
