#include <errno.h>
#include <limits.h>
#include <pthread.h>

#include "common/digest.h"
#include "common/json.h"
#include "common/log.h"
#include "common/util.h"
#include "cri/api.pb-c.h"
#include "cri/image_service.h"
#include "pull/manifest.h"
#include "pull/reference.h"

/* The deprecated pod annotation that selected a runtime handler before ImageSpec.runtime_handler existed. */
#define ANNOTATION_RUNTIME_HANDLER "io.containerd.cri.runtime-handler"

struct image_service {
  store *store;
  puller *puller;
  char *default_registry;
  handler_config *handlers;
  size_t n_handlers;
  bool reject_unknown_handlers;
  platform host_platform;
  scheduler *scheduler;
  backoff *backoff;
  char **pinned; /* normalized references (name:tag or name@digest) of pinned images */
  progress_tracker *progress;
  pull_credentials *credentials;
  handler_store *handler_stores; /* handler names owned */
  size_t n_handler_stores;
  publisher *publisher;
  char *containerd_namespace;
  char *containerd_snapshotter; /* NULL: none */
  bool unpack_layers;
  cstorage **cstorages;
  size_t n_cstorages;
  char *cs_root; /* NULL: none */
  /* Held from collecting the records a tree is to hold until the tree holds them (and, for RemoveImage, until the
   * record is gone), so that a concurrent sync never writes back an image being removed. */
  pthread_mutex_t cs_lock;
  pthread_mutex_t waiters_lock;
  struct pull_waiters *waiters;
};

/* The PullImage calls waiting for one scheduler job (same key): a shared pull stops only when every one of them
 * has given up, not when the caller that happens to run it does. */
typedef struct pull_waiters {
  struct pull_waiters *next;
  char *key;
  rpc_call **calls;
  size_t n_calls;
} pull_waiters;

static pull_waiters *waiters_join(image_service *svc, const char *key, rpc_call *call)
{
  pthread_mutex_lock(&svc->waiters_lock);
  pull_waiters *w = svc->waiters;
  while (w && !streq(w->key, key))
    w = w->next;
  if (!w) {
    w = xcalloc(1, sizeof(*w));
    w->key = xstrdup(key);
    w->next = svc->waiters;
    svc->waiters = w;
  }
  w->calls = xrealloc(w->calls, (w->n_calls + 1) * sizeof(*w->calls));
  w->calls[w->n_calls++] = call;
  pthread_mutex_unlock(&svc->waiters_lock);
  return w;
}

static void waiters_leave(image_service *svc, pull_waiters *w, rpc_call *call)
{
  pthread_mutex_lock(&svc->waiters_lock);
  for (size_t i = 0; i < w->n_calls; i++)
    if (w->calls[i] == call) {
      w->calls[i] = w->calls[--w->n_calls];
      break;
    }
  if (w->n_calls == 0) {
    pull_waiters **pp = &svc->waiters;
    while (*pp != w)
      pp = &(*pp)->next;
    *pp = w->next;
    free(w->key);
    free(w->calls);
    free(w);
  }
  pthread_mutex_unlock(&svc->waiters_lock);
}

/* True when every caller waiting for the pull is gone. */
static bool waiters_all_cancelled(image_service *svc, pull_waiters *w)
{
  pthread_mutex_lock(&svc->waiters_lock);
  bool all = true;
  for (size_t i = 0; i < w->n_calls && all; i++)
    all = rpc_call_cancelled(w->calls[i]);
  pthread_mutex_unlock(&svc->waiters_lock);
  return all;
}

/* The pinned references in the form the store records names: "name:tag" or "name@digest". */
static int normalize_pinned(char *const *refs, const char *default_registry, char ***ret, crimage_error **err)
{
  cleanup_strv char **out = xcalloc(1, sizeof(char *));
  for (size_t i = 0; refs && refs[i]; i++) {
    cleanup_reference image_ref *ref = NULL;
    int r = reference_parse(refs[i], default_registry, &ref, err);
    if (r < 0)
      return crimage_error_wrap(err, "pinned image");
    cleanup_free char *key = ref->digest ? reference_digested(ref) : reference_tagged(ref);
    strv_add_unique(&out, key);
  }
  *ret = TAKE_PTR(out);
  return 0;
}

static bool is_pinned(const image_service *svc, const store_image *img)
{
  for (size_t i = 0; svc->pinned[i]; i++)
    if (strv_contains(img->repo_tags, svc->pinned[i]) || strv_contains(img->repo_digests, svc->pinned[i]))
      return true;
  return false;
}

/* A handler is a key of the store and goes into every reply that lists its images: it must be a name as kubelet
 * can send one (RuntimeClass.handler, a DNS label). The value is shown only when it is short and printable. */
static int invalid_handler(const char *h, crimage_error **err)
{
  bool printable = strlen(h) <= 2 * STORE_HANDLER_MAX_LEN;
  for (const char *p = h; *p && printable; p++)
    printable = *p >= 0x20 && *p < 0x7f;
  return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0,
                           "invalid runtime handler%s%s%s: a handler is a DNS label (at most %d of a-z, 0-9 and '-', "
                           "starting and ending with a letter or digit), as in RuntimeClass.handler",
                           printable ? " \"" : "", printable ? h : "", printable ? "\"" : "", STORE_HANDLER_MAX_LEN);
}

int image_service_new(store *st, puller *p, const image_service_options *opts, image_service **ret,
                      crimage_error **err)
{
  for (size_t i = 0; i < opts->n_handlers; i++)
    if (!store_handler_valid(opts->handlers[i].name) || !*opts->handlers[i].name) {
      invalid_handler(opts->handlers[i].name, err);
      return crimage_error_wrap(err, "runtimeHandlers");
    }
  cleanup_strv char **pinned = NULL;
  int r = normalize_pinned(opts->pinned_images,
                           opts->default_registry ? opts->default_registry : REFERENCE_DEFAULT_REGISTRY, &pinned, err);
  if (r < 0)
    return r;
  image_service *svc = xcalloc(1, sizeof(*svc));
  svc->pinned = TAKE_PTR(pinned);
  svc->store = st;
  svc->puller = p;
  svc->default_registry = xstrdup(opts->default_registry ? opts->default_registry : REFERENCE_DEFAULT_REGISTRY);
  svc->reject_unknown_handlers = opts->reject_unknown_handlers;
  svc->scheduler = opts->scheduler;
  svc->backoff = opts->backoff;
  svc->progress = opts->progress;
  svc->handler_stores = xcalloc(opts->n_handler_stores + 1, sizeof(handler_store));
  for (size_t i = 0; i < opts->n_handler_stores; i++) {
    svc->handler_stores[i] = opts->handler_stores[i];
    svc->handler_stores[i].handler = xstrdup(opts->handler_stores[i].handler);
  }
  svc->n_handler_stores = opts->n_handler_stores;
  svc->publisher = opts->publisher;
  svc->unpack_layers = opts->unpack_layers;
  svc->containerd_snapshotter = str_empty(opts->containerd_snapshotter) ? NULL : xstrdup(opts->containerd_snapshotter);
  svc->containerd_namespace = xstrdup(opts->containerd_namespace ? opts->containerd_namespace : "k8s.io");
  svc->cstorages = xcalloc(opts->n_cstorages + 1, sizeof(cstorage *));
  for (size_t i = 0; i < opts->n_cstorages; i++)
    svc->cstorages[i] = opts->cstorages[i];
  svc->n_cstorages = opts->n_cstorages;
  svc->cs_root = str_empty(opts->containers_storage_root) ? NULL : xstrdup(opts->containers_storage_root);
  pthread_mutex_init(&svc->cs_lock, NULL);
  pthread_mutex_init(&svc->waiters_lock, NULL);
  svc->credentials = opts->credentials;
  svc->handlers = xcalloc(opts->n_handlers, sizeof(handler_config));
  for (size_t i = 0; i < opts->n_handlers; i++) {
    svc->handlers[i] = opts->handlers[i];
    svc->handlers[i].name = xstrdup(opts->handlers[i].name);
    svc->handlers[i].root = opts->handlers[i].root ? xstrdup(opts->handlers[i].root) : NULL;
    svc->handlers[i].containerd_namespace =
        opts->handlers[i].containerd_namespace ? xstrdup(opts->handlers[i].containerd_namespace) : NULL;
    svc->handlers[i].snapshotter = opts->handlers[i].snapshotter ? xstrdup(opts->handlers[i].snapshotter) : NULL;
    svc->handlers[i].containers_storage_root =
        opts->handlers[i].containers_storage_root ? xstrdup(opts->handlers[i].containers_storage_root) : NULL;
  }
  svc->n_handlers = opts->n_handlers;
  platform_host(&svc->host_platform);
  *ret = svc;
  return 0;
}

void image_service_free(image_service *svc)
{
  if (!svc)
    return;
  for (size_t i = 0; i < svc->n_handlers; i++) {
    free(svc->handlers[i].name);
    free(svc->handlers[i].root);
    free(svc->handlers[i].containerd_namespace);
    free(svc->handlers[i].snapshotter);
    free(svc->handlers[i].containers_storage_root);
  }
  for (size_t i = 0; i < svc->n_handler_stores; i++)
    free((char *) svc->handler_stores[i].handler);
  free(svc->handler_stores);
  pthread_mutex_destroy(&svc->waiters_lock);
  pthread_mutex_destroy(&svc->cs_lock);
  free(svc->cstorages);
  free(svc->cs_root);
  free(svc->handlers);
  free(svc->default_registry);
  free(svc->containerd_namespace);
  free(svc->containerd_snapshotter);
  strv_free(svc->pinned);
  free(svc);
}

/* The store and puller of a handler: its own when it has a root, else the main ones. */
static const handler_store *own_store(const image_service *svc, const char *handler)
{
  for (size_t i = 0; i < svc->n_handler_stores; i++)
    if (streq(svc->handler_stores[i].handler, handler))
      return &svc->handler_stores[i];
  return NULL;
}

static store *store_for(const image_service *svc, const char *handler)
{
  const handler_store *hs = own_store(svc, handler);
  return hs ? hs->store : svc->store;
}

static puller *puller_for(const image_service *svc, const char *handler)
{
  const handler_store *hs = own_store(svc, handler);
  return hs ? hs->puller : svc->puller;
}

static const handler_config *find_handler(const image_service *svc, const char *name)
{
  for (size_t i = 0; i < svc->n_handlers; i++)
    if (streq(svc->handlers[i].name, name))
      return &svc->handlers[i];
  return NULL;
}

/* Where in containerd a handler's images go: its namespace, and the snapshotter that stands for their layers. */
static publish_dest dest_for(const image_service *svc, const char *handler)
{
  const handler_config *hc = *handler ? find_handler(svc, handler) : NULL;
  publish_dest d = {
      .ns = hc && hc->containerd_namespace ? hc->containerd_namespace : svc->containerd_namespace,
      .snapshotter = hc && hc->snapshotter ? hc->snapshotter : svc->containerd_snapshotter,
  };
  if (str_empty(d.snapshotter))
    d.snapshotter = NULL; /* a handler's "" goes back to containerd's own snapshotter */
  return d;
}

/* The containers-storage tree of a handler's images, NULL for none. */
static cstorage *cs_for(const image_service *svc, const char *handler)
{
  const handler_config *hc = *handler ? find_handler(svc, handler) : NULL;
  const char *root = hc && hc->containers_storage_root ? hc->containers_storage_root : svc->cs_root;
  for (size_t i = 0; i < svc->n_cstorages && !str_empty(root); i++)
    if (streq(cstorage_root(svc->cstorages[i]), root))
      return svc->cstorages[i];
  return NULL;
}

/* Whether a handler's pulls unpack layers: when its images go to crimage's snapshotter or to a containers-storage
 * tree (whose layers are the unpacked ones) they must; otherwise as configured. */
static bool unpack_for(const image_service *svc, const char *handler)
{
  const handler_config *hc = *handler ? find_handler(svc, handler) : NULL;
  if ((svc->publisher && dest_for(svc, handler).snapshotter) || cs_for(svc, handler))
    return true;
  return hc && hc->unpack_layers >= 0 ? hc->unpack_layers > 0 : svc->unpack_layers;
}

/* The runtime handler of a request: ImageSpec.runtime_handler, else the deprecated pod annotation. */
static int resolve_handler(const image_service *svc, const Runtime__V1__ImageSpec *spec,
                           const Runtime__V1__PodSandboxConfig *sandbox, const char **ret, crimage_error **err)
{
  const char *h = spec && spec->runtime_handler ? spec->runtime_handler : "";
  if (!*h && sandbox) {
    for (size_t i = 0; i < sandbox->n_annotations; i++)
      if (streq(sandbox->annotations[i]->key, ANNOTATION_RUNTIME_HANDLER) && sandbox->annotations[i]->value)
        h = sandbox->annotations[i]->value;
  }
  if (!store_handler_valid(h))
    return invalid_handler(h, err);
  if (*h && svc->reject_unknown_handlers && !find_handler(svc, h))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "unknown runtime handler \"%s\"", h);
  *ret = h;
  return 0;
}

static bool is_hex(const char *s)
{
  if (!*s)
    return false;
  for (; *s; s++)
    if (!((*s >= '0' && *s <= '9') || (*s >= 'a' && *s <= 'f')))
      return false;
  return true;
}

/* Finds the image an ImageSpec.image names, within a handler: an image ID (full, bare hex or a prefix), a
 * reference by tag or a reference by digest. Returns 1 found, 0 absent, <0 error. */
static int lookup_image(image_service *svc, const char *handler, const char *name, store_image **ret,
                        crimage_error **err)
{
  if (str_has_prefix(name, "sha256:") || (strlen(name) == 64 && is_hex(name)))
    return store_find_image(store_for(svc, handler), handler, name, ret, err);

  cleanup_error crimage_error *parse_err = NULL;
  cleanup_reference image_ref *ref = NULL;
  if (reference_parse(name, svc->default_registry, &ref, &parse_err) == 0) {
    cleanup_free char *key = ref->digest ? reference_digested(ref) : reference_tagged(ref);
    int r = store_find_image(store_for(svc, handler), handler, key, ret, err);
    if (r != 0)
      return r;
  }
  /* A short hex string may be an ID prefix even when it also reads as a repository name. */
  if (is_hex(name))
    return store_find_image(store_for(svc, handler), handler, name, ret, err);
  if (parse_err) {
    *err = TAKE_PTR(parse_err);
    return -EINVAL;
  }
  return 0;
}

static char *chain_id(json_object *config)
{
  json_object *rootfs = json_get_object(config, "rootfs");
  json_object *diff_ids = json_get_array(rootfs, "diff_ids");
  size_t n = diff_ids ? json_object_array_length(diff_ids) : 0;
  char chain[DIGEST_MAX_LEN + 1] = "";
  for (size_t i = 0; i < n; i++) {
    const char *d = json_object_get_string(json_object_array_get_idx(diff_ids, i));
    if (!d)
      return NULL;
    char next[DIGEST_MAX_LEN + 1];
    digest_chain_id(chain, d, next);
    memcpy(chain, next, sizeof(chain));
  }
  return xstrdup(chain);
}

/* The directories of the image's unpacked layers, lowest first, when every layer is unpacked; NULL otherwise (not
 * unpacked, a record made before diff_ids were kept, or a layer still missing). `crimage rootfs` and `crimage mount`
 * read them from the verbose info, so they hold paths on this host. A record keeps the directories of its
 * diff_ids, so the list stays valid as long as the image does. */
static json_object *unpacked_layers(store *st, const store_image *img)
{
  size_t n = strv_length(img->diff_ids);
  if (n == 0 || n != strv_length(img->layers))
    return NULL;
  json_object *dirs = json_object_new_array();
  for (size_t i = 0; i < n; i++) {
    char *dir = store_layer_exists(st, img->diff_ids[i]) ? store_layer_path(st, img->diff_ids[i]) : NULL;
    if (!dir) {
      json_object_put(dirs);
      return NULL;
    }
    json_object_array_add(dirs, json_object_new_string(dir));
    free(dir);
  }
  return dirs;
}

static int build_info(image_service *svc, const store_image *img, char **ret_json, crimage_error **err)
{
  cleanup_free char *data = NULL;
  size_t len = 0;
  /* The pull's own limit: every config it accepted can be shown. */
  int r = store_blob_read(store_for(svc, img->handler), img->id, IMAGE_CONFIG_MAX_SIZE, &data, &len, err);
  if (r < 0)
    return crimage_error_wrap(err, "reading the config of %s", img->id);
  cleanup_json json_object *config = NULL;
  r = json_parse(data, len, "image config", IMAGE_CONFIG_JSON_LIMITS, &config, err);
  if (r < 0)
    return r;
  json_object *info = json_object_new_object();
  cleanup_free char *chain = chain_id(config);
  json_object_object_add(info, "chainID", json_object_new_string(chain ? chain : ""));
  json_object_object_add(info, "imageSpec", json_object_get(config));
  json_object_object_add(info, "runtimeHandler", json_object_new_string(img->handler));
  json_object_object_add(info, "manifestDigest", json_object_new_string(img->manifest_digest));
  json_object *layers = unpacked_layers(store_for(svc, img->handler), img);
  if (layers)
    json_object_object_add(info, "unpackedLayers", layers);
  /* As Go's encoding/json writes it (containerd's info): a "/" stays a "/". */
  *ret_json = xstrdup(json_object_to_json_string_ext(info, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE));
  json_object_put(info);
  return 0;
}

static char **strv_to_repeated(char *const *v, size_t *ret_n)
{
  size_t n = strv_length(v);
  char **out = n ? xcalloc(n, sizeof(char *)) : NULL;
  for (size_t i = 0; i < n; i++)
    out[i] = xstrdup(v[i]);
  *ret_n = n;
  return out;
}

/* Config.User: a numeric user (before any ':') goes to uid, a name to username. */
static void fill_user(Runtime__V1__Image *out, const char *user)
{
  if (str_empty(user))
    return;
  cleanup_free char *u = xstrdup(user);
  char *colon = strchr(u, ':');
  if (colon)
    *colon = '\0';
  if (!*u)
    return;
  char *end = NULL;
  errno = 0;
  long long id = strtoll(u, &end, 10);
  if (!errno && end && *end == '\0' && id >= 0) {
    out->uid = xmalloc(sizeof(*out->uid));
    runtime__v1__int64_value__init(out->uid);
    out->uid->value = id;
  } else {
    out->username = xstrdup(u);
  }
}

static Runtime__V1__Image *to_cri_image(const image_service *svc, const store_image *img)
{
  Runtime__V1__Image *out = xmalloc(sizeof(*out));
  runtime__v1__image__init(out);
  out->id = xstrdup(img->id);
  out->repo_tags = strv_to_repeated(img->repo_tags, &out->n_repo_tags);
  out->repo_digests = strv_to_repeated(img->repo_digests, &out->n_repo_digests);
  out->size = img->size;
  out->pinned = img->pinned || is_pinned(svc, img);
  fill_user(out, img->user);
  out->spec = xmalloc(sizeof(*out->spec));
  runtime__v1__image_spec__init(out->spec);
  out->spec->image = xstrdup(img->id);
  if (*img->handler)
    out->spec->runtime_handler = xstrdup(img->handler);
  return out;
}

static int require_image(const Runtime__V1__ImageSpec *spec, crimage_error **err)
{
  if (!spec)
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "image spec is missing");
  if (str_empty(spec->image))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "image spec has an empty image");
  return 0;
}

/* The image an ImageStatus or RemoveImage request names, for its handler; *ret_img stays NULL when absent. */
static int find_requested_image(image_service *svc, const Runtime__V1__ImageSpec *spec, const char **ret_handler,
                                store_image **ret_img, crimage_error **err)
{
  int r = require_image(spec, err);
  if (r < 0)
    return r;
  r = resolve_handler(svc, spec, NULL, ret_handler, err);
  if (r < 0)
    return r;
  return lookup_image(svc, *ret_handler, spec->image, ret_img, err);
}

/* ---- ImageStatus ---- */

static int handle_image_status(void *userdata, rpc_call *call, const ProtobufCMessage *request,
                               ProtobufCMessage **ret_reply, crimage_error **err)
{
  image_service *svc = userdata;
  const Runtime__V1__ImageStatusRequest *req = (const Runtime__V1__ImageStatusRequest *) request;
  const char *handler = NULL;
  cleanup_store_image store_image *img = NULL;
  int r = find_requested_image(svc, req->image, &handler, &img, err);
  if (r < 0)
    return r;
  /* The runtime of a handler with a containers-storage tree finds there only images whose layers are unpacked: one
   * pulled before the handler had a tree is reported absent, so that kubelet pulls it, which unpacks it. */
  if (img && cs_for(svc, handler)) {
    json_object *dirs = unpacked_layers(store_for(svc, handler), img);
    if (!dirs) {
      store_image_free(img);
      img = NULL;
    }
    json_object_put(dirs);
  }

  Runtime__V1__ImageStatusResponse *reply = xmalloc(sizeof(*reply));
  runtime__v1__image_status_response__init(reply);
  if (img) {
    reply->image = to_cri_image(svc, img);
    if (req->verbose) {
      char *info = NULL;
      if (build_info(svc, img, &info, err) < 0) {
        protobuf_c_message_free_unpacked(&reply->base, NULL);
        return -EIO;
      }
      Runtime__V1__ImageStatusResponse__InfoEntry *e = xmalloc(sizeof(*e));
      runtime__v1__image_status_response__info_entry__init(e);
      e->key = xstrdup("info");
      e->value = info;
      reply->info = xmalloc(sizeof(*reply->info));
      reply->info[0] = e;
      reply->n_info = 1;
    }
  }
  *ret_reply = &reply->base;
  return 0;
}

/* ---- ListImages ---- */

/* The normalized repository a filter names when it names one without a tag or digest ("busybox" ->
 * "docker.io/library/busybox"); NULL for an image ID, a reference with a tag or digest, or no reference. */
static char *filter_repository(const image_service *svc, const char *name)
{
  if (str_has_prefix(name, "sha256:") || (strlen(name) == 64 && is_hex(name)))
    return NULL;
  cleanup_error crimage_error *e = NULL;
  cleanup_reference image_ref *ref = NULL;
  if (reference_parse(name, svc->default_registry, &ref, &e) < 0 || ref->tag_given || ref->digest)
    return NULL;
  return reference_name(ref);
}

static bool in_repository(const store_image *img, const char *repo)
{
  size_t l = strlen(repo);
  for (char **t = img->repo_tags; t && *t; t++)
    if (strncmp(*t, repo, l) == 0 && (*t)[l] == ':')
      return true;
  for (char **d = img->repo_digests; d && *d; d++)
    if (strncmp(*d, repo, l) == 0 && (*d)[l] == '@')
      return true;
  return false;
}

/* Every image of handler with a name in repo (as `docker images busybox` and CRI-O list every tag). */
static int list_repository(image_service *svc, const char *handler, const char *repo, store_image ***ret,
                           size_t *ret_n, crimage_error **err)
{
  store_image **all = NULL;
  size_t n = 0, kept = 0;
  int r = store_list_images(store_for(svc, handler), handler, &all, &n, err);
  if (r < 0)
    return r;
  for (size_t i = 0; i < n; i++) {
    if (in_repository(all[i], repo))
      all[kept++] = all[i];
    else
      store_image_free(all[i]);
  }
  *ret = all;
  *ret_n = kept;
  return 0;
}

/* The images of handler a filter naming an image selects: every image of a repository named without tag or digest
 * (as `docker images busybox` and CRI-O), else the one image a tag, a digest or an ID names. */
static int select_named(image_service *svc, const char *handler, const char *name, store_image ***ret,
                        size_t *ret_n, crimage_error **err)
{
  cleanup_free char *repo = filter_repository(svc, name);
  if (repo) {
    int r = list_repository(svc, handler, repo, ret, ret_n, err);
    /* A short hex string that names no repository with images may still be an ID prefix. */
    if (r < 0 || *ret_n > 0 || !is_hex(name))
      return r;
    free(*ret);
    *ret = NULL;
  }
  store_image *img = NULL;
  int r = lookup_image(svc, handler, name, &img, err);
  if (r < 0)
    return r;
  if (img) {
    *ret = xmalloc(sizeof(**ret));
    (*ret)[0] = img;
    *ret_n = 1;
  }
  return 0;
}

/* The distinct stores, the main one first. */
static size_t distinct_stores(const image_service *svc, store **out)
{
  size_t n = 0;
  out[n++] = svc->store;
  for (size_t i = 0; i < svc->n_handler_stores; i++) {
    bool seen = false;
    for (size_t j = 0; j < n && !seen; j++)
      seen = out[j] == svc->handler_stores[i].store;
    if (!seen)
      out[n++] = svc->handler_stores[i].store;
  }
  return n;
}

/* Makes tree cs hold the images of every record of the handlers whose tree it is, but for (without_handler,
 * without_id) when given (an image being removed). required_id: the image a pull just recorded, which must get
 * in. With cs_lock held. */
static int cs_sync_locked(image_service *svc, cstorage *cs, const char *required_id, const char *without_handler,
                          const char *without_id, crimage_error **err)
{
  store *stores[svc->n_handler_stores + 1];
  size_t n_stores = distinct_stores(svc, stores);
  store_image **lists[n_stores];
  size_t counts[n_stores], total = 0;
  int r = 0;
  for (size_t i = 0; i < n_stores; i++) {
    lists[i] = NULL;
    counts[i] = 0;
    if (r == 0)
      r = store_list_images(stores[i], NULL, &lists[i], &counts[i], err);
    total += counts[i];
  }
  cstorage_source *src = xcalloc(total + 1, sizeof(*src));
  size_t n = 0;
  for (size_t i = 0; i < n_stores && r == 0; i++)
    for (size_t j = 0; j < counts[i]; j++) {
      const store_image *img = lists[i][j];
      /* A handler's images live in its own store; a record of another handler in this store is not its. */
      if (store_for(svc, img->handler) != stores[i] || cs_for(svc, img->handler) != cs)
        continue;
      if (without_id && streq(img->handler, without_handler) && streq(img->id, without_id))
        continue;
      src[n++] = (cstorage_source){.st = stores[i], .img = img};
    }
  if (r == 0)
    r = cstorage_sync(cs, src, n, required_id, err);
  free(src);
  for (size_t i = 0; i < n_stores; i++)
    store_image_list_free(lists[i], counts[i]);
  return r;
}

int image_service_sync_containers_storage(image_service *svc, crimage_error **err)
{
  for (size_t i = 0; i < svc->n_cstorages; i++) {
    int64_t start = now_monotonic_ms();
    pthread_mutex_lock(&svc->cs_lock);
    int r = cs_sync_locked(svc, svc->cstorages[i], NULL, NULL, NULL, err);
    pthread_mutex_unlock(&svc->cs_lock);
    if (r < 0)
      return r;
    log_msg(r ? LOG_INFO : LOG_DEBUG, "containers-storage %s: %d images and layers added or removed, in %lld ms",
            cstorage_root(svc->cstorages[i]), r, (long long) (now_monotonic_ms() - start));
  }
  return 0;
}

/* The images an ImageFilter selects; shared by ListImages and StreamImages. */
static int list_images(image_service *svc, const Runtime__V1__ImageFilter *filter, store_image ***ret,
                       size_t *ret_n, crimage_error **err)
{
  const Runtime__V1__ImageSpec *spec = filter ? filter->image : NULL;
  const char *handler = NULL;
  int r = resolve_handler(svc, spec, NULL, &handler, err);
  if (r < 0)
    return r;

  store_image **list = NULL;
  size_t n = 0;
  if (spec && !str_empty(spec->image)) {
    r = select_named(svc, handler, spec->image, &list, &n, err);
    if (r < 0)
      return r;
  } else {
    /* No handler in the filter lists the images of every handler: kubelet's image GC needs them all and tells them
     * apart by Image.spec.runtime_handler. */
    if (*handler) {
      r = store_list_images(store_for(svc, handler), handler, &list, &n, err);
      if (r < 0)
        return r;
    } else {
      /* The main store and every store of a handler's own (a store shared by several handlers once). */
      store *stores[svc->n_handler_stores + 1];
      size_t n_stores = distinct_stores(svc, stores);
      for (size_t i = 0; i < n_stores; i++) {
        store_image **more = NULL;
        size_t m = 0;
        r = store_list_images(stores[i], NULL, &more, &m, err);
        if (r < 0) {
          store_image_list_free(list, n);
          return r;
        }
        list = xrealloc(list, (n + m + 1) * sizeof(*list));
        if (m)
          memcpy(list + n, more, m * sizeof(*more));
        n += m;
        free(more);
      }
    }
  }
  *ret = list;
  *ret_n = n;
  return 0;
}

static int handle_list_images(void *userdata, rpc_call *call, const ProtobufCMessage *request,
                              ProtobufCMessage **ret_reply, crimage_error **err)
{
  image_service *svc = userdata;
  const Runtime__V1__ListImagesRequest *req = (const Runtime__V1__ListImagesRequest *) request;
  store_image **list = NULL;
  size_t n = 0;
  int r = list_images(svc, req->filter, &list, &n, err);
  if (r < 0)
    return r;

  Runtime__V1__ListImagesResponse *reply = xmalloc(sizeof(*reply));
  runtime__v1__list_images_response__init(reply);
  if (n) {
    reply->images = xcalloc(n, sizeof(*reply->images));
    for (size_t i = 0; i < n; i++)
      reply->images[i] = to_cri_image(svc, list[i]);
    reply->n_images = n;
  }
  store_image_list_free(list, n);
  *ret_reply = &reply->base;
  return 0;
}

/* ---- StreamImages ---- */

/* Images per StreamImagesResponse: small enough that a batch stays far below the message cap. */
#define STREAM_IMAGES_BATCH 100

static int handle_stream_images(void *userdata, rpc_call *call, const ProtobufCMessage *request,
                                crimage_error **err)
{
  image_service *svc = userdata;
  const Runtime__V1__StreamImagesRequest *req = (const Runtime__V1__StreamImagesRequest *) request;
  store_image **list = NULL;
  size_t n = 0;
  int r = list_images(svc, req->filter, &list, &n, err);
  if (r < 0)
    return r;
  for (size_t off = 0; off < n && r >= 0; off += STREAM_IMAGES_BATCH) {
    size_t k = n - off < STREAM_IMAGES_BATCH ? n - off : STREAM_IMAGES_BATCH;
    Runtime__V1__StreamImagesResponse *msg = xmalloc(sizeof(*msg));
    runtime__v1__stream_images_response__init(msg);
    msg->images = xcalloc(k, sizeof(*msg->images));
    for (size_t i = 0; i < k; i++)
      msg->images[i] = to_cri_image(svc, list[off + i]);
    msg->n_images = k;
    r = rpc_call_send(call, &msg->base, err);
    protobuf_c_message_free_unpacked(&msg->base, NULL);
  }
  store_image_list_free(list, n);
  return r < 0 ? r : 0;
}

/* ---- RemoveImage ---- */

static int handle_remove_image(void *userdata, rpc_call *call, const ProtobufCMessage *request,
                               ProtobufCMessage **ret_reply, crimage_error **err)
{
  image_service *svc = userdata;
  const Runtime__V1__RemoveImageRequest *req = (const Runtime__V1__RemoveImageRequest *) request;
  const char *handler = NULL;
  cleanup_store_image store_image *img = NULL;
  int r = find_requested_image(svc, req->image, &handler, &img, err);
  if (r < 0)
    return r;
  if (img) {
    /* containerd first: should it be unreachable, the image stays in both and kubelet's next try removes it. */
    if (svc->publisher) {
      publish_dest dest = dest_for(svc, handler);
      r = publisher_unpublish(svc->publisher, img, &dest, err);
      if (r < 0)
        return crimage_error_wrap(err, "removing %s", req->image->image);
    }
    /* Then the containers-storage tree, from which the image goes before its record, so that its layers are no
     * longer in use when the store decides whether they go too. */
    cstorage *cs = cs_for(svc, handler);
    if (cs) {
      pthread_mutex_lock(&svc->cs_lock);
      r = cs_sync_locked(svc, cs, NULL, handler, img->id, err);
    }
    if (r >= 0)
      r = store_remove_image(store_for(svc, handler), handler, img->id, err);
    if (cs)
      pthread_mutex_unlock(&svc->cs_lock);
    if (r < 0)
      return crimage_error_wrap(err, "removing %s", req->image->image);
    log_info("removed image %s (%s) for handler \"%s\"", req->image->image, img->id, handler);
  }
  Runtime__V1__RemoveImageResponse *reply = xmalloc(sizeof(*reply));
  runtime__v1__remove_image_response__init(reply);
  *ret_reply = &reply->base;
  return 0;
}

/* ---- ImageFsInfo ---- */



static int fs_usage(store *st, Runtime__V1__FilesystemUsage **ret, crimage_error **err)
{
  store_usage usage = {0};
  int r = store_get_usage(st, &usage, err);
  if (r < 0)
    return r;
  Runtime__V1__FilesystemUsage *fs = xmalloc(sizeof(*fs));
  runtime__v1__filesystem_usage__init(fs);
  fs->timestamp = usage.timestamp_ns;
  fs->fs_id = xmalloc(sizeof(*fs->fs_id));
  runtime__v1__filesystem_identifier__init(fs->fs_id);
  fs->fs_id->mountpoint = xstrdup(usage.mountpoint);
  fs->used_bytes = xmalloc(sizeof(*fs->used_bytes));
  runtime__v1__uint64_value__init(fs->used_bytes);
  fs->used_bytes->value = usage.used_bytes;
  fs->inodes_used = xmalloc(sizeof(*fs->inodes_used));
  runtime__v1__uint64_value__init(fs->inodes_used);
  fs->inodes_used->value = usage.inodes_used;
  store_usage_clear(&usage);
  *ret = fs;
  return 0;
}

static int handle_image_fs_info(void *userdata, rpc_call *call, const ProtobufCMessage *request,
                                ProtobufCMessage **ret_reply, crimage_error **err)
{
  image_service *svc = userdata;
  Runtime__V1__ImageFsInfoResponse *reply = xmalloc(sizeof(*reply));
  runtime__v1__image_fs_info_response__init(reply);
  /* The main store first: kubelet reads only the first entry. Then each store of its own, once. */
  store *stores[svc->n_handler_stores + 1];
  size_t n_stores = distinct_stores(svc, stores);
  reply->image_filesystems = xcalloc(n_stores, sizeof(*reply->image_filesystems));
  for (size_t i = 0; i < n_stores; i++) {
    Runtime__V1__FilesystemUsage *fs = NULL;
    int r = fs_usage(stores[i], &fs, err);
    if (r < 0) {
      protobuf_c_message_free_unpacked(&reply->base, NULL);
      return r;
    }
    reply->image_filesystems[reply->n_image_filesystems++] = fs;
  }
  *ret_reply = &reply->base;
  return 0;
}

/* ---- PullImage ---- */


static credential *credential_from_auth(const Runtime__V1__AuthConfig *a, crimage_error **err)
{
  if (!a)
    return NULL;
  if (str_empty(a->username) && str_empty(a->password) && str_empty(a->auth) && str_empty(a->identity_token) &&
      str_empty(a->registry_token))
    return NULL;
  credential *c = credential_new();
  c->source = xstrdup("request");
  if (!str_empty(a->auth)) {
    if (credential_set_auth(c, a->auth) < 0) {
      credential_free(c);
      crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "auth config: `auth` is not base64 of user:password");
      return NULL;
    }
  }
  if (!str_empty(a->username)) {
    secret_free(c->username);
    c->username = xstrdup(a->username);
  }
  if (!str_empty(a->password)) {
    secret_free(c->password);
    c->password = xstrdup(a->password);
  }
  if (!str_empty(a->identity_token))
    c->identity_token = xstrdup(a->identity_token);
  if (!str_empty(a->registry_token))
    c->registry_token = xstrdup(a->registry_token);
  if (!str_empty(a->server_address))
    c->server_address = xstrdup(a->server_address);
  return c;
}

/* The unpacked request is freed by the server after the handler returns; the secrets in it are wiped first. */
static void auth_config_wipe(const Runtime__V1__AuthConfig **ap)
{
  const Runtime__V1__AuthConfig *a = *ap;
  if (!a)
    return;
  char *fields[] = {a->username, a->password, a->auth, a->identity_token, a->registry_token};
  for (size_t i = 0; i < ARRAY_SIZE(fields); i++)
    if (fields[i])
      explicit_bzero(fields[i], strlen(fields[i]));
}

/* One pull as the scheduler runs it. */
typedef struct pull_job {
  image_service *svc;
  pull_request req;
  rpc_call *call;
  pull_waiters *waiters; /* every call sharing this job */
  uint64_t progress_id;  /* 0: not tracked */
} pull_job;

static bool job_cancelled(void *userdata)
{
  pull_job *job = userdata;
  return waiters_all_cancelled(job->svc, job->waiters);
}

static void job_progress(void *userdata, const pull_event *ev)
{
  pull_job *job = userdata;
  if (job->svc->progress)
    progress_event(job->svc->progress, job->progress_id, ev);
}

static int run_pull_job(void *ud, void **ret_result, crimage_error **err)
{
  pull_job *job = ud;
  if (job->svc->progress)
    progress_start(job->svc->progress, job->progress_id);
  pull_result *res = xcalloc(1, sizeof(*res));
  int r = puller_pull(puller_for(job->svc, job->req.handler), &job->req, res, err);
  if (job->svc->progress)
    progress_end(job->svc->progress, job->progress_id, r, err ? *err : NULL);
  if (r < 0) {
    free(res);
    return r;
  }
  *ret_result = res;
  return 0;
}

static void free_pull_result(void *p)
{
  pull_result_clear(p);
  free(p);
}

static void *copy_pull_result(const void *p)
{
  const pull_result *src = p;
  pull_result *dst = xcalloc(1, sizeof(*dst));
  dst->image_id = xstrdup(src->image_id);
  dst->repo_digest = src->repo_digest ? xstrdup(src->repo_digest) : NULL;
  dst->manifest_digest = src->manifest_digest ? xstrdup(src->manifest_digest) : NULL;
  dst->unchanged = src->unchanged;
  return dst;
}

/* Pulls are told apart by handler, reference and credential: kubelet tries one credential after another, and the
 * failure of one must neither be shared with nor hold back the try with the next. */
static char *pull_key(const char *handler, const char *ref, const credential *cred)
{
  char digest[DIGEST_MAX_LEN + 1] = "anonymous";
  if (cred) {
    digester *d = digester_new("sha256");
    const char *fields[] = {cred->username, cred->password, cred->identity_token, cred->registry_token,
                            cred->server_address};
    for (size_t i = 0; i < ARRAY_SIZE(fields); i++) {
      const char *f = fields[i] ? fields[i] : "";
      digester_update(d, f, strlen(f) + 1);
    }
    digester_final(d, digest);
    digester_free(d);
  }
  return xasprintf("%s\x1f%s\x1f%s", handler, ref, digest);
}

static const char *pod_uid_of(const Runtime__V1__PodSandboxConfig *sandbox)
{
  if (sandbox && sandbox->metadata && !str_empty(sandbox->metadata->uid))
    return sandbox->metadata->uid;
  return NULL;
}

/* One try of a PullImage with one credential (NULL = anonymous), through the scheduler; a pull_attempt_fn. */
typedef struct pull_attempt {
  image_service *svc;
  rpc_call *call;
  const Runtime__V1__PullImageRequest *req;
  image_ref *ref;
  const char *handler;
  const char *refstr;
} pull_attempt;

static int run_pull_attempt(void *userdata, const credential *cred, void **ret_result, crimage_error **err)
{
  pull_attempt *at = userdata;
  image_service *svc = at->svc;
  const Runtime__V1__PullImageRequest *req = at->req;
  const char *handler = at->handler, *refstr = at->refstr;
  /* Each credential is a pull of its own for the scheduler: concurrent identical tries share one run. */
  cleanup_free char *key = pull_key(handler, refstr, cred);
  const handler_config *hc = *handler ? find_handler(svc, handler) : NULL;
  pull_job job = {
      .svc = svc,
      .req =
          {
              .ref = at->ref,
              .handler = handler,
              .platform = hc && hc->has_platform ? &hc->platform : &svc->host_platform,
              .cred = cred,
              .unpack = unpack_for(svc, handler),
              .cancelled = job_cancelled,
              .progress = job_progress,
              .userdata = &job,
          },
      .call = at->call,
  };
  log_info("pulling %s for handler \"%s\"%s%s", refstr, handler, cred ? " with credentials from " : "",
           cred ? cred->source : "");
  pull_result *res = NULL;
  if (svc->progress)
    job.progress_id = progress_begin(svc->progress, key, refstr, handler, pod_uid_of(req->sandbox_config));
  /* Every caller of a shared pull (they all wait in scheduler_run until it is over) stays in the set meanwhile. */
  job.waiters = waiters_join(svc, key, at->call);
  int r = scheduler_run(svc->scheduler, key, pod_uid_of(req->sandbox_config), run_pull_job, &job, (void **) &res,
                        free_pull_result, copy_pull_result, err);
  waiters_leave(svc, job.waiters, at->call);
  if (svc->progress)
    progress_release(svc->progress, job.progress_id, r, r < 0 ? *err : NULL);
  if (r < 0)
    return r;
  *ret_result = res;
  return 0;
}

/* Hands the image a pull recorded to containerd. */
static int publish_pulled(image_service *svc, const char *handler, const char *id, crimage_error **err)
{
  store *st = store_for(svc, handler);
  cleanup_store_image store_image *img = NULL;
  int r = store_find_image(st, handler, id, &img, err);
  if (r < 0)
    return r;
  if (r == 0) /* removed meanwhile by a concurrent RemoveImage: nothing to hand over */
    return crimage_error_set(err, CRIMAGE_ABORTED, 0, "image %s was removed while it was being pulled", id);
  publish_dest dest = dest_for(svc, handler);
  r = publisher_publish(svc->publisher, st, img, &dest, err);
  return r < 0 ? r : 0;
}

static int handle_pull_image(void *userdata, rpc_call *call, const ProtobufCMessage *request,
                             ProtobufCMessage **ret_reply, crimage_error **err)
{
  image_service *svc = userdata;
  const Runtime__V1__PullImageRequest *req = (const Runtime__V1__PullImageRequest *) request;
  _cleanup_(auth_config_wipe) const Runtime__V1__AuthConfig *auth = req->auth;
  const char *handler = NULL;
  int r = require_image(req->image, err);
  if (r < 0)
    return r;
  r = resolve_handler(svc, req->image, req->sandbox_config, &handler, err);
  if (r < 0)
    return r;
  cleanup_reference image_ref *ref = NULL;
  r = reference_parse(req->image->image, svc->default_registry, &ref, err);
  if (r < 0)
    return r;
  crimage_error *auth_err = NULL;
  cleanup_credential credential *cred = credential_from_auth(auth, &auth_err);
  if (auth_err) {
    *err = auth_err;
    return -EINVAL;
  }
  cleanup_free char *refstr = reference_string(ref);
  /* One back-off key around the whole sequence of credentials: the request's own, or those resolved here. */
  bool resolve = !cred && svc->credentials;
  cleanup_free char *key =
      resolve ? xasprintf("%s\x1f%s\x1fresolved", handler, refstr) : pull_key(handler, refstr, cred);

  if (svc->backoff) {
    int64_t retry_at = 0;
    cleanup_free char *last_error = NULL;
    int64_t now = now_monotonic_ms();
    if (backoff_check(svc->backoff, key, now, &retry_at, &last_error)) {
      if (svc->progress)
        progress_count_backoff(svc->progress);
      return crimage_error_set(err, CRIMAGE_UNAVAILABLE, 0,
                               "Back-off pulling image \"%s\": next try in %lld s; last error: %s", refstr,
                               (long long) ((retry_at - now + 999) / 1000), last_error ? last_error : "unknown");
    }
  }

  pull_attempt at = {.svc = svc, .call = call, .req = req, .ref = ref, .handler = handler, .refstr = refstr};
  pull_result *res = NULL;
  int64_t start = now_monotonic_ms();
  if (resolve) {
    cleanup_credential_list credential_list cands = {0};
    r = pull_credentials_resolve(svc->credentials, ref, &cands, err);
    if (r >= 0)
      r = pull_credentials_try(&cands, run_pull_attempt, &at, (void **) &res, err);
  } else {
    r = run_pull_attempt(&at, cred, (void **) &res, err);
  }
  if (r < 0) {
    /* A pull the client gave up on says nothing about the image. */
    if (svc->backoff && *err && (*err)->status != CRIMAGE_CANCELLED && (*err)->status != CRIMAGE_RESOURCE_EXHAUSTED)
      backoff_fail(svc->backoff, key, now_monotonic_ms(), (*err)->message);
    return r;
  }
  if (svc->backoff)
    backoff_success(svc->backoff, key);
  log_info("pulled %s for handler \"%s\": %s%s in %lld ms", refstr, handler, res->image_id,
           res->unchanged ? " (unchanged)" : "", (long long) (now_monotonic_ms() - start));
  /* Before the reply: kubelet's CreateContainer follows at once and containerd must know the image by then. A
   * failure here says nothing about the registry, so it is no reason for back-off. */
  if (svc->publisher) {
    r = publish_pulled(svc, handler, res->image_id, err);
    if (r < 0) {
      crimage_error_wrap(err, "pulled %s but could not hand it to the runtime", refstr);
      free_pull_result(res);
      return r;
    }
  }

  cstorage *cs = cs_for(svc, handler);
  if (cs) {
    pthread_mutex_lock(&svc->cs_lock);
    r = cs_sync_locked(svc, cs, res->image_id, NULL, NULL, err);
    pthread_mutex_unlock(&svc->cs_lock);
    if (r < 0) {
      crimage_error_wrap(err, "pulled %s but could not hand it to the runtime", refstr);
      free_pull_result(res);
      return r;
    }
  }

  Runtime__V1__PullImageResponse *reply = xmalloc(sizeof(*reply));
  runtime__v1__pull_image_response__init(reply);
  reply->image_ref = TAKE_PTR(res->image_id);
  free_pull_result(res);
  *ret_reply = &reply->base;
  return 0;
}

static const rpc_method image_methods[] = {
    {.name = "ListImages", .unary = handle_list_images},
    {.name = "ImageStatus", .unary = handle_image_status},
    {.name = "PullImage", .unary = handle_pull_image},
    {.name = "RemoveImage", .unary = handle_remove_image},
    {.name = "ImageFsInfo", .unary = handle_image_fs_info},
    {.name = "StreamImages", .stream = handle_stream_images},
};

void image_service_reconcile(void *userdata)
{
  image_service *svc = userdata;
  int64_t start = now_monotonic_ms();
  size_t total = 0, published = 0, failed = 0;
  store *stores[svc->n_handler_stores + 1];
  size_t n_stores = distinct_stores(svc, stores);
  for (size_t s = 0; s < n_stores && !publisher_stopping(svc->publisher); s++) {
    store_image **list = NULL;
    size_t n = 0;
    cleanup_error crimage_error *err = NULL;
    if (store_list_images(stores[s], NULL, &list, &n, &err) < 0) {
      log_error("containerd reconcile: %s", err->message);
      continue;
    }
    for (size_t i = 0; i < n && !publisher_stopping(svc->publisher); i++) {
      /* A handler's images live in its own store; a record of another handler in this store is not its. */
      if (store_for(svc, list[i]->handler) != stores[s])
        continue;
      total++;
      crimage_error *e = NULL;
      publish_dest dest = dest_for(svc, list[i]->handler);
      int r = publisher_publish(svc->publisher, stores[s], list[i], &dest, &e);
      if (r < 0) {
        failed++;
        log_warn("containerd reconcile: %s", e->message);
        crimage_error_clear(&e);
      } else {
        published += (size_t) r;
      }
    }
    store_image_list_free(list, n);
  }
  /* The periodic check that finds everything in place says so only at debug level. */
  log_msg(published || failed ? LOG_INFO : LOG_DEBUG,
          "containerd reconcile: %zu of %zu images published again, %zu failed, in %lld ms", published, total, failed,
          (long long) (now_monotonic_ms() - start));
}

int image_service_register(image_service *svc, rpc_server *server, crimage_error **err)
{
  /* Store errors name files by their path; a client sees them relative to the store. */
  rpc_server_hide_path(server, store_root(svc->store), "<store>");
  for (size_t i = 0; i < svc->n_handler_stores; i++) {
    const handler_store *hs = &svc->handler_stores[i];
    if (hs->store != svc->store) {
      cleanup_free char *name = xasprintf("<store of handler %s>", hs->handler);
      rpc_server_hide_path(server, store_root(hs->store), name);
    }
  }
  return rpc_server_add_service(server, &runtime__v1__image_service__descriptor, image_methods,
                                ARRAY_SIZE(image_methods), svc, err);
}
