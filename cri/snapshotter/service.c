/* containerd.services.snapshots.v1.Snapshots on the generic gRPC server: each method unpacks its request into the
 * snapshotter's types, calls it, and packs the answer as containerd's snapshot service (contrib/snapshotservice)
 * does: List sends its snapshots in messages of at most 100, Info always carries both times. */
#include <errno.h>
#include <stddef.h>

#include "common/util.h"
#include "cri/containerd/snapshots.pb-c.h"
#include "cri/server.h"
#include "cri/snapshotter/snapshotter.h"

/* Snapshots per ListSnapshotsResponse, as containerd's service batches them, and a bound on the bytes of one: the
 * labels allowed make a snapshot up to about 1 MiB, and containerd's client takes messages of at most 16 MiB. */
#define LIST_BATCH 100
#define LIST_BATCH_BYTES (4 * 1024 * 1024)

typedef Containerd__Services__Snapshots__V1__PrepareSnapshotRequest__LabelsEntry label_entry;
typedef Containerd__Services__Snapshots__V1__Info__LabelsEntry info_label_entry;

/* Every labels map of the API has an entry type of its own, all generated as {base, key, value}: one reader takes
 * them all. */
#define SAME_LAYOUT(T)                                                                                                 \
  _Static_assert(offsetof(T, key) == offsetof(label_entry, key) && offsetof(T, value) == offsetof(label_entry, value), \
                 #T " is not laid out as the other label entries")
SAME_LAYOUT(Containerd__Services__Snapshots__V1__ViewSnapshotRequest__LabelsEntry);
SAME_LAYOUT(Containerd__Services__Snapshots__V1__CommitSnapshotRequest__LabelsEntry);
SAME_LAYOUT(Containerd__Services__Snapshots__V1__Info__LabelsEntry);

static int labels_from_entries(label_entry **entries, size_t n, snap_labels *ret, crimage_error **err)
{
  *ret = (snap_labels){0};
  if (n > SNAP_MAX_LABELS)
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, E2BIG, "%zu labels, more than %d", n, SNAP_MAX_LABELS);
  for (size_t i = 0; i < n; i++)
    if (entries[i] && !str_empty(entries[i]->key))
      snap_labels_set(ret, entries[i]->key, entries[i]->value);
    else if (entries[i])
      return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, EINVAL, "a label key is empty");
  return 0;
}

static Containerd__Types__Mount **mounts_to_proto(const snap_mounts *m)
{
  Containerd__Types__Mount **v = xcalloc(m->n ? m->n : 1, sizeof(*v));
  for (size_t i = 0; i < m->n; i++) {
    Containerd__Types__Mount *pm = xmalloc(sizeof(*pm));
    containerd__types__mount__init(pm);
    pm->type = xstrdup(m->v[i].type);
    pm->source = xstrdup(m->v[i].source);
    pm->n_options = strv_length(m->v[i].options);
    pm->options = strv_copy(m->v[i].options);
    v[i] = pm;
  }
  return v;
}

static Google__Protobuf__Timestamp *timestamp(int64_t ns)
{
  Google__Protobuf__Timestamp *t = xmalloc(sizeof(*t));
  google__protobuf__timestamp__init(t);
  t->seconds = ns / 1000000000;
  t->nanos = (int32_t) (ns % 1000000000);
  if (t->nanos < 0) {
    t->nanos += 1000000000;
    t->seconds--;
  }
  return t;
}

static Containerd__Services__Snapshots__V1__Info *info_to_proto(const snap_info *info)
{
  Containerd__Services__Snapshots__V1__Info *pi = xmalloc(sizeof(*pi));
  containerd__services__snapshots__v1__info__init(pi);
  pi->name = xstrdup(info->name);
  pi->parent = xstrdup(info->parent);
  pi->kind = (Containerd__Services__Snapshots__V1__Kind) info->kind;
  pi->created_at = timestamp(info->created_ns);
  pi->updated_at = timestamp(info->updated_ns);
  if (info->labels.n > 0) {
    pi->labels = xcalloc(info->labels.n, sizeof(*pi->labels));
    for (size_t i = 0; i < info->labels.n; i++) {
      info_label_entry *e = xmalloc(sizeof(*e));
      containerd__services__snapshots__v1__info__labels_entry__init(e);
      e->key = xstrdup(info->labels.v[i].key);
      e->value = xstrdup(info->labels.v[i].value);
      pi->labels[i] = e;
    }
    pi->n_labels = info->labels.n;
  }
  return pi;
}

static ProtobufCMessage *empty_reply(void)
{
  Google__Protobuf__Empty *e = xmalloc(sizeof(*e));
  google__protobuf__empty__init(e);
  return &e->base;
}

static int handle_prepare(void *userdata, rpc_call *call, const ProtobufCMessage *request,
                          ProtobufCMessage **ret_reply, crimage_error **err)
{
  const Containerd__Services__Snapshots__V1__PrepareSnapshotRequest *req = (const void *) request;
  snap_labels labels;
  int r = labels_from_entries(req->labels, req->n_labels, &labels, err);
  snap_mounts m = {0};
  if (r == 0)
    r = snapshotter_prepare(userdata, req->key, req->parent, &labels, &m, err);
  snap_labels_clear(&labels);
  if (r < 0)
    return r;
  Containerd__Services__Snapshots__V1__PrepareSnapshotResponse *reply = xmalloc(sizeof(*reply));
  containerd__services__snapshots__v1__prepare_snapshot_response__init(reply);
  reply->mounts = mounts_to_proto(&m);
  reply->n_mounts = m.n;
  snap_mounts_clear(&m);
  *ret_reply = &reply->base;
  return 0;
}

static int handle_view(void *userdata, rpc_call *call, const ProtobufCMessage *request, ProtobufCMessage **ret_reply,
                       crimage_error **err)
{
  const Containerd__Services__Snapshots__V1__ViewSnapshotRequest *req = (const void *) request;
  snap_labels labels;
  int r = labels_from_entries((label_entry **) req->labels, req->n_labels, &labels, err);
  snap_mounts m = {0};
  if (r == 0)
    r = snapshotter_view(userdata, req->key, req->parent, &labels, &m, err);
  snap_labels_clear(&labels);
  if (r < 0)
    return r;
  Containerd__Services__Snapshots__V1__ViewSnapshotResponse *reply = xmalloc(sizeof(*reply));
  containerd__services__snapshots__v1__view_snapshot_response__init(reply);
  reply->mounts = mounts_to_proto(&m);
  reply->n_mounts = m.n;
  snap_mounts_clear(&m);
  *ret_reply = &reply->base;
  return 0;
}

static int handle_mounts(void *userdata, rpc_call *call, const ProtobufCMessage *request,
                         ProtobufCMessage **ret_reply, crimage_error **err)
{
  const Containerd__Services__Snapshots__V1__MountsRequest *req = (const void *) request;
  snap_mounts m = {0};
  int r = snapshotter_mounts(userdata, req->key, &m, err);
  if (r < 0)
    return r;
  Containerd__Services__Snapshots__V1__MountsResponse *reply = xmalloc(sizeof(*reply));
  containerd__services__snapshots__v1__mounts_response__init(reply);
  reply->mounts = mounts_to_proto(&m);
  reply->n_mounts = m.n;
  snap_mounts_clear(&m);
  *ret_reply = &reply->base;
  return 0;
}

static int handle_commit(void *userdata, rpc_call *call, const ProtobufCMessage *request,
                         ProtobufCMessage **ret_reply, crimage_error **err)
{
  const Containerd__Services__Snapshots__V1__CommitSnapshotRequest *req = (const void *) request;
  snap_labels labels;
  int r = labels_from_entries((label_entry **) req->labels, req->n_labels, &labels, err);
  if (r == 0)
    r = snapshotter_commit(userdata, req->name, req->key, &labels, err);
  snap_labels_clear(&labels);
  if (r < 0)
    return r;
  *ret_reply = empty_reply();
  return 0;
}

static int handle_remove(void *userdata, rpc_call *call, const ProtobufCMessage *request,
                         ProtobufCMessage **ret_reply, crimage_error **err)
{
  const Containerd__Services__Snapshots__V1__RemoveSnapshotRequest *req = (const void *) request;
  int r = snapshotter_remove(userdata, req->key, err);
  if (r < 0)
    return r;
  *ret_reply = empty_reply();
  return 0;
}

static int handle_stat(void *userdata, rpc_call *call, const ProtobufCMessage *request, ProtobufCMessage **ret_reply,
                       crimage_error **err)
{
  const Containerd__Services__Snapshots__V1__StatSnapshotRequest *req = (const void *) request;
  snap_info info = {0};
  int r = snapshotter_stat(userdata, req->key, &info, err);
  if (r < 0)
    return r;
  Containerd__Services__Snapshots__V1__StatSnapshotResponse *reply = xmalloc(sizeof(*reply));
  containerd__services__snapshots__v1__stat_snapshot_response__init(reply);
  reply->info = info_to_proto(&info);
  snap_info_clear(&info);
  *ret_reply = &reply->base;
  return 0;
}

static int handle_update(void *userdata, rpc_call *call, const ProtobufCMessage *request,
                         ProtobufCMessage **ret_reply, crimage_error **err)
{
  const Containerd__Services__Snapshots__V1__UpdateSnapshotRequest *req = (const void *) request;
  if (!req->info)
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, EINVAL, "update: no snapshot info");
  snap_info in = {.name = req->info->name};
  int r = labels_from_entries((label_entry **) req->info->labels, req->info->n_labels, &in.labels, err);
  snap_info out = {0};
  if (r == 0)
    r = snapshotter_update(userdata, &in, req->update_mask ? req->update_mask->paths : NULL,
                           req->update_mask ? req->update_mask->n_paths : 0, &out, err);
  snap_labels_clear(&in.labels);
  if (r < 0)
    return r;
  Containerd__Services__Snapshots__V1__UpdateSnapshotResponse *reply = xmalloc(sizeof(*reply));
  containerd__services__snapshots__v1__update_snapshot_response__init(reply);
  reply->info = info_to_proto(&out);
  snap_info_clear(&out);
  *ret_reply = &reply->base;
  return 0;
}

static int handle_list(void *userdata, rpc_call *call, const ProtobufCMessage *request, crimage_error **err)
{
  const Containerd__Services__Snapshots__V1__ListSnapshotsRequest *req = (const void *) request;
  snap_info *list = NULL;
  size_t n = 0;
  int r = snapshotter_list(userdata, req->filters, req->n_filters, &list, &n, err);
  if (r < 0)
    return r;
  for (size_t i = 0; i < n && r >= 0;) {
    Containerd__Services__Snapshots__V1__ListSnapshotsResponse *msg = xmalloc(sizeof(*msg));
    containerd__services__snapshots__v1__list_snapshots_response__init(msg);
    msg->info = xcalloc(LIST_BATCH, sizeof(*msg->info));
    size_t bytes = 0;
    while (i < n && msg->n_info < LIST_BATCH) {
      Containerd__Services__Snapshots__V1__Info *pi = info_to_proto(&list[i]);
      size_t size = protobuf_c_message_get_packed_size(&pi->base) + 8; /* with its field tag and length */
      if (msg->n_info > 0 && bytes + size > LIST_BATCH_BYTES) {
        protobuf_c_message_free_unpacked(&pi->base, NULL);
        break;
      }
      msg->info[msg->n_info++] = pi;
      bytes += size;
      i++;
    }
    r = rpc_call_send(call, &msg->base, err);
    protobuf_c_message_free_unpacked(&msg->base, NULL);
  }
  snap_info_list_free(list, n);
  return r < 0 ? r : 0;
}

static int handle_usage(void *userdata, rpc_call *call, const ProtobufCMessage *request, ProtobufCMessage **ret_reply,
                        crimage_error **err)
{
  const Containerd__Services__Snapshots__V1__UsageRequest *req = (const void *) request;
  int64_t size = 0, inodes = 0;
  int r = snapshotter_usage(userdata, req->key, &size, &inodes, err);
  if (r < 0)
    return r;
  Containerd__Services__Snapshots__V1__UsageResponse *reply = xmalloc(sizeof(*reply));
  containerd__services__snapshots__v1__usage_response__init(reply);
  reply->size = size;
  reply->inodes = inodes;
  *ret_reply = &reply->base;
  return 0;
}

static int handle_cleanup(void *userdata, rpc_call *call, const ProtobufCMessage *request,
                          ProtobufCMessage **ret_reply, crimage_error **err)
{
  int r = snapshotter_cleanup(userdata, err);
  if (r < 0)
    return r;
  *ret_reply = empty_reply();
  return 0;
}

static const rpc_method snapshot_methods[] = {
    {.name = "Prepare", .unary = handle_prepare}, {.name = "View", .unary = handle_view},
    {.name = "Mounts", .unary = handle_mounts},   {.name = "Commit", .unary = handle_commit},
    {.name = "Remove", .unary = handle_remove},   {.name = "Stat", .unary = handle_stat},
    {.name = "Update", .unary = handle_update},   {.name = "List", .stream = handle_list},
    {.name = "Usage", .unary = handle_usage},     {.name = "Cleanup", .unary = handle_cleanup},
};

int snapshotter_register(snapshotter *s, struct rpc_server *server, crimage_error **err)
{
  return rpc_server_add_service(server, &containerd__services__snapshots__v1__snapshots__descriptor, snapshot_methods,
                                ARRAY_SIZE(snapshot_methods), s, err);
}
