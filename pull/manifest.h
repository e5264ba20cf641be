/* Image manifests and indexes (OCI image spec v1, Docker image manifest v2 schema 2 and manifest list): parsing with
 * limits, media type checks and platform selection from an index. */
#ifndef CRIMAGE_PULL_MANIFEST_H
#define CRIMAGE_PULL_MANIFEST_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/error.h"
#include "pull/platform.h"

#define MEDIA_TYPE_OCI_MANIFEST "application/vnd.oci.image.manifest.v1+json"
#define MEDIA_TYPE_OCI_INDEX "application/vnd.oci.image.index.v1+json"
#define MEDIA_TYPE_DOCKER_MANIFEST "application/vnd.docker.distribution.manifest.v2+json"
#define MEDIA_TYPE_DOCKER_LIST "application/vnd.docker.distribution.manifest.list.v2+json"
#define MEDIA_TYPE_OCI_CONFIG "application/vnd.oci.image.config.v1+json"
#define MEDIA_TYPE_DOCKER_CONFIG "application/vnd.docker.container.image.v1+json"

/* The Accept header of a manifest request: without it the distribution registry answers 404 for OCI manifests. */
#define MANIFEST_ACCEPT                                                                                                \
  MEDIA_TYPE_OCI_MANIFEST ", " MEDIA_TYPE_OCI_INDEX ", " MEDIA_TYPE_DOCKER_MANIFEST ", " MEDIA_TYPE_DOCKER_LIST

#define MANIFEST_MAX_SIZE (4u * 1024 * 1024)
#define MANIFEST_MAX_LAYERS 1000
#define MANIFEST_MAX_ENTRIES 1000 /* manifests in an index */
/* What parsing a manifest or an index may build (json_limits, checked before json-c builds anything): no array or
 * object longer than the longer of the two lists above, and a tree of at most 16 MiB (an index of 1000 entries
 * with platforms and annotations takes about 3 MiB). */
#define MANIFEST_JSON_LIMITS JSON_LIMITS(16u << 20, 1000)
_Static_assert(MANIFEST_MAX_LAYERS <= 1000 && MANIFEST_MAX_ENTRIES <= 1000, "MANIFEST_JSON_LIMITS fits both lists");
/* The one limit of an image config: the pull refuses a larger one and ImageStatus reads any it accepted; also its
 * shape: at most 10000 entries in any list or map (history, Env, Labels) and 24 MiB of tree (a config of 8 MiB
 * of real strings takes little more than its size; one of empty objects would take 100 times it). */
#define IMAGE_CONFIG_MAX_SIZE (8u * 1024 * 1024)
#define IMAGE_CONFIG_JSON_LIMITS JSON_LIMITS(24u << 20, 10000)

typedef struct manifest_descriptor {
  char *media_type;
  char *digest;
  int64_t size;
  bool has_platform;
  platform platform; /* normalized; valid when has_platform */
} manifest_descriptor;

typedef enum manifest_kind {
  MANIFEST_KIND_IMAGE, /* OCI image manifest or Docker schema 2 manifest */
  MANIFEST_KIND_INDEX, /* OCI index or Docker manifest list */
} manifest_kind;

typedef struct manifest {
  manifest_kind kind;
  char *media_type;
  /* MANIFEST_KIND_IMAGE */
  manifest_descriptor config;
  manifest_descriptor *layers; /* distributable layers only, in order */
  size_t n_layers;
  size_t n_skipped_layers; /* foreign / non-distributable layers left out */
  /* MANIFEST_KIND_INDEX */
  manifest_descriptor *manifests;
  size_t n_manifests;
} manifest;

/* Parses a manifest or index of at most MANIFEST_MAX_SIZE bytes. content_type is the HTTP Content-Type (may be NULL);
 * the document's own mediaType wins when present, and the two must agree. Errors are INVALID_ARGUMENT. */
int manifest_parse(const char *data, size_t len, const char *content_type, manifest **ret, crimage_error **err);
void manifest_free(manifest *m);
static inline void manifest_freep(manifest **m) { manifest_free(*m); }
#define cleanup_manifest __attribute__((cleanup(manifest_freep)))

/* The bytes of an image: its manifest (manifest_len) + config + layers as the manifest gives them, capped at
 * INT64_MAX: the sizes come from the registry, and a sum of them must neither wrap nor read as negative to kubelet
 * (which takes Image.size as an int64). */
uint64_t manifest_image_size(const manifest *m, size_t manifest_len);

bool manifest_media_type_is_index(const char *media_type);
bool manifest_media_type_is_image(const char *media_type);

/* Picks the entry of an index for platform want (normalized). An entry whose platform equals want exactly beats
 * one that merely matches. INVALID_ARGUMENT naming the available platforms when none does. */
int manifest_select_platform(const manifest *index, const platform *want, const manifest_descriptor **ret,
                             crimage_error **err);

/* Reads Config.User ("" when unset) and rootfs.diff_ids of an image config blob. *ret_diff_ids (NULL-terminated) is
 * NULL when the config has none or they cannot be matched to the layers (n_skipped foreign layers were left out of
 * the manifest); diff_ids that are not digests, or not one per layer, are INVALID_ARGUMENT. */
int image_config_parse(const char *data, size_t len, size_t n_layers, size_t n_skipped, char **ret_user,
                       char ***ret_diff_ids, crimage_error **err);

#endif
