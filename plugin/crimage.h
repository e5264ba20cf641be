/* libcrimage: the public face of crimage.
 *
 * Only the crimage_* symbols declared here are exported from the shared library (see plugin/libcrimage.sym).
 * Functions that can fail return 0 (or a non-negative count) on success and a negative errno on failure, and
 * fill *err with a crimage_error the caller frees with crimage_error_free(). */
#ifndef CRIMAGE_H
#define CRIMAGE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Status codes: the same numbers as gRPC status codes. */
typedef enum crimage_status {
  CRIMAGE_OK = 0,
  CRIMAGE_CANCELLED = 1,
  CRIMAGE_UNKNOWN = 2,
  CRIMAGE_INVALID_ARGUMENT = 3,
  CRIMAGE_DEADLINE_EXCEEDED = 4,
  CRIMAGE_NOT_FOUND = 5,
  CRIMAGE_ALREADY_EXISTS = 6,
  CRIMAGE_PERMISSION_DENIED = 7,
  CRIMAGE_RESOURCE_EXHAUSTED = 8,
  CRIMAGE_FAILED_PRECONDITION = 9,
  CRIMAGE_ABORTED = 10,
  CRIMAGE_OUT_OF_RANGE = 11,
  CRIMAGE_UNIMPLEMENTED = 12,
  CRIMAGE_INTERNAL = 13,
  CRIMAGE_UNAVAILABLE = 14,
  CRIMAGE_DATA_LOSS = 15,
  CRIMAGE_UNAUTHENTICATED = 16,
} crimage_status;

typedef struct crimage_error {
  crimage_status status;
  int errnum;    /* errno behind the failure, 0 if none */
  char *message; /* human readable, with context; never holds a secret */
} crimage_error;

void crimage_error_free(crimage_error *err);
const char *crimage_status_name(crimage_status status);
const char *crimage_version(void);

/* Normalizes an image reference as kubelet and docker do ("busybox" -> "docker.io/library/busybox:latest").
 * default_registry NULL means "docker.io". */
int crimage_reference_normalize(const char *image, const char *default_registry, char **ret_normalized,
                                crimage_error **err);

#ifdef __cplusplus
}
#endif
#endif
