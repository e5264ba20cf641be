/* The pull engine: resolves a reference against a registry (or its mirrors), picks the platform manifest, downloads
 * config and layers into the store with streaming verification and records the image for a runtime handler. */
#ifndef CRIMAGE_PULL_PULLER_H
#define CRIMAGE_PULL_PULLER_H

#include <stdbool.h>
#include <stdint.h>

#include "auth/credential.h"
#include "common/error.h"
#include "pull/platform.h"
#include "pull/reference.h"
#include "pull/store.h"

typedef struct registry_mirror {
  char *endpoint;     /* "https://mirror.example:5000" or "http://127.0.0.1:5001" */
  bool override_path; /* endpoint already holds the full API path (no "/v2" added) */
} registry_mirror;

/* Per registry host[:port] settings from the config's `registries` map. */
typedef struct registry_host {
  char *host; /* "docker.io", "127.0.0.1:5000" */
  bool insecure; /* plain HTTP */
  registry_mirror *mirrors;
  size_t n_mirrors;
  /* Served by its mirrors only, the registry itself is never asked (containerd's hosts.toml with a mirror as its
   * `server`): an air-gapped node. */
  bool mirrors_only;
} registry_host;

typedef struct puller_options {
  const char *certs_dir;          /* <dir>/<host[:port]>/{ca.crt,client.cert,client.key}; NULL = none */
  const registry_host *hosts;     /* may be NULL */
  size_t n_hosts;
  int max_concurrent_downloads;   /* layers in parallel per pull; default 3 */
  int64_t progress_timeout_ms;    /* no bytes for this long fails a request; default 5 min */
  int64_t min_speed_bytes_per_s;  /* throughput floor per request; 0 = default 1024 B/s, < 0 = none */
  int64_t min_speed_window_ms;    /* averaged over this window; <= 0 = 30 s */
  bool skip_diff_id_check;        /* do not inflate layers to check them against the config's diff_ids */
  const char *user_agent;
} puller_options;

typedef struct puller puller;

int puller_new(store *s, const puller_options *opts, puller **ret, crimage_error **err);
void puller_free(puller *p);

typedef enum pull_event_kind {
  PULL_EVENT_RESOLVED,   /* manifest chosen: total bytes known */
  PULL_EVENT_BLOB_START,
  PULL_EVENT_BLOB_PROGRESS,
  PULL_EVENT_BLOB_DONE,
} pull_event_kind;

typedef struct pull_event {
  pull_event_kind kind;
  const char *digest;  /* blob events */
  uint64_t done;       /* bytes of this blob so far (blob events) */
  uint64_t total;      /* size of this blob, or of the whole image for RESOLVED */
} pull_event;

typedef struct pull_request {
  const image_ref *ref;
  const char *handler;       /* "" = default */
  const platform *platform;  /* the platform to select from an index */
  const credential *cred;    /* NULL = anonymous */
  bool unpack;               /* also unpack every layer for overlayfs (store_layer_path), in the download pass */
  /* Polled during transfers; returning true stops the pull with CANCELLED. May be NULL. */
  bool (*cancelled)(void *userdata);
  /* Progress callbacks, called from transfer threads. May be NULL. */
  void (*progress)(void *userdata, const pull_event *ev);
  void *userdata;
} pull_request;

typedef struct pull_result {
  char *image_id;        /* config digest */
  char *repo_digest;     /* digest the reference resolved to (index or manifest) */
  char *manifest_digest; /* platform manifest */
  bool unchanged;        /* the image was already stored for this handler and nothing was downloaded */
} pull_result;

void pull_result_clear(pull_result *r);

/* Pulls req->ref for req->handler. Errors: INVALID_ARGUMENT (bad manifest, no matching platform), NOT_FOUND
 * (MANIFEST_UNKNOWN), UNAUTHENTICATED/PERMISSION_DENIED (auth), UNAVAILABLE (network), DATA_LOSS (digest mismatch),
 * CANCELLED. Messages name the registry, the HTTP status and the registry's error code. */
int puller_pull(puller *p, const pull_request *req, pull_result *ret, crimage_error **err);

#endif
