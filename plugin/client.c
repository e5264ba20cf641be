/* The public client of libcrimage: CRI v1 ImageService and pull progress calls over a unix socket, on the generic
 * gRPC client (cri/rpc_client.h). The per-method functions only build requests and copy replies into the plain
 * crimage_* structs, so callers never see protobuf-c or gRPC types. */
#include <errno.h>

#include "common/error.h"
#include "common/json.h"
#include "common/util.h"
#include "cri/api.pb-c.h"
#include "cri/crimage.pb-c.h"
#include "cri/rpc_client.h"
#include "pull/manifest.h"
#include "crimage.h"

struct crimage_client {
  rpc_client *rpc;
  int64_t timeout_ms; /* 0: no deadline */
};

int crimage_client_connect(const char *socket_path, crimage_client **ret, crimage_error **err)
{
  rpc_client *rpc = NULL;
  int r = rpc_client_new(socket_path, NULL, &rpc, err);
  if (r < 0)
    return r;
  crimage_client *c = xcalloc(1, sizeof(*c));
  c->rpc = rpc;
  *ret = c;
  return 0;
}

void crimage_client_close(crimage_client *c)
{
  if (!c)
    return;
  rpc_client_free(c->rpc);
  free(c);
}

void crimage_client_set_timeout(crimage_client *c, int64_t timeout_ms)
{
  c->timeout_ms = timeout_ms > 0 ? timeout_ms : 0;
}

/* One unary call of a service: the reply is unpacked as reply_desc (free it with protobuf_c_message_free_unpacked);
 * a non-OK status is an error with the same status number. */
static int unary_call_service(crimage_client *c, const char *service, const char *method, const ProtobufCMessage *req,
                              const ProtobufCMessageDescriptor *reply_desc, ProtobufCMessage **ret,
                              crimage_error **err)
{
  cleanup_free char *path = xasprintf("/%s/%s", service, method);
  return rpc_client_unary(c->rpc, path, NULL, 0, c->timeout_ms, req, reply_desc, ret, err);
}

static int unary_call(crimage_client *c, const char *method, const ProtobufCMessage *req,
                      const ProtobufCMessageDescriptor *reply_desc, ProtobufCMessage **ret, crimage_error **err)
{
  return unary_call_service(c, "runtime.v1.ImageService", method, req, reply_desc, ret, err);
}

/* One server-streaming call: every message goes to fn until the stream ends or fn returns non-zero. */
static int stream_call(crimage_client *c, const char *service, const char *method, const ProtobufCMessage *req,
                       const ProtobufCMessageDescriptor *msg_desc, rpc_message_fn fn, void *ud, crimage_error **err)
{
  cleanup_free char *path = xasprintf("/%s/%s", service, method);
  return rpc_client_server_stream(c->rpc, path, NULL, 0, c->timeout_ms, req, msg_desc, fn, ud, err);
}

/* ---- conversions ---- */

static char **strv_from_proto(char **v, size_t n)
{
  char **out = xcalloc(n + 1, sizeof(char *));
  for (size_t i = 0; i < n; i++)
    out[i] = xstrdup(v[i] ? v[i] : "");
  return out;
}

static crimage_image *image_from_proto(const Runtime__V1__Image *p)
{
  crimage_image *img = xcalloc(1, sizeof(*img));
  img->id = xstrdup(p->id ? p->id : "");
  img->repo_tags = strv_from_proto(p->repo_tags, p->n_repo_tags);
  img->repo_digests = strv_from_proto(p->repo_digests, p->n_repo_digests);
  img->size = p->size;
  if (p->uid) {
    img->has_uid = true;
    img->uid = p->uid->value;
  }
  img->username = xstrdup(p->username ? p->username : "");
  if (p->spec) {
    img->has_spec = true;
    img->spec_image = xstrdup(p->spec->image ? p->spec->image : "");
    img->runtime_handler = xstrdup(p->spec->runtime_handler ? p->spec->runtime_handler : "");
  } else {
    img->spec_image = xstrdup("");
    img->runtime_handler = xstrdup("");
  }
  img->pinned = p->pinned;
  return img;
}

void crimage_image_free(crimage_image *img)
{
  if (!img)
    return;
  free(img->id);
  strv_free(img->repo_tags);
  strv_free(img->repo_digests);
  free(img->username);
  free(img->spec_image);
  free(img->runtime_handler);
  free(img);
}

void crimage_image_list_free(crimage_image **images, size_t n)
{
  if (!images)
    return;
  for (size_t i = 0; i < n; i++)
    crimage_image_free(images[i]);
  free(images);
}

void crimage_fs_usage_free(crimage_fs_usage *usage, size_t n)
{
  if (!usage)
    return;
  for (size_t i = 0; i < n; i++)
    free(usage[i].mountpoint);
  free(usage);
}

/* The protobuf-c structs take char *; the request only reads these strings. */
static char *req_str(const char *s) { return (char *) (s ? s : ""); }

static void image_spec_init(Runtime__V1__ImageSpec *spec, const char *image, const char *runtime_handler)
{
  runtime__v1__image_spec__init(spec);
  spec->image = req_str(image);
  spec->runtime_handler = req_str(runtime_handler);
}

static void free_reply(ProtobufCMessage *m)
{
  if (m)
    protobuf_c_message_free_unpacked(m, NULL);
}

/* ---- the five calls ---- */

int crimage_client_pull(crimage_client *c, const char *image, const char *runtime_handler, const crimage_auth *auth,
                        const char *pod_uid, char **ret_ref, crimage_error **err)
{
  if (str_empty(image))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, EINVAL, "no image given");

  Runtime__V1__ImageSpec spec;
  image_spec_init(&spec, image, runtime_handler);
  spec.user_specified_image = req_str(image);
  Runtime__V1__PullImageRequest req;
  runtime__v1__pull_image_request__init(&req);
  req.image = &spec;

  Runtime__V1__AuthConfig auth_config;
  if (auth) {
    runtime__v1__auth_config__init(&auth_config);
    auth_config.username = req_str(auth->username);
    auth_config.password = req_str(auth->password);
    auth_config.auth = req_str(auth->auth);
    auth_config.server_address = req_str(auth->server_address);
    auth_config.identity_token = req_str(auth->identity_token);
    auth_config.registry_token = req_str(auth->registry_token);
    req.auth = &auth_config;
  }
  Runtime__V1__PodSandboxConfig sandbox;
  Runtime__V1__PodSandboxMetadata metadata;
  if (!str_empty(pod_uid)) {
    runtime__v1__pod_sandbox_config__init(&sandbox);
    runtime__v1__pod_sandbox_metadata__init(&metadata);
    metadata.uid = req_str(pod_uid);
    sandbox.metadata = &metadata;
    req.sandbox_config = &sandbox;
  }

  ProtobufCMessage *reply = NULL;
  int r = unary_call(c, "PullImage", &req.base, &runtime__v1__pull_image_response__descriptor, &reply, err);
  if (auth)
    explicit_bzero(&auth_config, sizeof(auth_config));
  if (r < 0)
    return r;
  Runtime__V1__PullImageResponse *resp = (Runtime__V1__PullImageResponse *) reply;
  if (str_empty(resp->image_ref)) {
    free_reply(reply);
    return crimage_error_set(err, CRIMAGE_INTERNAL, 0, "PullImage: the server returned an empty image reference");
  }
  if (ret_ref)
    *ret_ref = xstrdup(resp->image_ref);
  free_reply(reply);
  return 0;
}

/* Turns the info map into one JSON object; values that are JSON documents are embedded as such (as crictl shows
 * them), anything else as a string. */
static char *info_to_json(Runtime__V1__ImageStatusResponse__InfoEntry **entries, size_t n)
{
  cleanup_json json_object *obj = json_object_new_object();
  for (size_t i = 0; i < n; i++) {
    const char *key = entries[i]->key ? entries[i]->key : "";
    const char *value = entries[i]->value ? entries[i]->value : "";
    json_object *v = NULL;
    crimage_error *perr = NULL;
    if (json_parse(value, strlen(value), key, IMAGE_CONFIG_JSON_LIMITS, &v, &perr) < 0) {
      crimage_error_free(perr);
      v = json_object_new_string(value);
    }
    json_object_object_add(obj, key, v);
  }
  return xstrdup(json_object_to_json_string_ext(obj, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE));
}

int crimage_client_image_status(crimage_client *c, const char *image, const char *runtime_handler, bool verbose,
                                crimage_image **ret, char **ret_info_json, crimage_error **err)
{
  if (str_empty(image))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, EINVAL, "no image given");
  Runtime__V1__ImageSpec spec;
  image_spec_init(&spec, image, runtime_handler);
  Runtime__V1__ImageStatusRequest req;
  runtime__v1__image_status_request__init(&req);
  req.image = &spec;
  req.verbose = verbose;

  ProtobufCMessage *reply = NULL;
  int r = unary_call(c, "ImageStatus", &req.base, &runtime__v1__image_status_response__descriptor, &reply, err);
  if (r < 0)
    return r;
  Runtime__V1__ImageStatusResponse *resp = (Runtime__V1__ImageStatusResponse *) reply;
  if (ret)
    *ret = resp->image ? image_from_proto(resp->image) : NULL;
  if (ret_info_json)
    *ret_info_json = info_to_json(resp->info, resp->n_info);
  free_reply(reply);
  return 0;
}

int crimage_client_list_images(crimage_client *c, const char *filter_image, const char *runtime_handler,
                               crimage_image ***ret, size_t *ret_n, crimage_error **err)
{
  /* crictl always sends a filter, possibly empty; do the same so servers see one shape of request. */
  Runtime__V1__ImageSpec spec;
  image_spec_init(&spec, filter_image, runtime_handler);
  Runtime__V1__ImageFilter filter;
  runtime__v1__image_filter__init(&filter);
  filter.image = &spec;
  Runtime__V1__ListImagesRequest req;
  runtime__v1__list_images_request__init(&req);
  req.filter = &filter;

  ProtobufCMessage *reply = NULL;
  int r = unary_call(c, "ListImages", &req.base, &runtime__v1__list_images_response__descriptor, &reply, err);
  if (r < 0)
    return r;
  Runtime__V1__ListImagesResponse *resp = (Runtime__V1__ListImagesResponse *) reply;
  crimage_image **images = xcalloc(resp->n_images + 1, sizeof(crimage_image *));
  size_t n = 0;
  for (size_t i = 0; i < resp->n_images; i++)
    if (resp->images[i])
      images[n++] = image_from_proto(resp->images[i]);
  free_reply(reply);
  *ret = images;
  *ret_n = n;
  return 0;
}

int crimage_client_remove_image(crimage_client *c, const char *image, const char *runtime_handler,
                                crimage_error **err)
{
  if (str_empty(image))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, EINVAL, "no image given");
  Runtime__V1__ImageSpec spec;
  image_spec_init(&spec, image, runtime_handler);
  Runtime__V1__RemoveImageRequest req;
  runtime__v1__remove_image_request__init(&req);
  req.image = &spec;

  ProtobufCMessage *reply = NULL;
  int r = unary_call(c, "RemoveImage", &req.base, &runtime__v1__remove_image_response__descriptor, &reply, err);
  free_reply(reply);
  return r < 0 ? r : 0;
}

int crimage_client_fs_info(crimage_client *c, crimage_fs_usage **ret, size_t *ret_n, crimage_error **err)
{
  Runtime__V1__ImageFsInfoRequest req;
  runtime__v1__image_fs_info_request__init(&req);

  ProtobufCMessage *reply = NULL;
  int r = unary_call(c, "ImageFsInfo", &req.base, &runtime__v1__image_fs_info_response__descriptor, &reply, err);
  if (r < 0)
    return r;
  Runtime__V1__ImageFsInfoResponse *resp = (Runtime__V1__ImageFsInfoResponse *) reply;
  crimage_fs_usage *usage = xcalloc(resp->n_image_filesystems + 1, sizeof(*usage));
  size_t n = 0;
  for (size_t i = 0; i < resp->n_image_filesystems; i++) {
    const Runtime__V1__FilesystemUsage *u = resp->image_filesystems[i];
    if (!u)
      continue;
    usage[n].timestamp_ns = u->timestamp;
    usage[n].mountpoint = xstrdup(u->fs_id && u->fs_id->mountpoint ? u->fs_id->mountpoint : "");
    usage[n].used_bytes = u->used_bytes ? u->used_bytes->value : 0;
    usage[n].inodes_used = u->inodes_used ? u->inodes_used->value : 0;
    n++;
  }
  free_reply(reply);
  *ret = usage;
  *ret_n = n;
  return 0;
}

/* ---- pull progress (crimage.v1.PullProgress) ---- */

#define PROGRESS_SERVICE "crimage.v1.PullProgress"

static void pull_status_from_proto(crimage_pull_status *out, const Crimage__V1__PullStatus *p)
{
  memset(out, 0, sizeof(*out));
  out->id = p->id;
  out->reference = xstrdup(p->reference ? p->reference : "");
  out->runtime_handler = xstrdup(p->runtime_handler ? p->runtime_handler : "");
  out->pod_uid = xstrdup(p->pod_uid ? p->pod_uid : "");
  switch (p->state) {
  case CRIMAGE__V1__PULL_STATE__QUEUED:
    out->state = CRIMAGE_PULL_QUEUED;
    break;
  case CRIMAGE__V1__PULL_STATE__RUNNING:
    out->state = CRIMAGE_PULL_RUNNING;
    break;
  case CRIMAGE__V1__PULL_STATE__SUCCEEDED:
    out->state = CRIMAGE_PULL_SUCCEEDED;
    break;
  default:
    out->state = CRIMAGE_PULL_FAILED;
    break;
  }
  out->created_unix_ms = p->created_unix_ms;
  out->started_unix_ms = p->started_unix_ms;
  out->ended_unix_ms = p->ended_unix_ms;
  out->bytes_done = p->bytes_done;
  out->bytes_total = p->bytes_total;
  out->waiters = p->waiters;
  out->error = xstrdup(p->error ? p->error : "");
  out->blobs = xcalloc(p->n_blobs + 1, sizeof(*out->blobs));
  for (size_t i = 0; i < p->n_blobs; i++) {
    const Crimage__V1__BlobProgress *b = p->blobs[i];
    if (!b)
      continue;
    crimage_pull_blob *o = &out->blobs[out->n_blobs++];
    o->digest = xstrdup(b->digest ? b->digest : "");
    o->done = b->done;
    o->total = b->total;
    o->finished = b->finished;
  }
}

void crimage_pull_status_clear(crimage_pull_status *s)
{
  if (!s)
    return;
  free(s->reference);
  free(s->runtime_handler);
  free(s->pod_uid);
  free(s->error);
  for (size_t i = 0; i < s->n_blobs; i++)
    free(s->blobs[i].digest);
  free(s->blobs);
  memset(s, 0, sizeof(*s));
}

void crimage_pull_status_list_free(crimage_pull_status *list, size_t n)
{
  if (!list)
    return;
  for (size_t i = 0; i < n; i++)
    crimage_pull_status_clear(&list[i]);
  free(list);
}

int crimage_client_list_pulls(crimage_client *c, bool include_ended, crimage_pull_status **ret, size_t *ret_n,
                              crimage_error **err)
{
  Crimage__V1__ListPullsRequest req;
  crimage__v1__list_pulls_request__init(&req);
  req.include_ended = include_ended;
  ProtobufCMessage *reply = NULL;
  int r = unary_call_service(c, PROGRESS_SERVICE, "ListPulls", &req.base, &crimage__v1__list_pulls_response__descriptor,
                             &reply, err);
  if (r < 0)
    return r;
  Crimage__V1__ListPullsResponse *resp = (Crimage__V1__ListPullsResponse *) reply;
  crimage_pull_status *list = xcalloc(resp->n_pulls + 1, sizeof(*list));
  size_t n = 0;
  for (size_t i = 0; i < resp->n_pulls; i++)
    if (resp->pulls[i])
      pull_status_from_proto(&list[n++], resp->pulls[i]);
  free_reply(reply);
  *ret = list;
  *ret_n = n;
  return 0;
}

typedef struct watch_ctx {
  crimage_pull_watch_fn fn;
  void *userdata;
} watch_ctx;

static int watch_message(void *ud, const ProtobufCMessage *msg)
{
  watch_ctx *w = ud;
  crimage_pull_status s;
  pull_status_from_proto(&s, (const Crimage__V1__PullStatus *) msg);
  int r = w->fn(w->userdata, &s);
  crimage_pull_status_clear(&s);
  return r;
}

int crimage_client_watch_pull(crimage_client *c, const char *image, const char *runtime_handler,
                              crimage_pull_watch_fn fn, void *userdata, crimage_error **err)
{
  if (str_empty(image))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, EINVAL, "no image given");
  Crimage__V1__WatchPullRequest req;
  crimage__v1__watch_pull_request__init(&req);
  req.image = req_str(image);
  req.runtime_handler = req_str(runtime_handler);
  watch_ctx w = {fn, userdata};
  return stream_call(c, PROGRESS_SERVICE, "WatchPull", &req.base, &crimage__v1__pull_status__descriptor,
                     watch_message, &w, err);
}
