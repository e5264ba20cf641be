/* Prometheus metrics of the daemon, in the text exposition format, on an optional local HTTP listener
 * (config key metricsAddress). Everything is read on each scrape from what the daemon owns: the progress tracker's
 * counters, the scheduler's queue and the stores. */
#ifndef CRIMAGE_PLUGIN_METRICS_H
#define CRIMAGE_PLUGIN_METRICS_H

#include <stddef.h>
#include <sys/socket.h>

#include "common/error.h"
#include "pull/progress.h"
#include "pull/scheduler.h"
#include "pull/store.h"

typedef struct metrics_sources {
  progress_tracker *progress;
  scheduler *scheduler;
  store *const *stores; /* the main store first, then any per-handler ones */
  size_t n_stores;
} metrics_sources;

/* The whole exposition text (caller frees). */
char *metrics_render(const metrics_sources *src);

typedef struct metrics_server metrics_server;

/* Listens on address ("127.0.0.1:9712", "[::1]:9712") and answers GET /metrics. The sources must outlive the
 * server. */
int metrics_server_start(const char *address, const metrics_sources *src, metrics_server **ret, crimage_error **err);
void metrics_server_stop(metrics_server *m);

/* Checks an address as metrics_server_start takes it (for the config check at start-up). */
int metrics_parse_address(const char *address, struct sockaddr_storage *ret, size_t *ret_len, crimage_error **err);

#endif
