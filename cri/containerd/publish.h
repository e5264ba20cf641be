/* Hands crimage's images to containerd, so its CRI plugin finds them when kubelet creates a container: the blobs
 * containerd lacks go over its content API inside a lease, the manifest gets containerd's GC reference labels, and
 * an image record per name crimage recorded targets the manifest pulled. A watcher republishes whatever containerd
 * lacks when it comes (back) up. */
#ifndef CRIMAGE_CRI_CONTAINERD_PUBLISH_H
#define CRIMAGE_CRI_CONTAINERD_PUBLISH_H

#include <stdbool.h>
#include <stdint.h>

#include "common/error.h"
#include "pull/store.h"

/* The label crimage puts on the image records it publishes, one per runtime handler that published the record:
 * "io.crimage.handler" for the default handler, "io.crimage.handler.<name>" for the others. Records without it are
 * someone else's and crimage never changes or deletes them. */
#define PUBLISH_LABEL_HANDLER "io.crimage.handler"
#define PUBLISH_LABEL_VALUE "published"

typedef struct publisher publisher;

/* Makes an unpacked layer directory of crimage's the committed snapshot chain_id (on parent_chain, "" for a base
 * layer) of crimage's own snapshotter, which then answers containerd's remote-snapshot Prepare for it. */
typedef int (*publisher_add_layer_fn)(void *userdata, const char *chain_id, const char *parent_chain, const char *dir,
                                      crimage_error **err);

typedef struct publisher_options {
  const char *address;        /* containerd's socket */
  int64_t call_timeout_ms;    /* one call to containerd; <= 0: 30 s */
  int64_t confirm_timeout_ms; /* how long containerd's CRI gets to take a new image in; <= 0: 10 s */
  publisher_add_layer_fn add_layer; /* NULL: crimage serves no snapshotter */
  void *add_layer_userdata;
} publisher_options;

/* Where an image goes in containerd. */
typedef struct publish_dest {
  const char *ns;
  /* NULL or "": containerd gets the layer blobs and unpacks them itself. Otherwise the name containerd's config gives
   * crimage's snapshotter ([proxy_plugins.<name>]): no layer blob is sent; the unpacked layers become containerd
   * snapshots through that snapshotter. */
  const char *snapshotter;
} publish_dest;

int publisher_new(const publisher_options *opts, publisher **ret, crimage_error **err);
/* Stops the watcher first. */
void publisher_free(publisher *p);
const char *publisher_address(const publisher *p);

/* Publishes img (a record of store st) into namespace ns, for img->handler. Returns 1 when something was written,
 * 0 when containerd already had all of it. Before it returns, containerd's CRI resolves the image ID (namespace
 * k8s.io). Errors are UNAVAILABLE and name containerd's socket and the step that failed. */
int publisher_publish(publisher *p, store *st, const store_image *img, const publish_dest *dest,
                      crimage_error **err);
/* Deletes the records img->handler published for img in ns (records another handler also published only lose this
 * handler's label), then the image ID record containerd's CRI added when no other record targets the image. */
int publisher_unpublish(publisher *p, const store_image *img, const publish_dest *dest, crimage_error **err);

/* Calls fn on a thread of the publisher's: once containerd answers, again each time it answers after it was
 * unreachable (a restart, a wiped root), and every few minutes while it stays up. At most one watcher. */
typedef void (*publisher_ready_fn)(void *userdata);
int publisher_watch(publisher *p, publisher_ready_fn fn, void *userdata, crimage_error **err);
/* True once publisher_free began: a long reconcile stops early. */
bool publisher_stopping(publisher *p);

#endif
