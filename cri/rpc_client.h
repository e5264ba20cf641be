/* The client side of the generic gRPC layer: calls to a server on a unix socket over the gRPC C core, with
 * protobuf-c messages. Unary calls, server-streaming calls and bidirectional streams, each with optional request
 * metadata (containerd reads its namespace and lease from there) and a deadline. A non-OK status becomes a
 * crimage_error with the same status number and the server's (bounded, printable) details.
 *
 * A client holds one channel; it is safe to use from several threads at once (every call has its own queue). */
#ifndef CRIMAGE_CRI_RPC_CLIENT_H
#define CRIMAGE_CRI_RPC_CLIENT_H

#include <protobuf-c/protobuf-c.h>
#include <stdbool.h>
#include <stdint.h>

#include "common/error.h"

typedef struct rpc_client rpc_client;

/* One request metadata entry; keys are lowercase ASCII as HTTP/2 wants them. */
typedef struct rpc_metadata {
  const char *key;
  const char *value;
} rpc_metadata;

typedef struct rpc_client_options {
  size_t max_message;   /* largest message sent or received; 0 = 16 MiB */
  bool fast_reconnect;  /* reconnect within about a second after the server comes back (default: gRPC's back-off,
                           which grows to two minutes) */
} rpc_client_options;

/* address: a socket path, "unix:/path" or "unix:///path". Connecting is lazy: this fails only on a bad address. */
int rpc_client_new(const char *address, const rpc_client_options *opts, rpc_client **ret, crimage_error **err);
void rpc_client_free(rpc_client *c);
/* The socket path, for messages. */
const char *rpc_client_path(const rpc_client *c);

/* Calls path ("/package.Service/Method") with req and unpacks the reply as reply_desc (free it with
 * protobuf_c_message_free_unpacked). timeout_ms <= 0: no deadline. */
int rpc_client_unary(rpc_client *c, const char *path, const rpc_metadata *md, size_t n_md, int64_t timeout_ms,
                     const ProtobufCMessage *req, const ProtobufCMessageDescriptor *reply_desc,
                     ProtobufCMessage **ret_reply, crimage_error **err);

/* A server-streaming call: every message (unpacked as msg_desc) goes to fn until the stream ends, or fn returns
 * non-zero (the call is then cancelled, which is not an error). */
typedef int (*rpc_message_fn)(void *userdata, const ProtobufCMessage *msg);
int rpc_client_server_stream(rpc_client *c, const char *path, const rpc_metadata *md, size_t n_md,
                             int64_t timeout_ms, const ProtobufCMessage *req,
                             const ProtobufCMessageDescriptor *msg_desc, rpc_message_fn fn, void *userdata,
                             crimage_error **err);

/* A bidirectional stream: send and receive in any order the protocol asks for, then finish. Not for concurrent
 * use of one stream from several threads. */
typedef struct rpc_stream rpc_stream;
int rpc_stream_open(rpc_client *c, const char *path, const rpc_metadata *md, size_t n_md, int64_t timeout_ms,
                    rpc_stream **ret, crimage_error **err);
int rpc_stream_send(rpc_stream *s, const ProtobufCMessage *msg, crimage_error **err);
/* Receives one message. The end of the stream before a message is an error: the server's status when it sent one
 * (e.g. ALREADY_EXISTS), else UNAVAILABLE. */
int rpc_stream_recv(rpc_stream *s, const ProtobufCMessageDescriptor *desc, ProtobufCMessage **ret,
                    crimage_error **err);
/* Half-closes and waits for the server's status. */
int rpc_stream_finish(rpc_stream *s, crimage_error **err);
/* Cancels the call if it was not finished. */
void rpc_stream_free(rpc_stream *s);
static inline void rpc_stream_freep(rpc_stream **s) { rpc_stream_free(*s); }
#define cleanup_rpc_stream __attribute__((cleanup(rpc_stream_freep)))

/* Connection state, for a watcher that acts when the server comes back. */
typedef enum rpc_state {
  RPC_STATE_IDLE,
  RPC_STATE_CONNECTING,
  RPC_STATE_READY,
  RPC_STATE_FAILURE, /* transient failure: the server is not there (yet) */
  RPC_STATE_SHUTDOWN,
} rpc_state;
/* The current state; try_connect starts connecting an idle channel. */
rpc_state rpc_client_state(rpc_client *c, bool try_connect);
/* Waits up to timeout_ms for the state to differ from last; returns the state then (last on timeout). */
rpc_state rpc_client_wait_state(rpc_client *c, rpc_state last, int64_t timeout_ms);
/* Connects if needed and waits up to timeout_ms for the channel to be ready; true when it is. */
bool rpc_client_wait_ready(rpc_client *c, int64_t timeout_ms);

#endif
