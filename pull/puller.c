/* The pull engine: reference -> manifest (-> platform manifest) -> config and layers into the store -> image record.
 * Blobs go through store ingests, which hash the bytes as they arrive and make a blob visible only once its digest
 * matches; a partial ingest left by a broken transfer (or a restart) is resumed with a Range request. Layers are
 * downloaded by a small pool of threads sharing one registry client, so connections are reused. */
#include "pull/puller.h"
#include "pull/unpack.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <string.h>
#include <isa-l/igzip_lib.h>

#include "common/digest.h"
#include "common/dynbuf.h"
#include "common/json.h"
#include "common/log.h"
#include "common/util.h"
#include "pull/manifest.h"
#include "pull/registry.h"

#define PULL_BLOB_ATTEMPTS 3 /* tries per blob when the connection breaks; each resumes where the last stopped */
#define PULL_MAX_CONCURRENT 16
#define UNPACK_CHUNK (128 * 1024) /* inflate output per call, allocated once per layer */
#define STORED_READ_CHUNK (1024 * 1024) /* a stored layer is read this much at a time to unpack it */

struct puller {
  store *store;
  registry_client *client;
  registry_host *hosts; /* deep copy */
  size_t n_hosts;
  int max_concurrent;
  bool check_diff_ids;
};

static void hosts_free(registry_host *h, size_t n)
{
  for (size_t i = 0; i < n; i++) {
    free(h[i].host);
    for (size_t j = 0; j < h[i].n_mirrors; j++)
      free(h[i].mirrors[j].endpoint);
    free(h[i].mirrors);
  }
  free(h);
}

int puller_new(store *s, const puller_options *opts, puller **ret, crimage_error **err)
{
  static const puller_options defaults = {0};
  if (!opts)
    opts = &defaults;
  registry_client_options ro = {
      .certs_dir = opts->certs_dir,
      .user_agent = opts->user_agent,
      .progress_timeout_ms = opts->progress_timeout_ms,
      .min_speed_bytes_per_s = opts->min_speed_bytes_per_s,
      .min_speed_window_ms = opts->min_speed_window_ms,
  };
  registry_client *client = NULL;
  int r = registry_client_new(&ro, &client, err);
  if (r < 0)
    return r;
  puller *p = xcalloc(1, sizeof(*p));
  p->store = s;
  p->client = client;
  p->max_concurrent = opts->max_concurrent_downloads > 0 ? opts->max_concurrent_downloads : 3;
  p->check_diff_ids = !opts->skip_diff_id_check;
  if (p->max_concurrent > PULL_MAX_CONCURRENT)
    p->max_concurrent = PULL_MAX_CONCURRENT;
  if (opts->n_hosts > 0 && opts->hosts) {
    p->hosts = xcalloc(opts->n_hosts, sizeof(*p->hosts));
    for (size_t i = 0; i < opts->n_hosts; i++) {
      const registry_host *src = &opts->hosts[i];
      registry_host *dst = &p->hosts[i];
      dst->host = xstrdup(src->host ? src->host : "");
      dst->insecure = src->insecure;
      dst->mirrors_only = src->mirrors_only;
      if (src->n_mirrors > 0) {
        dst->mirrors = xcalloc(src->n_mirrors, sizeof(*dst->mirrors));
        for (size_t j = 0; j < src->n_mirrors; j++) {
          dst->mirrors[j].endpoint = xstrdup(src->mirrors[j].endpoint ? src->mirrors[j].endpoint : "");
          dst->mirrors[j].override_path = src->mirrors[j].override_path;
        }
        dst->n_mirrors = src->n_mirrors;
      }
    }
    p->n_hosts = opts->n_hosts;
  }
  *ret = p;
  return 0;
}

void puller_free(puller *p)
{
  if (!p)
    return;
  registry_client_free(p->client);
  hosts_free(p->hosts, p->n_hosts);
  free(p);
}

void pull_result_clear(pull_result *r)
{
  if (!r)
    return;
  free(r->image_id);
  free(r->repo_digest);
  free(r->manifest_digest);
  memset(r, 0, sizeof(*r));
}

static const registry_host *find_host(const puller *p, const char *host)
{
  for (size_t i = 0; i < p->n_hosts; i++)
    if (streq(p->hosts[i].host, host))
      return &p->hosts[i];
  return NULL;
}

/* The upstream endpoint of a registry host. Docker Hub's API lives on another name than its references use. */
static char *upstream_endpoint(const puller *p, const char *domain)
{
  const registry_host *h = find_host(p, domain);
  const char *api = streq(domain, "docker.io") ? "registry-1.docker.io" : domain;
  return xasprintf("%s://%s", h && h->insecure ? "http" : "https", api);
}

/* A credential that names its registry (server_address) is only for that registry: "https://host/v1/", "host" and
 * Docker Hub's historic "index.docker.io" forms all name a host[:port]. */
static bool credential_applies(const credential *c, const char *domain)
{
  if (!c || str_empty(c->server_address))
    return true;
  const char *s = c->server_address;
  if (str_has_prefix(s, "https://"))
    s += 8;
  else if (str_has_prefix(s, "http://"))
    s += 7;
  size_t n = strcspn(s, "/");
  cleanup_free char *host = xstrndup(s, n);
  if (streq(host, "index.docker.io") || streq(host, "registry-1.docker.io"))
    return streq(domain, "docker.io");
  return strcasecmp(host, domain) == 0;
}

/* ---- digests ---- */

static int verify_digest(const char *expected, const char *data, size_t len, const char *host, const char *what,
                         crimage_error **err)
{
  const char *colon = strchr(expected, ':');
  cleanup_free char *alg = xstrndup(expected, colon ? (size_t) (colon - expected) : 0);
  cleanup_digester digester *d = digester_new(alg);
  if (!d)
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "unsupported digest algorithm in %s", expected);
  digester_update(d, data, len);
  char got[DIGEST_MAX_LEN + 1];
  digester_final(d, got);
  if (!streq(got, expected))
    return crimage_error_set(err, CRIMAGE_DATA_LOSS, 0, "registry %s: %s: digest mismatch: got %s, want %s", host,
                             what, got, expected);
  return 0;
}

/* ---- uncompressed digest (diff_id) ----
 * A gzip layer is inflated as its bytes arrive, in the same pass that writes and hashes them, and the uncompressed
 * bytes are hashed; at the end the result must equal the config's rootfs.diff_ids[i]. The inflated bytes go nowhere
 * else: one output buffer per layer is reused for every chunk. */

typedef struct layer_check {
  const char *diff_id; /* expected, from the config */
  struct inflate_state zs; /* ISA-L's inflate: about 2.5 times zlib's speed, and CPU is what a pull spends */
  bool member_end; /* the last gzip member ended; more bytes start another member */
  digester *d;
  unsigned char *out;
} layer_check;

static void layer_check_free(layer_check *c)
{
  if (!c)
    return;
  digester_free(c->d);
  free(c->out);
  free(c);
}

static void inflate_start(layer_check *c)
{
  isal_inflate_init(&c->zs);
  c->zs.crc_flag = ISAL_GZIP; /* a gzip wrapper; its CRC-32 and length are checked too */
  c->member_end = false;
}

static layer_check *layer_check_new(const char *diff_id)
{
  const char *colon = strchr(diff_id, ':');
  cleanup_free char *alg = xstrndup(diff_id, colon ? (size_t) (colon - diff_id) : 0);
  digester *d = digester_new(alg);
  if (!d)
    return NULL;
  layer_check *c = xcalloc(1, sizeof(*c));
  c->diff_id = diff_id;
  c->d = d;
  c->out = xmalloc(UNPACK_CHUNK);
  inflate_start(c);
  return c;
}

static void layer_check_reset(layer_check *c)
{
  char scratch[DIGEST_MAX_LEN + 1];
  inflate_start(c);
  digester_final(c->d, scratch); /* resets it */
}

static int layer_check_feed(void *userdata, const void *data, size_t len, crimage_error **err)
{
  layer_check *c = userdata;
  const unsigned char *p = data;
  while (len > 0) {
    /* avail_in is 32 bits */
    uint32_t n = len > (1u << 30) ? (1u << 30) : (uint32_t) len;
    c->zs.next_in = (uint8_t *) p;
    c->zs.avail_in = n;
    for (;;) {
      if (c->member_end) {
        if (c->zs.avail_in == 0)
          break;
        /* Concatenated gzip members form one stream (RFC 1952 §2.2). */
        uint8_t *next = c->zs.next_in;
        uint32_t avail = c->zs.avail_in;
        inflate_start(c);
        c->zs.next_in = next;
        c->zs.avail_in = avail;
      }
      c->zs.next_out = c->out;
      c->zs.avail_out = UNPACK_CHUNK;
      int zr = isal_inflate(&c->zs);
      if (zr < 0)
        return crimage_error_set(err, CRIMAGE_DATA_LOSS, EBADMSG, "layer is not a valid gzip stream (error %d)", zr);
      size_t produced = UNPACK_CHUNK - c->zs.avail_out;
      if (produced)
        digester_update(c->d, c->out, produced);
      if (c->zs.block_state == ISAL_BLOCK_FINISH)
        c->member_end = true;
      else if (c->zs.avail_out > 0 && c->zs.avail_in == 0)
        break; /* needs more input */
    }
    p += n;
    len -= n;
  }
  return 0;
}

static int layer_check_finish(layer_check *c, crimage_error **err)
{
  if (!c->member_end)
    return crimage_error_set(err, CRIMAGE_DATA_LOSS, EBADMSG, "layer gzip stream is truncated");
  char got[DIGEST_MAX_LEN + 1];
  digester_final(c->d, got);
  if (!streq(got, c->diff_id))
    return crimage_error_set(err, CRIMAGE_DATA_LOSS, EBADMSG,
                             "uncompressed layer hashes to %s, the image config's diff_id is %s", got, c->diff_id);
  return 0;
}

typedef enum layer_compression {
  LAYER_OTHER, /* config, foreign or unknown media types: no diff_id check */
  LAYER_PLAIN,
  LAYER_GZIP,
} layer_compression;

static layer_compression layer_compression_of(const char *media_type)
{
  if (!media_type)
    return LAYER_OTHER;
  if (str_has_suffix(media_type, "+gzip") || str_has_suffix(media_type, ".tar.gzip"))
    return LAYER_GZIP;
  if (str_has_suffix(media_type, "layer.v1.tar") || str_has_suffix(media_type, "rootfs.diff.tar"))
    return LAYER_PLAIN;
  /* +zstd layers are not checked: that would need libzstd for the inflate step only; their compressed digest is
   * still verified as they arrive. */
  return LAYER_OTHER;
}

/* ---- blob downloads ---- */

typedef struct pull_job pull_job;

/* The image config a download brings, read before its blob is committed. */
typedef struct config_out {
  size_t n_layers, n_skipped; /* of the manifest, to match the diff_ids to */
  dynbuf bytes;               /* the config as it arrives (it is at most IMAGE_CONFIG_MAX_SIZE) */
  char *user;
  char **diff_ids;
} config_out;

typedef struct blob_task {
  const manifest_descriptor *desc;
  pull_job *job;
  store_ingest *ingest;
  layer_check *check; /* NULL: no diff_id check (or the unpacker checks it) */
  unpack *unpack;     /* NULL: the layer is not unpacked in this pass */
  config_out *config; /* NULL: not the image config */
  uint64_t base; /* ingest offset when the current request started */
} blob_task;

static void blob_task_drop_checks(blob_task *t)
{
  layer_check_free(t->check);
  t->check = NULL;
  unpack_abort(t->unpack);
  t->unpack = NULL;
}

struct pull_job {
  puller *p;
  const pull_request *req;
  registry_repo *repo;
  const manifest_descriptor **blobs;
  const char **diff_ids; /* per blob: the expected uncompressed digest, NULL = none */
  size_t n_blobs;

  pthread_mutex_t lock;
  size_t next;     /* next blob to take */
  bool failed;     /* stop taking new blobs */
  crimage_error *first_err;
  int first_ret;
};

static bool job_cancelled(void *userdata)
{
  blob_task *t = userdata;
  pull_job *j = t->job;
  pthread_mutex_lock(&j->lock);
  bool failed = j->failed;
  pthread_mutex_unlock(&j->lock);
  /* A failure elsewhere stops the other transfers early: the pull fails anyway. */
  if (failed)
    return true;
  return j->req->cancelled && j->req->cancelled(j->req->userdata);
}

static void emit(const pull_request *req, pull_event_kind kind, const char *digest, uint64_t done, uint64_t total)
{
  if (!req->progress)
    return;
  pull_event ev = {.kind = kind, .digest = digest, .done = done, .total = total};
  req->progress(req->userdata, &ev);
}

static void task_progress(void *userdata, uint64_t received)
{
  blob_task *t = userdata;
  emit(t->job->req, PULL_EVENT_BLOB_PROGRESS, t->desc->digest, t->base + received, (uint64_t) t->desc->size);
}

static int unpack_feed(void *userdata, const void *data, size_t len, crimage_error **err)
{
  return unpack_write(userdata, data, len, err);
}

static int config_collect(void *userdata, const void *data, size_t len, crimage_error **err)
{
  config_out *c = userdata;
  if (dynbuf_append(&c->bytes, data, len) < 0)
    return crimage_error_set(err, CRIMAGE_DATA_LOSS, EFBIG, "image config is larger than its descriptor says");
  return 0;
}

/* Verifies and reads an image config before its blob is accepted (or, stored already, before it is used): its
 * shape and what parsing it costs are bounded (IMAGE_CONFIG_JSON_LIMITS), so a config that is not one never
 * becomes a blob of the store. */
static int config_accept(const pull_job *j, const manifest_descriptor *desc, config_out *c, const char *data,
                         size_t len, crimage_error **err)
{
  const char *host = registry_repo_host(j->repo);
  int r = verify_digest(desc->digest, data, len, host, "image config", err);
  if (r < 0)
    return r;
  r = image_config_parse(data, len, c->n_layers, c->n_skipped, &c->user, &c->diff_ids, err);
  if (r < 0)
    return crimage_error_wrap(err, "registry %s: image %s", host, desc->digest);
  return 0;
}

static int config_read_stored(const pull_job *j, const manifest_descriptor *desc, config_out *c, crimage_error **err)
{
  cleanup_free char *data = NULL;
  size_t len = 0;
  int r = store_blob_read(j->p->store, desc->digest, IMAGE_CONFIG_MAX_SIZE, &data, &len, err);
  if (r < 0)
    return r;
  return config_accept(j, desc, c, data, len, err);
}

static int sink_write(void *userdata, const void *data, size_t len, crimage_error **err)
{
  blob_task *t = userdata;
  int r = store_ingest_write(t->ingest, data, len, err);
  if (r < 0)
    return r;
  /* The bytes go on to the unpacker (which inflates, hashes and extracts them) or to the diff_id check alone. */
  if (t->config)
    return config_collect(t->config, data, len, err);
  if (t->unpack)
    return unpack_write(t->unpack, data, len, err);
  if (t->check)
    return layer_check_feed(t->check, data, len, err);
  return 0;
}

static int sink_restart(void *userdata, crimage_error **err)
{
  blob_task *t = userdata;
  t->base = 0;
  if (t->config)
    dynbuf_reset(&t->config->bytes);
  if (t->check)
    layer_check_reset(t->check);
  if (t->unpack) {
    int r = unpack_restart(t->unpack, err);
    if (r < 0)
      return r;
  }
  return store_ingest_truncate(t->ingest, err);
}

/* Whether this layer is to be unpacked: the pull unpacks, the config names its diff_id, the unpacker reads its
 * media type, and it is not unpacked yet. */
static bool want_unpack(const pull_job *j, const manifest_descriptor *desc, const char *diff_id)
{
  unpack_compression c;
  return j->req->unpack && diff_id && unpack_compression_of(desc->media_type, &c) == 0 &&
         !store_layer_exists(j->p->store, diff_id);
}

/* Ends an unpack: the layer directory appears once its content hashes to diff_id. Another pull that unpacked the
 * same layer meanwhile is as good. */
static int unpack_complete(unpack *u, const char *diff_id, crimage_error **err)
{
  crimage_error *e = NULL;
  int r = unpack_finish(u, diff_id, NULL, &e);
  if (r < 0 && e->status == CRIMAGE_ALREADY_EXISTS) {
    crimage_error_clear(&e);
    return 0;
  }
  if (r < 0)
    *err = e;
  return r;
}

/* Unpacks a layer whose blob is stored already (pulled before unpacking was on, or by another image). */
static int unpack_stored(pull_job *j, blob_task *t, const char *diff_id, crimage_error **err)
{
  store *s = j->p->store;
  const manifest_descriptor *desc = t->desc;
  cleanup_free char *dir = store_layer_path(s, diff_id);
  cleanup_free char *path = store_blob_path(s, desc->digest);
  cleanup_close int fd = path ? open(path, O_RDONLY | O_CLOEXEC) : -1;
  if (!dir || fd < 0)
    return crimage_error_set(err, CRIMAGE_INTERNAL, errno, "opening layer %s", desc->digest);
  cleanup_unpack unpack *u = NULL;
  int r = unpack_begin(dir, desc->media_type, NULL, &u, err);
  if (r < 0)
    return r;
  cleanup_free uint8_t *buf = xmalloc(STORED_READ_CHUNK);
  for (;;) {
    if (job_cancelled(t))
      return crimage_error_set(err, CRIMAGE_CANCELLED, ECANCELED, "unpacking layer %s: cancelled", desc->digest);
    ssize_t n = read(fd, buf, STORED_READ_CHUNK);
    if (n < 0 && errno == EINTR)
      continue;
    if (n < 0)
      return crimage_error_set(err, CRIMAGE_INTERNAL, errno, "reading layer %s", desc->digest);
    if (n == 0)
      break;
    r = unpack_write(u, buf, (size_t) n, err);
    if (r < 0)
      return crimage_error_wrap(err, "unpacking layer %s", desc->digest);
  }
  r = unpack_complete(TAKE_PTR(u), diff_id, err);
  if (r < 0)
    return crimage_error_wrap(err, "unpacking layer %s", desc->digest);
  log_debug("unpacked stored layer %s (%s)", desc->digest, diff_id);
  return 0;
}

/* The diff_id check of one layer download, or NULL. A plain tar's diff_id is its digest: compared, not hashed. */
static int blob_check_new(const pull_job *j, const manifest_descriptor *desc, const char *diff_id,
                          layer_check **ret, crimage_error **err)
{
  *ret = NULL;
  if (!diff_id)
    return 0;
  switch (layer_compression_of(desc->media_type)) {
  case LAYER_PLAIN:
    if (!streq(diff_id, desc->digest))
      return crimage_error_set(err, CRIMAGE_DATA_LOSS, 0,
                               "registry %s: uncompressed layer %s does not match the image config's diff_id %s",
                               registry_repo_host(j->repo), desc->digest, diff_id);
    return 0;
  case LAYER_GZIP:
    *ret = layer_check_new(diff_id);
    if (!*ret)
      log_debug("layer %s: diff_id %s not checked (unsupported algorithm)", desc->digest, diff_id);
    return 0;
  default:
    return 0;
  }
}

/* Downloads one blob (a layer, or the config when config is given: it is read into *config before the commit) into
 * the store, unless it is there. */
static int download_blob(pull_job *j, const manifest_descriptor *desc, const char *diff_id, config_out *config,
                         crimage_error **err)
{
  store *s = j->p->store;
  uint64_t have = 0;
  blob_task t = {.desc = desc, .job = j, .config = config};
  if (store_blob_exists(s, desc->digest, &have)) {
    int r = config ? config_read_stored(j, desc, config, err) : 0;
    if (r == 0 && want_unpack(j, desc, diff_id))
      r = unpack_stored(j, &t, diff_id, err);
    if (r == 0)
      emit(j->req, PULL_EVENT_BLOB_DONE, desc->digest, have, have);
    return r;
  }
  emit(j->req, PULL_EVENT_BLOB_START, desc->digest, 0, (uint64_t) desc->size);

  int r;
  if (want_unpack(j, desc, diff_id)) {
    /* Extracted in the same pass as it is written and hashed; the unpacker checks the diff_id itself. */
    cleanup_free char *dir = store_layer_path(s, diff_id);
    r = unpack_begin(dir, desc->media_type, NULL, &t.unpack, err);
  } else {
    r = blob_check_new(j, desc, j->p->check_diff_ids ? diff_id : NULL, &t.check, err);
  }
  if (r < 0)
    return r;
  /* A pull of the same blob in progress elsewhere (another pull of this or another image sharing the layer) holds
   * its ingest lock: we wait for it without a timeout and without a request of our own (but stop when this pull is
   * cancelled), then find the blob committed (-EEXIST), or, when that pull failed, resume from what it left. */
  r = store_ingest_begin_cancellable(s, desc->digest, desc->size, job_cancelled, &t, &t.ingest, err);
  if (r == -EEXIST) {
    /* Another writer finished it while we waited for its lock (and unpacked it, if it unpacks). */
    blob_task_drop_checks(&t);
    r = config ? config_read_stored(j, desc, config, err) : 0;
    if (r == 0 && want_unpack(j, desc, diff_id))
      r = unpack_stored(j, &t, diff_id, err);
    if (r == 0)
      emit(j->req, PULL_EVENT_BLOB_DONE, desc->digest, (uint64_t) desc->size, (uint64_t) desc->size);
    return r;
  }
  if (r < 0) {
    blob_task_drop_checks(&t);
    return r;
  }
  if ((t.check || t.unpack || t.config) && store_ingest_offset(t.ingest) > 0) {
    /* Resuming: the inflater (or unpacker, or the config's reader) catches up on the partial bytes first (read
     * once; only on this path). */
    cleanup_error crimage_error *e = NULL;
    r = t.config   ? store_ingest_replay(t.ingest, config_collect, t.config, &e)
        : t.unpack ? store_ingest_replay(t.ingest, unpack_feed, t.unpack, &e)
                   : store_ingest_replay(t.ingest, layer_check_feed, t.check, &e);
    if (r < 0) {
      log_info("partial layer %s: %s; downloading it again", desc->digest, e->message);
      r = sink_restart(&t, err);
      if (r < 0) {
        store_ingest_abort(t.ingest, false);
        blob_task_drop_checks(&t);
        return r;
      }
    }
  }

  registry_sink sink = {.write = sink_write, .restart = sink_restart, .userdata = &t};
  registry_xfer x = {.cancelled = job_cancelled, .progress = task_progress, .userdata = &t};
  for (int attempt = 1;; attempt++) {
    t.base = store_ingest_offset(t.ingest);
    if (t.base >= (uint64_t) desc->size)
      break; /* everything is there (a resumed ingest): commit verifies it */
    if (t.base > 0)
      log_debug("resuming %s at %" PRIu64 " of %" PRId64, desc->digest, t.base, desc->size);
    cleanup_error crimage_error *e = NULL;
    r = registry_get_blob(j->repo, desc->digest, t.base, desc->size, &sink, &x, &e);
    if (r == 0)
      break;
    /* A broken connection is worth another try from where it stopped; anything else is final. */
    bool retry = e && e->status == CRIMAGE_UNAVAILABLE && attempt < PULL_BLOB_ATTEMPTS && !job_cancelled(&t);
    if (!retry) {
      /* Keep what arrived for a later pull to resume from, unless it is known bad. */
      store_ingest_abort(t.ingest, !(e && e->status == CRIMAGE_DATA_LOSS));
      blob_task_drop_checks(&t);
      if (err && !*err)
        *err = TAKE_PTR(e);
      return r;
    }
    log_info("registry %s: blob %s: %s; retrying", registry_repo_host(j->repo), desc->digest, e->message);
  }
  /* Before the commit: a layer whose content is not what the config says never becomes visible, nor does a config
   * that is not one. */
  if (t.config) {
    r = config_accept(j, desc, t.config, t.config->bytes.data ? t.config->bytes.data : "", t.config->bytes.len, err);
    if (r < 0) {
      store_ingest_abort(t.ingest, false);
      return r;
    }
  }
  if (t.check)
    r = layer_check_finish(t.check, err);
  else if (t.unpack)
    r = unpack_complete(TAKE_PTR(t.unpack), diff_id, err);
  blob_task_drop_checks(&t);
  if (r < 0) {
    store_ingest_abort(t.ingest, false);
    return crimage_error_wrap(err, "registry %s: layer %s", registry_repo_host(j->repo), desc->digest);
  }
  r = store_ingest_commit(t.ingest, err);
  if (r < 0)
    return crimage_error_wrap(err, "registry %s: blob %s", registry_repo_host(j->repo), desc->digest);
  emit(j->req, PULL_EVENT_BLOB_DONE, desc->digest, (uint64_t) desc->size, (uint64_t) desc->size);
  return 0;
}

static void *worker(void *arg)
{
  pull_job *j = arg;
  for (;;) {
    pthread_mutex_lock(&j->lock);
    if (j->failed || j->next >= j->n_blobs) {
      pthread_mutex_unlock(&j->lock);
      return NULL;
    }
    size_t i = j->next++;
    pthread_mutex_unlock(&j->lock);

    crimage_error *e = NULL;
    int r = download_blob(j, j->blobs[i], j->diff_ids ? j->diff_ids[i] : NULL, NULL, &e);
    if (r < 0) {
      pthread_mutex_lock(&j->lock);
      /* The first real error wins over the CANCELLED it causes in the other transfers. */
      if (!j->failed) {
        j->failed = true;
        j->first_err = e;
        j->first_ret = r;
        e = NULL;
      }
      pthread_mutex_unlock(&j->lock);
      crimage_error_clear(&e);
    }
  }
}

static int download_all(pull_job *j, crimage_error **err)
{
  size_t n_threads = (size_t) j->p->max_concurrent;
  if (n_threads > j->n_blobs)
    n_threads = j->n_blobs;
  pthread_t threads[PULL_MAX_CONCURRENT];
  size_t started = 0;
  /* The calling thread works too, so one download needs no extra thread. */
  for (size_t i = 1; i < n_threads; i++) {
    if (pthread_create(&threads[started], NULL, worker, j) != 0)
      break; /* fewer threads is still correct */
    started++;
  }
  worker(j);
  for (size_t i = 0; i < started; i++)
    pthread_join(threads[i], NULL);
  if (j->failed) {
    if (err && !*err)
      *err = TAKE_PTR(j->first_err);
    else
      crimage_error_clear(&j->first_err);
    return j->first_ret;
  }
  return 0;
}

/* ---- the pull ---- */

typedef struct pull_state {
  registry_repo *repo;
  char *index_body; /* the body the reference resolved to */
  char *body;       /* the platform manifest */
  size_t body_len;
  manifest *m;
} pull_state;

static void pull_state_clear(pull_state *st)
{
  registry_repo_free(st->repo);
  free(st->index_body);
  free(st->body);
  manifest_free(st->m);
}

static bool req_cancelled(void *userdata)
{
  const pull_request *req = userdata;
  return req->cancelled && req->cancelled(req->userdata);
}

static int fetch_manifest(registry_repo *repo, const pull_request *req, const char *reference,
                          const char *expected_digest, char **ret_body, size_t *ret_len, char **ret_digest,
                          manifest **ret_m, crimage_error **err)
{
  registry_xfer x = {.cancelled = req_cancelled, .userdata = (void *) req};
  cleanup_free char *body = NULL, *ct = NULL;
  size_t len = 0;
  int r = registry_get_manifest(repo, reference, MANIFEST_MAX_SIZE, &x, &body, &len, &ct, err);
  if (r < 0)
    return r;
  char digest[DIGEST_MAX_LEN + 1];
  if (expected_digest) {
    cleanup_free char *what = xasprintf("manifest %s", reference);
    r = verify_digest(expected_digest, body, len, registry_repo_host(repo), what, err);
    if (r < 0)
      return r;
    snprintf(digest, sizeof(digest), "%s", expected_digest);
  } else {
    digest_sha256(body, len, digest);
  }
  manifest *m = NULL;
  r = manifest_parse(body, len, ct, &m, err);
  if (r < 0)
    return crimage_error_wrap(err, "registry %s: manifest %s", registry_repo_host(repo), reference);
  *ret_m = m;
  *ret_len = len;
  *ret_body = TAKE_PTR(body);
  *ret_digest = xstrdup(digest);
  return 0;
}

/* Everything of the stored image a pull would produce is there: its blobs and, when the pull unpacks, its
 * unpacked layers (a record from before unpacking was on knows no diff_ids: the full pull path fills them in). */
static bool image_complete(puller *p, const pull_request *req, const store_image *img)
{
  if (!store_blob_exists(p->store, img->manifest_digest, NULL) || !store_blob_exists(p->store, img->id, NULL))
    return false;
  for (char **l = img->layers; l && *l; l++)
    if (!store_blob_exists(p->store, *l, NULL))
      return false;
  if (!req->unpack)
    return true;
  if (strv_length(img->diff_ids) != strv_length(img->layers))
    return false;
  for (char **d = img->diff_ids; *d; d++)
    if (!store_layer_exists(p->store, *d))
      return false;
  return true;
}

/* The stored image when it is already recorded for this handler with the same manifest and all its blobs. */
static store_image *already_stored(puller *p, const pull_request *req, const char *handler,
                                   const char *config_digest, const char *manifest_digest)
{
  cleanup_store_image store_image *img = NULL;
  cleanup_error crimage_error *e = NULL;
  if (store_find_image(p->store, handler, config_digest, &img, &e) <= 0)
    return NULL;
  if (!streq_ptr(img->manifest_digest, manifest_digest) || !image_complete(p, req, img))
    return NULL;
  return TAKE_PTR(img);
}

/* The `Always` fast path: when name:tag is stored for this handler, one HEAD tells whether the tag still resolves
 * to the digest pulled for it (the image carries name@<that digest>). Returns 1 with *res filled when unchanged
 * (no GET, no blob request, no store write), 0 when the full pull must run (tag not stored, digest changed, or the
 * registry sent no Docker-Content-Digest or failed the HEAD: the GET then gives the real answer). */
static int try_unchanged(puller *p, const pull_request *req, registry_repo *repo, const char *name,
                         const char *handler, const char *want_platform, pull_result *res, crimage_error **err)
{
  cleanup_free char *tagged = xasprintf("%s:%s", name, req->ref->tag);
  cleanup_store_image store_image *img = NULL;
  cleanup_error crimage_error *e = NULL;
  if (store_find_image(p->store, handler, tagged, &img, &e) <= 0)
    return 0;
  /* An image resolved from an index stands for the platform it was resolved for only. */
  if (!img->platform || (*img->platform && !streq(img->platform, want_platform)))
    return 0;
  registry_xfer x = {.cancelled = req_cancelled, .userdata = (void *) req};
  cleanup_free char *digest = NULL;
  int r = registry_head_manifest(repo, req->ref->tag, &x, &digest, NULL, NULL, &e);
  if (r < 0) {
    if (e->status == CRIMAGE_CANCELLED) {
      if (err && !*err)
        *err = TAKE_PTR(e);
      return r;
    }
    log_debug("%s: %s; fetching the manifest instead", tagged, e->message);
    return 0;
  }
  if (!digest) {
    log_debug("%s: registry %s sent no Docker-Content-Digest; fetching the manifest", tagged,
              registry_repo_host(repo));
    return 0;
  }
  cleanup_free char *pulled_as = xasprintf("%s@%s", name, digest);
  if (!strv_contains(img->repo_digests, pulled_as) || !image_complete(p, req, img))
    return 0;
  emit(req, PULL_EVENT_RESOLVED, NULL, 0, img->size);
  res->image_id = xstrdup(img->id);
  res->repo_digest = TAKE_PTR(digest);
  res->manifest_digest = xstrdup(img->manifest_digest);
  res->unchanged = true;
  return 1;
}

/* How much a failed attempt says about the image, to pick the status of a pull that every endpoint failed: an
 * answer about the image itself (it is there but unusable, or not there for us, or not there) tells more than a
 * registry that was too busy, and any answer more than an endpoint that gave none. */
static int status_rank(crimage_status s)
{
  switch (s) {
  case CRIMAGE_INVALID_ARGUMENT:
  case CRIMAGE_DATA_LOSS:
  case CRIMAGE_FAILED_PRECONDITION:
    return 4;
  case CRIMAGE_UNAUTHENTICATED:
  case CRIMAGE_PERMISSION_DENIED:
    return 3;
  case CRIMAGE_NOT_FOUND:
    return 2;
  case CRIMAGE_RESOURCE_EXHAUSTED:
    return 1;
  default:
    return 0;
  }
}

/* Where one attempt of a pull goes: a mirror or the upstream registry. */
typedef struct pull_endpoint {
  char *url;          /* "https://host[:port][/prefix]" */
  bool override_path; /* url already holds the API path */
  char *host;         /* host[:port] of url: messages and certs.d */
  const credential *cred;
  bool mirror;
} pull_endpoint;

/* host[:port] of an endpoint URL. */
static char *endpoint_host(const char *url)
{
  const char *s = strstr(url, "://");
  s = s ? s + 3 : url;
  return xstrndup(s, strcspn(s, "/"));
}

static int do_pull(puller *p, const pull_request *req, const pull_endpoint *ep, store_holder *hold, pull_state *st,
                   pull_result *res, crimage_error **err)
{
  const image_ref *ref = req->ref;
  const char *handler = req->handler ? req->handler : "";
  int r = registry_repo_new(p->client, ep->url, ep->override_path, ep->host, ref->path, ep->cred, &st->repo, err);
  if (r < 0)
    return r;

  /* Resolve the tag (or digest) to a manifest or index. */
  const char *reference = ref->digest ? ref->digest : ref->tag;
  if (!reference)
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "reference has neither a tag nor a digest");
  cleanup_free char *name = reference_name(ref);
  platform want;
  if (req->platform)
    want = *req->platform;
  else
    platform_host(&want);
  platform_normalize(&want);
  char want_str[128];
  platform_string(&want, want_str, sizeof(want_str));
  if (ref->tag && !ref->digest) {
    r = try_unchanged(p, req, st->repo, name, handler, want_str, res, err);
    if (r != 0)
      return r < 0 ? r : 0;
  }
  cleanup_free char *repo_digest = NULL;
  manifest *top = NULL;
  size_t top_len = 0;
  r = fetch_manifest(st->repo, req, reference, ref->digest, &st->index_body, &top_len, &repo_digest, &top, err);
  if (r < 0)
    return r;

  cleanup_free char *manifest_digest = NULL;
  bool from_index = top->kind == MANIFEST_KIND_INDEX;
  if (from_index) {
    const manifest_descriptor *d = NULL;
    r = manifest_select_platform(top, &want, &d, err);
    if (r < 0) {
      manifest_free(top);
      return crimage_error_wrap(err, "registry %s: %s", ep->host, reference);
    }
    cleanup_free char *want_digest = xstrdup(d->digest);
    int64_t want_size = d->size;
    manifest_free(top);
    r = fetch_manifest(st->repo, req, want_digest, want_digest, &st->body, &st->body_len, &manifest_digest, &st->m,
                       err);
    if (r < 0)
      return r;
    if ((int64_t) st->body_len != want_size)
      return crimage_error_set(err, CRIMAGE_DATA_LOSS, 0,
                               "registry %s: manifest %s is %zu bytes, the index says %" PRId64, ep->host,
                               want_digest, st->body_len, want_size);
    if (st->m->kind != MANIFEST_KIND_IMAGE)
      return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0,
                               "registry %s: index entry %s is not an image manifest", ep->host, want_digest);
  } else {
    st->m = top;
    st->body = TAKE_PTR(st->index_body);
    st->body_len = top_len;
    manifest_digest = xstrdup(repo_digest);
  }
  manifest *m = st->m;

  uint64_t total = manifest_image_size(m, st->body_len);
  emit(req, PULL_EVENT_RESOLVED, NULL, 0, total);

  /* What this pull is about to look for in the store (and may find left by an earlier try) stays until it ends. */
  store_pin(hold, manifest_digest);
  store_pin(hold, m->config.digest);
  for (size_t i = 0; i < m->n_layers; i++)
    store_pin(hold, m->layers[i].digest);
  cleanup_store_image store_image *stored = already_stored(p, req, handler, m->config.digest, manifest_digest);
  bool unchanged = stored != NULL;
  cleanup_free char *user = NULL;
  cleanup_strv char **diff_ids = NULL;
  if (unchanged) {
    user = xstrdup(stored->user ? stored->user : "");
    if (stored->diff_ids && stored->diff_ids[0])
      diff_ids = strv_copy(stored->diff_ids);
  } else {
    r = store_blob_put(p->store, manifest_digest, st->body, st->body_len, err);
    if (r < 0)
      return r;
    pull_job j = {.p = p, .req = req, .repo = st->repo};
    pthread_mutex_init(&j.lock, NULL);
    /* The config first: its diff_ids are what the layers are checked against. */
    config_out cfg = {.n_layers = m->n_layers, .n_skipped = m->n_skipped_layers};
    dynbuf_init(&cfg.bytes, IMAGE_CONFIG_MAX_SIZE);
    r = download_blob(&j, &m->config, NULL, &cfg, err);
    dynbuf_free(&cfg.bytes);
    user = TAKE_PTR(cfg.user);
    diff_ids = TAKE_PTR(cfg.diff_ids);
    for (char **d = diff_ids; d && *d; d++)
      store_pin(hold, *d); /* the unpacked layers, unreferenced until the image is recorded */
    if (r == 0 && m->n_layers > 0) {
      j.n_blobs = m->n_layers;
      j.blobs = xcalloc(j.n_blobs, sizeof(*j.blobs));
      for (size_t i = 0; i < m->n_layers; i++)
        j.blobs[i] = &m->layers[i];
      j.diff_ids = (const char **) diff_ids;
      r = download_all(&j, err);
      free(j.blobs);
    }
    pthread_mutex_destroy(&j.lock);
    if (r < 0)
      return r;
  }

  const char **layers = xcalloc(m->n_layers + 1, sizeof(*layers));
  for (size_t i = 0; i < m->n_layers; i++)
    layers[i] = m->layers[i].digest;
  store_record rec = {
      .handler = handler,
      .name = name,
      .tag = ref->tag,
      .repo_digest = repo_digest,
      .manifest_digest = manifest_digest,
      .manifest_media_type = m->media_type,
      .manifest_size = st->body_len,
      .config_digest = m->config.digest,
      .layers = layers,
      .diff_ids = (const char *const *) diff_ids,
      .size = total,
      .user = user,
      .platform = from_index ? want_str : "",
  };
  r = store_record_image(p->store, &rec, err);
  free(layers);
  if (r < 0)
    return r;

  res->image_id = xstrdup(m->config.digest);
  res->repo_digest = TAKE_PTR(repo_digest);
  res->manifest_digest = TAKE_PTR(manifest_digest);
  res->unchanged = unchanged;
  return 0;
}

int puller_pull(puller *p, const pull_request *req, pull_result *ret, crimage_error **err)
{
  if (!req || !req->ref || !ret)
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "missing pull request");
  const image_ref *ref = req->ref;
  cleanup_free char *refstr = reference_string(ref);

  /* Mirrors first, in order, then the upstream. A credential goes to a mirror only when it names that mirror. */
  const registry_host *h = find_host(p, ref->domain);
  size_t n_mirrors = h ? h->n_mirrors : 0;
  pull_endpoint *eps = xcalloc(n_mirrors + 1, sizeof(*eps));
  size_t n = 0;
  for (size_t i = 0; i < n_mirrors; i++) {
    const registry_mirror *m = &h->mirrors[i];
    if (!str_has_prefix(m->endpoint, "https://") && !str_has_prefix(m->endpoint, "http://"))
      continue;
    eps[n].url = xstrdup(m->endpoint);
    eps[n].override_path = m->override_path;
    eps[n].host = endpoint_host(m->endpoint);
    eps[n].cred = (req->cred && !str_empty(req->cred->server_address) && credential_applies(req->cred, eps[n].host))
                      ? req->cred
                      : NULL;
    eps[n].mirror = true;
    n++;
  }
  /* A registry served by its mirrors only is never asked itself (the config refuses one without mirrors). */
  if (!h || !h->mirrors_only) {
    eps[n].url = upstream_endpoint(p, ref->domain);
    eps[n].host = xstrdup(ref->domain);
    eps[n].cred = credential_applies(req->cred, ref->domain) ? req->cred : NULL;
    if (req->cred && !eps[n].cred)
      log_debug("credential from %s is for %s, not %s: pulling anonymously",
                req->cred->source ? req->cred->source : "request", req->cred->server_address, ref->domain);
    n++;
  }
  if (n == 0) {
    free(eps);
    return crimage_error_set(err, CRIMAGE_FAILED_PRECONDITION, 0,
                             "pulling %s: registry %s is served by its mirrors only, and none is configured",
                             refstr ? refstr : "image", ref->domain);
  }

  crimage_error **errs = xcalloc(n, sizeof(*errs));
  size_t n_tried = 0;
  int r = 0;
  pull_result res = {0};
  /* From before the first look at which blobs are present until the image is recorded: a concurrent RemoveImage
   * then defers deleting a shared blob this pull decided not to download. */
  store_holder *hold = store_hold(p->store);
  for (size_t i = 0; i < n; i++) {
    pull_state st = {0};
    crimage_error *e = NULL;
    r = do_pull(p, req, &eps[i], hold, &st, &res, &e);
    pull_state_clear(&st);
    if (r == 0)
      break;
    pull_result_clear(&res);
    errs[n_tried++] = e;
    /* A failing mirror (down, stalled, missing the image) falls through to the next one and finally to the
     * upstream; a cancelled pull stops. Partial blobs stay in the ingest area and are resumed from there. */
    if (e->status == CRIMAGE_CANCELLED)
      break;
    if (i + 1 < n)
      log_info("pulling %s: %s %s failed: %s", refstr, eps[i].mirror ? "mirror" : "registry", eps[i].url,
               e->message);
  }
  store_release(hold);
  if (r < 0) {
    /* One endpoint's error as it is; of several, the status of the one that says most about the image, and a
     * message naming each endpoint's result. */
    size_t pick = n_tried - 1;
    if (errs[pick]->status != CRIMAGE_CANCELLED)
      for (size_t i = 0; i < n_tried; i++)
        if (status_rank(errs[i]->status) > status_rank(errs[pick]->status) ||
            (status_rank(errs[i]->status) == status_rank(errs[pick]->status) && i < pick))
          pick = i;
    crimage_error *e = TAKE_PTR(errs[pick]);
    if (n_tried > 1) {
      cleanup_dynbuf dynbuf msg;
      dynbuf_init(&msg, 64 * 1024);
      for (size_t i = 0; i < n_tried; i++) {
        const crimage_error *ei = i == pick ? e : errs[i];
        (void) dynbuf_printf(&msg, "%s%s %s: %s: %s", i ? "; " : "", eps[i].mirror ? "mirror" : "upstream",
                             eps[i].mirror ? eps[i].url : eps[i].host, crimage_status_name(ei->status), ei->message);
      }
      free(e->message);
      e->message = xasprintf("every endpoint failed: %s", msg.data ? msg.data : "");
    }
    r = -(e->errnum > 0 ? e->errnum : EIO);
    if (err && !*err) {
      *err = e;
      crimage_error_wrap(err, "pulling %s", refstr ? refstr : "image");
    } else {
      crimage_error_clear(&e);
    }
  }
  for (size_t i = 0; i < n_tried; i++)
    crimage_error_clear(&errs[i]);
  free(errs);
  for (size_t i = 0; i < n; i++) {
    free(eps[i].url);
    free(eps[i].host);
  }
  free(eps);
  if (r < 0)
    return r;
  *ret = res;
  return 0;
}
