/* Client of containerd.services.leases.v1.Leases: Create and Delete. */
#include <time.h>

#include "common/util.h"
#include "cri/containerd/containerd.h"
#include "cri/containerd/leases.pb-c.h"

#define LEASES_SERVICE "/containerd.services.leases.v1.Leases/"

int ctrd_lease_create(const ctrd_ctx *c, const char *id, int64_t expire_s, crimage_error **err)
{
  rpc_metadata md[2];
  ctrd_ctx plain = *c;
  plain.lease = NULL; /* a lease is not created inside another */
  size_t n_md = ctrd_metadata(&plain, md);
  /* containerd's GC drops the lease at this time (RFC 3339), so a publisher that dies leaves nothing pinned. */
  time_t at = time(NULL) + (time_t) expire_s;
  struct tm tm;
  gmtime_r(&at, &tm);
  char expire[64];
  strftime(expire, sizeof(expire), "%Y-%m-%dT%H:%M:%SZ", &tm);
  Containerd__Services__Leases__V1__CreateRequest__LabelsEntry label =
      CONTAINERD__SERVICES__LEASES__V1__CREATE_REQUEST__LABELS_ENTRY__INIT;
  label.key = (char *) CTRD_LABEL_GC_EXPIRE;
  label.value = expire;
  Containerd__Services__Leases__V1__CreateRequest__LabelsEntry *labels[] = {&label};
  Containerd__Services__Leases__V1__CreateRequest req = CONTAINERD__SERVICES__LEASES__V1__CREATE_REQUEST__INIT;
  req.id = (char *) id;
  req.labels = labels;
  req.n_labels = 1;
  ProtobufCMessage *reply = NULL;
  int r = rpc_client_unary(c->rpc, LEASES_SERVICE "Create", md, n_md, c->timeout_ms, &req.base,
                           &containerd__services__leases__v1__create_response__descriptor, &reply, err);
  if (reply)
    protobuf_c_message_free_unpacked(reply, NULL);
  return r;
}

int ctrd_lease_delete(const ctrd_ctx *c, const char *id, crimage_error **err)
{
  rpc_metadata md[2];
  ctrd_ctx plain = *c;
  plain.lease = NULL;
  size_t n_md = ctrd_metadata(&plain, md);
  Containerd__Services__Leases__V1__DeleteRequest req = CONTAINERD__SERVICES__LEASES__V1__DELETE_REQUEST__INIT;
  req.id = (char *) id;
  ProtobufCMessage *reply = NULL;
  int r = rpc_client_unary(c->rpc, LEASES_SERVICE "Delete", md, n_md, c->timeout_ms, &req.base,
                           &google__protobuf__empty__descriptor, &reply, err);
  if (reply)
    protobuf_c_message_free_unpacked(reply, NULL);
  return r;
}

int ctrd_lease_add_content(const ctrd_ctx *c, const char *id, const char *digest, crimage_error **err)
{
  rpc_metadata md[2];
  ctrd_ctx plain = *c;
  plain.lease = NULL;
  size_t n_md = ctrd_metadata(&plain, md);
  /* The resource type containerd's metadata store names blobs with (core/metadata: bucketKeyObjectContent). */
  Containerd__Services__Leases__V1__Resource res = CONTAINERD__SERVICES__LEASES__V1__RESOURCE__INIT;
  res.id = (char *) digest;
  res.type = (char *) "content";
  Containerd__Services__Leases__V1__AddResourceRequest req =
      CONTAINERD__SERVICES__LEASES__V1__ADD_RESOURCE_REQUEST__INIT;
  req.id = (char *) id;
  req.resource = &res;
  ProtobufCMessage *reply = NULL;
  int r = rpc_client_unary(c->rpc, LEASES_SERVICE "AddResource", md, n_md, c->timeout_ms, &req.base,
                           &google__protobuf__empty__descriptor, &reply, err);
  if (reply)
    protobuf_c_message_free_unpacked(reply, NULL);
  return r;
}
