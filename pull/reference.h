/* Image references, parsed and normalized the way kubelet and docker do (distribution/reference semantics). */
#ifndef CRIMAGE_PULL_REFERENCE_H
#define CRIMAGE_PULL_REFERENCE_H

#include <stdbool.h>

#include "common/error.h"

#define REFERENCE_DEFAULT_REGISTRY "docker.io"

typedef struct image_ref {
  char *domain; /* "docker.io", "registry.k8s.io", "fictional.registry.example:10443", "[::1]:5000" */
  char *path;   /* "library/busybox", "pause" */
  char *tag;    /* "latest" when neither a tag nor a digest was given; NULL when only a digest was given */
  char *digest; /* "sha256:<64 hex>" / "sha512:<128 hex>", or NULL */
  bool tag_given; /* the input named a tag explicitly (used for pull-policy defaulting) */
} image_ref;

/* Parses and normalizes s. default_registry NULL means docker.io; "library/" is added to one-component names only
 * on docker.io; "index.docker.io" becomes "docker.io". Errors are INVALID_ARGUMENT and name the problem. */
int reference_parse(const char *s, const char *default_registry, image_ref **ret, crimage_error **err);
void reference_free(image_ref *r);
static inline void reference_freep(image_ref **r) { reference_free(*r); }
#define cleanup_reference __attribute__((cleanup(reference_freep)))

/* "docker.io/library/busybox" */
char *reference_name(const image_ref *r);
/* "docker.io/library/busybox:latest" (NULL when the ref has no tag) */
char *reference_tagged(const image_ref *r);
/* "docker.io/library/busybox@sha256:..." (NULL when the ref has no digest) */
char *reference_digested(const image_ref *r);
/* The full normalized form: name[:tag][@digest]. */
char *reference_string(const image_ref *r);

#endif
