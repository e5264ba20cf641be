/* Client of containerd.services.content.v1.Content: Info, Update and the Write stream. */
#include <errno.h>
#include <inttypes.h>

#include "common/util.h"
#include "cri/containerd/containerd.h"
#include "cri/containerd/content.pb-c.h"

#define CONTENT_SERVICE "/containerd.services.content.v1.Content/"
/* Bytes per WRITE message: far below gRPC's default 4 MiB receive limit on containerd's side. */
#define WRITE_CHUNK (1024 * 1024)
/* A blob gets the call's usual time plus a second for every MiB: a local socket moves hundreds of MiB/s, so only a
 * stuck containerd ever meets this deadline. */
#define WRITE_MS_PER_MIB 1000

static int info_call(const ctrd_ctx *c, const char *digest, Containerd__Services__Content__V1__InfoResponse **ret,
                     crimage_error **err)
{
  rpc_metadata md[2];
  size_t n_md = ctrd_metadata(c, md);
  Containerd__Services__Content__V1__InfoRequest req = CONTAINERD__SERVICES__CONTENT__V1__INFO_REQUEST__INIT;
  req.digest = (char *) digest;
  ProtobufCMessage *reply = NULL;
  int r = rpc_client_unary(c->rpc, CONTENT_SERVICE "Info", md, n_md, c->timeout_ms, &req.base,
                           &containerd__services__content__v1__info_response__descriptor, &reply, err);
  if (r < 0)
    return r;
  *ret = (Containerd__Services__Content__V1__InfoResponse *) reply;
  return 0;
}

int ctrd_content_info(const ctrd_ctx *c, const char *digest, int64_t *ret_size, crimage_error **err)
{
  crimage_error *e = NULL;
  Containerd__Services__Content__V1__InfoResponse *reply = NULL;
  int r = info_call(c, digest, &reply, &e);
  if (r < 0)
    return ctrd_not_found(&e, err) ? 0 : r;
  if (ret_size)
    *ret_size = reply->info ? reply->info->size : 0;
  protobuf_c_message_free_unpacked(&reply->base, NULL);
  return 1;
}

int ctrd_content_update_labels(const ctrd_ctx *c, const char *digest, const ctrd_label *labels, size_t n,
                               crimage_error **err)
{
  rpc_metadata md[2];
  size_t n_md = ctrd_metadata(c, md);
  Containerd__Services__Content__V1__Info info = CONTAINERD__SERVICES__CONTENT__V1__INFO__INIT;
  info.digest = (char *) digest;
  Containerd__Services__Content__V1__Info__LabelsEntry entries[n ? n : 1];
  Containerd__Services__Content__V1__Info__LabelsEntry *entry_ptrs[n ? n : 1];
  Google__Protobuf__FieldMask mask = GOOGLE__PROTOBUF__FIELD_MASK__INIT;
  char *paths[n ? n : 1];
  for (size_t i = 0; i < n; i++) {
    /* A path names the label; a label in the mask but not in the message is removed. */
    paths[i] = xasprintf("labels.%s", labels[i].key);
    if (labels[i].value) {
      containerd__services__content__v1__info__labels_entry__init(&entries[info.n_labels]);
      entries[info.n_labels].key = (char *) labels[i].key;
      entries[info.n_labels].value = (char *) labels[i].value;
      entry_ptrs[info.n_labels] = &entries[info.n_labels];
      info.n_labels++;
    }
  }
  info.labels = entry_ptrs;
  mask.paths = paths;
  mask.n_paths = n;
  Containerd__Services__Content__V1__UpdateRequest req = CONTAINERD__SERVICES__CONTENT__V1__UPDATE_REQUEST__INIT;
  req.info = &info;
  req.update_mask = &mask;
  ProtobufCMessage *reply = NULL;
  int r = rpc_client_unary(c->rpc, CONTENT_SERVICE "Update", md, n_md, c->timeout_ms, &req.base,
                           &containerd__services__content__v1__update_response__descriptor, &reply, err);
  for (size_t i = 0; i < n; i++)
    free(paths[i]);
  if (reply)
    protobuf_c_message_free_unpacked(reply, NULL);
  return r;
}

/* One request of the Write stream and its response. */
static int write_step(rpc_stream *s, const Containerd__Services__Content__V1__WriteContentRequest *req,
                      int64_t *ret_offset, crimage_error **err)
{
  int r = rpc_stream_send(s, &req->base, err);
  if (r < 0)
    return r;
  ProtobufCMessage *msg = NULL;
  r = rpc_stream_recv(s, &containerd__services__content__v1__write_content_response__descriptor, &msg, err);
  if (r < 0)
    return r;
  *ret_offset = ((Containerd__Services__Content__V1__WriteContentResponse *) msg)->offset;
  protobuf_c_message_free_unpacked(msg, NULL);
  return 0;
}

static int write_stream(const ctrd_ctx *c, const char *ref, const char *digest, int64_t size, int fd,
                        const ctrd_label *labels, size_t n_labels, crimage_error **err)
{
  rpc_metadata md[2];
  size_t n_md = ctrd_metadata(c, md);
  int64_t timeout = c->timeout_ms > 0 ? c->timeout_ms + (size >> 20) * WRITE_MS_PER_MIB : 0;
  cleanup_rpc_stream rpc_stream *s = NULL;
  int r = rpc_stream_open(c->rpc, CONTENT_SERVICE "Write", md, n_md, timeout, &s, err);
  if (r < 0)
    return r;

  /* STAT names the ref and what it must become; containerd answers with what an earlier write left. */
  Containerd__Services__Content__V1__WriteContentRequest req =
      CONTAINERD__SERVICES__CONTENT__V1__WRITE_CONTENT_REQUEST__INIT;
  req.action = CONTAINERD__SERVICES__CONTENT__V1__WRITE_ACTION__STAT;
  req.ref = (char *) ref;
  req.total = size;
  req.expected = (char *) digest;
  int64_t offset = 0;
  r = write_step(s, &req, &offset, err);
  if (r < 0)
    return r;
  if (offset < 0 || offset > size)
    offset = 0; /* not ours to resume: a write at 0 starts over */

  cleanup_free uint8_t *buf = xmalloc(WRITE_CHUNK);
  req.ref = NULL; /* the stream is bound to its ref from the first message on */
  req.action = CONTAINERD__SERVICES__CONTENT__V1__WRITE_ACTION__WRITE;
  while (offset < size) {
    size_t want = (size_t) (size - offset < WRITE_CHUNK ? size - offset : WRITE_CHUNK);
    ssize_t got = pread(fd, buf, want, offset);
    if (got < 0)
      return crimage_error_set(err, CRIMAGE_INTERNAL, errno, "reading blob %s", digest);
    if (got == 0)
      return crimage_error_set(err, CRIMAGE_DATA_LOSS, 0, "blob %s ends at %" PRId64 " of %" PRId64 " bytes",
                               digest, offset, size);
    req.offset = offset;
    req.data.data = buf;
    req.data.len = (size_t) got;
    int64_t now = 0;
    r = write_step(s, &req, &now, err);
    if (r < 0)
      return r;
    if (now != offset + got)
      return crimage_error_set(err, CRIMAGE_INTERNAL, 0, "writing %s: containerd is at %" PRId64 ", expected %" PRId64,
                               digest, now, offset + (int64_t) got);
    offset = now;
  }

  Containerd__Services__Content__V1__WriteContentRequest__LabelsEntry entries[n_labels ? n_labels : 1];
  Containerd__Services__Content__V1__WriteContentRequest__LabelsEntry *entry_ptrs[n_labels ? n_labels : 1];
  for (size_t i = 0; i < n_labels; i++) {
    containerd__services__content__v1__write_content_request__labels_entry__init(&entries[i]);
    entries[i].key = (char *) labels[i].key;
    entries[i].value = (char *) labels[i].value;
    entry_ptrs[i] = &entries[i];
  }
  req.action = CONTAINERD__SERVICES__CONTENT__V1__WRITE_ACTION__COMMIT;
  req.offset = offset;
  req.data.data = NULL;
  req.data.len = 0;
  req.labels = entry_ptrs;
  req.n_labels = n_labels;
  r = write_step(s, &req, &offset, err);
  if (r < 0)
    return r;
  return rpc_stream_finish(s, err);
}

int ctrd_content_write(const ctrd_ctx *c, const char *ref, const char *digest, int64_t size, int fd,
                       const ctrd_label *labels, size_t n_labels, crimage_error **err)
{
  crimage_error *e = NULL;
  int r = write_stream(c, ref, digest, size, fd, labels, n_labels, &e);
  if (r < 0 && e && e->status == CRIMAGE_ALREADY_EXISTS) {
    /* Present already (another writer, or another namespace's copy that containerd now shares with this one). The
     * labels a commit would have set still have to be there. */
    crimage_error_clear(&e);
    return n_labels ? ctrd_content_update_labels(c, digest, labels, n_labels, err) : 0;
  }
  if (r < 0) {
    *err = e;
    return r;
  }
  return 0;
}
