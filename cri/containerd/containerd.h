/* Small clients of containerd's remote APIs, on the generic gRPC client: content, images, leases, and the image
 * service of containerd's CRI plugin. Every call acts in a namespace (gRPC metadata `containerd-namespace`) and,
 * when one is given, inside a lease (`containerd-lease`), as containerd's own Go client sends them. Errors keep
 * containerd's status (NOT_FOUND, ALREADY_EXISTS, UNAVAILABLE...) and name the call. */
#ifndef CRIMAGE_CRI_CONTAINERD_H
#define CRIMAGE_CRI_CONTAINERD_H

#include <stdbool.h>
#include <stdint.h>

#include "common/error.h"
#include "cri/rpc_client.h"

/* Label names as containerd writes them (core/images/mediatypes.go, core/metadata/gc.go, core/leases). */
#define CTRD_LABEL_GC_EXPIRE "containerd.io/gc.expire"
#define CTRD_LABEL_GC_REF_CONFIG "containerd.io/gc.ref.content.config"
#define CTRD_LABEL_GC_REF_LAYER "containerd.io/gc.ref.content.l." /* + index */
#define CTRD_LABEL_GC_REF_MANIFEST "containerd.io/gc.ref.content.m." /* + index */
/* A snapshot chain is kept alive by this label on the image config, + the snapshotter's name. */
#define CTRD_LABEL_GC_REF_SNAPSHOT "containerd.io/gc.ref.snapshot."
/* The chain ID a Prepare asks a remote snapshotter to provide (core/snapshots: TargetRefLabel). */
#define CTRD_LABEL_SNAPSHOT_REF "containerd.io/snapshot.ref"
/* The namespace containerd's CRI plugin keeps its images in. */
#define CTRD_CRI_NAMESPACE "k8s.io"

/* Where a call goes and in which namespace and lease it acts. */
typedef struct ctrd_ctx {
  rpc_client *rpc;
  const char *ns;
  const char *lease;  /* NULL: none */
  int64_t timeout_ms; /* per call; <= 0: none */
} ctrd_ctx;

typedef struct ctrd_label {
  const char *key;
  const char *value; /* NULL in an update: remove the label */
} ctrd_label;

/* The gRPC metadata of a call in c: its namespace, and its lease when set. Fills md (room for 2), returns the
 * count. */
size_t ctrd_metadata(const ctrd_ctx *c, rpc_metadata md[2]);
/* Hands *e on to *err, except a NOT_FOUND (where absence is an answer, not a failure): that one is freed and true
 * returned. */
bool ctrd_not_found(crimage_error **e, crimage_error **err);

/* ---- content (content.c) ---- */
/* 1 and *ret_size when containerd has the blob in this namespace, 0 when not. */
int ctrd_content_info(const ctrd_ctx *c, const char *digest, int64_t *ret_size, crimage_error **err);
/* Sets (or, with a NULL value, removes) the given labels of a blob; the others stay. */
int ctrd_content_update_labels(const ctrd_ctx *c, const char *digest, const ctrd_label *labels, size_t n,
                               crimage_error **err);
/* Writes size bytes read from fd as blob digest through the Write stream (stat, writes, commit with the expected
 * digest and size, and the labels), resuming where an earlier interrupted write of the same ref stopped. A blob
 * containerd already has is success. */
int ctrd_content_write(const ctrd_ctx *c, const char *ref, const char *digest, int64_t size, int fd,
                       const ctrd_label *labels, size_t n_labels, crimage_error **err);

/* ---- images (images.c) ---- */
typedef struct ctrd_descriptor {
  char *media_type;
  char *digest;
  int64_t size;
} ctrd_descriptor;

typedef struct ctrd_image {
  char *name;
  ctrd_descriptor target;
  char **label_keys; /* NULL-terminated, with label_values in step */
  char **label_values;
} ctrd_image;

void ctrd_image_free(ctrd_image *img);
static inline void ctrd_image_freep(ctrd_image **img) { ctrd_image_free(*img); }
#define cleanup_ctrd_image __attribute__((cleanup(ctrd_image_freep)))
void ctrd_image_list_free(ctrd_image **list, size_t n);
/* The value of a label, NULL when absent. */
const char *ctrd_image_label(const ctrd_image *img, const char *key);

/* 1 and *ret when the image record exists, 0 when not. */
int ctrd_images_get(const ctrd_ctx *c, const char *name, ctrd_image **ret, crimage_error **err);
/* Lists the records matching a containerd filter (NULL: all). */
int ctrd_images_list(const ctrd_ctx *c, const char *filter, ctrd_image ***ret, size_t *ret_n, crimage_error **err);
/* Creates the record, or updates the target and the given labels of an existing one (its other labels stay). */
int ctrd_images_put(const ctrd_ctx *c, const char *name, const ctrd_descriptor *target, const ctrd_label *labels,
                    size_t n_labels, crimage_error **err);
/* Changes only the given labels of an existing record (NULL values remove). */
int ctrd_images_update_labels(const ctrd_ctx *c, const char *name, const ctrd_label *labels, size_t n_labels,
                              crimage_error **err);
/* Deletes a record; an absent one is success. */
int ctrd_images_delete(const ctrd_ctx *c, const char *name, crimage_error **err);

/* ---- leases (leases.c) ---- */
/* Creates lease id, which containerd's GC ends by itself expire_s seconds from now. */
int ctrd_lease_create(const ctrd_ctx *c, const char *id, int64_t expire_s, crimage_error **err);
int ctrd_lease_delete(const ctrd_ctx *c, const char *id, crimage_error **err);
/* Makes lease id reference the blob digest (present or not yet), so containerd's GC keeps it while the lease
 * lives. */
int ctrd_lease_add_content(const ctrd_ctx *c, const char *id, const char *digest, crimage_error **err);

/* ---- snapshots (snapshots.c), through containerd's metadata in front of the named snapshotter ---- */
/* Prepare of key on parent asking for the committed chain chain_id (the label containerd.io/snapshot.ref), as
 * containerd's unpacker asks a remote snapshotter. 1: the snapshotter has the chain, and containerd recorded it
 * committed (its answer is ALREADY_EXISTS); 0: the snapshotter made an ordinary active snapshot key instead. */
int ctrd_snapshot_prepare_remote(const ctrd_ctx *c, const char *snapshotter, const char *key, const char *parent,
                                 const char *chain_id, crimage_error **err);
/* 1 when containerd has the snapshot key of snapshotter in this namespace, 0 when not. */
int ctrd_snapshot_exists(const ctrd_ctx *c, const char *snapshotter, const char *key, crimage_error **err);
/* Removes a snapshot; an absent one is success. */
int ctrd_snapshot_remove(const ctrd_ctx *c, const char *snapshotter, const char *key, crimage_error **err);

/* ---- containerd's CRI image service (cri_images.c) ---- */
/* Whether containerd's CRI resolves image (an ID or reference) to an image: its ImageStatus. */
int ctrd_cri_image_present(const ctrd_ctx *c, const char *image, bool *ret, crimage_error **err);

#endif
