#include <errno.h>
#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/time.h>
#include <sys/un.h>

#include "common/util.h"
#include "cri/rpc_client.h"

#define RPC_CLIENT_DEFAULT_MAX_MESSAGE (16 * 1024 * 1024)
/* Status details come from the server: keep what we show bounded. */
#define RPC_CLIENT_MAX_DETAILS 4096
#define RPC_CLIENT_MAX_METADATA 8
/* Messages a finished stream may still bring before its status; beyond that the call is cancelled. */
#define RPC_CLIENT_MAX_TRAILING_MESSAGES 16

struct rpc_client {
  grpc_channel *channel;
  char *path;
  size_t max_message;
};

static const char *strip_unix_scheme(const char *address)
{
  /* The forms crictl and containerd users type: "unix:///run/x.sock" and "unix:/run/x.sock". */
  if (str_has_prefix(address, "unix://"))
    return address + strlen("unix://");
  if (str_has_prefix(address, "unix:"))
    return address + strlen("unix:");
  return address;
}

int rpc_client_new(const char *address, const rpc_client_options *opts, rpc_client **ret, crimage_error **err)
{
  if (str_empty(address))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, EINVAL, "no socket path given");
  const char *path = strip_unix_scheme(address);
  if (str_empty(path))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, EINVAL, "invalid socket address '%s'", address);
  if (strlen(path) >= sizeof(((struct sockaddr_un *) NULL)->sun_path))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, ENAMETOOLONG, "socket path '%s'", path);

  size_t max = opts && opts->max_message ? opts->max_message : RPC_CLIENT_DEFAULT_MAX_MESSAGE;
  grpc_init();
  cleanup_free char *target = xasprintf("unix:%s", path);
  grpc_arg args[5] = {
      {.type = GRPC_ARG_INTEGER, .key = (char *) GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH, .value.integer = (int) max},
      {.type = GRPC_ARG_INTEGER, .key = (char *) GRPC_ARG_MAX_SEND_MESSAGE_LENGTH, .value.integer = (int) max},
  };
  size_t n_args = 2;
  if (opts && opts->fast_reconnect) {
    /* A local daemon that restarts is back within a second or two; gRPC's default back-off would wait minutes. */
    args[n_args++] = (grpc_arg){.type = GRPC_ARG_INTEGER, .key = (char *) GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS,
                                .value.integer = 100};
    args[n_args++] = (grpc_arg){.type = GRPC_ARG_INTEGER, .key = (char *) GRPC_ARG_MIN_RECONNECT_BACKOFF_MS,
                                .value.integer = 100};
    args[n_args++] = (grpc_arg){.type = GRPC_ARG_INTEGER, .key = (char *) GRPC_ARG_MAX_RECONNECT_BACKOFF_MS,
                                .value.integer = 1000};
  }
  grpc_channel_args channel_args = {.num_args = n_args, .args = args};
  grpc_channel_credentials *creds = grpc_insecure_credentials_create();
  grpc_channel *channel = grpc_channel_create(target, creds, &channel_args);
  grpc_channel_credentials_release(creds);
  if (!channel) {
    grpc_shutdown();
    return crimage_error_set(err, CRIMAGE_INTERNAL, 0, "cannot create a channel to %s", target);
  }
  rpc_client *c = xcalloc(1, sizeof(*c));
  c->channel = channel;
  c->path = xstrdup(path);
  c->max_message = max;
  *ret = c;
  return 0;
}

void rpc_client_free(rpc_client *c)
{
  if (!c)
    return;
  grpc_channel_destroy(c->channel);
  free(c->path);
  free(c);
  grpc_shutdown();
}

const char *rpc_client_path(const rpc_client *c) { return c->path; }

/* ---- calls ---- */

/* Wipes a packed request before freeing it: a request can carry registry credentials. */
static void wipe_free(void *p, size_t len)
{
  explicit_bzero(p, len);
  free(p);
}

static char *slice_to_printable(grpc_slice s)
{
  size_t len = GRPC_SLICE_LENGTH(s);
  if (len > RPC_CLIENT_MAX_DETAILS)
    len = RPC_CLIENT_MAX_DETAILS;
  char *out = xmalloc(len + 1);
  const unsigned char *p = GRPC_SLICE_START_PTR(s);
  for (size_t i = 0; i < len; i++)
    out[i] = (p[i] < 0x20 || p[i] == 0x7f) ? '?' : (char) p[i];
  out[len] = '\0';
  return out;
}

static gpr_timespec deadline_after(int64_t timeout_ms)
{
  if (timeout_ms <= 0)
    return gpr_inf_future(GPR_CLOCK_MONOTONIC);
  return gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), gpr_time_from_millis(timeout_ms, GPR_TIMESPAN));
}

static int pack_message(const rpc_client *c, const ProtobufCMessage *msg, const char *path, grpc_byte_buffer **ret,
                        crimage_error **err)
{
  size_t len = protobuf_c_message_get_packed_size(msg);
  if (len > c->max_message)
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, EMSGSIZE, "%s: message of %zu bytes", path, len);
  grpc_slice slice;
  if (len > 0) {
    uint8_t *buf = xmalloc(len);
    protobuf_c_message_pack(msg, buf);
    slice = grpc_slice_new_with_len(buf, len, wipe_free);
  } else {
    slice = grpc_empty_slice();
  }
  *ret = grpc_raw_byte_buffer_create(&slice, 1);
  grpc_slice_unref(slice);
  return 0;
}

/* NULL when the buffer cannot be read or the message is malformed. */
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

/* One call on its own queue with what gRPC fills in for it. Unary, server-streaming and bidirectional calls all
 * begin and end this way. */
struct rpc_stream {
  rpc_client *client;
  char *path;
  const char *method; /* the last part of path: what messages name */
  grpc_completion_queue *cq;
  grpc_call *call;
  grpc_metadata md[RPC_CLIENT_MAX_METADATA];
  size_t n_md;
  grpc_metadata_array initial_md, trailing_md;
  grpc_status_code status;
  grpc_slice details;
  bool got_initial_md;
  bool closed_send; /* SEND_CLOSE_FROM_CLIENT done */
  bool finished;    /* status received */
};

static int call_begin(rpc_client *c, const char *path, const rpc_metadata *md, size_t n_md, int64_t timeout_ms,
                      rpc_stream **ret, crimage_error **err)
{
  if (n_md > RPC_CLIENT_MAX_METADATA)
    return crimage_error_set(err, CRIMAGE_INTERNAL, 0, "%s: %zu metadata entries", path, n_md);
  rpc_stream *s = xcalloc(1, sizeof(*s));
  s->client = c;
  s->path = xstrdup(path);
  const char *slash = strrchr(s->path, '/');
  s->method = slash ? slash + 1 : s->path;
  s->cq = grpc_completion_queue_create_for_pluck(NULL);
  grpc_slice method = grpc_slice_from_copied_string(path);
  s->call = grpc_channel_create_call(c->channel, NULL, GRPC_PROPAGATE_DEFAULTS, s->cq, method, NULL,
                                     deadline_after(timeout_ms), NULL);
  grpc_slice_unref(method);
  for (size_t i = 0; i < n_md; i++) {
    s->md[i].key = grpc_slice_from_copied_string(md[i].key);
    s->md[i].value = grpc_slice_from_copied_string(md[i].value);
  }
  s->n_md = n_md;
  grpc_metadata_array_init(&s->initial_md);
  grpc_metadata_array_init(&s->trailing_md);
  s->status = GRPC_STATUS_UNKNOWN;
  s->details = grpc_empty_slice();
  *ret = s;
  return 0;
}

/* Runs a batch and waits for it; the call's deadline bounds the wait (gRPC then fails the batch). */
static bool run_batch(rpc_stream *s, const grpc_op *ops, size_t n)
{
  if (grpc_call_start_batch(s->call, ops, n, (void *) ops, NULL) != GRPC_CALL_OK)
    return false;
  grpc_event ev = grpc_completion_queue_pluck(s->cq, (void *) ops, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL);
  return ev.type == GRPC_OP_COMPLETE && ev.success;
}

static void op_send_initial_metadata(rpc_stream *s, grpc_op *op)
{
  memset(op, 0, sizeof(*op));
  op->op = GRPC_OP_SEND_INITIAL_METADATA;
  op->data.send_initial_metadata.count = s->n_md;
  op->data.send_initial_metadata.metadata = s->n_md ? s->md : NULL;
}

static void op_recv_initial_metadata(rpc_stream *s, grpc_op *op)
{
  memset(op, 0, sizeof(*op));
  op->op = GRPC_OP_RECV_INITIAL_METADATA;
  op->data.recv_initial_metadata.recv_initial_metadata = &s->initial_md;
  s->got_initial_md = true;
}

static void op_status(rpc_stream *s, grpc_op *op)
{
  memset(op, 0, sizeof(*op));
  op->op = GRPC_OP_RECV_STATUS_ON_CLIENT;
  op->data.recv_status_on_client.trailing_metadata = &s->trailing_md;
  op->data.recv_status_on_client.status = &s->status;
  op->data.recv_status_on_client.status_details = &s->details;
}

/* Receives the next message as raw bytes (the initial metadata with the first one); NULL at the end of the stream
 * or of the call. */
static grpc_byte_buffer *recv_raw(rpc_stream *s)
{
  grpc_byte_buffer *bb = NULL;
  grpc_op ops[2];
  size_t n = 0;
  if (!s->got_initial_md)
    op_recv_initial_metadata(s, &ops[n++]);
  memset(&ops[n], 0, sizeof(ops[n]));
  ops[n].op = GRPC_OP_RECV_MESSAGE;
  ops[n++].data.recv_message.recv_message = &bb;
  if (!run_batch(s, ops, n) && bb) {
    grpc_byte_buffer_destroy(bb);
    bb = NULL;
  }
  return bb;
}

/* The call's status as an error (0 when OK). */
static int status_result(rpc_stream *s, crimage_error **err)
{
  if (s->status == GRPC_STATUS_OK)
    return 0;
  cleanup_free char *msg = slice_to_printable(s->details);
  int code = (int) s->status;
  crimage_status st = (code > 0 && code <= (int) CRIMAGE_UNAUTHENTICATED) ? (crimage_status) code : CRIMAGE_UNKNOWN;
  return crimage_error_set(err, st, 0, "%s: %s", s->method, str_empty(msg) ? crimage_status_name(st) : msg);
}

/* Half-closes if needed, reads what the server still sends (the status is only delivered once every message was
 * read; containerd's Write answers the half-close with one more message) and collects the status. */
static int call_status(rpc_stream *s, crimage_error **err)
{
  if (!s->finished) {
    grpc_op op;
    if (!s->closed_send) {
      memset(&op, 0, sizeof(op));
      op.op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
      run_batch(s, &op, 1);
      s->closed_send = true;
    }
    int i = 0;
    for (; i < RPC_CLIENT_MAX_TRAILING_MESSAGES; i++) {
      grpc_byte_buffer *bb = recv_raw(s);
      if (!bb)
        break;
      grpc_byte_buffer_destroy(bb);
    }
    if (i == RPC_CLIENT_MAX_TRAILING_MESSAGES)
      grpc_call_cancel(s->call, NULL);
    op_status(s, &op);
    if (!run_batch(s, &op, 1))
      return crimage_error_set(err, CRIMAGE_UNAVAILABLE, 0, "%s: the call failed", s->method);
    s->finished = true;
  }
  return status_result(s, err);
}

void rpc_stream_free(rpc_stream *s)
{
  if (!s)
    return;
  if (!s->finished) {
    grpc_call_cancel(s->call, NULL);
    grpc_op op;
    op_status(s, &op);
    run_batch(s, &op, 1);
  }
  grpc_slice_unref(s->details);
  grpc_call_unref(s->call);
  grpc_completion_queue_shutdown(s->cq);
  while (grpc_completion_queue_pluck(s->cq, NULL, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL).type !=
         GRPC_QUEUE_SHUTDOWN)
    ;
  grpc_completion_queue_destroy(s->cq);
  for (size_t i = 0; i < s->n_md; i++) {
    grpc_slice_unref(s->md[i].key);
    grpc_slice_unref(s->md[i].value);
  }
  grpc_metadata_array_destroy(&s->initial_md);
  grpc_metadata_array_destroy(&s->trailing_md);
  free(s->path);
  free(s);
}

int rpc_client_unary(rpc_client *c, const char *path, const rpc_metadata *md, size_t n_md, int64_t timeout_ms,
                     const ProtobufCMessage *req, const ProtobufCMessageDescriptor *reply_desc,
                     ProtobufCMessage **ret_reply, crimage_error **err)
{
  grpc_byte_buffer *send_buf = NULL;
  int r = pack_message(c, req, path, &send_buf, err);
  if (r < 0)
    return r;
  cleanup_rpc_stream rpc_stream *s = NULL;
  r = call_begin(c, path, md, n_md, timeout_ms, &s, err);
  if (r < 0) {
    grpc_byte_buffer_destroy(send_buf);
    return r;
  }
  grpc_byte_buffer *recv_buf = NULL;
  grpc_op ops[6];
  op_send_initial_metadata(s, &ops[0]);
  memset(&ops[1], 0, 3 * sizeof(ops[0]));
  ops[1].op = GRPC_OP_SEND_MESSAGE;
  ops[1].data.send_message.send_message = send_buf;
  ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
  ops[3].op = GRPC_OP_RECV_MESSAGE;
  ops[3].data.recv_message.recv_message = &recv_buf;
  op_recv_initial_metadata(s, &ops[4]);
  op_status(s, &ops[5]);
  s->closed_send = true;
  bool ok = run_batch(s, ops, ARRAY_SIZE(ops));
  grpc_byte_buffer_destroy(send_buf);
  if (ok)
    s->finished = true;
  if (!ok)
    r = crimage_error_set(err, CRIMAGE_UNAVAILABLE, 0, "%s: the call failed", s->method);
  else
    r = status_result(s, err);
  if (r == 0 && !recv_buf)
    r = crimage_error_set(err, CRIMAGE_INTERNAL, 0, "%s: the server sent no reply", s->method);
  if (r == 0) {
    ProtobufCMessage *reply = unpack_message(recv_buf, reply_desc);
    if (!reply)
      r = crimage_error_set(err, CRIMAGE_INTERNAL, 0, "%s: malformed reply", s->method);
    else
      *ret_reply = reply;
  }
  if (recv_buf)
    grpc_byte_buffer_destroy(recv_buf);
  return r;
}

int rpc_stream_open(rpc_client *c, const char *path, const rpc_metadata *md, size_t n_md, int64_t timeout_ms,
                    rpc_stream **ret, crimage_error **err)
{
  cleanup_rpc_stream rpc_stream *s = NULL;
  int r = call_begin(c, path, md, n_md, timeout_ms, &s, err);
  if (r < 0)
    return r;
  grpc_op op;
  op_send_initial_metadata(s, &op);
  if (!run_batch(s, &op, 1)) {
    r = call_status(s, err);
    return r < 0 ? r : crimage_error_set(err, CRIMAGE_UNAVAILABLE, 0, "%s: cannot start", s->method);
  }
  *ret = TAKE_PTR(s);
  return 0;
}

int rpc_stream_send(rpc_stream *s, const ProtobufCMessage *msg, crimage_error **err)
{
  grpc_byte_buffer *bb = NULL;
  int r = pack_message(s->client, msg, s->method, &bb, err);
  if (r < 0)
    return r;
  grpc_op op;
  memset(&op, 0, sizeof(op));
  op.op = GRPC_OP_SEND_MESSAGE;
  op.data.send_message.send_message = bb;
  bool ok = run_batch(s, &op, 1);
  grpc_byte_buffer_destroy(bb);
  if (ok)
    return 0;
  /* The call ended under us: its status says why. */
  r = call_status(s, err);
  return r < 0 ? r : crimage_error_set(err, CRIMAGE_UNAVAILABLE, 0, "%s: the stream ended", s->method);
}

int rpc_stream_recv(rpc_stream *s, const ProtobufCMessageDescriptor *desc, ProtobufCMessage **ret,
                    crimage_error **err)
{
  grpc_byte_buffer *bb = recv_raw(s);
  if (!bb) {
    int r = call_status(s, err);
    return r < 0 ? r : crimage_error_set(err, CRIMAGE_UNAVAILABLE, 0, "%s: the stream ended", s->method);
  }
  ProtobufCMessage *msg = unpack_message(bb, desc);
  grpc_byte_buffer_destroy(bb);
  if (!msg)
    return crimage_error_set(err, CRIMAGE_INTERNAL, 0, "%s: malformed message", s->method);
  *ret = msg;
  return 0;
}

int rpc_stream_finish(rpc_stream *s, crimage_error **err) { return call_status(s, err); }

int rpc_client_server_stream(rpc_client *c, const char *path, const rpc_metadata *md, size_t n_md,
                             int64_t timeout_ms, const ProtobufCMessage *req,
                             const ProtobufCMessageDescriptor *msg_desc, rpc_message_fn fn, void *userdata,
                             crimage_error **err)
{
  grpc_byte_buffer *send_buf = NULL;
  int r = pack_message(c, req, path, &send_buf, err);
  if (r < 0)
    return r;
  cleanup_rpc_stream rpc_stream *s = NULL;
  r = call_begin(c, path, md, n_md, timeout_ms, &s, err);
  if (r < 0) {
    grpc_byte_buffer_destroy(send_buf);
    return r;
  }
  grpc_op ops[3];
  op_send_initial_metadata(s, &ops[0]);
  memset(&ops[1], 0, 2 * sizeof(ops[0]));
  ops[1].op = GRPC_OP_SEND_MESSAGE;
  ops[1].data.send_message.send_message = send_buf;
  ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
  s->closed_send = true;
  bool sent = run_batch(s, ops, ARRAY_SIZE(ops));
  grpc_byte_buffer_destroy(send_buf);
  bool stopped = false;
  while (sent && !stopped) {
    grpc_byte_buffer *bb = recv_raw(s);
    if (!bb)
      break; /* the end of the stream (or of the call): the status tells which */
    ProtobufCMessage *msg = unpack_message(bb, msg_desc);
    grpc_byte_buffer_destroy(bb);
    if (!msg) {
      r = crimage_error_set(err, CRIMAGE_INTERNAL, 0, "%s: malformed message", s->method);
      stopped = true;
    } else {
      stopped = fn(userdata, msg) != 0;
      protobuf_c_message_free_unpacked(msg, NULL);
    }
  }
  if (stopped)
    return r; /* the cleanup cancels the call */
  return call_status(s, err);
}

/* ---- connection state ---- */

static rpc_state state_from_grpc(grpc_connectivity_state st)
{
  switch (st) {
  case GRPC_CHANNEL_IDLE:
    return RPC_STATE_IDLE;
  case GRPC_CHANNEL_CONNECTING:
    return RPC_STATE_CONNECTING;
  case GRPC_CHANNEL_READY:
    return RPC_STATE_READY;
  case GRPC_CHANNEL_TRANSIENT_FAILURE:
    return RPC_STATE_FAILURE;
  default:
    return RPC_STATE_SHUTDOWN;
  }
}

static grpc_connectivity_state state_to_grpc(rpc_state st)
{
  switch (st) {
  case RPC_STATE_IDLE:
    return GRPC_CHANNEL_IDLE;
  case RPC_STATE_CONNECTING:
    return GRPC_CHANNEL_CONNECTING;
  case RPC_STATE_READY:
    return GRPC_CHANNEL_READY;
  case RPC_STATE_FAILURE:
    return GRPC_CHANNEL_TRANSIENT_FAILURE;
  default:
    return GRPC_CHANNEL_SHUTDOWN;
  }
}

rpc_state rpc_client_state(rpc_client *c, bool try_connect)
{
  return state_from_grpc(grpc_channel_check_connectivity_state(c->channel, try_connect ? 1 : 0));
}

bool rpc_client_wait_ready(rpc_client *c, int64_t timeout_ms)
{
  int64_t deadline = now_monotonic_ms() + timeout_ms;
  rpc_state st = rpc_client_state(c, true);
  while (st != RPC_STATE_READY && st != RPC_STATE_SHUTDOWN) {
    int64_t left = deadline - now_monotonic_ms();
    if (left <= 0)
      return false;
    st = rpc_client_wait_state(c, st, left);
    if (st == RPC_STATE_IDLE)
      st = rpc_client_state(c, true);
  }
  return st == RPC_STATE_READY;
}

rpc_state rpc_client_wait_state(rpc_client *c, rpc_state last, int64_t timeout_ms)
{
  static char tag;
  grpc_completion_queue *cq = grpc_completion_queue_create_for_pluck(NULL);
  grpc_channel_watch_connectivity_state(c->channel, state_to_grpc(last), deadline_after(timeout_ms), cq, &tag);
  grpc_event ev = grpc_completion_queue_pluck(cq, &tag, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL);
  grpc_completion_queue_shutdown(cq);
  while (grpc_completion_queue_pluck(cq, NULL, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL).type != GRPC_QUEUE_SHUTDOWN)
    ;
  grpc_completion_queue_destroy(cq);
  if (ev.type != GRPC_OP_COMPLETE || !ev.success)
    return last;
  return rpc_client_state(c, false);
}
