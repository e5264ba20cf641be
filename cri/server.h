/* A generic gRPC server on the gRPC C core, driven by protobuf-c service descriptors.
 *
 * Every method is registered with the core, which reads a call's request message before it hands the call over:
 * a client that opens calls and never sends holds no thread of ours. One dispatcher thread takes the new calls;
 * each is then served by a worker of a pool, with its own completion queue, so a long PullImage never holds up an
 * ImageStatus. The listening unix socket is ours (bound here or passed in by systemd); accepted connections are
 * handed to the core. */
#ifndef CRIMAGE_CRI_SERVER_H
#define CRIMAGE_CRI_SERVER_H

#include <protobuf-c/protobuf-c.h>
#include <stdbool.h>

#include "common/error.h"

#define RPC_MAX_MESSAGE_SIZE (16 * 1024 * 1024) /* kubelet's cap on CRI messages */
#define RPC_MAX_STATUS_MESSAGE (64 * 1024)       /* the most of an error message a client is sent */
/* Threads serving calls at most. Pulls waiting in the pull queue (at most 1,024) each hold one, so the cap sits above
 * that: a full pull queue answers RESOURCE_EXHAUSTED and still leaves workers for ImageStatus. */
#define RPC_MAX_WORKERS 1280
/* Concurrent calls (HTTP/2 streams) per connection; beyond, a client waits for one of its calls to end. Above
 * RPC_MAX_WORKERS, so kubelet's one connection can use every worker. */
#define RPC_MAX_STREAMS_PER_CONNECTION 2048
/* A call that does not arrive with its request (only those of unknown methods, which need none) waits this long
 * for it at most. */
#define RPC_RECEIVE_TIMEOUT_MS 10000

typedef struct rpc_server rpc_server;
typedef struct rpc_call rpc_call;

/* A unary handler fills *ret_reply (a message of the method's output type; every field heap-allocated, it is freed
 * with protobuf_c_message_free_unpacked) or returns an error whose status goes to the client. */
typedef int (*rpc_unary_fn)(void *userdata, rpc_call *call, const ProtobufCMessage *request,
                            ProtobufCMessage **ret_reply, crimage_error **err);
/* A server-streaming handler sends its messages with rpc_call_send and returns 0 or an error. */
typedef int (*rpc_stream_fn)(void *userdata, rpc_call *call, const ProtobufCMessage *request, crimage_error **err);

typedef struct rpc_method {
  const char *name; /* as in the service descriptor, e.g. "PullImage" */
  rpc_unary_fn unary;
  rpc_stream_fn stream;
} rpc_method;

int rpc_server_new(rpc_server **ret, crimage_error **err);
/* Registers the methods of a service, before rpc_server_start; methods not listed answer UNIMPLEMENTED. */
int rpc_server_add_service(rpc_server *s, const ProtobufCServiceDescriptor *service, const rpc_method *methods,
                           size_t n_methods, void *userdata, crimage_error **err);
/* Error messages sent to clients show name instead of the host path (e.g. a store's root): a client of the socket
 * (and whoever reads the pod events kubelet makes of them) has no business with the node's file system layout. The
 * daemon's log keeps the whole message. Before rpc_server_start. */
void rpc_server_hide_path(rpc_server *s, const char *path, const char *name);
/* msg with the hidden paths replaced (caller frees). */
char *rpc_server_redact(const rpc_server *s, const char *msg);
/* Serves on a listening unix socket fd (taken over). */
int rpc_server_start(rpc_server *s, int listen_fd, crimage_error **err);
/* Stops accepting, lets running calls finish for grace_ms, then cancels the rest and waits for their threads. */
void rpc_server_shutdown(rpc_server *s, int grace_ms);
void rpc_server_free(rpc_server *s);

/* True once the client went away, the deadline passed or the server is shutting down. Thread-safe. */
bool rpc_call_cancelled(rpc_call *call);
/* Sends one message of a server-streaming method. */
int rpc_call_send(rpc_call *call, const ProtobufCMessage *msg, crimage_error **err);
/* The peer's description, for logs. */
const char *rpc_call_method(const rpc_call *call);

/* Binds a unix stream socket at path with the given mode, after checking no live server answers there (a stale
 * socket file is replaced). Returns the listening fd. */
int rpc_listen_unix(const char *path, mode_t mode, int *ret_fd, crimage_error **err);

#endif
