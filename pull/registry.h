/* A registry HTTP client (OCI distribution spec) on libcurl: one client per daemon shares connections, DNS and TLS
 * sessions between every transfer; a registry_repo is one repository on one endpoint with its authentication state
 * (anonymous, Basic, or a Bearer token from the WWW-Authenticate challenge: with a secret an OAuth2 POST to the
 * realm, falling back to a GET with Basic auth; tokens are cached per client by realm, service, scope and
 * credential until they expire). Thread-safe: several threads may transfer through one repo at once. */
#ifndef CRIMAGE_PULL_REGISTRY_H
#define CRIMAGE_PULL_REGISTRY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "auth/credential.h"
#include "common/error.h"

#define REGISTRY_MAX_REDIRECTS 5
#define REGISTRY_MAX_HEADER_BYTES (64 * 1024) /* all response headers of one response */
#define REGISTRY_MAX_TOKEN_BODY (1024 * 1024)
#define REGISTRY_MAX_ERROR_BODY (64 * 1024)
/* The shapes of those bodies (json_limits): flat objects of a few fields; a token response holds a secret. */
#define REGISTRY_TOKEN_JSON_LIMITS JSON_LIMITS_QUIET(4u << 20, 1000)
#define REGISTRY_ERROR_JSON_LIMITS JSON_LIMITS(1u << 20, 1000)
#define REGISTRY_MAX_CHALLENGES 16
#define REGISTRY_MAX_CHALLENGE_PARAMS 32
#define REGISTRY_MAX_RETRIES 3                 /* for 429 and 5xx answers */
#define REGISTRY_MAX_RETRY_AFTER_MS (30 * 1000) /* a longer Retry-After is cut to this */

typedef struct registry_client_options {
  const char *certs_dir;       /* <dir>/<host[:port]>/{ca.crt,client.cert,client.key}; NULL = none */
  const char *user_agent;      /* NULL = "crimage/<version>" */
  int64_t progress_timeout_ms; /* no bytes for this long fails a request; <= 0 = 5 min */
  int64_t connect_timeout_ms;  /* <= 0 = 30 s */
  /* A throughput floor per request: once a body has started, fewer than min_speed_bytes_per_s bytes per second
   * averaged over min_speed_window_ms fail the request (a trickling connection cannot hold a pull for hours).
   * 0 = default (1024 B/s), < 0 = no floor; window <= 0 = 30 s. */
  int64_t min_speed_bytes_per_s;
  int64_t min_speed_window_ms;
} registry_client_options;

#define REGISTRY_HANDLE_POOL 8 /* idle curl handles kept per client for the next requests */
/* curl's receive buffer per handle: a blob arrives in write callbacks of up to this size (curl's default is 16 KiB).
 * Measured on a 393 MB pull, 3 downloads: 64 KiB saves about 6% of the CPU of 16 KiB; 256 KiB and 1 MiB save no more
 * but cost peak RSS (+1 MB, +6 MB: one buffer per pooled handle). */
#define REGISTRY_RECV_BUFFER (64 * 1024)
#define REGISTRY_CANCEL_POLL_MS 50 /* registry_xfer.cancelled is asked at most this often during a transfer */
#define REGISTRY_TOKEN_CACHE_SIZE 64 /* Bearer tokens kept per client, keyed by (realm, service, scope, credential) */
#define REGISTRY_OAUTH_CLIENT_ID "crimage"

typedef struct registry_client registry_client;

int registry_client_new(const registry_client_options *opts, registry_client **ret, crimage_error **err);
void registry_client_free(registry_client *c);

/* One repository on one endpoint. endpoint is "https://host[:port]" or "http://host[:port]" (no trailing slash; a
 * path prefix is allowed and "/v2" is appended unless override_path). host names the registry in messages and
 * picks the certs.d directory (looked up once, here). cred may be NULL (anonymous); it is copied. */
typedef struct registry_repo registry_repo;
int registry_repo_new(registry_client *c, const char *endpoint, bool override_path, const char *host,
                      const char *name, const credential *cred, registry_repo **ret, crimage_error **err);
void registry_repo_free(registry_repo *r);
const char *registry_repo_host(const registry_repo *r);

/* Per call: cancellation and progress. */
typedef struct registry_xfer {
  bool (*cancelled)(void *userdata); /* polled while transferring; true aborts with CANCELLED */
  /* bytes of the body received so far in this request (not counting a resume offset) */
  void (*progress)(void *userdata, uint64_t received);
  void *userdata;
} registry_xfer;

/* GET /v2/<name>/manifests/<reference> with the Accept of every supported manifest type. The body (at most max
 * bytes) is returned NUL-terminated with its Content-Type (may be NULL). */
int registry_get_manifest(registry_repo *r, const char *reference, size_t max, const registry_xfer *x,
                          char **ret_body, size_t *ret_len, char **ret_content_type, crimage_error **err);

/* HEAD /v2/<name>/manifests/<reference> with the same Accept: what a tag resolves to, without the body. *ret_digest
 * is the Docker-Content-Digest header (NULL when the registry sends none or an invalid one: the caller then GETs the
 * manifest); content type and size (Content-Length, -1 unknown) are optional. One 401 is answered; nothing is
 * retried. */
int registry_head_manifest(registry_repo *r, const char *reference, const registry_xfer *x, char **ret_digest,
                           char **ret_content_type, int64_t *ret_size, crimage_error **err);

/* Where a blob's bytes go. write returns 0 or a negative errno with *err set. restart is called when a server
 * answers a Range request with the whole blob (200 instead of 206): the sink must drop what it holds. */
typedef struct registry_sink {
  int (*write)(void *userdata, const void *data, size_t len, crimage_error **err);
  int (*restart)(void *userdata, crimage_error **err);
  void *userdata;
} registry_sink;

/* GET /v2/<name>/blobs/<digest>, from offset on (a Range request when offset > 0). At most size - offset bytes are
 * accepted (size < 0: unknown, no limit). Redirects to blob storage are followed without the Authorization header. */
int registry_get_blob(registry_repo *r, const char *digest, uint64_t offset, int64_t size, const registry_sink *sink,
                      const registry_xfer *x, crimage_error **err);

/* ---- exposed for tests and for other auth flows ---- */

typedef struct auth_param {
  char *name;  /* lowercased */
  char *value; /* unquoted, unescaped */
} auth_param;

typedef struct auth_challenge {
  char *scheme; /* lowercased: "bearer", "basic" */
  char *token68; /* NULL unless the challenge carries a token68 instead of parameters */
  auth_param params[REGISTRY_MAX_CHALLENGE_PARAMS];
  size_t n_params;
} auth_challenge;

/* Parses one or more WWW-Authenticate header values (RFC 7235 §4.1: challenges separated by commas, parameters as
 * token=token or token="quoted, string"). Appends to *challenges (at most REGISTRY_MAX_CHALLENGES in all).
 * Returns 0 or -EINVAL with *err set. */
int auth_challenges_parse(const char *header, auth_challenge *challenges, size_t *n_challenges, crimage_error **err);
void auth_challenges_clear(auth_challenge *challenges, size_t n);
/* The value of a parameter (case-insensitive name) or NULL. */
const char *auth_challenge_param(const auth_challenge *c, const char *name);

/* How many idle curl handles the client holds for reuse (at most REGISTRY_HANDLE_POOL). */
size_t registry_client_idle_handles(registry_client *c);

/* Maps a registry error code ("MANIFEST_UNKNOWN", ...) and HTTP status to a status. */
int registry_status_from_code(const char *code, long http_status);

/* Numbers of response headers, range-checked before any arithmetic (a registry can send anything):
 * - the wait a Retry-After value (delta-seconds or an HTTP-date, now_s the current Unix time) asks for, in
 *   [0, REGISTRY_MAX_RETRY_AFTER_MS]: a huge value is capped, a date in the past is 0; -1 when it is neither;
 * - a Content-Length: the size, or -1 when it is not a number of at most INT64_MAX;
 * - the first byte of a Content-Range ("bytes <first>-<last>/<size>"): false when it is not one. */
int64_t registry_retry_after_ms(const char *value, int64_t now_s);
int64_t registry_content_length(const char *value);
bool registry_content_range_first(const char *value, uint64_t *ret_first);

#endif
