/* The progress tracker. One mutex guards the list; one condition variable wakes watchers on every change. The
 * list is short (pulls waiting or running, plus a bounded history), so lookups are linear scans. */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <time.h>

#include "common/log.h"
#include "common/util.h"
#include "pull/progress.h"

typedef struct entry {
  struct entry *next;
  progress_pull p; /* p.waiters counts the calls holding it */
  char *key;
  bool over;
  bool counted_start;    /* started through progress_start, so its end is counted */
  int64_t start_mono_ms; /* for the duration and the rate */
  int64_t last_log_mono_ms;
  uint64_t downloaded; /* bytes that arrived over the network */
} entry;

struct progress_tracker {
  pthread_mutex_t lock;
  pthread_cond_t changed;
  entry *head, *tail;
  size_t n_active, n_history;
  uint64_t next_id;
  int64_t log_interval_ms;
  progress_counters c;
};

static const double duration_bounds[PROGRESS_N_DURATION_BUCKETS] = PROGRESS_DURATION_BUCKETS;

static int64_t now_wall_ms(void) { return now_realtime_ns() / 1000000; }

progress_tracker *progress_tracker_new(int64_t log_interval_ms)
{
  progress_tracker *t = xcalloc(1, sizeof(*t));
  pthread_mutex_init(&t->lock, NULL);
  pthread_condattr_t attr;
  pthread_condattr_init(&attr);
  pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
  pthread_cond_init(&t->changed, &attr);
  pthread_condattr_destroy(&attr);
  t->next_id = 1;
  t->log_interval_ms = log_interval_ms == 0 ? PROGRESS_LOG_INTERVAL_MS : log_interval_ms;
  return t;
}

void progress_pull_clear(progress_pull *p)
{
  free(p->reference);
  free(p->handler);
  free(p->pod_uid);
  for (size_t i = 0; i < p->n_blobs; i++)
    free(p->blobs[i].digest);
  free(p->blobs);
  free(p->error);
  *p = (progress_pull){0};
}

void progress_pull_list_free(progress_pull *list, size_t n)
{
  for (size_t i = 0; i < n; i++)
    progress_pull_clear(&list[i]);
  free(list);
}

static void entry_free(entry *e)
{
  progress_pull_clear(&e->p);
  free(e->key);
  free(e);
}

void progress_tracker_free(progress_tracker *t)
{
  if (!t)
    return;
  for (entry *e = t->head, *next; e; e = next) {
    next = e->next;
    entry_free(e);
  }
  pthread_cond_destroy(&t->changed);
  pthread_mutex_destroy(&t->lock);
  free(t);
}

static entry *find_id(progress_tracker *t, uint64_t id)
{
  if (id == 0)
    return NULL;
  for (entry *e = t->head; e; e = e->next)
    if (e->p.id == id)
      return e;
  return NULL;
}

static void changed(progress_tracker *t, entry *e)
{
  e->p.version++;
  pthread_cond_broadcast(&t->changed);
}

/* Drops the oldest released ended pulls beyond the history bound. Lock held. */
static void trim_history(progress_tracker *t)
{
  entry *prev = NULL;
  for (entry *e = t->head; e && t->n_history > PROGRESS_HISTORY;) {
    entry *next = e->next;
    if (e->over && e->p.waiters == 0) {
      if (prev)
        prev->next = next;
      else
        t->head = next;
      if (t->tail == e)
        t->tail = prev;
      t->n_history--;
      entry_free(e);
    } else {
      prev = e;
    }
    e = next;
  }
}

uint64_t progress_begin(progress_tracker *t, const char *key, const char *reference, const char *handler,
                        const char *pod_uid)
{
  pthread_mutex_lock(&t->lock);
  if (!str_empty(key))
    for (entry *e = t->head; e; e = e->next)
      if (!e->over && e->key && streq(e->key, key)) {
        e->p.waiters++;
        changed(t, e);
        uint64_t id = e->p.id;
        pthread_mutex_unlock(&t->lock);
        return id;
      }
  if (t->n_active >= PROGRESS_MAX_ACTIVE) {
    pthread_mutex_unlock(&t->lock);
    return 0;
  }
  entry *e = xcalloc(1, sizeof(*e));
  e->key = str_empty(key) ? NULL : xstrdup(key);
  e->p.id = t->next_id++;
  e->p.reference = xstrdup(reference ? reference : "");
  e->p.handler = xstrdup(handler ? handler : "");
  e->p.pod_uid = xstrdup(pod_uid ? pod_uid : "");
  e->p.state = PROGRESS_QUEUED;
  e->p.created_ms = now_wall_ms();
  e->p.waiters = 1;
  if (t->tail)
    t->tail->next = e;
  else
    t->head = e;
  t->tail = e;
  t->n_active++;
  t->c.queued++;
  changed(t, e);
  uint64_t id = e->p.id;
  pthread_mutex_unlock(&t->lock);
  return id;
}

void progress_start(progress_tracker *t, uint64_t id)
{
  pthread_mutex_lock(&t->lock);
  entry *e = find_id(t, id);
  if (e) {
    if (e->over) {
      /* A new job for a key whose entry ended just before: the same entry tracks the new run. */
      e->over = false;
      t->n_history -= e->p.waiters == 0 ? 1 : 0;
      t->n_active++;
      free(e->p.error);
      e->p.error = NULL;
      e->p.ended_ms = 0;
    } else if (e->p.state == PROGRESS_QUEUED) {
      t->c.queued--;
    }
    if (e->p.state != PROGRESS_RUNNING)
      t->c.running++;
    e->p.state = PROGRESS_RUNNING;
    e->p.started_ms = now_wall_ms();
    e->start_mono_ms = e->last_log_mono_ms = now_monotonic_ms();
    e->counted_start = true;
    t->c.started++;
    changed(t, e);
  }
  pthread_mutex_unlock(&t->lock);
}

static progress_blob *find_blob(entry *e, const char *digest)
{
  for (size_t i = 0; i < e->p.n_blobs; i++)
    if (streq(e->p.blobs[i].digest, digest))
      return &e->p.blobs[i];
  if (e->p.n_blobs >= PROGRESS_MAX_BLOBS)
    return NULL;
  e->p.blobs = xrealloc(e->p.blobs, (e->p.n_blobs + 1) * sizeof(*e->p.blobs));
  progress_blob *b = &e->p.blobs[e->p.n_blobs++];
  *b = (progress_blob){.digest = xstrdup(digest)};
  return b;
}

static void recount_done(entry *e)
{
  uint64_t done = 0, total = 0;
  for (size_t i = 0; i < e->p.n_blobs; i++) {
    /* Sizes from a registry: a sum of them saturates rather than wraps. */
    done = u64_add_sat(done, e->p.blobs[i].done);
    total = u64_add_sat(total, e->p.blobs[i].total);
  }
  e->p.bytes_done = done;
  /* RESOLVED gives the size of the whole image; until then (or should it be short) the blobs seen so far. */
  if (total > e->p.bytes_total)
    e->p.bytes_total = total;
}

static void format_bytes(uint64_t n, char *buf, size_t len)
{
  if (n < 1024)
    snprintf(buf, len, "%" PRIu64 " B", n);
  else if (n < 1024 * 1024)
    snprintf(buf, len, "%.1f KiB", (double) n / 1024);
  else if (n < (uint64_t) 1024 * 1024 * 1024)
    snprintf(buf, len, "%.1f MiB", (double) n / (1024 * 1024));
  else
    snprintf(buf, len, "%.2f GiB", (double) n / (1024.0 * 1024 * 1024));
}

void progress_event(progress_tracker *t, uint64_t id, const pull_event *ev)
{
  char *log_line = NULL;
  pthread_mutex_lock(&t->lock);
  entry *e = find_id(t, id);
  if (!e || e->over) {
    pthread_mutex_unlock(&t->lock);
    return;
  }
  if (ev->kind == PULL_EVENT_RESOLVED) {
    e->p.bytes_total = ev->total;
  } else if (ev->digest) {
    progress_blob *b = find_blob(e, ev->digest);
    if (b) {
      uint64_t before = b->done;
      b->total = ev->total;
      if (ev->kind == PULL_EVENT_BLOB_START) {
        b->done = ev->done;
      } else if (ev->kind == PULL_EVENT_BLOB_PROGRESS) {
        /* A restarted transfer goes back; only forward motion is new bytes. */
        if (ev->done > before) {
          e->downloaded += ev->done - before;
          t->c.bytes += ev->done - before;
        }
        b->done = ev->done;
      } else {
        b->done = ev->total;
        b->finished = true;
      }
      recount_done(e);
    }
  }
  changed(t, e);

  int64_t now = now_monotonic_ms();
  if (t->log_interval_ms > 0 && e->counted_start && now - e->last_log_mono_ms >= t->log_interval_ms) {
    e->last_log_mono_ms = now;
    char done[32], total[32], rate[32];
    format_bytes(e->p.bytes_done, done, sizeof(done));
    format_bytes(e->p.bytes_total, total, sizeof(total));
    int64_t elapsed = now - e->start_mono_ms;
    format_bytes(elapsed > 0 ? e->downloaded * 1000 / (uint64_t) elapsed : 0, rate, sizeof(rate));
    log_line = xasprintf("pulling %s for handler \"%s\": %s of %s after %" PRId64 " s (%s/s)", e->p.reference,
                         e->p.handler, done, total, elapsed / 1000, rate);
  }
  pthread_mutex_unlock(&t->lock);
  if (log_line) {
    log_info("%s", log_line);
    free(log_line);
  }
}

/* Marks an entry over. Lock held. */
static void finish(progress_tracker *t, entry *e, bool ok, const crimage_error *err)
{
  if (e->p.state == PROGRESS_QUEUED)
    t->c.queued--;
  else if (e->p.state == PROGRESS_RUNNING)
    t->c.running--;
  e->over = true;
  t->n_active--;
  if (e->p.waiters == 0)
    t->n_history++;
  e->p.state = ok ? PROGRESS_SUCCEEDED : PROGRESS_FAILED;
  /* The resolved total also counts the manifest, which has no blob events: a pull that succeeded has it all. */
  if (ok && e->p.bytes_done < e->p.bytes_total)
    e->p.bytes_done = e->p.bytes_total;
  e->p.ended_ms = now_wall_ms();
  free(e->p.error);
  e->p.error = ok ? NULL : xstrdup(err && err->message ? err->message : "failed");
  changed(t, e);
}

void progress_end(progress_tracker *t, uint64_t id, int r, const crimage_error *err)
{
  pthread_mutex_lock(&t->lock);
  entry *e = find_id(t, id);
  if (e && !e->over) {
    bool counted = e->counted_start;
    finish(t, e, r >= 0, err);
    if (counted) {
      if (r >= 0) {
        t->c.succeeded++;
      } else {
        crimage_status st = err ? err->status : CRIMAGE_UNKNOWN;
        if ((unsigned) st > CRIMAGE_UNAUTHENTICATED || st == CRIMAGE_OK)
          st = CRIMAGE_UNKNOWN;
        t->c.failed[st]++;
      }
      double secs = (double) (now_monotonic_ms() - e->start_mono_ms) / 1000.0;
      size_t b = 0;
      while (b < PROGRESS_N_DURATION_BUCKETS && secs > duration_bounds[b])
        b++;
      if (b < PROGRESS_N_DURATION_BUCKETS)
        t->c.duration_buckets[b]++;
      t->c.duration_count++;
      t->c.duration_sum_s += secs;
    }
  }
  trim_history(t);
  pthread_mutex_unlock(&t->lock);
}

void progress_release(progress_tracker *t, uint64_t id, int r, const crimage_error *err)
{
  pthread_mutex_lock(&t->lock);
  entry *e = find_id(t, id);
  if (e && e->p.waiters > 0) {
    e->p.waiters--;
    if (e->p.waiters == 0) {
      if (!e->over)
        finish(t, e, r >= 0, err); /* never ran: not counted as a started pull */
      else
        t->n_history++;
    }
    changed(t, e);
  }
  trim_history(t);
  pthread_mutex_unlock(&t->lock);
}

void progress_count_backoff(progress_tracker *t)
{
  pthread_mutex_lock(&t->lock);
  t->c.backoffs++;
  pthread_mutex_unlock(&t->lock);
}

static void copy_pull(progress_pull *dst, const progress_pull *src)
{
  *dst = *src;
  dst->reference = xstrdup(src->reference);
  dst->handler = xstrdup(src->handler);
  dst->pod_uid = xstrdup(src->pod_uid);
  dst->error = src->error ? xstrdup(src->error) : NULL;
  dst->blobs = src->n_blobs ? xcalloc(src->n_blobs, sizeof(*dst->blobs)) : NULL;
  for (size_t i = 0; i < src->n_blobs; i++) {
    dst->blobs[i] = src->blobs[i];
    dst->blobs[i].digest = xstrdup(src->blobs[i].digest);
  }
}

int progress_list(progress_tracker *t, bool include_ended, progress_pull **ret, size_t *ret_n)
{
  pthread_mutex_lock(&t->lock);
  size_t n = 0;
  for (entry *e = t->head; e; e = e->next)
    if (include_ended || !e->over)
      n++;
  progress_pull *out = n ? xcalloc(n, sizeof(*out)) : NULL;
  size_t i = 0;
  for (entry *e = t->head; e; e = e->next)
    if (include_ended || !e->over)
      copy_pull(&out[i++], &e->p);
  pthread_mutex_unlock(&t->lock);
  *ret = out;
  *ret_n = n;
  return (int) (n > INT32_MAX ? INT32_MAX : n);
}

uint64_t progress_find(progress_tracker *t, const char *reference, const char *handler)
{
  uint64_t id = 0;
  pthread_mutex_lock(&t->lock);
  for (entry *e = t->head; e; e = e->next)
    if (!e->over && streq(e->p.reference, reference) && streq(e->p.handler, handler ? handler : ""))
      id = e->p.id;
  pthread_mutex_unlock(&t->lock);
  return id;
}

int progress_wait(progress_tracker *t, uint64_t id, uint64_t after_version, int64_t timeout_ms, progress_pull *ret)
{
  struct timespec until;
  clock_gettime(CLOCK_MONOTONIC, &until);
  if (timeout_ms > 0) {
    until.tv_sec += timeout_ms / 1000;
    until.tv_nsec += (timeout_ms % 1000) * 1000000;
    if (until.tv_nsec >= 1000000000) {
      until.tv_sec++;
      until.tv_nsec -= 1000000000;
    }
  }
  pthread_mutex_lock(&t->lock);
  entry *e;
  for (;;) {
    e = find_id(t, id);
    if (!e || e->over || e->p.version > after_version || timeout_ms <= 0)
      break;
    if (pthread_cond_timedwait(&t->changed, &t->lock, &until) == ETIMEDOUT) {
      e = find_id(t, id);
      break;
    }
  }
  if (e)
    copy_pull(ret, &e->p);
  pthread_mutex_unlock(&t->lock);
  return e ? 1 : 0;
}

void progress_get_counters(progress_tracker *t, progress_counters *ret)
{
  pthread_mutex_lock(&t->lock);
  *ret = t->c;
  pthread_mutex_unlock(&t->lock);
}
