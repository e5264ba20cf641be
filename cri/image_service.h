/* The CRI v1 ImageService handlers: PullImage, ImageStatus, ListImages, RemoveImage, ImageFsInfo. Every image is
 * keyed by (image, runtime handler). */
#ifndef CRIMAGE_CRI_IMAGE_SERVICE_H
#define CRIMAGE_CRI_IMAGE_SERVICE_H

#include <stdbool.h>

#include "common/error.h"
#include "cri/containerd/publish.h"
#include "cri/containers_storage/cstorage.h"
#include "cri/pull_credentials.h"
#include "cri/server.h"
#include "pull/backoff.h"
#include "pull/platform.h"
#include "pull/progress.h"
#include "pull/puller.h"
#include "pull/scheduler.h"
#include "pull/store.h"

/* A runtime handler declared in the config. */
typedef struct handler_config {
  char *name;
  bool has_platform;
  platform platform; /* the platform this handler pulls from an index */
  char *root;        /* a store of its own; NULL = the main store */
  char *containerd_namespace; /* where its images go in containerd; NULL = the default namespace */
  int unpack_layers;          /* 1 / 0: unpack its layers or not; -1: as unpackLayers says */
  char *snapshotter;          /* containerd's name for crimage's snapshotter for its images; NULL = as containerd's */
  char *containers_storage_root; /* the containers-storage tree of its images; NULL = the default, "" = none */
} handler_config;

/* A runtime handler with a store (and so a puller) of its own: runtimeHandlers.<name>.root. */
typedef struct handler_store {
  const char *handler;
  store *store;
  puller *puller;
} handler_store;

typedef struct image_service_options {
  const char *default_registry;     /* NULL = docker.io */
  const handler_config *handlers;   /* declared handlers */
  size_t n_handlers;
  bool reject_unknown_handlers;     /* an undeclared handler is INVALID_ARGUMENT (else a plain key) */
  char *const *pinned_images;       /* NULL-terminated references whose images report Image.pinned (kubelet's image
                                       GC leaves them alone), e.g. the pause image; may be NULL */
  scheduler *scheduler;             /* when pulls may run (required) */
  backoff *backoff;                 /* failed pulls wait before the next try; NULL = no back-off */
  progress_tracker *progress;       /* told about every pull; NULL = none */
  pull_credentials *credentials;    /* for pulls without AuthConfig; NULL = anonymous */
  const handler_store *handler_stores; /* handlers that do not use the main store */
  size_t n_handler_stores;
  publisher *publisher;             /* hands every pulled image to containerd; NULL = none */
  const char *containerd_namespace; /* of handlers without one of their own; NULL = k8s.io */
  bool unpack_layers;               /* pulls unpack every layer for overlayfs (handlers may say otherwise) */
  const char *containerd_snapshotter; /* containerd's name for crimage's snapshotter; NULL: containerd gets the
                                         layer blobs and unpacks them itself */
  cstorage *const *cstorages;         /* every containers-storage tree of the config, open */
  size_t n_cstorages;
  const char *containers_storage_root; /* the tree of handlers without one of their own; NULL or "" = none */
} image_service_options;

typedef struct image_service image_service;

int image_service_new(store *st, puller *p, const image_service_options *opts, image_service **ret,
                      crimage_error **err);
void image_service_free(image_service *svc);
int image_service_register(image_service *svc, rpc_server *server, crimage_error **err);
/* Publishes every image of every store that containerd lacks (a publisher_ready_fn: containerd came up). */
void image_service_reconcile(void *svc);
/* Makes every containers-storage tree hold exactly the images of its handlers' records (at start-up: a tree that
 * was wiped, edited or left mid-write by a crash is made whole again). */
int image_service_sync_containers_storage(image_service *svc, crimage_error **err);

#endif
