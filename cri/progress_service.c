#include <errno.h>

#include "common/util.h"
#include "cri/crimage.pb-c.h"
#include "cri/progress_service.h"
#include "pull/reference.h"

/* A watcher gets an update at least this often, so a client can notice that it no longer needs it. */
#define WATCH_HEARTBEAT_MS 1000

struct progress_service {
  progress_tracker *tracker;
  char *default_registry;
};

progress_service *progress_service_new(progress_tracker *tracker, const char *default_registry)
{
  progress_service *svc = xcalloc(1, sizeof(*svc));
  svc->tracker = tracker;
  svc->default_registry = xstrdup(default_registry ? default_registry : REFERENCE_DEFAULT_REGISTRY);
  return svc;
}

void progress_service_free(progress_service *svc)
{
  if (!svc)
    return;
  free(svc->default_registry);
  free(svc);
}

static Crimage__V1__PullState to_state(progress_state s)
{
  switch (s) {
  case PROGRESS_QUEUED:
    return CRIMAGE__V1__PULL_STATE__QUEUED;
  case PROGRESS_RUNNING:
    return CRIMAGE__V1__PULL_STATE__RUNNING;
  case PROGRESS_SUCCEEDED:
    return CRIMAGE__V1__PULL_STATE__SUCCEEDED;
  case PROGRESS_FAILED:
    return CRIMAGE__V1__PULL_STATE__FAILED;
  }
  return CRIMAGE__V1__PULL_STATE__FAILED;
}

/* Every field on the heap: the message is freed with protobuf_c_message_free_unpacked. */
static Crimage__V1__PullStatus *to_status(const progress_pull *p)
{
  Crimage__V1__PullStatus *s = xmalloc(sizeof(*s));
  crimage__v1__pull_status__init(s);
  s->id = p->id;
  s->reference = xstrdup(p->reference);
  s->runtime_handler = xstrdup(p->handler);
  s->pod_uid = xstrdup(p->pod_uid);
  s->state = to_state(p->state);
  s->created_unix_ms = p->created_ms;
  s->started_unix_ms = p->started_ms;
  s->ended_unix_ms = p->ended_ms;
  s->bytes_done = p->bytes_done;
  s->bytes_total = p->bytes_total;
  s->waiters = p->waiters;
  s->error = xstrdup(p->error ? p->error : "");
  if (p->n_blobs) {
    s->blobs = xcalloc(p->n_blobs, sizeof(*s->blobs));
    for (size_t i = 0; i < p->n_blobs; i++) {
      Crimage__V1__BlobProgress *b = xmalloc(sizeof(*b));
      crimage__v1__blob_progress__init(b);
      b->digest = xstrdup(p->blobs[i].digest);
      b->done = p->blobs[i].done;
      b->total = p->blobs[i].total;
      b->finished = p->blobs[i].finished;
      s->blobs[i] = b;
    }
    s->n_blobs = p->n_blobs;
  }
  return s;
}

static int handle_list_pulls(void *userdata, rpc_call *call, const ProtobufCMessage *request,
                             ProtobufCMessage **ret_reply, crimage_error **err)
{
  progress_service *svc = userdata;
  const Crimage__V1__ListPullsRequest *req = (const Crimage__V1__ListPullsRequest *) request;
  progress_pull *list = NULL;
  size_t n = 0;
  progress_list(svc->tracker, req->include_ended, &list, &n);
  Crimage__V1__ListPullsResponse *reply = xmalloc(sizeof(*reply));
  crimage__v1__list_pulls_response__init(reply);
  if (n) {
    reply->pulls = xcalloc(n, sizeof(*reply->pulls));
    for (size_t i = 0; i < n; i++)
      reply->pulls[i] = to_status(&list[i]);
    reply->n_pulls = n;
  }
  progress_pull_list_free(list, n);
  *ret_reply = &reply->base;
  return 0;
}

static int handle_watch_pull(void *userdata, rpc_call *call, const ProtobufCMessage *request, crimage_error **err)
{
  progress_service *svc = userdata;
  const Crimage__V1__WatchPullRequest *req = (const Crimage__V1__WatchPullRequest *) request;
  if (str_empty(req->image))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "no image given");
  cleanup_reference image_ref *ref = NULL;
  int r = reference_parse(req->image, svc->default_registry, &ref, err);
  if (r < 0)
    return r;
  cleanup_free char *refstr = reference_string(ref);
  const char *handler = req->runtime_handler ? req->runtime_handler : "";
  uint64_t id = progress_find(svc->tracker, refstr, handler);
  if (id == 0)
    return crimage_error_set(err, CRIMAGE_NOT_FOUND, 0, "no pull of %s for handler \"%s\" is queued or running",
                             refstr, handler);

  uint64_t version = 0;
  for (bool first = true;; first = false) {
    progress_pull p = {0};
    if (!progress_wait(svc->tracker, id, version, first ? 0 : WATCH_HEARTBEAT_MS, &p))
      return crimage_error_set(err, CRIMAGE_NOT_FOUND, 0, "the pull of %s is no longer known", refstr);
    version = p.version;
    bool over = p.state == PROGRESS_SUCCEEDED || p.state == PROGRESS_FAILED;
    Crimage__V1__PullStatus *msg = to_status(&p);
    progress_pull_clear(&p);
    r = rpc_call_send(call, &msg->base, err);
    protobuf_c_message_free_unpacked(&msg->base, NULL);
    if (r < 0)
      return r;
    if (over)
      return 0;
    if (rpc_call_cancelled(call))
      return crimage_error_set(err, CRIMAGE_CANCELLED, ECANCELED, "the client went away");
  }
}

static const rpc_method progress_methods[] = {
    {.name = "ListPulls", .unary = handle_list_pulls},
    {.name = "WatchPull", .stream = handle_watch_pull},
};

int progress_service_register(progress_service *svc, rpc_server *server, crimage_error **err)
{
  return rpc_server_add_service(server, &crimage__v1__pull_progress__descriptor, progress_methods,
                                ARRAY_SIZE(progress_methods), svc, err);
}
