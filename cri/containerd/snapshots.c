/* Client of containerd.services.snapshots.v1.Snapshots on containerd's socket (containerd's metadata in front of
 * a snapshotter it names): the remote-snapshot Prepare, Stat and Remove. */
#include "common/util.h"
#include "cri/containerd/containerd.h"
#include "cri/containerd/snapshots.pb-c.h"

#define SNAPSHOTS_SERVICE "/containerd.services.snapshots.v1.Snapshots/"

int ctrd_snapshot_prepare_remote(const ctrd_ctx *c, const char *snapshotter, const char *key, const char *parent,
                                 const char *chain_id, crimage_error **err)
{
  rpc_metadata md[2];
  size_t n_md = ctrd_metadata(c, md);
  Containerd__Services__Snapshots__V1__PrepareSnapshotRequest__LabelsEntry ref =
      CONTAINERD__SERVICES__SNAPSHOTS__V1__PREPARE_SNAPSHOT_REQUEST__LABELS_ENTRY__INIT;
  ref.key = (char *) CTRD_LABEL_SNAPSHOT_REF;
  ref.value = (char *) chain_id;
  Containerd__Services__Snapshots__V1__PrepareSnapshotRequest__LabelsEntry *labels[] = {&ref};
  Containerd__Services__Snapshots__V1__PrepareSnapshotRequest req =
      CONTAINERD__SERVICES__SNAPSHOTS__V1__PREPARE_SNAPSHOT_REQUEST__INIT;
  req.snapshotter = (char *) snapshotter;
  req.key = (char *) key;
  req.parent = (char *) (parent ? parent : "");
  req.labels = labels;
  req.n_labels = 1;
  ProtobufCMessage *reply = NULL;
  crimage_error *e = NULL;
  int r = rpc_client_unary(c->rpc, SNAPSHOTS_SERVICE "Prepare", md, n_md, c->timeout_ms, &req.base,
                           &containerd__services__snapshots__v1__prepare_snapshot_response__descriptor, &reply, &e);
  if (reply)
    protobuf_c_message_free_unpacked(reply, NULL);
  if (r < 0 && e->status == CRIMAGE_ALREADY_EXISTS) {
    crimage_error_clear(&e);
    return 1;
  }
  if (r < 0) {
    *err = e;
    return r;
  }
  return 0;
}

int ctrd_snapshot_exists(const ctrd_ctx *c, const char *snapshotter, const char *key, crimage_error **err)
{
  rpc_metadata md[2];
  size_t n_md = ctrd_metadata(c, md);
  Containerd__Services__Snapshots__V1__StatSnapshotRequest req =
      CONTAINERD__SERVICES__SNAPSHOTS__V1__STAT_SNAPSHOT_REQUEST__INIT;
  req.snapshotter = (char *) snapshotter;
  req.key = (char *) key;
  ProtobufCMessage *reply = NULL;
  crimage_error *e = NULL;
  int r = rpc_client_unary(c->rpc, SNAPSHOTS_SERVICE "Stat", md, n_md, c->timeout_ms, &req.base,
                           &containerd__services__snapshots__v1__stat_snapshot_response__descriptor, &reply, &e);
  if (reply)
    protobuf_c_message_free_unpacked(reply, NULL);
  if (r < 0)
    return ctrd_not_found(&e, err) ? 0 : r;
  return 1;
}

int ctrd_snapshot_remove(const ctrd_ctx *c, const char *snapshotter, const char *key, crimage_error **err)
{
  rpc_metadata md[2];
  size_t n_md = ctrd_metadata(c, md);
  Containerd__Services__Snapshots__V1__RemoveSnapshotRequest req =
      CONTAINERD__SERVICES__SNAPSHOTS__V1__REMOVE_SNAPSHOT_REQUEST__INIT;
  req.snapshotter = (char *) snapshotter;
  req.key = (char *) key;
  ProtobufCMessage *reply = NULL;
  crimage_error *e = NULL;
  int r = rpc_client_unary(c->rpc, SNAPSHOTS_SERVICE "Remove", md, n_md, c->timeout_ms, &req.base,
                           &google__protobuf__empty__descriptor, &reply, &e);
  if (reply)
    protobuf_c_message_free_unpacked(reply, NULL);
  if (r < 0)
    return ctrd_not_found(&e, err) ? 0 : r;
  return 0;
}
