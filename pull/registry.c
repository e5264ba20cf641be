/* Registry HTTP client. Every transfer is a curl easy handle attached to the client's share handle, so TCP/TLS
 * connections, DNS answers and TLS sessions are reused across requests and threads. Bearer tokens live in a cache
 * of the client, shared by all its repos. Authentication is curl's own
 * (CURLAUTH_BASIC / CURLAUTH_BEARER) rather than a hand-made header: curl then refuses to send it to another host
 * when a redirect leads to blob storage (CURLOPT_UNRESTRICTED_AUTH stays off). */
#include "pull/registry.h"

#include <ctype.h>
#include <curl/curl.h>
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "common/digest.h"
#include "common/dynbuf.h"
#include "common/json.h"
#include "common/log.h"
#include "common/util.h"
#include "pull/manifest.h"

struct registry_client {
  CURLSH *share;
  pthread_mutex_t locks[CURL_LOCK_DATA_LAST];
  char *certs_dir;
  char *user_agent;
  long low_speed_time_s;
  long connect_timeout_ms;
  int64_t min_speed;      /* bytes/s, 0 = no floor */
  int64_t min_speed_window_ms;

  /* Idle easy handles. A handle keeps its receive buffer and the internal multi handle curl_easy_perform makes for
   * it (with its wakeup socketpair), so reusing one spares every request that setup; curl_easy_reset clears the
   * options of the previous request (credentials included) but keeps the handle attached to the share. */
  pthread_mutex_t pool_lock;
  CURL *pool[REGISTRY_HANDLE_POOL];
  size_t n_pool;

  /* Bearer tokens shared by every repo of the client. The key is a sha256 over realm, service, scope and the
   * credential's secrets, so no secret is kept in clear beside the token itself. */
  pthread_mutex_t token_lock;
  struct token_entry {
    char key[DIGEST_MAX_LEN + 1]; /* "" = free slot */
    char *token;                  /* secret */
    int64_t expiry_ms;            /* monotonic: the token is not used from then on */
    uint64_t seq;                 /* when it was stored: a full cache drops the oldest */
  } tokens[REGISTRY_TOKEN_CACHE_SIZE];
  uint64_t token_seq;
};

typedef enum auth_kind {
  AUTH_NONE,
  AUTH_BASIC,
  AUTH_BEARER,
} auth_kind;

struct registry_repo {
  registry_client *client;
  char *base;  /* ".../v2" */
  char *host;  /* for messages and certs.d */
  char *name;  /* repository path */
  credential *cred; /* NULL = anonymous */
  /* <certs dir>/<host>/ files that exist, looked up once per repo rather than stat()ed on every request */
  char *ca_file;
  char *cert_file;
  char *key_file;

  pthread_mutex_t lock; /* guards the auth state below */
  auth_kind auth;
  char *token;              /* bearer token (secret) */
  int64_t token_expiry_ms;  /* monotonic; 0 = none known */
  unsigned auth_generation; /* bumped each time the auth state changes */
};

/* ---- client ---- */

static void share_lock(CURL *h, curl_lock_data data, curl_lock_access access, void *userdata)
{
  registry_client *c = userdata;
  if ((int) data >= 0 && data < CURL_LOCK_DATA_LAST)
    pthread_mutex_lock(&c->locks[data]);
}

static void share_unlock(CURL *h, curl_lock_data data, void *userdata)
{
  registry_client *c = userdata;
  if ((int) data >= 0 && data < CURL_LOCK_DATA_LAST)
    pthread_mutex_unlock(&c->locks[data]);
}

static void curl_init_once(void) { curl_global_init(CURL_GLOBAL_DEFAULT); }

int registry_client_new(const registry_client_options *opts, registry_client **ret, crimage_error **err)
{
  static pthread_once_t once = PTHREAD_ONCE_INIT;
  static const registry_client_options defaults = {0};
  if (!opts)
    opts = &defaults;
  /* curl_global_init is not thread-safe; doing it once here keeps it out of the transfer threads. */
  pthread_once(&once, curl_init_once);

  registry_client *c = xcalloc(1, sizeof(*c));
  for (size_t i = 0; i < ARRAY_SIZE(c->locks); i++)
    pthread_mutex_init(&c->locks[i], NULL);
  pthread_mutex_init(&c->token_lock, NULL);
  pthread_mutex_init(&c->pool_lock, NULL);
  c->share = curl_share_init();
  if (!c->share) {
    registry_client_free(c);
    return crimage_error_set(err, CRIMAGE_INTERNAL, 0, "curl_share_init failed");
  }
  curl_share_setopt(c->share, CURLSHOPT_LOCKFUNC, share_lock);
  curl_share_setopt(c->share, CURLSHOPT_UNLOCKFUNC, share_unlock);
  curl_share_setopt(c->share, CURLSHOPT_USERDATA, c);
  curl_share_setopt(c->share, CURLSHOPT_SHARE, CURL_LOCK_DATA_DNS);
  curl_share_setopt(c->share, CURLSHOPT_SHARE, CURL_LOCK_DATA_SSL_SESSION);
  curl_share_setopt(c->share, CURLSHOPT_SHARE, CURL_LOCK_DATA_CONNECT);

  c->certs_dir = opts->certs_dir ? xstrdup(opts->certs_dir) : NULL;
  c->user_agent = xstrdup(opts->user_agent ? opts->user_agent : "crimage/" CRIMAGE_VERSION);
  int64_t pt = opts->progress_timeout_ms > 0 ? opts->progress_timeout_ms : 5 * 60 * 1000;
  c->low_speed_time_s = (long) ((pt + 999) / 1000);
  c->connect_timeout_ms = opts->connect_timeout_ms > 0 ? (long) opts->connect_timeout_ms : 30000;
  if (opts->min_speed_bytes_per_s == 0)
    c->min_speed = 1024;
  else
    c->min_speed = opts->min_speed_bytes_per_s < 0 ? 0 : opts->min_speed_bytes_per_s;
  c->min_speed_window_ms = opts->min_speed_window_ms > 0 ? opts->min_speed_window_ms : 30000;
  *ret = c;
  return 0;
}

void registry_client_free(registry_client *c)
{
  if (!c)
    return;
  /* The handles first: a share still in use by a handle cannot be cleaned up. */
  for (size_t i = 0; i < c->n_pool; i++)
    curl_easy_cleanup(c->pool[i]);
  pthread_mutex_destroy(&c->pool_lock);
  if (c->share)
    curl_share_cleanup(c->share);
  for (size_t i = 0; i < ARRAY_SIZE(c->locks); i++)
    pthread_mutex_destroy(&c->locks[i]);
  for (size_t i = 0; i < ARRAY_SIZE(c->tokens); i++)
    secret_free(c->tokens[i].token);
  pthread_mutex_destroy(&c->token_lock);
  free(c->certs_dir);
  free(c->user_agent);
  free(c);
}

/* ---- repo ---- */

static bool file_exists(const char *path)
{
  struct stat st;
  return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

/* The per-registry CA and client certificate (the docker/containerd certs.d layout). */
static void find_tls_files(const registry_client *c, registry_repo *r)
{
  const char *host = r->host;
  if (!c->certs_dir || str_empty(host) || strchr(host, '/') || streq(host, "..") || streq(host, "."))
    return;
  char *ca = xasprintf("%s/%s/ca.crt", c->certs_dir, host);
  char *cert = xasprintf("%s/%s/client.cert", c->certs_dir, host);
  char *key = xasprintf("%s/%s/client.key", c->certs_dir, host);
  if (file_exists(ca))
    r->ca_file = TAKE_PTR(ca);
  if (file_exists(cert) && file_exists(key)) {
    r->cert_file = TAKE_PTR(cert);
    r->key_file = TAKE_PTR(key);
  }
  free(ca);
  free(cert);
  free(key);
}

int registry_repo_new(registry_client *c, const char *endpoint, bool override_path, const char *host,
                      const char *name, const credential *cred, registry_repo **ret, crimage_error **err)
{
  if (!str_has_prefix(endpoint, "https://") && !str_has_prefix(endpoint, "http://"))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "registry endpoint %s is not http(s)", endpoint);
  if (str_empty(name) || strlen(name) > 255)
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "invalid repository name");
  registry_repo *r = xcalloc(1, sizeof(*r));
  r->client = c;
  size_t n = strlen(endpoint);
  while (n > 0 && endpoint[n - 1] == '/')
    n--;
  r->base = xasprintf("%.*s%s", (int) n, endpoint, override_path ? "" : "/v2");
  r->host = xstrdup(host);
  r->name = xstrdup(name);
  find_tls_files(c, r);
  pthread_mutex_init(&r->lock, NULL);
  if (cred && !credential_is_empty(cred)) {
    r->cred = credential_dup(cred);
    if (!str_empty(cred->registry_token)) {
      /* A registry token is a bearer token to send as is. */
      r->auth = AUTH_BEARER;
      r->token = xstrdup(cred->registry_token);
    }
  }
  *ret = r;
  return 0;
}

void registry_repo_free(registry_repo *r)
{
  if (!r)
    return;
  free(r->base);
  free(r->host);
  free(r->name);
  credential_free(r->cred);
  secret_free(r->token);
  free(r->ca_file);
  free(r->cert_file);
  free(r->key_file);
  pthread_mutex_destroy(&r->lock);
  free(r);
}

const char *registry_repo_host(const registry_repo *r) { return r->host; }

/* ---- WWW-Authenticate (RFC 7235) ---- */

static bool is_tchar(char ch)
{
  return isalnum((unsigned char) ch) || (ch && strchr("!#$%&'*+-.^_`|~", ch));
}

static bool is_token68_char(char ch)
{
  return isalnum((unsigned char) ch) || (ch && strchr("-._~+/", ch));
}

static const char *skip_ows(const char *p)
{
  while (*p == ' ' || *p == '\t')
    p++;
  return p;
}

static char *lowercase_dup(const char *s, size_t n)
{
  char *d = xstrndup(s, n);
  for (char *q = d; *q; q++)
    *q = (char) tolower((unsigned char) *q);
  return d;
}

/* At p (after optional whitespace): does an auth-param ("name" BWS "=" BWS value) start here? */
static bool param_starts(const char *p)
{
  const char *q = p;
  while (is_tchar(*q))
    q++;
  if (q == p)
    return false;
  q = skip_ows(q);
  if (*q != '=')
    return false;
  q = skip_ows(q + 1);
  return *q == '"' || is_tchar(*q);
}

static int parse_quoted(const char **pp, char **ret, crimage_error **err)
{
  const char *p = *pp + 1; /* past the opening quote */
  cleanup_dynbuf dynbuf b;
  dynbuf_init(&b, 8192);
  for (;;) {
    char ch = *p;
    if (ch == 0)
      return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "WWW-Authenticate: unterminated quoted string");
    if (ch == '"')
      break;
    if (ch == '\\') {
      p++;
      ch = *p;
      if (ch == 0)
        return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "WWW-Authenticate: bad escape");
    }
    if (dynbuf_append(&b, &ch, 1) < 0)
      return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "WWW-Authenticate: value too long");
    p++;
  }
  *pp = p + 1;
  *ret = b.data ? dynbuf_take(&b, NULL) : xstrdup("");
  return 0;
}

void auth_challenges_clear(auth_challenge *challenges, size_t n)
{
  for (size_t i = 0; i < n; i++) {
    auth_challenge *c = &challenges[i];
    free(c->scheme);
    free(c->token68);
    for (size_t j = 0; j < c->n_params; j++) {
      free(c->params[j].name);
      free(c->params[j].value);
    }
    memset(c, 0, sizeof(*c));
  }
}

int auth_challenges_parse(const char *header, auth_challenge *challenges, size_t *n_challenges, crimage_error **err)
{
  const char *p = header;
  for (;;) {
    /* Empty list elements are allowed (RFC 7230 §7). */
    while (*p == ' ' || *p == '\t' || *p == ',')
      p++;
    if (*p == 0)
      return 0;
    const char *s = p;
    while (is_tchar(*p))
      p++;
    if (p == s)
      return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "WWW-Authenticate: expected an auth scheme");
    if (*n_challenges >= REGISTRY_MAX_CHALLENGES)
      return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "WWW-Authenticate: too many challenges");
    auth_challenge *c = &challenges[(*n_challenges)++];
    memset(c, 0, sizeof(*c));
    c->scheme = lowercase_dup(s, (size_t) (p - s));
    if (*p != ' ' && *p != '\t' && *p != ',' && *p != 0)
      return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "WWW-Authenticate: bad character after scheme");
    p = skip_ows(p);

    if (*p && *p != ',' && !param_starts(p)) {
      /* token68 */
      s = p;
      while (is_token68_char(*p))
        p++;
      while (*p == '=')
        p++;
      if (p == s)
        return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "WWW-Authenticate: bad token68");
      c->token68 = xstrndup(s, (size_t) (p - s));
      p = skip_ows(p);
      if (*p != 0 && *p != ',')
        return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "WWW-Authenticate: junk after token68");
      continue;
    }

    /* #auth-param: params are separated by commas; a comma followed by something that is not a param starts the
     * next challenge. */
    while (param_starts(p)) {
      s = p;
      while (is_tchar(*p))
        p++;
      if (c->n_params >= REGISTRY_MAX_CHALLENGE_PARAMS)
        return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "WWW-Authenticate: too many parameters");
      auth_param *ap = &c->params[c->n_params++];
      ap->name = lowercase_dup(s, (size_t) (p - s));
      p = skip_ows(p);
      p = skip_ows(p + 1); /* '=' */
      if (*p == '"') {
        int r = parse_quoted(&p, &ap->value, err);
        if (r < 0)
          return r;
      } else {
        s = p;
        while (is_tchar(*p))
          p++;
        ap->value = xstrndup(s, (size_t) (p - s));
      }
      p = skip_ows(p);
      if (*p == 0)
        return 0;
      if (*p != ',')
        return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "WWW-Authenticate: expected ',' after %s",
                                 ap->name);
      while (*p == ',' || *p == ' ' || *p == '\t')
        p++;
    }
  }
}

const char *auth_challenge_param(const auth_challenge *c, const char *name)
{
  for (size_t i = 0; i < c->n_params; i++)
    if (strcasecmp(c->params[i].name, name) == 0)
      return c->params[i].value;
  return NULL;
}

/* ---- errors ---- */

int registry_status_from_code(const char *code, long http_status)
{
  static const struct {
    const char *code;
    crimage_status status;
  } map[] = {
      {"MANIFEST_UNKNOWN", CRIMAGE_NOT_FOUND},
      {"BLOB_UNKNOWN", CRIMAGE_NOT_FOUND},
      {"NAME_UNKNOWN", CRIMAGE_NOT_FOUND},
      {"UNAUTHORIZED", CRIMAGE_UNAUTHENTICATED},
      {"DENIED", CRIMAGE_PERMISSION_DENIED},
      {"TOOMANYREQUESTS", CRIMAGE_RESOURCE_EXHAUSTED},
      {"NAME_INVALID", CRIMAGE_INVALID_ARGUMENT},
      {"TAG_INVALID", CRIMAGE_INVALID_ARGUMENT},
      {"DIGEST_INVALID", CRIMAGE_INVALID_ARGUMENT},
      {"MANIFEST_INVALID", CRIMAGE_INVALID_ARGUMENT},
      {"UNSUPPORTED", CRIMAGE_UNIMPLEMENTED},
  };
  if (code)
    for (size_t i = 0; i < ARRAY_SIZE(map); i++)
      if (streq(code, map[i].code))
        return map[i].status;
  switch (http_status) {
  case 400:
    return CRIMAGE_INVALID_ARGUMENT;
  case 401:
    return CRIMAGE_UNAUTHENTICATED;
  case 403:
    return CRIMAGE_PERMISSION_DENIED;
  case 404:
    return CRIMAGE_NOT_FOUND;
  case 429:
    return CRIMAGE_RESOURCE_EXHAUSTED;
  default:
    return http_status >= 500 ? CRIMAGE_UNAVAILABLE : CRIMAGE_UNKNOWN;
  }
}

/* Copies text a registry sent into a message: printable ASCII only, bounded. */
static void sanitize(const char *in, char *out, size_t size)
{
  size_t j = 0;
  for (size_t i = 0; in && in[i] && j + 1 < size; i++)
    out[j++] = (in[i] >= 0x20 && in[i] < 0x7f) ? in[i] : '?';
  out[j] = 0;
}

/* ---- one HTTP transfer ---- */

typedef struct xfer_ctx {
  CURL *h;
  registry_client *client;
  const registry_xfer *x;
  /* body destinations: a bounded buffer or a sink */
  dynbuf *body;
  const registry_sink *sink;
  uint64_t offset; /* resume offset asked for */
  int64_t limit;   /* max bytes of a 2xx body, < 0 none */
  int64_t total;   /* the blob's size, < 0 unknown: the limit when a server restarts from 0 */
  uint64_t received;
  bool body_started;
  bool too_big;
  bool header_too_big;
  bool bad_range; /* a 206 that does not start at the offset asked for */
  bool cancelled;
  bool too_slow;  /* below the throughput floor */
  int64_t cancel_polled_ms; /* when x->cancelled was last asked (0 = not yet) */
  int64_t window_start_ms; /* throughput window: when it started (0 = no body yet) and the bytes by then */
  uint64_t window_start_bytes;
  const char *post; /* a form body to POST (the OAuth2 token request); NULL = GET */
  bool head;        /* HEAD: headers only (registry_head_manifest) */
  int sink_r;
  crimage_error *sink_err;
  dynbuf errbody; /* body of a non-2xx response */
  dynbuf headers; /* header lines of the latest response */
  char errbuf[CURL_ERROR_SIZE];
} xfer_ctx;

static size_t header_cb(char *data, size_t size, size_t n, void *userdata)
{
  xfer_ctx *ctx = userdata;
  size_t len = size * n;
  /* A new response (after a redirect or a 401 with a 100-continue before it) starts a new header block. */
  if (len >= 5 && memcmp(data, "HTTP/", 5) == 0)
    dynbuf_reset(&ctx->headers);
  if (dynbuf_append(&ctx->headers, data, len) < 0) {
    ctx->header_too_big = true;
    return 0;
  }
  return len;
}

static long current_status(xfer_ctx *ctx)
{
  long status = 0;
  curl_easy_getinfo(ctx->h, CURLINFO_RESPONSE_CODE, &status);
  return status;
}

static char *header_get(const xfer_ctx *ctx, const char *name);

bool registry_content_range_first(const char *value, uint64_t *ret_first)
{
  if (!value || strncasecmp(value, "bytes ", 6) != 0)
    return false;
  const char *p = value + 6;
  size_t n = strspn(p, "0123456789");
  if (n == 0 || n > 20 || p[n] != '-')
    return false;
  char num[21];
  memcpy(num, p, n);
  num[n] = '\0';
  return parse_u64_decimal(num, ret_first) == 0;
}

/* A 206 must continue exactly where we asked ("Content-Range: bytes <offset>-<last>/<size>"). */
static bool range_matches(const xfer_ctx *ctx)
{
  cleanup_free char *cr = header_get(ctx, "Content-Range");
  uint64_t start;
  return registry_content_range_first(cr, &start) && start == ctx->offset;
}

static size_t write_cb(char *data, size_t size, size_t n, void *userdata)
{
  xfer_ctx *ctx = userdata;
  size_t len = size * n;
  long status = current_status(ctx);
  if (status < 200 || status >= 300) {
    /* Error bodies are only read for their error code; keep the start and drop the rest. */
    size_t room = ctx->errbody.max > ctx->errbody.len ? ctx->errbody.max - ctx->errbody.len : 0;
    if (room)
      (void) dynbuf_append(&ctx->errbody, data, len < room ? len : room);
    return len;
  }
  if (!ctx->body_started) {
    ctx->body_started = true;
    ctx->window_start_ms = now_monotonic_ms();
    ctx->window_start_bytes = 0;
    if (ctx->offset > 0 && status != 206 && ctx->sink && ctx->sink->restart) {
      /* The server ignored the Range request and sends the whole blob. */
      ctx->sink_r = ctx->sink->restart(ctx->sink->userdata, &ctx->sink_err);
      if (ctx->sink_r < 0)
        return 0;
      ctx->offset = 0;
      ctx->limit = ctx->total;
    } else if (ctx->offset > 0 && status == 206 && !range_matches(ctx)) {
      ctx->bad_range = true;
      return 0;
    }
  }
  if (ctx->limit >= 0 && ctx->received + len > (uint64_t) ctx->limit) {
    ctx->too_big = true;
    return 0;
  }
  if (ctx->sink) {
    ctx->sink_r = ctx->sink->write(ctx->sink->userdata, data, len, &ctx->sink_err);
    if (ctx->sink_r < 0)
      return 0;
  } else if (dynbuf_append(ctx->body, data, len) < 0) {
    ctx->too_big = true;
    return 0;
  }
  ctx->received += len;
  if (ctx->x && ctx->x->progress)
    ctx->x->progress(ctx->x->userdata, ctx->received);
  return len;
}

static int xferinfo_cb(void *userdata, curl_off_t dltotal, curl_off_t dlnow, curl_off_t ultotal, curl_off_t ulnow)
{
  xfer_ctx *ctx = userdata;
  /* curl calls this on every pass of its transfer loop (several times for one small request, once per chunk of a
   * blob); the cancellation check can be costly (over CRI it polls the call's completion queue), so it runs at most
   * every REGISTRY_CANCEL_POLL_MS, and always on the first call. */
  if (ctx->x && ctx->x->cancelled) {
    int64_t now = now_monotonic_ms();
    if (ctx->cancel_polled_ms == 0 || now - ctx->cancel_polled_ms >= REGISTRY_CANCEL_POLL_MS) {
      ctx->cancel_polled_ms = now > 0 ? now : 1;
      if (ctx->x->cancelled(ctx->x->userdata)) {
        ctx->cancelled = true;
        return 1;
      }
    }
  }
  /* The throughput floor, measured on the body only: a registry that takes long to start answering is the
   * no-progress timeout's business, one that trickles is this one's. */
  registry_client *c = ctx->client;
  if (c && c->min_speed > 0 && ctx->window_start_ms > 0) {
    int64_t now = now_monotonic_ms();
    int64_t elapsed = now - ctx->window_start_ms;
    if (elapsed >= c->min_speed_window_ms) {
      uint64_t bytes = ctx->received - ctx->window_start_bytes;
      if ((int64_t) (bytes * 1000 / (uint64_t) elapsed) < c->min_speed) {
        ctx->too_slow = true;
        return 1;
      }
      ctx->window_start_ms = now;
      ctx->window_start_bytes = ctx->received;
    }
  }
  return 0;
}

/* Every value of header `name` in the latest response, joined with ", " (the list form of RFC 7230 §3.2.2). */
static char *header_get(const xfer_ctx *ctx, const char *name)
{
  if (!ctx->headers.data)
    return NULL;
  size_t nl = strlen(name);
  cleanup_dynbuf dynbuf out;
  dynbuf_init(&out, REGISTRY_MAX_HEADER_BYTES);
  bool found = false;
  const char *p = ctx->headers.data;
  while (*p) {
    const char *eol = strchr(p, '\n');
    size_t ll = eol ? (size_t) (eol - p) : strlen(p);
    if (ll > nl && strncasecmp(p, name, nl) == 0 && p[nl] == ':') {
      const char *v = skip_ows(p + nl + 1);
      size_t vl = ll - (size_t) (v - p);
      while (vl > 0 && (v[vl - 1] == '\r' || v[vl - 1] == ' ' || v[vl - 1] == '\t'))
        vl--;
      if (found)
        (void) dynbuf_append_str(&out, ", ");
      (void) dynbuf_append(&out, v, vl);
      found = true;
    }
    if (!eol)
      break;
    p = eol + 1;
  }
  if (!found)
    return NULL;
  return out.data ? dynbuf_take(&out, NULL) : xstrdup("");
}

static void setup_tls(const registry_repo *r, CURL *h)
{
  if (r->ca_file)
    curl_easy_setopt(h, CURLOPT_CAINFO, r->ca_file); /* curl copies string options */
  if (r->cert_file && r->key_file) {
    curl_easy_setopt(h, CURLOPT_SSLCERT, r->cert_file);
    curl_easy_setopt(h, CURLOPT_SSLKEY, r->key_file);
  }
}

typedef struct auth_snapshot {
  auth_kind kind;
  char *token;
  unsigned generation;
} auth_snapshot;

static void auth_snapshot_clear(auth_snapshot *s)
{
  secret_free(s->token);
  s->token = NULL;
}

static void auth_take_snapshot(registry_repo *r, auth_snapshot *s)
{
  pthread_mutex_lock(&r->lock);
  s->kind = r->auth;
  if (r->auth == AUTH_BEARER && r->token_expiry_ms && now_monotonic_ms() >= r->token_expiry_ms) {
    /* Expired: go without; the 401 that follows fetches a fresh one. */
    s->kind = AUTH_NONE;
  }
  s->token = (s->kind == AUTH_BEARER) ? xstrdup(r->token) : NULL;
  s->generation = r->auth_generation;
  pthread_mutex_unlock(&r->lock);
}

/* An easy handle for one request: an idle one of the client (attached to its share already) or a new one. */
static CURL *handle_acquire(registry_client *c)
{
  CURL *h = NULL;
  pthread_mutex_lock(&c->pool_lock);
  if (c->n_pool > 0)
    h = c->pool[--c->n_pool];
  pthread_mutex_unlock(&c->pool_lock);
  if (h)
    return h;
  h = curl_easy_init();
  if (h && curl_easy_setopt(h, CURLOPT_SHARE, c->share) != CURLE_OK) {
    curl_easy_cleanup(h);
    return NULL;
  }
  return h;
}

/* Back to the pool, every option of the request reset (credentials, callbacks and their pointers into the request's
 * context); when the pool is full the handle is freed. The share and its connections stay. */
static void handle_release(registry_client *c, CURL *h)
{
  curl_easy_reset(h);
  pthread_mutex_lock(&c->pool_lock);
  if (c->n_pool < ARRAY_SIZE(c->pool)) {
    c->pool[c->n_pool++] = h;
    h = NULL;
  }
  pthread_mutex_unlock(&c->pool_lock);
  if (h)
    curl_easy_cleanup(h);
}

size_t registry_client_idle_handles(registry_client *c)
{
  pthread_mutex_lock(&c->pool_lock);
  size_t n = c->n_pool;
  pthread_mutex_unlock(&c->pool_lock);
  return n;
}

/* Runs one request. auth: the repo's auth state to present (NULL: none). basic: a credential to present with HTTP
 * Basic instead (the token endpoint). */
static CURLcode perform(registry_repo *r, const char *url, const char *accept, const auth_snapshot *auth,
                        const credential *basic, xfer_ctx *ctx, long *ret_status)
{
  registry_client *c = r->client;
  CURL *h = handle_acquire(c);
  if (!h)
    return CURLE_OUT_OF_MEMORY;
  ctx->h = h;
  ctx->client = c;
  ctx->errbuf[0] = 0;
  struct curl_slist *hdrs = NULL;

  /* The same size on every request: a pooled handle keeps the buffer of its first one. */
  curl_easy_setopt(h, CURLOPT_BUFFERSIZE, (long) REGISTRY_RECV_BUFFER);
  curl_easy_setopt(h, CURLOPT_URL, url);
  curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(h, CURLOPT_ERRORBUFFER, ctx->errbuf);
  curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "http,https");
  curl_easy_setopt(h, CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
  curl_easy_setopt(h, CURLOPT_FOLLOWLOCATION, 1L);
  curl_easy_setopt(h, CURLOPT_MAXREDIRS, (long) REGISTRY_MAX_REDIRECTS);
  curl_easy_setopt(h, CURLOPT_UNRESTRICTED_AUTH, 0L);
  curl_easy_setopt(h, CURLOPT_HTTP_VERSION, (long) CURL_HTTP_VERSION_2TLS);
  curl_easy_setopt(h, CURLOPT_USERAGENT, c->user_agent);
  curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS, c->connect_timeout_ms);
  /* No bytes for the progress timeout fails the request (less than 1 byte/s over that window). */
  curl_easy_setopt(h, CURLOPT_LOW_SPEED_LIMIT, 1L);
  curl_easy_setopt(h, CURLOPT_LOW_SPEED_TIME, c->low_speed_time_s);
  curl_easy_setopt(h, CURLOPT_HEADERFUNCTION, header_cb);
  curl_easy_setopt(h, CURLOPT_HEADERDATA, ctx);
  curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, write_cb);
  curl_easy_setopt(h, CURLOPT_WRITEDATA, ctx);
  curl_easy_setopt(h, CURLOPT_XFERINFOFUNCTION, xferinfo_cb);
  curl_easy_setopt(h, CURLOPT_XFERINFODATA, ctx);
  curl_easy_setopt(h, CURLOPT_NOPROGRESS, 0L);
  setup_tls(r, h);

  if (accept) {
    cleanup_free char *a = xasprintf("Accept: %s", accept);
    hdrs = curl_slist_append(hdrs, a);
  }
  if (ctx->head)
    curl_easy_setopt(h, CURLOPT_NOBODY, 1L);
  if (ctx->post) {
    /* application/x-www-form-urlencoded, curl's default for POSTFIELDS; the pointer stays valid during perform */
    curl_easy_setopt(h, CURLOPT_POSTFIELDS, ctx->post);
    curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE, (long) strlen(ctx->post));
  }
  if (ctx->offset > 0) {
    char range[64];
    snprintf(range, sizeof(range), "%" PRIu64 "-", ctx->offset);
    curl_easy_setopt(h, CURLOPT_RANGE, range);
  }
  if (hdrs)
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, hdrs);

  if (auth && auth->kind == AUTH_BEARER && auth->token) {
    curl_easy_setopt(h, CURLOPT_HTTPAUTH, (long) CURLAUTH_BEARER);
    curl_easy_setopt(h, CURLOPT_XOAUTH2_BEARER, auth->token);
  } else if ((auth && auth->kind == AUTH_BASIC && r->cred) || basic) {
    const credential *cr = basic ? basic : r->cred;
    curl_easy_setopt(h, CURLOPT_HTTPAUTH, (long) CURLAUTH_BASIC);
    curl_easy_setopt(h, CURLOPT_USERNAME, cr->username ? cr->username : "");
    curl_easy_setopt(h, CURLOPT_PASSWORD, cr->password ? cr->password : "");
  }

  CURLcode cc = curl_easy_perform(h);
  *ret_status = current_status(ctx);
  /* ctx->h stays valid for status only until here; the reset drops the secrets and the pointers into ctx. */
  handle_release(c, h);
  curl_slist_free_all(hdrs);
  ctx->h = NULL;
  return cc;
}

/* Turns a failed transfer into an error naming the registry, the request, the HTTP status and the registry's code. */
static int transfer_error(registry_repo *r, const char *what, xfer_ctx *ctx, CURLcode cc, long status,
                          crimage_error **err)
{
  if (ctx->cancelled)
    return crimage_error_set(err, CRIMAGE_CANCELLED, 0, "registry %s: %s: cancelled", r->host, what);
  if (ctx->sink_err) {
    int ret = -(ctx->sink_err->errnum ? ctx->sink_err->errnum : EIO);
    if (err && !*err)
      *err = TAKE_PTR(ctx->sink_err);
    else
      crimage_error_clear(&ctx->sink_err);
    return ret;
  }
  if (ctx->header_too_big)
    return crimage_error_set(err, CRIMAGE_UNKNOWN, 0, "registry %s: %s: response headers exceed %d bytes", r->host,
                             what, REGISTRY_MAX_HEADER_BYTES);
  if (ctx->bad_range)
    return crimage_error_set(err, CRIMAGE_UNKNOWN, 0,
                             "registry %s: %s: partial content does not start at the requested offset %" PRIu64,
                             r->host, what, ctx->offset);
  if (ctx->too_big)
    return crimage_error_set(err, ctx->sink ? CRIMAGE_DATA_LOSS : CRIMAGE_INVALID_ARGUMENT, 0,
                             "registry %s: %s: response larger than the limit of %" PRId64 " bytes", r->host, what,
                             ctx->limit >= 0 ? ctx->limit : (int64_t) ctx->body->max);
  if (ctx->too_slow)
    return crimage_error_set(err, CRIMAGE_UNAVAILABLE, 0,
                             "registry %s: %s: slower than %" PRId64 " bytes/s over %" PRId64 " s (%" PRIu64
                             " bytes received)",
                             r->host, what, r->client->min_speed, r->client->min_speed_window_ms / 1000,
                             ctx->received);
  if (cc == CURLE_OPERATION_TIMEDOUT)
    return crimage_error_set(err, CRIMAGE_UNAVAILABLE, 0, "registry %s: %s: no progress for %ld s", r->host,
                             what, r->client->low_speed_time_s);
  if (cc == CURLE_PEER_FAILED_VERIFICATION || cc == CURLE_SSL_CACERT_BADFILE || cc == CURLE_SSL_CONNECT_ERROR ||
      cc == CURLE_SSL_CERTPROBLEM || cc == CURLE_SSL_ISSUER_ERROR) {
    char msg[CURL_ERROR_SIZE];
    sanitize(ctx->errbuf[0] ? ctx->errbuf : curl_easy_strerror(cc), msg, sizeof(msg));
    return crimage_error_set(err, CRIMAGE_UNAVAILABLE, 0,
                             "registry %s: %s: TLS error: %s (a private CA goes in %s/%s/ca.crt, a client "
                             "certificate in client.cert and client.key there)",
                             r->host, what, msg, r->client->certs_dir ? r->client->certs_dir : "<certsDir>",
                             r->host);
  }
  if (cc == CURLE_TOO_MANY_REDIRECTS)
    return crimage_error_set(err, CRIMAGE_UNAVAILABLE, 0, "registry %s: %s: more than %d redirects", r->host, what,
                             REGISTRY_MAX_REDIRECTS);
  if (cc != CURLE_OK) {
    char msg[CURL_ERROR_SIZE];
    sanitize(ctx->errbuf[0] ? ctx->errbuf : curl_easy_strerror(cc), msg, sizeof(msg));
    return crimage_error_set(err, CRIMAGE_UNAVAILABLE, 0, "registry %s: %s: %s", r->host, what, msg);
  }

  /* An HTTP error: look for the registry's error code ({"errors":[{"code":...,"message":...}]}). */
  const char *code = NULL, *message = NULL;
  cleanup_json json_object *root = NULL;
  if (ctx->errbody.len > 0) {
    cleanup_error crimage_error *jerr = NULL;
    if (json_parse(ctx->errbody.data, ctx->errbody.len, "registry error", REGISTRY_ERROR_JSON_LIMITS, &root,
                   &jerr) == 0) {
      json_object *errors = json_get_array(root, "errors");
      json_object *e0 = errors && json_object_array_length(errors) > 0 ? json_object_array_get_idx(errors, 0) : NULL;
      code = json_get_string(e0, "code");
      message = json_get_string(e0, "message");
    }
  }
  char scode[64], smsg[256];
  sanitize(code, scode, sizeof(scode));
  sanitize(message, smsg, sizeof(smsg));
  crimage_status st = registry_status_from_code(code, status);
  return crimage_error_set(err, st, 0, "registry %s: %s: HTTP %ld%s%s%s%s", r->host, what, status,
                           code ? " " : "", scode, message ? ": " : "", smsg);
}

/* ---- tokens ---- */

static void token_cache_key(const char *realm, const char *service, const char *scope, const credential *cred,
                            char out[DIGEST_MAX_LEN + 1])
{
  /* Fields are NUL-separated so ("ab","c") and ("a","bc") differ. The credential enters only through the hash. */
  digester *d = digester_new("sha256");
  const char *parts[] = {realm, service ? service : "", scope,
                         cred ? (cred->username ? cred->username : "") : "\x01anonymous",
                         cred ? (cred->password ? cred->password : "") : "",
                         cred ? (cred->identity_token ? cred->identity_token : "") : ""};
  for (size_t i = 0; i < ARRAY_SIZE(parts); i++)
    digester_update(d, parts[i], strlen(parts[i]) + 1);
  digester_final(d, out);
  digester_free(d);
}

/* A copy of the cached token for key, with its expiry, or NULL. */
static char *token_cache_get(registry_client *c, const char *key, int64_t *ret_expiry)
{
  char *token = NULL;
  int64_t now = now_monotonic_ms();
  pthread_mutex_lock(&c->token_lock);
  for (size_t i = 0; i < ARRAY_SIZE(c->tokens); i++)
    if (c->tokens[i].token && streq(c->tokens[i].key, key) && c->tokens[i].expiry_ms > now) {
      token = xstrdup(c->tokens[i].token);
      *ret_expiry = c->tokens[i].expiry_ms;
      break;
    }
  pthread_mutex_unlock(&c->token_lock);
  return token;
}

/* Stores a token: over the entry with the same key, else in a free or expired slot, else over the entry closest to
 * its expiry, so the cache stays bounded. */
static void token_cache_put(registry_client *c, const char *key, const char *token, int64_t expiry_ms)
{
  int64_t now = now_monotonic_ms();
  pthread_mutex_lock(&c->token_lock);
  struct token_entry *slot = NULL;
  for (size_t i = 0; i < ARRAY_SIZE(c->tokens) && !slot; i++)
    if (c->tokens[i].token && streq(c->tokens[i].key, key))
      slot = &c->tokens[i];
  for (size_t i = 0; i < ARRAY_SIZE(c->tokens) && !slot; i++)
    if (!c->tokens[i].token || c->tokens[i].expiry_ms <= now)
      slot = &c->tokens[i];
  if (!slot) {
    /* The oldest, not the one nearest its expiry: expiries computed from a registry's second-granular issued_at
     * tie or jitter by milliseconds, which would make the choice arbitrary. */
    slot = &c->tokens[0];
    for (size_t i = 1; i < ARRAY_SIZE(c->tokens); i++)
      if (c->tokens[i].seq < slot->seq)
        slot = &c->tokens[i];
  }
  secret_free(slot->token);
  snprintf(slot->key, sizeof(slot->key), "%s", key);
  slot->token = xstrdup(token);
  slot->expiry_ms = expiry_ms;
  slot->seq = ++c->token_seq;
  pthread_mutex_unlock(&c->token_lock);
}

/* "2026-11-26T16:00:00Z" or with fractional seconds -> seconds since the epoch; -1 when it is not RFC 3339 UTC. */
static int64_t parse_issued_at(const char *s)
{
  struct tm tm = {0};
  const char *p = s ? strptime(s, "%Y-%m-%dT%H:%M:%S", &tm) : NULL;
  if (!p)
    return -1;
  if (*p == '.')
    for (p++; isdigit((unsigned char) *p); p++)
      ;
  if (!streq(p, "Z"))
    return -1;
  return (int64_t) timegm(&tm);
}

/* Appends "&name=<value URL-encoded>" (without the '&' for the first) to a form body. */
static void form_add(dynbuf *b, const char *name, const char *value)
{
  char *e = curl_easy_escape(NULL, value, 0);
  (void) dynbuf_printf(b, "%s%s=%s", b->len ? "&" : "", name, e ? e : "");
  if (e)
    explicit_bzero(e, strlen(e));
  curl_free(e);
}

/* One token request (POST when form is set, else GET url with Basic from `basic` if set). Returns 0 with the HTTP
 * status (any), or a negative errno when the request did not complete. */
static int token_request(registry_repo *r, const char *what, const char *url, const char *form,
                         const credential *basic, dynbuf *body, long *ret_status, crimage_error **err)
{
  xfer_ctx ctx = {.body = body, .limit = -1, .post = form};
  dynbuf_init(&ctx.errbody, REGISTRY_MAX_ERROR_BODY);
  dynbuf_init(&ctx.headers, REGISTRY_MAX_HEADER_BYTES);
  long status = 0;
  dynbuf_reset(body);
  CURLcode cc = perform(r, url, "application/json", NULL, basic, &ctx, &status);
  int ret = 0;
  if (cc != CURLE_OK || (status >= 500 && status < 600))
    ret = transfer_error(r, what, &ctx, cc, status, err);
  else
    *ret_status = status;
  dynbuf_free(&ctx.errbody);
  dynbuf_free(&ctx.headers);
  if (ctx.sink_err)
    crimage_error_clear(&ctx.sink_err);
  return ret;
}

/* Gets a Bearer token for the challenge (distribution token spec): from the client's cache when use_cache and it
 * holds a live one, else from the realm. With a secret, the OAuth2 POST first (grant_type=password, or
 * refresh_token for an identity token), falling back to a GET with Basic auth when the server does not do OAuth2
 * (400/401/404/405); anonymous: a GET. */
static int fetch_token(registry_repo *r, const auth_challenge *ch, bool use_cache, bool *ret_from_cache,
                       crimage_error **err)
{
  const char *realm = auth_challenge_param(ch, "realm");
  const char *service = auth_challenge_param(ch, "service");
  const char *scope = auth_challenge_param(ch, "scope");
  *ret_from_cache = false;
  if (str_empty(realm) || (!str_has_prefix(realm, "https://") && !str_has_prefix(realm, "http://")))
    return crimage_error_set(err, CRIMAGE_UNAUTHENTICATED, 0,
                             "registry %s: Bearer challenge without a valid http(s) realm", r->host);
  if (strlen(realm) > 2048 || (service && strlen(service) > 1024) || (scope && strlen(scope) > 4096))
    return crimage_error_set(err, CRIMAGE_UNAUTHENTICATED, 0, "registry %s: Bearer challenge too long", r->host);
  cleanup_free char *default_scope = xasprintf("repository:%s:pull", r->name);
  if (str_empty(scope))
    scope = default_scope;
  char srealm[256];
  sanitize(realm, srealm, sizeof(srealm));

  const credential *cred = r->cred;
  bool has_identity = cred && !str_empty(cred->identity_token);
  bool has_password = cred && !str_empty(cred->username) && !str_empty(cred->password);
  char key[DIGEST_MAX_LEN + 1];
  token_cache_key(realm, service, scope, (has_identity || has_password) ? cred : NULL, key);

  int64_t expiry = 0;
  if (use_cache) {
    char *cached = token_cache_get(r->client, key, &expiry);
    if (cached) {
      pthread_mutex_lock(&r->lock);
      secret_free(r->token);
      r->token = cached;
      r->auth = AUTH_BEARER;
      r->token_expiry_ms = expiry;
      r->auth_generation++;
      pthread_mutex_unlock(&r->lock);
      *ret_from_cache = true;
      return 0;
    }
  }

  cleanup_dynbuf dynbuf q;
  dynbuf_init(&q, 16384);
  if (service)
    form_add(&q, "service", service);
  form_add(&q, "scope", scope);
  cleanup_free char *get_url = xasprintf("%s%s%s", realm, strchr(realm, '?') ? "&" : "?", q.data ? q.data : "");
  cleanup_free char *what = xasprintf("token request to %s", srealm);

  cleanup_dynbuf dynbuf body;
  dynbuf_init(&body, REGISTRY_MAX_TOKEN_BODY);
  long status = 0;
  int ret = 0;
  bool got = false;
  if (has_identity || has_password) {
    cleanup_dynbuf dynbuf form;
    dynbuf_init(&form, 256 * 1024);
    if (has_identity) {
      form_add(&form, "grant_type", "refresh_token");
      form_add(&form, "refresh_token", cred->identity_token);
    } else {
      form_add(&form, "grant_type", "password");
      form_add(&form, "username", cred->username);
      form_add(&form, "password", cred->password);
    }
    form_add(&form, "client_id", REGISTRY_OAUTH_CLIENT_ID);
    if (service)
      form_add(&form, "service", service);
    form_add(&form, "scope", scope);
    ret = token_request(r, what, realm, form.data ? form.data : "", NULL, &body, &status, err);
    if (form.data)
      explicit_bzero(form.data, form.len);
    if (ret < 0)
      goto out;
    if (status >= 200 && status < 300)
      got = true;
    else if (!(status == 400 || status == 401 || status == 404 || status == 405) || !has_password) {
      ret = crimage_error_set(err, status == 403 ? CRIMAGE_PERMISSION_DENIED : CRIMAGE_UNAUTHENTICATED, 0,
                              "registry %s: %s (OAuth2 %s grant): HTTP %ld: credentials (%s) rejected", r->host,
                              what, has_identity ? "refresh_token" : "password", status,
                              cred->source ? cred->source : "request");
      goto out;
    } else
      log_debug("registry %s: %s: OAuth2 POST answered HTTP %ld, falling back to GET", r->host, what, status);
  }
  if (!got) {
    ret = token_request(r, what, get_url, NULL, has_password ? cred : NULL, &body, &status, err);
    if (ret < 0)
      goto out;
    if (status < 200 || status >= 300) {
      ret = crimage_error_set(err, status == 403 ? CRIMAGE_PERMISSION_DENIED : CRIMAGE_UNAUTHENTICATED, 0,
                              "registry %s: %s: HTTP %ld: %s", r->host, what, status,
                              has_password ? (status == 401 || status == 403 ? "credentials rejected"
                                                                              : "token refused")
                                           : "anonymous token refused (no credentials given)");
      if (has_password && cred->source)
        crimage_error_wrap(err, "credentials from %s", cred->source);
      goto out;
    }
  }
  {
    cleanup_json json_object *root = NULL;
    ret = json_parse(body.data ? body.data : "", body.len, "token response", REGISTRY_TOKEN_JSON_LIMITS, &root, err);
    if (ret < 0) {
      crimage_error_wrap(err, "registry %s: %s", r->host, what);
      goto out;
    }
    const char *token = json_get_string(root, "token");
    if (str_empty(token))
      token = json_get_string(root, "access_token");
    if (str_empty(token) || strlen(token) > 64 * 1024) {
      ret = crimage_error_set(err, CRIMAGE_UNAUTHENTICATED, 0, "registry %s: %s: response without a token",
                              r->host, what);
      goto out;
    }
    int64_t expires_in = 0;
    if (!json_get_int64(root, "expires_in", &expires_in) || expires_in <= 0)
      expires_in = 60; /* the token spec's default */
    if (expires_in > 24 * 3600)
      expires_in = 24 * 3600;
    /* With issued_at the lifetime counts from then (a token server whose answer took long, or a cached one). */
    int64_t lifetime_ms = expires_in * 1000;
    int64_t issued = parse_issued_at(json_get_string(root, "issued_at"));
    if (issued > 0) {
      int64_t left = (issued + expires_in) * 1000 - now_realtime_ns() / 1000000;
      if (left < lifetime_ms)
        lifetime_ms = left > 0 ? left : 0;
    }
    /* Renew a little early so a request does not start with a token about to expire. */
    int64_t margin = lifetime_ms >= 40000 ? 10000 : lifetime_ms / 4;
    expiry = now_monotonic_ms() + lifetime_ms - margin;
    token_cache_put(r->client, key, token, expiry);
    pthread_mutex_lock(&r->lock);
    secret_free(r->token);
    r->token = xstrdup(token);
    r->auth = AUTH_BEARER;
    r->token_expiry_ms = expiry;
    r->auth_generation++;
    pthread_mutex_unlock(&r->lock);
  }
out:
  if (body.data)
    explicit_bzero(body.data, body.len);
  return ret;
}

/* Reacts to a 401: picks the challenge we can answer (Bearer first, then Basic with a credential). */
static int authenticate(registry_repo *r, const char *www_authenticate, unsigned generation, bool use_cache,
                        bool *ret_from_cache, crimage_error **err)
{
  *ret_from_cache = false;
  pthread_mutex_lock(&r->lock);
  bool changed = r->auth_generation != generation;
  pthread_mutex_unlock(&r->lock);
  if (changed)
    return 0; /* another thread already renewed the auth state: just retry */
  if (str_empty(www_authenticate))
    return crimage_error_set(err, CRIMAGE_UNAUTHENTICATED, 0,
                             "registry %s: HTTP 401 without a WWW-Authenticate challenge", r->host);
  auth_challenge ch[REGISTRY_MAX_CHALLENGES];
  size_t n = 0;
  int ret = auth_challenges_parse(www_authenticate, ch, &n, err);
  if (ret < 0) {
    auth_challenges_clear(ch, n);
    return crimage_error_wrap(err, "registry %s", r->host);
  }
  const auth_challenge *bearer = NULL, *basic = NULL;
  for (size_t i = 0; i < n; i++) {
    if (streq(ch[i].scheme, "bearer") && !bearer)
      bearer = &ch[i];
    else if (streq(ch[i].scheme, "basic") && !basic)
      basic = &ch[i];
  }
  if (bearer) {
    ret = fetch_token(r, bearer, use_cache, ret_from_cache, err);
  } else if (basic && r->cred && !str_empty(r->cred->username)) {
    pthread_mutex_lock(&r->lock);
    if (r->auth == AUTH_BASIC)
      ret = crimage_error_set(err, CRIMAGE_UNAUTHENTICATED, 0,
                              "registry %s: credentials (%s) rejected", r->host,
                              r->cred->source ? r->cred->source : "request");
    else {
      r->auth = AUTH_BASIC;
      r->auth_generation++;
    }
    pthread_mutex_unlock(&r->lock);
  } else {
    ret = crimage_error_set(err, CRIMAGE_UNAUTHENTICATED, 0,
                            "registry %s: authentication required (%s)%s", r->host, ch[0].scheme,
                            r->cred ? "" : " and no credentials given");
  }
  auth_challenges_clear(ch, n);
  return ret;
}

/* GETs path (below the repo's base) with authentication: anonymous or the current auth state first, and on a 401
 * the challenge is answered and the request repeated once. */
/* How long to wait before retrying a 429/5xx: the registry's Retry-After (delta-seconds) when it sends one, capped,
 * else an exponential back-off. */
int64_t registry_retry_after_ms(const char *value, int64_t now_s)
{
  if (str_empty(value))
    return -1;
  uint64_t s = 0;
  int r = parse_u64_decimal(value, &s);
  if (r == 0 || r == -ERANGE) /* a number too large to hold is capped like any large one */
    return s >= REGISTRY_MAX_RETRY_AFTER_MS / 1000 ? REGISTRY_MAX_RETRY_AFTER_MS : (int64_t) s * 1000;
  time_t when = curl_getdate(value, NULL);
  if (when == (time_t) -1)
    return -1;
  if ((int64_t) when <= now_s)
    return 0;
  uint64_t wait_s = (uint64_t) ((int64_t) when - now_s);
  return wait_s >= REGISTRY_MAX_RETRY_AFTER_MS / 1000 ? REGISTRY_MAX_RETRY_AFTER_MS : (int64_t) wait_s * 1000;
}

int64_t registry_content_length(const char *value)
{
  uint64_t v = 0;
  if (parse_u64_decimal(value, &v) < 0 || v > INT64_MAX)
    return -1;
  return (int64_t) v;
}

static int64_t retry_delay_ms(const xfer_ctx *ctx, int retries)
{
  cleanup_free char *ra = header_get(ctx, "Retry-After");
  int64_t ms = registry_retry_after_ms(ra, now_realtime_ns() / 1000000000);
  if (ms >= 0)
    return ms;
  return 500LL << retries;
}

/* Sleeps ms, waking early (false) when the transfer is cancelled. */
static bool sleep_unless_cancelled(const registry_xfer *x, int64_t ms)
{
  int64_t end = now_monotonic_ms() + ms;
  for (;;) {
    if (x && x->cancelled && x->cancelled(x->userdata))
      return false;
    int64_t left = end - now_monotonic_ms();
    if (left <= 0)
      return true;
    struct timespec ts = {.tv_sec = 0, .tv_nsec = (left < 50 ? left : 50) * 1000000L};
    nanosleep(&ts, NULL);
  }
}

static bool status_retryable(long status)
{
  return status == 429 || status == 500 || status == 502 || status == 503 || status == 504;
}

/* GETs path (below the repo's base) with authentication: anonymous or the current auth state first, and on a 401
 * the challenge is answered and the request repeated once. 429 and 5xx answers are retried a few times, honouring
 * Retry-After. */
static int repo_get(registry_repo *r, const char *path, const char *what, const char *accept, xfer_ctx *ctx,
                    char **ret_content_type, crimage_error **err)
{
  cleanup_free char *url = xasprintf("%s/%s/%s", r->base, r->name, path);
  dynbuf_init(&ctx->errbody, REGISTRY_MAX_ERROR_BODY);
  dynbuf_init(&ctx->headers, REGISTRY_MAX_HEADER_BYTES);
  int ret = 0;
  /* At most two answers to a 401: the second only when the first took a cached token the registry refused. */
  int auth_rounds = 0;
  bool last_from_cache = false;
  int retries = 0;
  uint64_t offset = ctx->offset;
  for (;;) {
    auth_snapshot auth = {0};
    auth_take_snapshot(r, &auth);
    long status = 0;
    ctx->offset = offset;
    CURLcode cc = perform(r, url, accept, &auth, NULL, ctx, &status);
    unsigned generation = auth.generation;
    auth_snapshot_clear(&auth);
    if (cc == CURLE_OK && !ctx->body_started) {
      if (status == 401 && (auth_rounds == 0 || (auth_rounds == 1 && last_from_cache))) {
        cleanup_free char *challenge = header_get(ctx, "WWW-Authenticate");
        ret = authenticate(r, challenge, generation, auth_rounds == 0, &last_from_cache, err);
        auth_rounds++;
        if (ret < 0)
          break;
        dynbuf_reset(&ctx->errbody);
        dynbuf_reset(&ctx->headers);
        continue;
      }
      if (status_retryable(status) && retries < REGISTRY_MAX_RETRIES) {
        int64_t delay = retry_delay_ms(ctx, retries);
        retries++;
        log_info("registry %s: %s: HTTP %ld, retrying in %" PRId64 " ms", r->host, what, status, delay);
        if (!sleep_unless_cancelled(ctx->x, delay)) {
          ctx->cancelled = true;
          ret = transfer_error(r, what, ctx, cc, status, err);
          break;
        }
        dynbuf_reset(&ctx->errbody);
        dynbuf_reset(&ctx->headers);
        continue;
      }
    }
    if (cc != CURLE_OK || status < 200 || status >= 300) {
      ret = transfer_error(r, what, ctx, cc, status, err);
      break;
    }
    if (ret_content_type)
      *ret_content_type = header_get(ctx, "Content-Type");
    break;
  }
  dynbuf_free(&ctx->errbody);
  dynbuf_free(&ctx->headers);
  if (ctx->sink_err)
    crimage_error_clear(&ctx->sink_err);
  return ret;
}

static bool reference_safe(const char *s)
{
  /* A tag or digest goes into a URL path: allow only their own alphabets. */
  if (str_empty(s) || strlen(s) > DIGEST_MAX_LEN)
    return false;
  for (const char *p = s; *p; p++)
    if (!isalnum((unsigned char) *p) && !strchr("._-:+=", *p))
      return false;
  return true;
}

/* "manifest <repo>:<tag>" or "manifest <repo>@<digest>", as a reference is written. */
static char *manifest_what(const registry_repo *r, const char *reference, const char *suffix)
{
  return xasprintf("manifest %s%c%s%s", r->name, strchr(reference, ':') ? '@' : ':', reference, suffix);
}

int registry_get_manifest(registry_repo *r, const char *reference, size_t max, const registry_xfer *x,
                          char **ret_body, size_t *ret_len, char **ret_content_type, crimage_error **err)
{
  if (!reference_safe(reference))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "invalid manifest reference");
  cleanup_free char *path = xasprintf("manifests/%s", reference);
  cleanup_free char *what = manifest_what(r, reference, "");
  cleanup_dynbuf dynbuf body;
  dynbuf_init(&body, max);
  xfer_ctx ctx = {.x = x, .body = &body, .limit = -1};
  char *ct = NULL;
  int ret = repo_get(r, path, what, MANIFEST_ACCEPT, &ctx, &ct, err);
  if (ret < 0)
    return ret;
  *ret_len = body.len;
  *ret_body = body.data ? dynbuf_take(&body, NULL) : xstrdup("");
  *ret_content_type = ct;
  return 0;
}

int registry_get_blob(registry_repo *r, const char *digest, uint64_t offset, int64_t size, const registry_sink *sink,
                      const registry_xfer *x, crimage_error **err)
{
  if (!reference_safe(digest))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "invalid blob digest");
  if (size >= 0 && offset > (uint64_t) size)
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "resume offset beyond the blob size");
  cleanup_free char *path = xasprintf("blobs/%s", digest);
  cleanup_free char *what = xasprintf("blob %s", digest);
  xfer_ctx ctx = {.x = x, .sink = sink, .offset = offset, .limit = size >= 0 ? size - (int64_t) offset : -1,
                  .total = size};
  return repo_get(r, path, what, NULL, &ctx, NULL, err);
}

int registry_head_manifest(registry_repo *r, const char *reference, const registry_xfer *x, char **ret_digest,
                           char **ret_content_type, int64_t *ret_size, crimage_error **err)
{
  if (!reference_safe(reference))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "invalid manifest reference");
  cleanup_free char *url = xasprintf("%s/%s/manifests/%s", r->base, r->name, reference);
  cleanup_free char *what = manifest_what(r, reference, " (HEAD)");
  cleanup_dynbuf dynbuf none;
  dynbuf_init(&none, 0);
  xfer_ctx ctx = {.x = x, .body = &none, .limit = -1, .head = true};
  dynbuf_init(&ctx.errbody, REGISTRY_MAX_ERROR_BODY);
  dynbuf_init(&ctx.headers, REGISTRY_MAX_HEADER_BYTES);
  int ret = 0;
  bool authenticated = false;
  for (;;) {
    /* Like repo_get, but one try: a HEAD only saves a GET, and a failure leaves the caller to do that GET. */
    auth_snapshot auth = {0};
    auth_take_snapshot(r, &auth);
    long status = 0;
    CURLcode cc = perform(r, url, MANIFEST_ACCEPT, &auth, NULL, &ctx, &status);
    unsigned generation = auth.generation;
    auth_snapshot_clear(&auth);
    if (cc == CURLE_OK && status == 401 && !authenticated) {
      authenticated = true;
      cleanup_free char *challenge = header_get(&ctx, "WWW-Authenticate");
      bool from_cache = false;
      ret = authenticate(r, challenge, generation, true, &from_cache, err);
      if (ret < 0)
        break;
      dynbuf_reset(&ctx.headers);
      continue;
    }
    if (cc != CURLE_OK || status < 200 || status >= 300) {
      ret = transfer_error(r, what, &ctx, cc, status, err);
      break;
    }
    cleanup_free char *digest = header_get(&ctx, "Docker-Content-Digest");
    cleanup_free char *len = header_get(&ctx, "Content-Length");
    int64_t size = registry_content_length(len);
    *ret_digest = digest && digest_valid(digest) ? TAKE_PTR(digest) : NULL;
    if (ret_content_type)
      *ret_content_type = header_get(&ctx, "Content-Type");
    if (ret_size)
      *ret_size = size;
    break;
  }
  dynbuf_free(&ctx.errbody);
  dynbuf_free(&ctx.headers);
  return ret;
}
