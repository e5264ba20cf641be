#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <microhttpd.h>
#include <stdarg.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include "common/log.h"
#include "common/util.h"
#include "plugin/metrics.h"

/* Requests with a body or a long URL are not scrapes: refuse them early. */
#define METRICS_MAX_CONNECTIONS 16
#define METRICS_TIMEOUT_S 10
/* Per-connection buffer for the request line and headers; longer requests get 414/431 from libmicrohttpd. */
#define METRICS_MAX_REQUEST_BYTES (16 * 1024)

struct metrics_server {
  struct MHD_Daemon *mhd;
  metrics_sources src;
};

typedef struct text {
  char *buf;
  size_t len, cap;
} text;

static void add(text *t, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void add(text *t, const char *fmt, ...)
{
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(t->buf ? t->buf + t->len : NULL, t->buf ? t->cap - t->len : 0, fmt, ap);
  va_end(ap);
  if (n < 0)
    return;
  if (!t->buf || t->len + (size_t) n >= t->cap) {
    while (t->cap <= t->len + (size_t) n)
      t->cap = t->cap ? t->cap * 2 : 4096;
    t->buf = xrealloc(t->buf, t->cap);
    va_start(ap, fmt);
    vsnprintf(t->buf + t->len, t->cap - t->len, fmt, ap);
    va_end(ap);
  }
  t->len += (size_t) n;
}

static void header(text *t, const char *name, const char *type, const char *help)
{
  add(t, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

char *metrics_render(const metrics_sources *src)
{
  text t = {0};
  progress_counters c = {0};
  if (src->progress)
    progress_get_counters(src->progress, &c);
  scheduler_stats ss = {0};
  if (src->scheduler)
    scheduler_get_stats(src->scheduler, &ss);

  header(&t, "crimage_pulls_started_total", "counter", "Pulls that left the queue and ran.");
  add(&t, "crimage_pulls_started_total %" PRIu64 "\n", c.started);
  header(&t, "crimage_pulls_succeeded_total", "counter", "Pulls that succeeded.");
  add(&t, "crimage_pulls_succeeded_total %" PRIu64 "\n", c.succeeded);
  header(&t, "crimage_pulls_failed_total", "counter", "Pulls that failed, by gRPC status.");
  for (int st = 1; st <= CRIMAGE_UNAUTHENTICATED; st++)
    if (c.failed[st])
      add(&t, "crimage_pulls_failed_total{reason=\"%s\"} %" PRIu64 "\n", crimage_status_name((crimage_status) st),
          c.failed[st]);
  header(&t, "crimage_pull_bytes_total", "counter", "Bytes downloaded by pulls.");
  add(&t, "crimage_pull_bytes_total %" PRIu64 "\n", c.bytes);

  static const double bounds[PROGRESS_N_DURATION_BUCKETS] = PROGRESS_DURATION_BUCKETS;
  header(&t, "crimage_pull_duration_seconds", "histogram", "Time pulls ran, from leaving the queue to the end.");
  uint64_t cumulative = 0;
  for (size_t i = 0; i < PROGRESS_N_DURATION_BUCKETS; i++) {
    cumulative += c.duration_buckets[i];
    add(&t, "crimage_pull_duration_seconds_bucket{le=\"%g\"} %" PRIu64 "\n", bounds[i], cumulative);
  }
  add(&t, "crimage_pull_duration_seconds_bucket{le=\"+Inf\"} %" PRIu64 "\n", c.duration_count);
  add(&t, "crimage_pull_duration_seconds_sum %.3f\n", c.duration_sum_s);
  add(&t, "crimage_pull_duration_seconds_count %" PRIu64 "\n", c.duration_count);

  header(&t, "crimage_pull_queue_length", "gauge", "Pulls waiting in the scheduler's queue.");
  add(&t, "crimage_pull_queue_length %zu\n", ss.queued);
  header(&t, "crimage_pulls_in_flight", "gauge", "Pulls running.");
  add(&t, "crimage_pulls_in_flight %zu\n", ss.running);
  header(&t, "crimage_pull_backoffs_total", "counter", "PullImage calls refused by the back-off after a failure.");
  add(&t, "crimage_pull_backoffs_total %" PRIu64 "\n", c.backoffs);

  uint64_t bytes = 0, images = 0;
  for (size_t i = 0; i < src->n_stores; i++) {
    crimage_error *err = NULL;
    store_usage u = {0};
    if (store_get_usage(src->stores[i], &u, &err) == 0)
      bytes += u.used_bytes;
    store_usage_clear(&u);
    crimage_error_free(err);
    err = NULL;
    store_image **list = NULL;
    size_t n = 0;
    if (store_list_images(src->stores[i], NULL, &list, &n, &err) == 0)
      images += n;
    store_image_list_free(list, n);
    crimage_error_free(err);
  }
  header(&t, "crimage_store_bytes", "gauge", "Bytes used by the image stores.");
  add(&t, "crimage_store_bytes %" PRIu64 "\n", bytes);
  header(&t, "crimage_images", "gauge", "Image records (one per image and runtime handler).");
  add(&t, "crimage_images %" PRIu64 "\n", images);
  return t.buf;
}

static enum MHD_Result answer(void *cls, struct MHD_Connection *conn, const char *url, const char *method,
                              const char *version, const char *upload_data, size_t *upload_data_size, void **con_cls)
{
  metrics_server *m = cls;
  bool get = streq(method, MHD_HTTP_METHOD_GET) || streq(method, MHD_HTTP_METHOD_HEAD);
  if (*upload_data_size > 0)
    return MHD_NO; /* a scrape has no body */
  unsigned status;
  char *body;
  const char *type = "text/plain; charset=utf-8";
  if (!get) {
    status = MHD_HTTP_METHOD_NOT_ALLOWED;
    body = xstrdup("only GET\n");
  } else if (!streq(url, "/metrics")) {
    status = MHD_HTTP_NOT_FOUND;
    body = xstrdup("not found: the metrics are at /metrics\n");
  } else {
    status = MHD_HTTP_OK;
    body = metrics_render(&m->src);
    type = "text/plain; version=0.0.4; charset=utf-8";
  }
  struct MHD_Response *resp = MHD_create_response_from_buffer(strlen(body), body, MHD_RESPMEM_MUST_FREE);
  MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, type);
  enum MHD_Result r = MHD_queue_response(conn, status, resp);
  MHD_destroy_response(resp);
  return r;
}

int metrics_parse_address(const char *address, struct sockaddr_storage *ret, size_t *ret_len, crimage_error **err)
{
  const char *colon = strrchr(address, ':');
  if (!colon || colon == address || !colon[1])
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0,
                             "metricsAddress \"%s\": expected HOST:PORT, e.g. 127.0.0.1:9712", address);
  char *end = NULL;
  errno = 0;
  long port = strtol(colon + 1, &end, 10);
  if (errno || *end || port < 1 || port > 65535)
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "metricsAddress \"%s\": bad port", address);
  cleanup_free char *host = xstrndup(address, (size_t) (colon - address));
  memset(ret, 0, sizeof(*ret));
  size_t hl = strlen(host);
  if (host[0] == '[' && hl > 2 && host[hl - 1] == ']') {
    host[hl - 1] = '\0';
    struct sockaddr_in6 *s6 = (struct sockaddr_in6 *) ret;
    s6->sin6_family = AF_INET6;
    s6->sin6_port = htons((uint16_t) port);
    if (inet_pton(AF_INET6, host + 1, &s6->sin6_addr) != 1)
      return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "metricsAddress \"%s\": bad IPv6 address", address);
    *ret_len = sizeof(*s6);
    return 0;
  }
  struct sockaddr_in *s4 = (struct sockaddr_in *) ret;
  s4->sin_family = AF_INET;
  s4->sin_port = htons((uint16_t) port);
  if (streq(host, "localhost"))
    host[0] = '\0';
  if (inet_pton(AF_INET, *host ? host : "127.0.0.1", &s4->sin_addr) != 1)
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0,
                             "metricsAddress \"%s\": the host must be an IP address (IPv6 in brackets)", address);
  *ret_len = sizeof(*s4);
  return 0;
}

int metrics_server_start(const char *address, const metrics_sources *src, metrics_server **ret, crimage_error **err)
{
  struct sockaddr_storage sa;
  size_t len = 0;
  int r = metrics_parse_address(address, &sa, &len, err);
  if (r < 0)
    return r;
  metrics_server *m = xcalloc(1, sizeof(*m));
  m->src = *src;
  unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_ERROR_LOG;
  if (sa.ss_family == AF_INET6)
    flags |= MHD_USE_IPv6;
  uint16_t port = ntohs(sa.ss_family == AF_INET6 ? ((struct sockaddr_in6 *) &sa)->sin6_port
                                                 : ((struct sockaddr_in *) &sa)->sin_port);
  m->mhd = MHD_start_daemon(flags, port, NULL, NULL, answer, m, MHD_OPTION_SOCK_ADDR, (struct sockaddr *) &sa,
                            MHD_OPTION_CONNECTION_LIMIT, (unsigned) METRICS_MAX_CONNECTIONS,
                            MHD_OPTION_CONNECTION_TIMEOUT, (unsigned) METRICS_TIMEOUT_S,
                            MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t) METRICS_MAX_REQUEST_BYTES, MHD_OPTION_END);
  if (!m->mhd) {
    free(m);
    return crimage_error_set(err, CRIMAGE_UNAVAILABLE, errno, "cannot listen for metrics on %s", address);
  }
  log_info("serving metrics on http://%s/metrics", address);
  *ret = m;
  return 0;
}

void metrics_server_stop(metrics_server *m)
{
  if (!m)
    return;
  MHD_stop_daemon(m->mhd);
  free(m);
}
