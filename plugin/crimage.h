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

/* Image pull policies as in a pod spec. */
typedef enum crimage_pull_policy {
  CRIMAGE_PULL_ALWAYS,
  CRIMAGE_PULL_IF_NOT_PRESENT,
  CRIMAGE_PULL_NEVER,
} crimage_pull_policy;
/* The policy Kubernetes applies when none is given: a digest -> IfNotPresent; ":latest" or no tag -> Always; any
 * other tag -> IfNotPresent. Fails with INVALID_ARGUMENT when image is not a valid reference. */
int crimage_pull_policy_default(const char *image, crimage_pull_policy *ret, crimage_error **err);
/* Parses "Always", "IfNotPresent" or "Never"; returns 0 or -EINVAL. */
int crimage_pull_policy_parse(const char *s, crimage_pull_policy *ret);
/* "Always", "IfNotPresent", "Never". */
const char *crimage_pull_policy_name(crimage_pull_policy p);

/* ---- Client of a CRI v1 ImageService (crimaged, or any other) on a unix socket. ----
 * A client is one gRPC channel; calls on it may run from several threads (but do not change its timeout while
 * calls run). Every call returns 0 or a negative errno with *err set; a gRPC failure keeps its status number in
 * err->status and the server's message. A NULL or "" runtime_handler selects the default handler. */
typedef struct crimage_client crimage_client;

/* One registry credential, as kubelet sends it in PullImageRequest.auth. NULL fields are sent empty. */
typedef struct crimage_auth {
  const char *username;
  const char *password;
  const char *auth; /* base64("user:password") */
  const char *server_address;
  const char *identity_token;
  const char *registry_token;
} crimage_auth;

typedef struct crimage_image {
  char *id;             /* "sha256:<config digest>" */
  char **repo_tags;     /* NULL-terminated, never NULL: "name:tag" */
  char **repo_digests;  /* NULL-terminated, never NULL: "name@sha256:..." */
  uint64_t size;
  bool has_uid;         /* the image's user is numeric: uid holds it */
  int64_t uid;
  char *username;       /* the image's user when it is a name, else "" */
  bool has_spec;        /* the server returned an ImageSpec: */
  char *spec_image;     /*   its image ("" if none) */
  char *runtime_handler; /*  and runtime handler ("" if none) */
  bool pinned;
} crimage_image;

typedef struct crimage_fs_usage {
  char *mountpoint;
  uint64_t used_bytes;
  uint64_t inodes_used;
  int64_t timestamp_ns;
} crimage_fs_usage;

/* socket_path may carry a "unix://" or "unix:" prefix. Connecting is lazy: an absent daemon shows up as
 * CRIMAGE_UNAVAILABLE on the first call. */
int crimage_client_connect(const char *socket_path, crimage_client **ret, crimage_error **err);
void crimage_client_close(crimage_client *c);
/* Deadline of every following call, in milliseconds; 0 (the default) means none. */
void crimage_client_set_timeout(crimage_client *c, int64_t timeout_ms);
/* PullImage. auth and pod_uid may be NULL. ret_ref (may be NULL) gets the image ID the server returned. The packed
 * request is wiped from memory after sending. */
int crimage_client_pull(crimage_client *c, const char *image, const char *runtime_handler, const crimage_auth *auth,
                        const char *pod_uid, char **ret_ref, crimage_error **err);
/* ImageStatus. *ret is NULL when the image is absent (not an error). ret_info_json (may be NULL) gets the info
 * map as one JSON object: each key maps to its value, embedded as JSON when the value is a JSON document. */
int crimage_client_image_status(crimage_client *c, const char *image, const char *runtime_handler, bool verbose,
                                crimage_image **ret, char **ret_info_json, crimage_error **err);
/* ListImages; filter_image NULL or "" lists all. Free *ret with crimage_image_list_free(*ret, *ret_n). */
int crimage_client_list_images(crimage_client *c, const char *filter_image, const char *runtime_handler,
                               crimage_image ***ret, size_t *ret_n, crimage_error **err);
/* RemoveImage: idempotent, removing an absent image succeeds. */
int crimage_client_remove_image(crimage_client *c, const char *image, const char *runtime_handler,
                                crimage_error **err);
/* ImageFsInfo: the image filesystems, the main store first. Free with crimage_fs_usage_free(*ret, *ret_n). */
int crimage_client_fs_info(crimage_client *c, crimage_fs_usage **ret, size_t *ret_n, crimage_error **err);
void crimage_image_free(crimage_image *img);
void crimage_image_list_free(crimage_image **images, size_t n);
void crimage_fs_usage_free(crimage_fs_usage *usage, size_t n);

/* ---- Progress of pulls: crimaged's own service crimage.v1.PullProgress on the same socket. ---- */
typedef enum crimage_pull_state {
  CRIMAGE_PULL_QUEUED,
  CRIMAGE_PULL_RUNNING,
  CRIMAGE_PULL_SUCCEEDED,
  CRIMAGE_PULL_FAILED,
} crimage_pull_state;

typedef struct crimage_pull_blob {
  char *digest;
  uint64_t done;  /* bytes present so far */
  uint64_t total; /* the blob's size */
  bool finished;
} crimage_pull_blob;

typedef struct crimage_pull_status {
  uint64_t id;
  char *reference; /* normalized */
  char *runtime_handler;
  char *pod_uid;
  crimage_pull_state state;
  int64_t created_unix_ms; /* the first PullImage call for it */
  int64_t started_unix_ms; /* left the queue; 0 while queued */
  int64_t ended_unix_ms;   /* 0 while not over */
  uint64_t bytes_done;
  uint64_t bytes_total; /* 0 until the manifest is resolved */
  crimage_pull_blob *blobs;
  size_t n_blobs;
  unsigned waiters; /* PullImage calls waiting for it */
  char *error;      /* when failed, else "" */
} crimage_pull_status;

/* The pulls queued or running (with include_ended, also the last ones that ended), oldest first. Free with
 * crimage_pull_status_list_free(*ret, *ret_n). */
int crimage_client_list_pulls(crimage_client *c, bool include_ended, crimage_pull_status **ret, size_t *ret_n,
                              crimage_error **err);
/* Called for each update of a watched pull; return non-zero to stop watching. */
typedef int (*crimage_pull_watch_fn)(void *userdata, const crimage_pull_status *status);
/* Follows the pull of image for runtime_handler until it ends (the last update has state SUCCEEDED or FAILED) or
 * fn asks to stop; updates come on every change and at least once a second. NOT_FOUND when no such pull is queued
 * or running. */
int crimage_client_watch_pull(crimage_client *c, const char *image, const char *runtime_handler,
                              crimage_pull_watch_fn fn, void *userdata, crimage_error **err);
void crimage_pull_status_clear(crimage_pull_status *s);
void crimage_pull_status_list_free(crimage_pull_status *list, size_t n);

#ifdef __cplusplus
}
#endif
#endif
