#include <errno.h>
#include <fcntl.h>
#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_posix.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/time.h>
#include <poll.h>
#include <pthread.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

#include "common/dynbuf.h"
#include "common/log.h"
#include "common/util.h"
#include "cri/server.h"
#include "cri/wire.h"

typedef struct rpc_service {
  const ProtobufCServiceDescriptor *desc;
  const rpc_method *methods;
  size_t n_methods;
  void *userdata;
  /* Per method: its handle in the core (grpc_server_register_method) and its path "/<service>/<method>". */
  void **registered;
  char **paths;
} rpc_service;

/* A call the core has not handed us yet, or just has. A call of a registered method (registered, svc and method
 * set) comes with its request message already read (payload); any other one is for a method we do not serve. */
typedef struct pending_call {
  grpc_call *call;
  grpc_call_details details;
  grpc_metadata_array metadata;
  grpc_completion_queue *cq; /* the call's own queue (pluck) */
  size_t svc, method;        /* the registered method, when registered */
  bool registered;
  gpr_timespec deadline;
  grpc_byte_buffer *payload;
} pending_call;

struct rpc_server {
  grpc_server *server;
  grpc_completion_queue *cq; /* notifications of new calls */
  rpc_service *services;
  size_t n_services;
  /* Host paths (hidden_paths[i]) that error messages show to clients as hidden_names[i]; set before start. */
  char **hidden_paths, **hidden_names;
  size_t n_hidden;

  int listen_fd;
  int wake_fd; /* eventfd that stops the accept loop */
  pthread_t accept_thread, dispatch_thread;
  bool started;
  bool shutting_down; /* under lock */

  pthread_mutex_t lock;
  pthread_cond_t idle; /* signalled when active drops to 0, and when workers drops to 0 */
  unsigned active;     /* calls queued or being served */

  /* Calls are served by a pool of worker threads that grows on demand (a long pull holds its worker) and shrinks
   * when workers stay idle: no thread is created per call in steady state. */
  pthread_cond_t work;
  rpc_call *queue_head, *queue_tail;
  unsigned queued;
  unsigned workers;      /* worker threads alive */
  unsigned idle_workers; /* of those, waiting for a call */
  bool stop_workers;
};

struct rpc_call {
  rpc_server *server;
  rpc_call *next; /* in the server's queue */
  grpc_call *call;
  grpc_completion_queue *cq;
  char *method_path;
  const rpc_service *service;
  const rpc_method *method;
  const ProtobufCMethodDescriptor *method_desc;
  bool registered;           /* the core read the request before handing the call over: */
  grpc_byte_buffer *payload; /*   it is here (NULL: the client sent none) */

  pthread_mutex_t lock; /* serialises plucks on cq from several threads */
  int close_cancelled;  /* written by the core when RECV_CLOSE_ON_SERVER completes */
  bool closed;          /* the close event was seen */
  bool cancelled;
  bool sent_initial_metadata;
};

/* Requests for new calls kept outstanding per registered method (and for unknown methods). */
#define RPC_REQUESTS_PER_METHOD 2

/* Tags for events on the per-call queue. */
static char tag_close, tag_batch;
/* Tag for the server shutdown notification on the server queue. */
static char tag_shutdown;

int rpc_server_new(rpc_server **ret, crimage_error **err)
{
  rpc_server *s = xcalloc(1, sizeof(*s));
  s->listen_fd = -1;
  s->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (s->wake_fd < 0) {
    int e = errno;
    free(s);
    return crimage_error_set(err, CRIMAGE_INTERNAL, e, "eventfd");
  }
  pthread_mutex_init(&s->lock, NULL);
  pthread_cond_init(&s->idle, NULL);
  pthread_cond_init(&s->work, NULL);

  grpc_init();
  grpc_arg args[] = {
      {.type = GRPC_ARG_INTEGER, .key = (char *) GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH,
       .value.integer = RPC_MAX_MESSAGE_SIZE},
      {.type = GRPC_ARG_INTEGER, .key = (char *) GRPC_ARG_MAX_SEND_MESSAGE_LENGTH, .value.integer = -1},
      /* What one connection can make the core hold, calls waiting for their request included. */
      {.type = GRPC_ARG_INTEGER, .key = (char *) GRPC_ARG_MAX_CONCURRENT_STREAMS,
       .value.integer = RPC_MAX_STREAMS_PER_CONNECTION},
  };
  grpc_channel_args cargs = {.num_args = ARRAY_SIZE(args), .args = args};
  s->server = grpc_server_create(&cargs, NULL);
  s->cq = grpc_completion_queue_create_for_next(NULL);
  grpc_server_register_completion_queue(s->server, s->cq, NULL);
  *ret = s;
  return 0;
}

int rpc_server_add_service(rpc_server *s, const ProtobufCServiceDescriptor *service, const rpc_method *methods,
                           size_t n_methods, void *userdata, crimage_error **err)
{
  for (size_t i = 0; i < n_methods; i++) {
    if (!protobuf_c_service_descriptor_get_method_by_name(service, methods[i].name))
      return crimage_error_set(err, CRIMAGE_INTERNAL, 0, "service %s has no method %s", service->name,
                               methods[i].name);
  }
  /* Registered with the core, a method's calls reach us only once their request message has arrived: a client
   * that opens calls and never sends one holds no worker (the core keeps the stream, at most
   * RPC_MAX_STREAMS_PER_CONNECTION of them per connection). */
  rpc_service svc = {service, methods, n_methods, userdata, xcalloc(n_methods, sizeof(void *)),
                     xcalloc(n_methods, sizeof(char *))};
  for (size_t i = 0; i < n_methods; i++) {
    svc.paths[i] = xasprintf("/%s/%s", service->name, methods[i].name);
    svc.registered[i] =
        grpc_server_register_method(s->server, svc.paths[i], NULL, GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER, 0);
    if (!svc.registered[i]) {
      int r = crimage_error_set(err, CRIMAGE_INTERNAL, 0, "cannot register method %s", svc.paths[i]);
      for (size_t j = 0; j <= i; j++)
        free(svc.paths[j]);
      free(svc.paths);
      free(svc.registered);
      return r;
    }
  }
  s->services = xrealloc(s->services, (s->n_services + 1) * sizeof(*s->services));
  s->services[s->n_services++] = svc;
  return 0;
}

void rpc_server_hide_path(rpc_server *s, const char *path, const char *name)
{
  /* "/" (or "") would turn every message into nonsense: there is nothing to hide in it anyway. */
  if (!path || strlen(path) < 2)
    return;
  s->hidden_paths = xrealloc(s->hidden_paths, (s->n_hidden + 1) * sizeof(char *));
  s->hidden_names = xrealloc(s->hidden_names, (s->n_hidden + 1) * sizeof(char *));
  s->hidden_paths[s->n_hidden] = xstrdup(path);
  s->hidden_names[s->n_hidden] = xstrdup(name);
  s->n_hidden++;
}

/* A path character: a hidden path matches only where the next character is none of these, so /var/lib/crimage
 * does not match the start of /var/lib/crimage2. */
static bool is_path_char(char ch)
{
  return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') || strchr("._-+~@", ch);
}

/* The message as a client sees it: every hidden host path replaced by its name (the longest match wins, so a
 * store nested in another is named as itself). */
char *rpc_server_redact(const rpc_server *s, const char *msg)
{
  cleanup_dynbuf dynbuf out;
  dynbuf_init(&out, RPC_MAX_STATUS_MESSAGE); /* a longer message is cut there */
  for (const char *p = msg; *p;) {
    size_t best = SIZE_MAX, best_len = 0;
    for (size_t i = 0; i < s->n_hidden; i++) {
      size_t l = strlen(s->hidden_paths[i]);
      if (l > best_len && strncmp(p, s->hidden_paths[i], l) == 0 && (!p[l] || !is_path_char(p[l]))) {
        best = i;
        best_len = l;
      }
    }
    if (best != SIZE_MAX) {
      (void) dynbuf_append_str(&out, s->hidden_names[best]);
      p += best_len;
    } else {
      (void) dynbuf_append(&out, p, 1);
      p++;
    }
  }
  return dynbuf_take(&out, NULL);
}

/* "/runtime.v1.ImageService/PullImage" -> service and method; either may stay NULL. */
static void lookup_method(rpc_server *s, const char *path, rpc_call *c)
{
  if (path[0] != '/')
    return;
  const char *slash = strrchr(path, '/');
  if (slash == path)
    return;
  size_t svc_len = (size_t) (slash - path - 1);
  const char *method_name = slash + 1;
  for (size_t i = 0; i < s->n_services; i++) {
    const rpc_service *svc = &s->services[i];
    if (strlen(svc->desc->name) != svc_len || strncmp(svc->desc->name, path + 1, svc_len) != 0)
      continue;
    for (size_t j = 0; j < svc->n_methods; j++) {
      if (streq(svc->methods[j].name, method_name)) {
        c->service = svc;
        c->method = &svc->methods[j];
        c->method_desc = protobuf_c_service_descriptor_get_method_by_name(svc->desc, method_name);
        return;
      }
    }
  }
}

/* Waits for a tag on the call's queue. A close event seen meanwhile is recorded. */
static bool call_wait(rpc_call *c, void *tag, gpr_timespec deadline)
{
  pthread_mutex_lock(&c->lock);
  grpc_event ev = grpc_completion_queue_pluck(c->cq, tag, deadline, NULL);
  bool got = ev.type == GRPC_OP_COMPLETE;
  if (got && tag == &tag_close) {
    c->closed = true;
    if (c->close_cancelled)
      c->cancelled = true;
  }
  pthread_mutex_unlock(&c->lock);
  return got && ev.success;
}

bool rpc_call_cancelled(rpc_call *c)
{
  pthread_mutex_lock(&c->lock);
  bool closed = c->closed, cancelled = c->cancelled;
  pthread_mutex_unlock(&c->lock);
  if (cancelled)
    return true;
  if (!closed)
    call_wait(c, &tag_close, gpr_inf_past(GPR_CLOCK_MONOTONIC));
  pthread_mutex_lock(&c->lock);
  /* Before the reply is sent, a close means the client is gone: it cancelled, or its deadline passed. */
  cancelled = c->cancelled || c->closed;
  pthread_mutex_unlock(&c->lock);
  return cancelled;
}

const char *rpc_call_method(const rpc_call *c) { return c->method_path; }

static grpc_byte_buffer *pack_message(const rpc_call *c, const ProtobufCMessage *msg)
{
  /* Replies are built by the handlers, in memory of their own: repairing them in place is safe. */
  const char *field = NULL;
  if (wire_repair_strings((ProtobufCMessage *) msg, &field) > 0)
    log_warn("%s: the reply's %s field was not valid UTF-8; sent with '?' for the bad bytes", c->method_path, field);
  size_t len = protobuf_c_message_get_packed_size(msg);
  grpc_slice slice = grpc_slice_malloc(len);
  protobuf_c_message_pack(msg, GRPC_SLICE_START_PTR(slice));
  grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&slice, 1);
  grpc_slice_unref(slice);
  return bb;
}

static bool run_batch(rpc_call *c, const grpc_op *ops, size_t n)
{
  grpc_call_error e = grpc_call_start_batch(c->call, ops, n, &tag_batch, NULL);
  if (e != GRPC_CALL_OK) {
    log_warn("%s: starting a batch failed (%d)", c->method_path, (int) e);
    return false;
  }
  return call_wait(c, &tag_batch, gpr_inf_future(GPR_CLOCK_MONOTONIC));
}

int rpc_call_send(rpc_call *c, const ProtobufCMessage *msg, crimage_error **err)
{
  grpc_op ops[2];
  size_t n = 0;
  memset(ops, 0, sizeof(ops));
  if (!c->sent_initial_metadata) {
    ops[n++].op = GRPC_OP_SEND_INITIAL_METADATA;
    c->sent_initial_metadata = true;
  }
  grpc_byte_buffer *bb = pack_message(c, msg);
  ops[n].op = GRPC_OP_SEND_MESSAGE;
  ops[n++].data.send_message.send_message = bb;
  bool ok = run_batch(c, ops, n);
  grpc_byte_buffer_destroy(bb);
  if (!ok)
    return crimage_error_set(err, CRIMAGE_CANCELLED, ECANCELED, "%s: the client went away", c->method_path);
  return 0;
}

static void send_status(rpc_call *c, grpc_status_code code, const char *details, const ProtobufCMessage *reply)
{
  grpc_op ops[3];
  size_t n = 0;
  grpc_byte_buffer *bb = NULL;
  grpc_slice details_slice = grpc_slice_from_copied_string(details ? details : "");
  memset(ops, 0, sizeof(ops));
  /* Initial metadata must go with the status, or the client waits until its deadline. */
  if (!c->sent_initial_metadata) {
    ops[n++].op = GRPC_OP_SEND_INITIAL_METADATA;
    c->sent_initial_metadata = true;
  }
  if (reply) {
    bb = pack_message(c, reply);
    ops[n].op = GRPC_OP_SEND_MESSAGE;
    ops[n++].data.send_message.send_message = bb;
  }
  ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
  ops[n].data.send_status_from_server.status = code;
  ops[n].data.send_status_from_server.status_details = &details_slice;
  ops[n++].data.send_status_from_server.trailing_metadata_count = 0;
  run_batch(c, ops, n);
  if (bb)
    grpc_byte_buffer_destroy(bb);
  grpc_slice_unref(details_slice);
}

/* Receives a message on a call that did not come with its request, waiting RPC_RECEIVE_TIMEOUT_MS at most: a
 * client that never sends must not hold the worker. False (and *ret NULL) when none came. */
static bool receive_message(rpc_call *c, grpc_byte_buffer **ret)
{
  grpc_op op;
  memset(&op, 0, sizeof(op));
  op.op = GRPC_OP_RECV_MESSAGE;
  op.data.recv_message.recv_message = ret;
  *ret = NULL;
  if (grpc_call_start_batch(c->call, &op, 1, &tag_batch, NULL) != GRPC_CALL_OK)
    return false;
  gpr_timespec deadline =
      gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), gpr_time_from_millis(RPC_RECEIVE_TIMEOUT_MS, GPR_TIMESPAN));
  pthread_mutex_lock(&c->lock);
  grpc_event ev = grpc_completion_queue_pluck(c->cq, &tag_batch, deadline, NULL);
  pthread_mutex_unlock(&c->lock);
  if (ev.type == GRPC_QUEUE_TIMEOUT) {
    log_info("%s: no request message within %d ms; cancelling the call", c->method_path, RPC_RECEIVE_TIMEOUT_MS);
    grpc_call_cancel_with_status(c->call, GRPC_STATUS_DEADLINE_EXCEEDED, "no request message in time", NULL);
    /* A cancelled call completes its pending batch: wait for it, its buffer is ours until then. */
    call_wait(c, &tag_batch, gpr_inf_future(GPR_CLOCK_MONOTONIC));
    if (*ret)
      grpc_byte_buffer_destroy(*ret);
    *ret = NULL;
    return false;
  }
  return ev.type == GRPC_OP_COMPLETE && ev.success && *ret;
}

/* The single request message: for a registered method the one the core read before handing the call over, else
 * one received here. NULL (with *ret_status set) when there is none or it does not parse. */
static ProtobufCMessage *receive_request(rpc_call *c, grpc_status_code *ret_status, char **ret_details)
{
  grpc_byte_buffer *bb = NULL;
  if (c->registered)
    bb = TAKE_PTR(c->payload);
  else
    receive_message(c, &bb);
  if (!bb) {
    *ret_status = GRPC_STATUS_INVALID_ARGUMENT;
    *ret_details = xasprintf("%s: no request message", c->method_path);
    return NULL;
  }
  grpc_byte_buffer_reader reader;
  ProtobufCMessage *msg = NULL;
  cleanup_error crimage_error *bad = NULL;
  if (grpc_byte_buffer_reader_init(&reader, bb)) {
    grpc_slice slice = grpc_byte_buffer_reader_readall(&reader);
    grpc_byte_buffer_reader_destroy(&reader);
    /* Strings with a NUL or that are not UTF-8 are refused before unpacking, which would hide the first and keep
     * the second. */
    int r = wire_validate(c->method_desc->input, GRPC_SLICE_START_PTR(slice), GRPC_SLICE_LENGTH(slice), &bad);
    if (r == 0)
      msg = protobuf_c_message_unpack(c->method_desc->input, NULL, GRPC_SLICE_LENGTH(slice),
                                      GRPC_SLICE_START_PTR(slice));
    /* The copy is ours and a PullImage request can carry a password: wipe it before it goes back to the heap. */
    explicit_bzero(GRPC_SLICE_START_PTR(slice), GRPC_SLICE_LENGTH(slice));
    grpc_slice_unref(slice);
  }
  grpc_byte_buffer_destroy(bb);
  if (bad) {
    *ret_status = (grpc_status_code) bad->status;
    *ret_details = xasprintf("%s: %s", c->method_path, bad->message);
    return NULL;
  }
  if (!msg) {
    *ret_status = GRPC_STATUS_INVALID_ARGUMENT;
    *ret_details = xasprintf("%s: the request is not a valid %s message", c->method_path, c->method_desc->input->name);
  }
  return msg;
}

static void serve_call(rpc_call *c)
{
  grpc_op op;
  memset(&op, 0, sizeof(op));
  op.op = GRPC_OP_RECV_CLOSE_ON_SERVER;
  op.data.recv_close_on_server.cancelled = &c->close_cancelled;
  if (grpc_call_start_batch(c->call, &op, 1, &tag_close, NULL) != GRPC_CALL_OK) {
    log_warn("%s: cannot watch for cancellation", c->method_path);
    return;
  }

  if (!c->method) {
    cleanup_free char *msg = xasprintf("unknown method %s", c->method_path);
    log_debug("%s", msg);
    send_status(c, GRPC_STATUS_UNIMPLEMENTED, msg, NULL);
  } else {
    grpc_status_code status = GRPC_STATUS_OK;
    cleanup_free char *details = NULL;
    ProtobufCMessage *request = receive_request(c, &status, &details);
    if (!request) {
      log_debug("%s", details);
      send_status(c, status, details, NULL);
    } else {
      crimage_error *err = NULL;
      ProtobufCMessage *reply = NULL;
      int r;
      if (c->method->stream)
        r = c->method->stream(c->service->userdata, c, request, &err);
      else
        r = c->method->unary(c->service->userdata, c, request, &reply, &err);
      protobuf_c_message_free_unpacked(request, NULL);
      if (r < 0) {
        crimage_status st = err ? err->status : CRIMAGE_INTERNAL;
        if (st == CRIMAGE_OK)
          st = CRIMAGE_INTERNAL;
        const char *msg = err ? err->message : "internal error";
        /* The log (read by the node's admin) has the whole message; the client gets it without host paths. */
        log_msg(st == CRIMAGE_INTERNAL || st == CRIMAGE_DATA_LOSS ? LOG_ERR : LOG_INFO, "%s: %s: %s",
                c->method_path, crimage_status_name(st), msg);
        cleanup_free char *shown = rpc_server_redact(c->server, msg);
        send_status(c, (grpc_status_code) st, shown, NULL);
        crimage_error_free(err);
        if (reply)
          protobuf_c_message_free_unpacked(reply, NULL);
      } else {
        send_status(c, GRPC_STATUS_OK, NULL, reply);
        if (reply)
          protobuf_c_message_free_unpacked(reply, NULL);
      }
    }
  }
  /* The close event always arrives once the status is out (or the call is cancelled). */
  if (!c->closed)
    call_wait(c, &tag_close, gpr_inf_future(GPR_CLOCK_MONOTONIC));
}

/* How long a worker with nothing to do waits before it exits. */
#define WORKER_IDLE_MS 30000

static void finish_call(rpc_call *c)
{
  rpc_server *s = c->server;

  serve_call(c);

  grpc_call_unref(c->call);
  grpc_completion_queue_shutdown(c->cq);
  while (grpc_completion_queue_pluck(c->cq, NULL, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL).type !=
         GRPC_QUEUE_SHUTDOWN)
    ;
  grpc_completion_queue_destroy(c->cq);
  pthread_mutex_destroy(&c->lock);
  if (c->payload) /* not taken: serve_call gave up before it read the request */
    grpc_byte_buffer_destroy(c->payload);
  free(c->method_path);
  free(c);

  pthread_mutex_lock(&s->lock);
  if (--s->active == 0)
    pthread_cond_broadcast(&s->idle);
  pthread_mutex_unlock(&s->lock);
}

/* Takes the oldest queued call; the lock is held. */
static rpc_call *queue_pop(rpc_server *s)
{
  rpc_call *c = s->queue_head;
  s->queue_head = c->next;
  if (!s->queue_head)
    s->queue_tail = NULL;
  s->queued--;
  return c;
}

/* Serves queued calls. A pool worker (wait) waits for more and leaves after WORKER_IDLE_MS without work; the
 * fallback when no thread can be started (!wait) returns as soon as the queue is empty. */
static void worker_loop(rpc_server *s, bool wait)
{
  pthread_mutex_lock(&s->lock);
  for (;;) {
    if (!s->queue_head) {
      if (!wait || s->stop_workers)
        break;
      struct timespec until;
      clock_gettime(CLOCK_REALTIME, &until);
      until.tv_sec += WORKER_IDLE_MS / 1000;
      s->idle_workers++;
      int r = pthread_cond_timedwait(&s->work, &s->lock, &until);
      s->idle_workers--;
      if (r == ETIMEDOUT && !s->queue_head)
        break;
      continue;
    }
    rpc_call *c = queue_pop(s);
    pthread_mutex_unlock(&s->lock);
    finish_call(c);
    pthread_mutex_lock(&s->lock);
  }
  if (--s->workers == 0)
    pthread_cond_broadcast(&s->idle);
  pthread_mutex_unlock(&s->lock);
}

static void *worker_thread(void *arg)
{
  worker_loop(arg, true);
  return NULL;
}

/* Asks the core for the next call of method (svc, method) when registered, else of any method we did not
 * register. */
static bool request_call(rpc_server *s, bool registered, size_t svc, size_t method)
{
  pending_call *p = xcalloc(1, sizeof(*p));
  grpc_call_details_init(&p->details);
  grpc_metadata_array_init(&p->metadata);
  p->cq = grpc_completion_queue_create_for_pluck(NULL);
  p->registered = registered;
  p->svc = svc;
  p->method = method;
  grpc_call_error e =
      registered ? grpc_server_request_registered_call(s->server, s->services[svc].registered[method], &p->call,
                                                       &p->deadline, &p->metadata, &p->payload, p->cq, s->cq, p)
                 : grpc_server_request_call(s->server, &p->call, &p->details, &p->metadata, p->cq, s->cq, p);
  if (e != GRPC_CALL_OK) {
    log_error("grpc_server_request_call failed (%d)", (int) e);
    grpc_call_details_destroy(&p->details);
    grpc_metadata_array_destroy(&p->metadata);
    grpc_completion_queue_shutdown(p->cq);
    grpc_completion_queue_destroy(p->cq);
    free(p);
    return false;
  }
  return true;
}

static void start_call(rpc_server *s, pending_call *p)
{
  rpc_call *c = xcalloc(1, sizeof(*c));
  c->server = s;
  c->call = p->call;
  c->cq = p->cq;
  pthread_mutex_init(&c->lock, NULL);
  if (p->registered) {
    const rpc_service *svc = &s->services[p->svc];
    c->registered = true;
    c->payload = TAKE_PTR(p->payload);
    c->method_path = xstrdup(svc->paths[p->method]);
    c->service = svc;
    c->method = &svc->methods[p->method];
    c->method_desc = protobuf_c_service_descriptor_get_method_by_name(svc->desc, c->method->name);
  } else {
    c->method_path = xstrndup((const char *) GRPC_SLICE_START_PTR(p->details.method),
                              GRPC_SLICE_LENGTH(p->details.method));
    lookup_method(s, c->method_path, c);
  }

  pthread_mutex_lock(&s->lock);
  s->active++;
  c->next = NULL;
  if (s->queue_tail)
    s->queue_tail->next = c;
  else
    s->queue_head = c;
  s->queue_tail = c;
  s->queued++;
  /* Bounded: beyond RPC_MAX_WORKERS, calls wait in the queue for a worker to come free. */
  bool need_worker = s->idle_workers < s->queued && s->workers < RPC_MAX_WORKERS;
  if (need_worker)
    s->workers++;
  else if (s->idle_workers > 0)
    pthread_cond_signal(&s->work);
  pthread_mutex_unlock(&s->lock);
  if (!need_worker)
    return;

  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
  pthread_t t;
  int r = pthread_create(&t, &attr, worker_thread, s);
  pthread_attr_destroy(&attr);
  if (r != 0) {
    /* Out of threads: serve the queue right here (as the worker counted above) rather than drop calls. */
    log_error("cannot start a worker thread: %s", strerror(r));
    worker_loop(s, false);
  }
}

static void *dispatch_thread(void *arg)
{
  rpc_server *s = arg;
  /* Keep a few requests outstanding so a burst of calls does not wait for this loop: per registered method, and
   * for the calls of unknown methods. */
  for (size_t i = 0; i < s->n_services; i++)
    for (size_t j = 0; j < s->services[i].n_methods; j++)
      for (int k = 0; k < RPC_REQUESTS_PER_METHOD; k++)
        request_call(s, true, i, j);
  for (int k = 0; k < RPC_REQUESTS_PER_METHOD; k++)
    request_call(s, false, 0, 0);
  for (;;) {
    grpc_event ev = grpc_completion_queue_next(s->cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL);
    if (ev.type == GRPC_QUEUE_SHUTDOWN)
      break;
    if (ev.type != GRPC_OP_COMPLETE || ev.tag == &tag_shutdown)
      continue;
    pending_call *p = ev.tag;
    bool registered = p->registered;
    size_t svc = p->svc, method = p->method;
    if (ev.success) {
      start_call(s, p);
    } else {
      /* The server is shutting down: the request will never be a call. */
      if (p->payload)
        grpc_byte_buffer_destroy(p->payload);
      grpc_completion_queue_shutdown(p->cq);
      grpc_completion_queue_destroy(p->cq);
    }
    grpc_call_details_destroy(&p->details);
    grpc_metadata_array_destroy(&p->metadata);
    free(p);
    pthread_mutex_lock(&s->lock);
    bool stopping = s->shutting_down;
    pthread_mutex_unlock(&s->lock);
    if (ev.success && !stopping)
      request_call(s, registered, svc, method);
  }
  return NULL;
}

static void *accept_thread(void *arg)
{
  rpc_server *s = arg;
  grpc_server_credentials *creds = grpc_insecure_server_credentials_create();
  for (;;) {
    struct pollfd fds[2] = {{.fd = s->listen_fd, .events = POLLIN}, {.fd = s->wake_fd, .events = POLLIN}};
    if (poll(fds, 2, -1) < 0) {
      if (errno == EINTR)
        continue;
      log_error("poll on the listening socket: %s", strerror(errno));
      break;
    }
    if (fds[1].revents)
      break;
    if (!(fds[0].revents & POLLIN))
      continue;
    int fd = accept4(s->listen_fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd < 0) {
      if (errno != EAGAIN && errno != EINTR && errno != ECONNABORTED)
        log_warn("accept: %s", strerror(errno));
      if (errno == EMFILE || errno == ENFILE)
        poll(NULL, 0, 100); /* let calls finish and free descriptors */
      continue;
    }
    /* The core owns the connection from here on. */
    grpc_server_add_channel_from_fd(s->server, fd, creds);
  }
  grpc_server_credentials_release(creds);
  return NULL;
}

int rpc_server_start(rpc_server *s, int listen_fd, crimage_error **err)
{
  s->listen_fd = listen_fd;
  int flags = fcntl(listen_fd, F_GETFL);
  if (flags < 0 || fcntl(listen_fd, F_SETFL, flags | O_NONBLOCK) < 0)
    return crimage_error_set(err, CRIMAGE_INTERNAL, errno, "set the listening socket non-blocking");
  grpc_server_start(s->server);
  int r = pthread_create(&s->dispatch_thread, NULL, dispatch_thread, s);
  if (r != 0)
    return crimage_error_set(err, CRIMAGE_INTERNAL, r, "start the dispatcher thread");
  r = pthread_create(&s->accept_thread, NULL, accept_thread, s);
  if (r != 0)
    return crimage_error_set(err, CRIMAGE_INTERNAL, r, "start the accept thread");
  s->started = true;
  return 0;
}

void rpc_server_shutdown(rpc_server *s, int grace_ms)
{
  if (!s->started)
    return;
  pthread_mutex_lock(&s->lock);
  s->shutting_down = true;
  pthread_mutex_unlock(&s->lock);

  /* Stop taking connections. */
  uint64_t one = 1;
  if (write(s->wake_fd, &one, sizeof(one)) < 0)
    log_warn("waking the accept thread: %s", strerror(errno));
  pthread_join(s->accept_thread, NULL);

  /* Let running calls finish within the grace period, then cancel them: long pulls watch for it and stop. */
  grpc_server_shutdown_and_notify(s->server, s->cq, &tag_shutdown);
  struct timespec until;
  clock_gettime(CLOCK_REALTIME, &until);
  until.tv_sec += grace_ms / 1000;
  until.tv_nsec += (long) (grace_ms % 1000) * 1000000;
  if (until.tv_nsec >= 1000000000) {
    until.tv_sec++;
    until.tv_nsec -= 1000000000;
  }
  pthread_mutex_lock(&s->lock);
  while (s->active > 0)
    if (pthread_cond_timedwait(&s->idle, &s->lock, &until) == ETIMEDOUT)
      break;
  bool busy = s->active > 0;
  pthread_mutex_unlock(&s->lock);
  if (busy)
    log_info("cancelling calls still running after the %d ms grace period", grace_ms);
  /* Also disconnects idle clients: the shutdown completes only once every connection is gone, and a client that
   * keeps its channel open would otherwise hold it up. */
  grpc_server_cancel_all_calls(s->server);
  pthread_mutex_lock(&s->lock);
  while (s->active > 0)
    pthread_cond_wait(&s->idle, &s->lock);
  pthread_mutex_unlock(&s->lock);

  grpc_completion_queue_shutdown(s->cq);
  pthread_join(s->dispatch_thread, NULL);

  /* No call is left: let the workers go, and wait until none touches the server any more. */
  pthread_mutex_lock(&s->lock);
  s->stop_workers = true;
  pthread_cond_broadcast(&s->work);
  while (s->workers > 0)
    pthread_cond_wait(&s->idle, &s->lock);
  pthread_mutex_unlock(&s->lock);
  s->started = false;
}

void rpc_server_free(rpc_server *s)
{
  if (!s)
    return;
  bool ran = s->started || s->shutting_down;
  rpc_server_shutdown(s, 0);
  /* A started server was shut down above and its queue drained by the dispatcher. */
  grpc_server_destroy(s->server);
  if (!ran) {
    grpc_completion_queue_shutdown(s->cq);
    while (grpc_completion_queue_next(s->cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL).type != GRPC_QUEUE_SHUTDOWN)
      ;
  }
  grpc_completion_queue_destroy(s->cq);
  if (s->listen_fd >= 0)
    close(s->listen_fd);
  close(s->wake_fd);
  pthread_mutex_destroy(&s->lock);
  pthread_cond_destroy(&s->idle);
  pthread_cond_destroy(&s->work);
  for (size_t i = 0; i < s->n_services; i++) {
    for (size_t j = 0; j < s->services[i].n_methods; j++)
      free(s->services[i].paths[j]);
    free(s->services[i].paths);
    free(s->services[i].registered);
  }
  free(s->services);
  for (size_t i = 0; i < s->n_hidden; i++) {
    free(s->hidden_paths[i]);
    free(s->hidden_names[i]);
  }
  free(s->hidden_paths);
  free(s->hidden_names);
  free(s);
  grpc_shutdown();
}

int rpc_listen_unix(const char *path, mode_t mode, int *ret_fd, crimage_error **err)
{
  struct sockaddr_un sa = {.sun_family = AF_UNIX};
  if (strlen(path) >= sizeof(sa.sun_path))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, ENAMETOOLONG, "socket path `%s`", path);
  strcpy(sa.sun_path, path);

  /* Never take a socket from a live server: probe it first. A refused connection means a stale file. */
  struct stat st;
  if (lstat(path, &st) == 0) {
    if (!S_ISSOCK(st.st_mode))
      return crimage_error_set(err, CRIMAGE_FAILED_PRECONDITION, EEXIST, "`%s` exists and is not a socket", path);
    cleanup_close int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (probe >= 0 && connect(probe, (struct sockaddr *) &sa, sizeof(sa)) == 0)
      return crimage_error_set(err, CRIMAGE_FAILED_PRECONDITION, EADDRINUSE,
                               "another server is listening on `%s`", path);
    if (unlink(path) < 0 && errno != ENOENT)
      return crimage_error_set(err, CRIMAGE_INTERNAL, errno, "remove stale socket `%s`", path);
  }

  cleanup_close int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0)
    return crimage_error_set(err, CRIMAGE_INTERNAL, errno, "socket");
  /* Bind with a tight umask so the socket is never briefly open to everyone, then set the wanted mode. */
  mode_t old = umask(0177);
  int r = bind(fd, (struct sockaddr *) &sa, sizeof(sa));
  int e = errno;
  umask(old);
  if (r < 0)
    return crimage_error_set(err, CRIMAGE_INTERNAL, e, "bind `%s`", path);
  if (chmod(path, mode) < 0)
    return crimage_error_set(err, CRIMAGE_INTERNAL, errno, "chmod `%s`", path);
  if (listen(fd, 128) < 0)
    return crimage_error_set(err, CRIMAGE_INTERNAL, errno, "listen on `%s`", path);
  *ret_fd = TAKE_FD(fd);
  return 0;
}
