/* The public client of libcrimage: unary CRI v1 ImageService calls over a unix socket on the gRPC C core.
 *
 * One generic helper packs a protobuf-c request, runs the whole call as a single batch on its own completion
 * queue and unpacks the reply; the per-method functions only build requests and copy replies into the plain
 * crimage_* structs, so callers never see protobuf-c or gRPC types. */
#include <errno.h>
#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/time.h>
#include <sys/un.h>

#include "common/error.h"
#include "common/json.h"
#include "common/util.h"
#include "cri/api.pb-c.h"
#include "cri/crimage.pb-c.h"
#include "crimage.h"

/* kubelet caps CRI messages at 16 MiB; accept as much. */
#define CLIENT_MAX_MESSAGE (16 * 1024 * 1024)
/* Status details come from the server: keep what we show bounded. */
#define CLIENT_MAX_DETAILS 4096

struct crimage_client {
  grpc_channel *channel;
  int64_t timeout_ms; /* 0: no deadline */
};

static const char *strip_unix_scheme(const char *path)
{
  /* Accept the forms crictl users type: "unix:///run/x.sock" and "unix:/run/x.sock". */
  if (str_has_prefix(path, "unix://"))
    return path + strlen("unix://");
  if (str_has_prefix(path, "unix:"))
    return path + strlen("unix:");
  return path;
}

int crimage_client_connect(const char *socket_path, crimage_client **ret, crimage_error **err)
{
  if (str_empty(socket_path))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, EINVAL, "no socket path given");
  const char *path = strip_unix_scheme(socket_path);
  if (str_empty(path))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, EINVAL, "invalid socket address '%s'", socket_path);
  if (strlen(path) >= sizeof(((struct sockaddr_un *) NULL)->sun_path))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, ENAMETOOLONG, "socket path too long");

  grpc_init();
  cleanup_free char *target = xasprintf("unix:%s", path);
  grpc_arg args[] = {
      {.type = GRPC_ARG_INTEGER, .key = (char *) GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH, .value.integer = CLIENT_MAX_MESSAGE},
      {.type = GRPC_ARG_INTEGER, .key = (char *) GRPC_ARG_MAX_SEND_MESSAGE_LENGTH, .value.integer = CLIENT_MAX_MESSAGE},
  };
  grpc_channel_args channel_args = {.num_args = ARRAY_SIZE(args), .args = args};
  grpc_channel_credentials *creds = grpc_insecure_credentials_create();
  grpc_channel *channel = grpc_channel_create(target, creds, &channel_args);
  grpc_channel_credentials_release(creds);
  if (!channel) {
    grpc_shutdown();
    return crimage_error_set(err, CRIMAGE_INTERNAL, 0, "cannot create a channel to %s", target);
  }
  crimage_client *c = xcalloc(1, sizeof(*c));
  c->channel = channel;
  *ret = c;
  return 0;
}

void crimage_client_close(crimage_client *c)
{
  if (!c)
    return;
  grpc_channel_destroy(c->channel);
  free(c);
  grpc_shutdown();
}

void crimage_client_set_timeout(crimage_client *c, int64_t timeout_ms)
{
  c->timeout_ms = timeout_ms > 0 ? timeout_ms : 0;
}

/* Wipes a packed request before freeing it: a PullImage request can carry a password. */
static void wipe_free(void *p, size_t len)
{
  explicit_bzero(p, len);
  free(p);
}

static char *slice_to_printable(grpc_slice s)
{
  size_t len = GRPC_SLICE_LENGTH(s);
  if (len > CLIENT_MAX_DETAILS)
    len = CLIENT_MAX_DETAILS;
  char *out = xmalloc(len + 1);
  const unsigned char *p = GRPC_SLICE_START_PTR(s);
  for (size_t i = 0; i < len; i++)
    out[i] = (p[i] < 0x20 || p[i] == 0x7f) ? '?' : (char) p[i];
  out[len] = '\0';
  return out;
}

static gpr_timespec call_deadline(const crimage_client *c)
{
  if (c->timeout_ms <= 0)
    return gpr_inf_future(GPR_CLOCK_MONOTONIC);
  return gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), gpr_time_from_millis(c->timeout_ms, GPR_TIMESPAN));
}

static void completion_queue_destroy(grpc_completion_queue *cq)
{
  grpc_completion_queue_shutdown(cq);
  for (;;) {
    grpc_event ev = grpc_completion_queue_next(cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
    if (ev.type == GRPC_QUEUE_SHUTDOWN)
      break;
  }
  grpc_completion_queue_destroy(cq);
}

/* Packs req into a byte buffer for sending. The packed copy is wiped when gRPC frees it: a request can carry
 * registry credentials. */
static int pack_request(const ProtobufCMessage *req, const char *method, grpc_byte_buffer **ret, crimage_error **err)
{
  size_t len = protobuf_c_message_get_packed_size(req);
  if (len > CLIENT_MAX_MESSAGE)
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, EMSGSIZE, "%s: request too large", method);
  grpc_slice req_slice;
  if (len > 0) {
    uint8_t *buf = xmalloc(len);
    protobuf_c_message_pack(req, buf);
    req_slice = grpc_slice_new_with_len(buf, len, wipe_free);
  } else {
    req_slice = grpc_empty_slice();
  }
  *ret = grpc_raw_byte_buffer_create(&req_slice, 1);
  grpc_slice_unref(req_slice);
  return 0;
}

/* One call of /service/method on its own completion queue, bounded by the client's deadline, with what gRPC fills
 * in for it: the unary and the streaming call both begin and end one this way. */
typedef struct rpc_call {
  grpc_completion_queue *cq;
  grpc_call *call;
  grpc_byte_buffer *send_buf;
  grpc_metadata_array initial_md, trailing_md;
  grpc_status_code status;
  grpc_slice details;
} rpc_call;

static int rpc_call_begin(rpc_call *rc, crimage_client *c, const char *service, const char *method,
                          const ProtobufCMessage *req, crimage_error **err)
{
  grpc_byte_buffer *send_buf = NULL;
  int r = pack_request(req, method, &send_buf, err);
  if (r < 0)
    return r;
  cleanup_free char *path = xasprintf("/%s/%s", service, method);
  grpc_slice method_slice = grpc_slice_from_copied_string(path);
  rc->cq = grpc_completion_queue_create_for_next(NULL);
  rc->call = grpc_channel_create_call(c->channel, NULL, GRPC_PROPAGATE_DEFAULTS, rc->cq, method_slice, NULL,
                                      call_deadline(c), NULL);
  grpc_slice_unref(method_slice);
  rc->send_buf = send_buf;
  grpc_metadata_array_init(&rc->initial_md);
  grpc_metadata_array_init(&rc->trailing_md);
  rc->status = GRPC_STATUS_UNKNOWN;
  rc->details = grpc_empty_slice();
  return 0;
}

static void rpc_call_end(rpc_call *rc)
{
  grpc_slice_unref(rc->details);
  grpc_call_unref(rc->call);
  completion_queue_destroy(rc->cq);
  grpc_byte_buffer_destroy(rc->send_buf);
  grpc_metadata_array_destroy(&rc->initial_md);
  grpc_metadata_array_destroy(&rc->trailing_md);
}

/* Fills ops[0..3], the ops every call starts with: send the request and close, receive the initial metadata. */
static void rpc_call_send_ops(rpc_call *rc, grpc_op ops[4])
{
  memset(ops, 0, 4 * sizeof(*ops));
  ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
  ops[1].op = GRPC_OP_SEND_MESSAGE;
  ops[1].data.send_message.send_message = rc->send_buf;
  ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
  ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
  ops[3].data.recv_initial_metadata.recv_initial_metadata = &rc->initial_md;
}

/* Fills op to receive the call's status into rc. */
static void rpc_call_status_op(rpc_call *rc, grpc_op *op)
{
  memset(op, 0, sizeof(*op));
  op->op = GRPC_OP_RECV_STATUS_ON_CLIENT;
  op->data.recv_status_on_client.trailing_metadata = &rc->trailing_md;
  op->data.recv_status_on_client.status = &rc->status;
  op->data.recv_status_on_client.status_details = &rc->details;
}

/* Turns a non-OK gRPC status into a crimage_error with the same status number. */
static int status_error(grpc_status_code status, grpc_slice details, const char *method, crimage_error **err)
{
  cleanup_free char *msg = slice_to_printable(details);
  int code = (int) status;
  crimage_status st = (code > 0 && code <= (int) CRIMAGE_UNAUTHENTICATED) ? (crimage_status) code : CRIMAGE_UNKNOWN;
  return crimage_error_set(err, st, 0, "%s: %s", method, str_empty(msg) ? crimage_status_name(st) : msg);
}

/* Unpacks a received message as desc; NULL when the buffer cannot be read or the message is malformed. */
static ProtobufCMessage *unpack_message(grpc_byte_buffer *buf, const ProtobufCMessageDescriptor *desc)
{
  grpc_byte_buffer_reader reader;
  if (!grpc_byte_buffer_reader_init(&reader, buf))
    return NULL;
  grpc_slice data = grpc_byte_buffer_reader_readall(&reader);
  grpc_byte_buffer_reader_destroy(&reader);
  ProtobufCMessage *msg = protobuf_c_message_unpack(desc, NULL, GRPC_SLICE_LENGTH(data), GRPC_SLICE_START_PTR(data));
  grpc_slice_unref(data);
  return msg;
}

/* Runs one unary call of a service: sends req, returns the unpacked reply (free it with
 * protobuf_c_message_free_unpacked). A non-OK gRPC status becomes a crimage_error with the same status number. */
static int unary_call_service(crimage_client *c, const char *service, const char *method, const ProtobufCMessage *req,
                              const ProtobufCMessageDescriptor *reply_desc, ProtobufCMessage **ret,
                              crimage_error **err)
{
  rpc_call rc;
  int r = rpc_call_begin(&rc, c, service, method, req, err);
  if (r < 0)
    return r;
  grpc_byte_buffer *recv_buf = NULL;
  grpc_op ops[6];
  rpc_call_send_ops(&rc, ops);
  memset(&ops[4], 0, sizeof(ops[4]));
  ops[4].op = GRPC_OP_RECV_MESSAGE;
  ops[4].data.recv_message.recv_message = &recv_buf;
  rpc_call_status_op(&rc, &ops[5]);

  grpc_call_error cerr = grpc_call_start_batch(rc.call, ops, ARRAY_SIZE(ops), rc.call, NULL);
  if (cerr != GRPC_CALL_OK) {
    r = crimage_error_set(err, CRIMAGE_INTERNAL, 0, "%s: cannot start call (error %d)", method, (int) cerr);
  } else {
    /* The call's own deadline bounds this wait: gRPC completes the batch with DEADLINE_EXCEEDED. */
    grpc_event ev = grpc_completion_queue_next(rc.cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
    if (ev.type != GRPC_OP_COMPLETE || !ev.success)
      r = crimage_error_set(err, CRIMAGE_UNKNOWN, 0, "%s: call failed", method);
  }
  if (r == 0 && rc.status != GRPC_STATUS_OK)
    r = status_error(rc.status, rc.details, method, err);
  rpc_call_end(&rc);

  if (r == 0 && !recv_buf)
    r = crimage_error_set(err, CRIMAGE_INTERNAL, 0, "%s: the server sent no reply", method);
  if (r == 0) {
    ProtobufCMessage *reply = unpack_message(recv_buf, reply_desc);
    if (!reply)
      r = crimage_error_set(err, CRIMAGE_INTERNAL, 0, "%s: malformed reply", method);
    else
      *ret = reply;
  }
  if (recv_buf)
    grpc_byte_buffer_destroy(recv_buf);
  return r;
}

static int unary_call(crimage_client *c, const char *method, const ProtobufCMessage *req,
                      const ProtobufCMessageDescriptor *reply_desc, ProtobufCMessage **ret, crimage_error **err)
{
  return unary_call_service(c, "runtime.v1.ImageService", method, req, reply_desc, ret, err);
}

/* Runs a batch and waits for it on the call's own queue. */
static bool run_batch(grpc_call *call, grpc_completion_queue *cq, const grpc_op *ops, size_t n)
{
  if (grpc_call_start_batch(call, ops, n, (void *) ops, NULL) != GRPC_CALL_OK)
    return false;
  grpc_event ev = grpc_completion_queue_next(cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
  return ev.type == GRPC_OP_COMPLETE && ev.success;
}

/* Runs one server-streaming call: sends req, hands every message (unpacked as msg_desc) to fn until the stream ends
 * or fn returns non-zero (then the call is cancelled and that is not an error). */
static int stream_call(crimage_client *c, const char *service, const char *method, const ProtobufCMessage *req,
                       const ProtobufCMessageDescriptor *msg_desc,
                       int (*fn)(void *ud, const ProtobufCMessage *msg), void *ud, crimage_error **err)
{
  rpc_call rc;
  int r = rpc_call_begin(&rc, c, service, method, req, err);
  if (r < 0)
    return r;
  bool stopped = false;

  grpc_op ops[4];
  rpc_call_send_ops(&rc, ops);
  bool sent = run_batch(rc.call, rc.cq, ops, 4);
  while (sent && !stopped) {
    grpc_byte_buffer *recv_buf = NULL;
    grpc_op op;
    memset(&op, 0, sizeof(op));
    op.op = GRPC_OP_RECV_MESSAGE;
    op.data.recv_message.recv_message = &recv_buf;
    if (!run_batch(rc.call, rc.cq, &op, 1) || !recv_buf)
      break; /* the end of the stream (or of the call): the status tells which */
    ProtobufCMessage *msg = unpack_message(recv_buf, msg_desc);
    grpc_byte_buffer_destroy(recv_buf);
    if (!msg) {
      r = crimage_error_set(err, CRIMAGE_INTERNAL, 0, "%s: malformed message", method);
      stopped = true;
    } else {
      stopped = fn(ud, msg) != 0;
      protobuf_c_message_free_unpacked(msg, NULL);
    }
    if (stopped)
      grpc_call_cancel(rc.call, NULL);
  }
  grpc_op st;
  rpc_call_status_op(&rc, &st);
  bool got_status = run_batch(rc.call, rc.cq, &st, 1);
  if (r == 0 && !stopped) {
    if (!got_status) {
      r = crimage_error_set(err, CRIMAGE_UNKNOWN, 0, "%s: call failed", method);
    } else if (rc.status != GRPC_STATUS_OK) {
      r = status_error(rc.status, rc.details, method, err);
    }
  }
  rpc_call_end(&rc);
  return r;
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
    if (json_parse(value, strlen(value), key, &v, &perr) < 0) {
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
