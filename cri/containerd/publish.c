#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>

#include "common/digest.h"
#include "common/log.h"
#include "common/util.h"
#include "cri/containerd/containerd.h"
#include "cri/containerd/publish.h"

#define DEFAULT_CALL_TIMEOUT_MS (30 * 1000)
#define DEFAULT_CONFIRM_TIMEOUT_MS (10 * 1000)
/* containerd's GC ends a publish lease by itself after this long, should crimage die before deleting it. */
#define LEASE_EXPIRE_S 3600
#define CONFIRM_POLL_MS 20
#define PROXY_RETRIES 40
#define PROXY_RETRY_MS 250
/* A containerd that just came back is reconnected to within a second (the client's reconnect back-off); a publish
 * waits that long for it rather than failing on a connection attempt that was refused a moment ago. */
#define CONNECT_WAIT_MS 1500
/* While containerd stays up, its images are checked this often too: kubelet never pulls an image crimage reports
 * present (IfNotPresent), so a record deleted behind crimage's back would otherwise stay missing. */
#define RECHECK_INTERVAL_MS (5 * 60 * 1000)

/* A publish or a blob write in progress: the same image, or the same blob of two images, is never written by two
 * threads at once (containerd would refuse the second writer of a ref as locked). */
typedef struct busy_key {
  struct busy_key *next;
  char *key;
} busy_key;

struct publisher {
  rpc_client *rpc;
  int64_t call_timeout_ms;
  int64_t confirm_timeout_ms;
  publisher_add_layer_fn add_layer;
  void *add_layer_userdata;

  pthread_mutex_t lock;
  pthread_cond_t changed;
  busy_key *busy;

  pthread_t watcher;
  bool watching;
  bool stop; /* under lock */
  publisher_ready_fn ready_fn;
  void *ready_userdata;
};

int publisher_new(const publisher_options *opts, publisher **ret, crimage_error **err)
{
  rpc_client_options ro = {.fast_reconnect = true};
  rpc_client *rpc = NULL;
  int r = rpc_client_new(opts->address, &ro, &rpc, err);
  if (r < 0)
    return crimage_error_wrap(err, "containerd address");
  publisher *p = xcalloc(1, sizeof(*p));
  p->rpc = rpc;
  p->call_timeout_ms = opts->call_timeout_ms > 0 ? opts->call_timeout_ms : DEFAULT_CALL_TIMEOUT_MS;
  p->confirm_timeout_ms = opts->confirm_timeout_ms > 0 ? opts->confirm_timeout_ms : DEFAULT_CONFIRM_TIMEOUT_MS;
  p->add_layer = opts->add_layer;
  p->add_layer_userdata = opts->add_layer_userdata;
  pthread_mutex_init(&p->lock, NULL);
  pthread_cond_init(&p->changed, NULL);
  *ret = p;
  return 0;
}

void publisher_free(publisher *p)
{
  if (!p)
    return;
  if (p->watching) {
    pthread_mutex_lock(&p->lock);
    p->stop = true;
    pthread_mutex_unlock(&p->lock);
    pthread_join(p->watcher, NULL);
  }
  rpc_client_free(p->rpc);
  pthread_mutex_destroy(&p->lock);
  pthread_cond_destroy(&p->changed);
  free(p);
}

const char *publisher_address(const publisher *p) { return rpc_client_path(p->rpc); }

static void key_lock(publisher *p, const char *key)
{
  pthread_mutex_lock(&p->lock);
  for (;;) {
    busy_key *k = p->busy;
    while (k && !streq(k->key, key))
      k = k->next;
    if (!k)
      break;
    pthread_cond_wait(&p->changed, &p->lock);
  }
  busy_key *k = xcalloc(1, sizeof(*k));
  k->key = xstrdup(key);
  k->next = p->busy;
  p->busy = k;
  pthread_mutex_unlock(&p->lock);
}

static void key_unlock(publisher *p, const char *key)
{
  pthread_mutex_lock(&p->lock);
  for (busy_key **kp = &p->busy; *kp; kp = &(*kp)->next) {
    if (streq((*kp)->key, key)) {
      busy_key *k = *kp;
      *kp = k->next;
      free(k->key);
      free(k);
      break;
    }
  }
  pthread_cond_broadcast(&p->changed);
  pthread_mutex_unlock(&p->lock);
}

/* Every publish failure is UNAVAILABLE for the CRI caller (containerd is a local dependency: trying again later is
 * the remedy), with the socket, the namespace and the step in front of containerd's own words. */
static int publish_error(publisher *p, const char *ns, crimage_error **err, const char *step)
{
  if (err && *err) {
    (*err)->status = CRIMAGE_UNAVAILABLE;
    return crimage_error_wrap(err, "containerd at %s (namespace %s): %s", rpc_client_path(p->rpc), ns, step);
  }
  return crimage_error_set(err, CRIMAGE_UNAVAILABLE, 0, "containerd at %s (namespace %s): %s", rpc_client_path(p->rpc),
                           ns, step);
}

static char *handler_label(const char *handler)
{
  return str_empty(handler) ? xstrdup(PUBLISH_LABEL_HANDLER) : xasprintf("%s.%s", PUBLISH_LABEL_HANDLER, handler);
}

/* The names crimage recorded for img: its tags, then its repo digests. */
static char **image_names(const store_image *img)
{
  char **names = strv_copy(img->repo_tags);
  for (size_t i = 0; img->repo_digests && img->repo_digests[i]; i++)
    strv_add_unique(&names, img->repo_digests[i]);
  return names;
}

/* True when every name of img is a record in ns that targets its manifest and carries this handler's label. */
static int records_current(const ctrd_ctx *c, const store_image *img, char *const *names, const char *label,
                           bool *ret, crimage_error **err)
{
  for (size_t i = 0; names[i]; i++) {
    cleanup_ctrd_image ctrd_image *rec = NULL;
    int r = ctrd_images_get(c, names[i], &rec, err);
    if (r < 0)
      return r;
    if (r == 0 || !streq(rec->target.digest, img->manifest_digest) || !ctrd_image_label(rec, label)) {
      *ret = false;
      return 0;
    }
  }
  *ret = true;
  return 0;
}

/* Writes one blob of st unless containerd has it; labels go on it either way. */
static int publish_blob(publisher *p, const ctrd_ctx *c, store *st, const char *digest, const ctrd_label *labels,
                        size_t n_labels, crimage_error **err)
{
  cleanup_free char *key = xasprintf("blob\x1f%s", digest);
  key_lock(p, key);
  /* Pinned first: a blob containerd has but nothing references yet (its images were deleted) would otherwise be
   * fair game for containerd's GC between this check and the image records. */
  int r = ctrd_lease_add_content(c, c->lease, digest, err);
  if (r >= 0)
    r = ctrd_content_info(c, digest, NULL, err);
  if (r > 0) {
    r = n_labels ? ctrd_content_update_labels(c, digest, labels, n_labels, err) : 0;
  } else if (r == 0) {
    uint64_t size = 0;
    cleanup_free char *path = store_blob_path(st, digest);
    cleanup_close int fd = path && store_blob_exists(st, digest, &size) ? open(path, O_RDONLY | O_CLOEXEC) : -1;
    if (fd < 0) {
      r = crimage_error_set(err, CRIMAGE_DATA_LOSS, 0, "blob %s is not in crimage's store", digest);
    } else {
      /* One ref per blob: a write interrupted by a containerd restart resumes where it stopped. */
      cleanup_free char *ref = xasprintf("crimage-%s", digest);
      r = ctrd_content_write(c, ref, digest, (int64_t) size, fd, labels, n_labels, err);
    }
  }
  key_unlock(p, key);
  if (r < 0)
    return crimage_error_wrap(err, "blob %s", digest);
  return 0;
}

/* The manifest's GC references (config, then each layer), as containerd labels a manifest it pulled itself. */
static ctrd_label *manifest_gc_labels(const store_image *img, bool with_layers, size_t *ret_n, char ***ret_keys)
{
  size_t n_layers = with_layers ? strv_length(img->layers) : 0;
  ctrd_label *labels = xcalloc(n_layers + 1, sizeof(*labels));
  char **keys = xcalloc(n_layers + 1, sizeof(char *));
  labels[0] = (ctrd_label){CTRD_LABEL_GC_REF_CONFIG, img->id};
  for (size_t i = 0; i < n_layers; i++) {
    keys[i] = xasprintf(CTRD_LABEL_GC_REF_LAYER "%zu", i);
    labels[i + 1] = (ctrd_label){keys[i], img->layers[i]};
  }
  *ret_n = n_layers + 1;
  *ret_keys = keys;
  return labels;
}

/* Waits (bounded) until containerd's CRI resolves the image ID: its event handler takes in new records
 * asynchronously, and kubelet's CreateContainer must never get there first. */
static int confirm_cri(publisher *p, const ctrd_ctx *c, const store_image *img, crimage_error **err)
{
  int64_t deadline = now_monotonic_ms() + p->confirm_timeout_ms;
  for (;;) {
    bool present = false;
    int r = ctrd_cri_image_present(c, img->id, &present, err);
    if (r < 0)
      return r;
    if (present)
      return 0;
    if (now_monotonic_ms() >= deadline)
      return crimage_error_set(err, CRIMAGE_UNAVAILABLE, 0,
                               "containerd's CRI did not take in image %s within %" PRId64 " ms", img->id,
                               p->confirm_timeout_ms);
    usleep(CONFIRM_POLL_MS * 1000);
  }
}

static void lease_name(const char *ns, const store_image *img, char *buf, size_t size)
{
  char digest[DIGEST_MAX_LEN + 1];
  cleanup_free char *key = xasprintf("%s\x1f%s\x1f%s", ns, img->handler, img->id);
  digest_sha256(key, strlen(key), digest);
  /* "sha256:" and 16 hex digits: unique enough among one node's images, short in containerd's listings. */
  snprintf(buf, size, "crimage-%.16s", digest + strlen("sha256:"));
}

/* The chain IDs of img's layers, base first; NULL when the record knows no diff_ids. */
static char **image_chain_ids(const store_image *img)
{
  size_t n = strv_length(img->diff_ids);
  if (n == 0 || n != strv_length(img->layers))
    return NULL;
  char **chains = xcalloc(n + 1, sizeof(char *));
  for (size_t i = 0; i < n; i++) {
    chains[i] = xmalloc(DIGEST_MAX_LEN + 1);
    digest_chain_id(i ? chains[i - 1] : NULL, img->diff_ids[i], chains[i]);
  }
  return chains;
}

/* containerd's proxy plugin keeps one connection to crimage's snapshotter socket; after crimaged restarted, its
 * calls fail with UNAVAILABLE until it has reconnected, which its back-off (at most 3 s between dials) delays.
 * Retries over about 10 s cover that. */
static int prepare_remote(const ctrd_ctx *c, const char *snapshotter, const char *key, const char *parent,
                          const char *chain, crimage_error **err)
{
  for (int attempt = 1;; attempt++) {
    crimage_error *e = NULL;
    int r = ctrd_snapshot_prepare_remote(c, snapshotter, key, parent, chain, &e);
    if (r >= 0 || e->status != CRIMAGE_UNAVAILABLE || attempt == PROXY_RETRIES) {
      if (r < 0)
        *err = e;
      return r;
    }
    crimage_error_clear(&e);
    usleep(PROXY_RETRY_MS * 1000);
  }
}

/* crimage's snapshotter gets every unpacked layer of img as its chain; containerd then records each chain as a
 * committed snapshot of that snapshotter (the remote-snapshot protocol of its unpacker: a Prepare naming the chain
 * in containerd.io/snapshot.ref, answered ALREADY_EXISTS), and the config keeps the top of the chain alive. */
static int publish_snapshots(publisher *p, const ctrd_ctx *c, store *st, const store_image *img,
                             const char *snapshotter, char *const *chains, crimage_error **err)
{
  for (size_t i = 0; chains[i]; i++) {
    cleanup_free char *dir = store_layer_path(st, img->diff_ids[i]);
    if (!dir || !store_layer_exists(st, img->diff_ids[i]))
      return crimage_error_set(err, CRIMAGE_FAILED_PRECONDITION, 0,
                               "layer %s of image %s is not unpacked (unpackLayers is off for its handler?)",
                               img->diff_ids[i], img->id);
    int r = p->add_layer(p->add_layer_userdata, chains[i], i ? chains[i - 1] : "", dir, err);
    if (r < 0)
      return crimage_error_wrap(err, "registering layer %s", img->diff_ids[i]);
  }
  /* No Stat first: for a chain it has recorded already, containerd's metadata answers ALREADY_EXISTS itself. */
  for (size_t i = 0; chains[i]; i++) {
    cleanup_free char *key = xasprintf("crimage-extract-%lld-%zu", (long long) now_realtime_ns(), i);
    int r = prepare_remote(c, snapshotter, key, i ? chains[i - 1] : "", chains[i], err);
    if (r == 0) {
      /* An ordinary snapshot: the snapshotter containerd calls by this name is not crimage's. */
      crimage_error *e = NULL;
      if (ctrd_snapshot_remove(c, snapshotter, key, &e) < 0)
        crimage_error_clear(&e);
      return crimage_error_set(err, CRIMAGE_FAILED_PRECONDITION, 0,
                               "snapshotter \"%s\" did not provide chain %s: is it crimage's ([proxy_plugins.%s])?",
                               snapshotter, chains[i], snapshotter);
    }
    if (r < 0)
      return crimage_error_wrap(err, "snapshot %s", chains[i]);
  }
  cleanup_free char *gc_key = xasprintf(CTRD_LABEL_GC_REF_SNAPSHOT "%s", snapshotter);
  const char *top = chains[strv_length(chains) - 1];
  ctrd_label gc = {gc_key, top};
  return ctrd_content_update_labels(c, img->id, &gc, 1, err);
}

static int publish_locked(publisher *p, store *st, const store_image *img, const publish_dest *dest,
                          crimage_error **err)
{
  const char *ns = dest->ns;
  const char *snap = str_empty(dest->snapshotter) ? NULL : dest->snapshotter;
  ctrd_ctx c = {.rpc = p->rpc, .ns = ns, .timeout_ms = p->call_timeout_ms};
  cleanup_strv char **names = image_names(img);
  cleanup_free char *label = handler_label(img->handler);
  bool cri = streq(ns, CTRD_CRI_NAMESPACE);
  cleanup_strv char **chains = NULL;
  if (snap) {
    if (!p->add_layer)
      return crimage_error_set(err, CRIMAGE_FAILED_PRECONDITION, 0,
                               "snapshotter \"%s\" named for containerd, but crimaged serves no snapshotter "
                               "(snapshotterSocket)", snap);
    chains = image_chain_ids(img);
    if (!chains)
      return crimage_error_set(err, CRIMAGE_FAILED_PRECONDITION, 0,
                               "image %s: its record knows no diff_ids; pull it again", img->id);
  }

  bool current = false;
  int r = records_current(&c, img, names, label, &current, err);
  if (r >= 0 && current && snap) {
    /* containerd's GC removes snapshots it no longer needs: the chain must still be there too. */
    r = ctrd_snapshot_exists(&c, snap, chains[strv_length(chains) - 1], err);
    current = r > 0;
  }
  if (r < 0)
    return publish_error(p, ns, err, "checking the image records");
  if (current) {
    /* The records are there; the CRI side may still be catching up after a restart. */
    if (cri && confirm_cri(p, &c, img, err) < 0)
      return publish_error(p, ns, err, "confirming the image");
    return 0;
  }

  /* One lease name per (namespace, handler, image): a try after a failed one (containerd killed mid-publish) takes
   * over the lease that try left and deletes it when done, so nothing of the dead try stays referenced. */
  char lease[DIGEST_MAX_LEN + 16];
  lease_name(ns, img, lease, sizeof(lease));
  crimage_error *lease_err = NULL;
  r = ctrd_lease_create(&c, lease, LEASE_EXPIRE_S, &lease_err);
  if (r < 0 && lease_err->status == CRIMAGE_ALREADY_EXISTS) {
    crimage_error_clear(&lease_err);
    r = 0;
  }
  if (r < 0) {
    *err = lease_err;
    return publish_error(p, ns, err, "creating a lease");
  }
  c.lease = lease;

  /* Children before parents: nothing references a blob containerd does not have yet. With crimage's snapshotter
   * no layer blob goes over: the snapshots stand for them. */
  for (size_t i = 0; r >= 0 && !snap && img->layers && img->layers[i]; i++)
    r = publish_blob(p, &c, st, img->layers[i], NULL, 0, err);
  if (r >= 0)
    r = publish_blob(p, &c, st, img->id, NULL, 0, err);
  if (r >= 0) {
    size_t n_labels = 0;
    cleanup_strv char **keys = NULL;
    cleanup_free ctrd_label *labels = manifest_gc_labels(img, !snap, &n_labels, &keys);
    r = publish_blob(p, &c, st, img->manifest_digest, labels, n_labels, err);
  }
  if (r < 0) {
    publish_error(p, ns, err, "writing content");
  } else if (snap && publish_snapshots(p, &c, st, img, snap, chains, err) < 0) {
    r = publish_error(p, ns, err, "creating the snapshots");
  } else {
    uint64_t manifest_size = 0;
    store_blob_exists(st, img->manifest_digest, &manifest_size);
    ctrd_descriptor target = {
        .media_type = img->manifest_media_type,
        .digest = img->manifest_digest,
        .size = (int64_t) manifest_size,
    };
    ctrd_label mark = {label, PUBLISH_LABEL_VALUE};
    for (size_t i = 0; r >= 0 && names[i]; i++) {
      r = ctrd_images_put(&c, names[i], &target, &mark, 1, err);
      if (r < 0) {
        crimage_error_wrap(err, "image record %s", names[i]);
        publish_error(p, ns, err, "recording the image");
      }
    }
  }
  if (r >= 0 && cri && confirm_cri(p, &c, img, err) < 0)
    r = publish_error(p, ns, err, "confirming the image");

  /* The records (or nothing, on failure) hold the content now; a lease left behind expires by itself. */
  c.lease = NULL;
  if (ctrd_lease_delete(&c, lease, &lease_err) < 0) {
    log_warn("containerd at %s: deleting lease %s: %s", rpc_client_path(p->rpc), lease, lease_err->message);
    crimage_error_clear(&lease_err);
  }
  return r < 0 ? r : 1;
}

int publisher_publish(publisher *p, store *st, const store_image *img, const publish_dest *dest,
                      crimage_error **err)
{
  const char *ns = dest->ns;
  cleanup_free char *key = xasprintf("image\x1f%s\x1f%s\x1f%s", ns, img->handler, img->id);
  key_lock(p, key);
  rpc_client_wait_ready(p->rpc, CONNECT_WAIT_MS);
  /* crimage's own removals wait until the blobs are in containerd. */
  store_holder *hold = store_hold(st);
  int64_t start = now_monotonic_ms();
  int r = publish_locked(p, st, img, dest, err);
  store_release(hold);
  key_unlock(p, key);
  if (r > 0)
    log_info("published %s for handler \"%s\" to containerd (namespace %s) in %" PRId64 " ms", img->id,
             img->handler, ns, now_monotonic_ms() - start);
  return r;
}

/* Whether another handler's publish label is on the record. */
static bool other_handler_label(const ctrd_image *rec, const char *label)
{
  for (size_t i = 0; rec->label_keys[i]; i++) {
    const char *k = rec->label_keys[i];
    if (str_has_prefix(k, PUBLISH_LABEL_HANDLER) && !streq(k, label) &&
        (k[strlen(PUBLISH_LABEL_HANDLER)] == '\0' || k[strlen(PUBLISH_LABEL_HANDLER)] == '.'))
      return true;
  }
  return false;
}

static int unpublish_locked(publisher *p, const store_image *img, const char *ns, crimage_error **err)
{
  ctrd_ctx c = {.rpc = p->rpc, .ns = ns, .timeout_ms = p->call_timeout_ms};
  cleanup_strv char **names = image_names(img);
  cleanup_free char *label = handler_label(img->handler);
  for (size_t i = 0; names[i]; i++) {
    cleanup_ctrd_image ctrd_image *rec = NULL;
    int r = ctrd_images_get(&c, names[i], &rec, err);
    if (r < 0)
      return publish_error(p, ns, err, "reading an image record");
    /* Only records this handler published for this very image: a name that moved on is another image's now. */
    if (r == 0 || !ctrd_image_label(rec, label) || !streq(rec->target.digest, img->manifest_digest))
      continue;
    if (other_handler_label(rec, label)) {
      ctrd_label drop = {label, NULL};
      r = ctrd_images_update_labels(&c, names[i], &drop, 1, err);
    } else {
      r = ctrd_images_delete(&c, names[i], err);
    }
    if (r < 0) {
      crimage_error_wrap(err, "image record %s", names[i]);
      return publish_error(p, ns, err, "removing the image");
    }
  }

  /* containerd's CRI named the image by its ID when it took it in; that record goes with the last other name, or
   * the CRI would still show the image and containerd's GC would keep its content. */
  cleanup_free char *filter = xasprintf("target.digest==%s", img->manifest_digest);
  ctrd_image **left = NULL;
  size_t n_left = 0;
  int r = ctrd_images_list(&c, filter, &left, &n_left, err);
  if (r < 0)
    return publish_error(p, ns, err, "listing image records");
  bool id_record = false, others = false;
  for (size_t i = 0; i < n_left; i++) {
    if (streq(left[i]->name, img->id))
      id_record = true;
    else
      others = true;
  }
  ctrd_image_list_free(left, n_left);
  if (id_record && !others && ctrd_images_delete(&c, img->id, err) < 0) {
    crimage_error_wrap(err, "image record %s", img->id);
    return publish_error(p, ns, err, "removing the image");
  }
  return 0;
}

int publisher_unpublish(publisher *p, const store_image *img, const publish_dest *dest, crimage_error **err)
{
  const char *ns = dest->ns;
  cleanup_free char *key = xasprintf("image\x1f%s\x1f%s\x1f%s", ns, img->handler, img->id);
  key_lock(p, key);
  rpc_client_wait_ready(p->rpc, CONNECT_WAIT_MS);
  int r = unpublish_locked(p, img, ns, err);
  key_unlock(p, key);
  return r;
}

/* ---- watcher ---- */

bool publisher_stopping(publisher *p)
{
  pthread_mutex_lock(&p->lock);
  bool stop = p->stop;
  pthread_mutex_unlock(&p->lock);
  return stop;
}

static void *watcher_thread(void *arg)
{
  publisher *p = arg;
  bool was_ready = false;
  int64_t next_check = 0;
  while (!publisher_stopping(p)) {
    rpc_state st = rpc_client_state(p->rpc, true);
    if (st == RPC_STATE_READY && (!was_ready || now_monotonic_ms() >= next_check)) {
      if (!was_ready)
        log_info("containerd at %s answers", rpc_client_path(p->rpc));
      p->ready_fn(p->ready_userdata);
      next_check = now_monotonic_ms() + RECHECK_INTERVAL_MS;
    }
    if (st != RPC_STATE_READY && was_ready)
      log_warn("containerd at %s is unreachable; images are published again when it is back",
               rpc_client_path(p->rpc));
    was_ready = st == RPC_STATE_READY;
    /* Woken by every change; the timeout only bounds how long a shutdown waits for this thread. */
    rpc_client_wait_state(p->rpc, st, 500);
  }
  return NULL;
}

int publisher_watch(publisher *p, publisher_ready_fn fn, void *userdata, crimage_error **err)
{
  if (p->watching)
    return crimage_error_set(err, CRIMAGE_INTERNAL, 0, "the containerd watcher runs already");
  p->ready_fn = fn;
  p->ready_userdata = userdata;
  int r = pthread_create(&p->watcher, NULL, watcher_thread, p);
  if (r != 0)
    return crimage_error_set(err, CRIMAGE_INTERNAL, r, "starting the containerd watcher");
  p->watching = true;
  return 0;
}
