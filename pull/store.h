/* The content store: an OCI image layout under root (oci-layout, index.json, blobs/<alg>/<hex>), with an ingest area
 * for blobs being written, and image records keyed by (image, runtime handler). index.json is the durable record;
 * an in-memory index answers every query without touching the disk. Thread-safe. */
#ifndef CRIMAGE_PULL_STORE_H
#define CRIMAGE_PULL_STORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/error.h"

typedef struct store store;

/* A snapshot of one image record: a deep copy the caller owns. */
typedef struct store_image {
  char *handler;         /* runtime handler, "" for the default */
  char *id;              /* config digest, "sha256:..." */
  char *manifest_digest; /* the platform manifest stored */
  char *manifest_media_type;
  char **repo_tags;    /* NULL-terminated; normalized "name:tag" */
  char **repo_digests; /* NULL-terminated; "name@<digest pulled>" (the index or manifest digest) */
  char **layers;       /* NULL-terminated layer digests, in order */
  char **diff_ids;     /* NULL-terminated uncompressed digests of the layers (the config's rootfs.diff_ids); empty
                          for records made before they were kept */
  uint64_t size;       /* manifest + config + layers, as stored */
  char *user;          /* Config.User of the image config, "" if none */
  char *platform;      /* "os/arch[/variant]" an index was resolved for, "" for a lone manifest, NULL unknown */
  int64_t created_ns;  /* when recorded (ns since the epoch) */
  bool pinned;
} store_image;

/* A runtime handler as Kubernetes allows one in RuntimeClass.handler: "" (the default handler) or a DNS label
 * (RFC 1123: at most 63 of a-z, 0-9 and '-', starting and ending with a letter or digit). The store records and
 * loads only such handlers, and the image service accepts only such. */
#define STORE_HANDLER_MAX_LEN 63
bool store_handler_valid(const char *handler);

void store_image_free(store_image *img);
static inline void store_image_freep(store_image **img) { store_image_free(*img); }
#define cleanup_store_image __attribute__((cleanup(store_image_freep)))
void store_image_list_free(store_image **list, size_t n);

/* What the store keeps that no image references: the blobs a pull committed before it failed (or was interrupted),
 * its partial downloads in ingest/ and its unpacked layers, so that the next try resumes instead of downloading
 * again. Each is kept for retention after it was last written or used by a pull, and all of them together up to
 * max_bytes (the oldest go first); then the sweep of the store deletes them, without a restart. */
typedef struct store_options {
  int64_t unreferenced_retention_ms; /* 0 = none kept */
  uint64_t unreferenced_max_bytes;   /* 0 = none kept */
} store_options;
#define STORE_DEFAULT_RETENTION_MS ((int64_t) 60 * 60 * 1000)  /* 1h */
#define STORE_DEFAULT_UNREFERENCED_MAX_BYTES ((uint64_t) 4 << 30) /* 4 GiB */

/* Opens (creating if needed) the store at root and loads index.json. Leftover temporary files from a crash are
 * removed; unreferenced content is swept as store_options says (the unpacked layers wait for store_sweep, which
 * knows the keeper). opts NULL: the defaults above. */
int store_open_opts(const char *root, const store_options *opts, store **ret, crimage_error **err);
int store_open(const char *root, store **ret, crimage_error **err);
void store_close(store *s);
const char *store_root(const store *s);

/* ---- blobs ---- */
/* True when the blob is present (and verified: only verified blobs are ever in blobs/); size optional. */
bool store_blob_exists(store *s, const char *digest, uint64_t *ret_size);
/* The path of a stored blob (caller frees). */
char *store_blob_path(store *s, const char *digest);
/* Reads a whole stored blob of at most max bytes. */
int store_blob_read(store *s, const char *digest, size_t max, char **ret_data, size_t *ret_len, crimage_error **err);
/* Verifies data against digest and stores it (no-op when present). */
int store_blob_put(store *s, const char *digest, const void *data, size_t len, crimage_error **err);

/* An ingest writes one blob incrementally. The partial file lives in <root>/ingest/ named by digest and survives a
 * restart; begin reopens it, re-hashes what is there and reports the offset to resume from. Only one ingest of a
 * digest runs at a time (a file lock); a second begin waits for the first (or returns -EEXIST with the blob
 * present, i.e. the other writer finished it). */
typedef struct store_ingest store_ingest;
int store_ingest_begin(store *s, const char *digest, int64_t expected_size, store_ingest **ret, crimage_error **err);
/* The same, with the wait for another writer polled (every 20 ms) and abandoned with CANCELLED (-ECANCELED) when
 * cancelled(userdata) turns true. */
typedef bool (*store_cancelled_fn)(void *userdata);
int store_ingest_begin_cancellable(store *s, const char *digest, int64_t expected_size, store_cancelled_fn cancelled,
                                   void *userdata, store_ingest **ret, crimage_error **err);
uint64_t store_ingest_offset(const store_ingest *in);
int store_ingest_write(store_ingest *in, const void *data, size_t len, crimage_error **err);
/* Throws away what was written so far (e.g. a server ignored a Range request and resent from 0). */
int store_ingest_truncate(store_ingest *in, crimage_error **err);
/* Passes the bytes already in the ingest (a resumed partial: [0, offset)) to fn in order, so a caller that derives
 * something from the whole stream (the uncompressed digest of a layer) can catch up before writing resumes. */
typedef int (*store_ingest_replay_fn)(void *userdata, const void *data, size_t len, crimage_error **err);
int store_ingest_replay(store_ingest *in, store_ingest_replay_fn fn, void *userdata, crimage_error **err);
/* Checks size and digest, fsyncs and renames into blobs/. On mismatch the partial file is deleted and the error is
 * DATA_LOSS. Frees the ingest either way. */
int store_ingest_commit(store_ingest *in, crimage_error **err);
/* Stops; keep_partial keeps the bytes for a later resume (an empty file is removed all the same). Frees the
 * ingest. */
void store_ingest_abort(store_ingest *in, bool keep_partial);

/* ---- image records ---- */
typedef struct store_record {
  const char *handler;   /* "" default */
  const char *name;      /* normalized repository name, "docker.io/library/busybox" */
  const char *tag;       /* NULL when pulled by digest only */
  const char *repo_digest; /* the digest the pull resolved (index or manifest) */
  const char *manifest_digest;
  const char *manifest_media_type;
  uint64_t manifest_size;
  const char *config_digest; /* = image id */
  const char *const *layers; /* NULL-terminated */
  const char *const *diff_ids; /* NULL-terminated, one per layer; NULL = not known. The unpacked layer directories
                                  of these stay as long as the record does */
  uint64_t size;             /* total bytes of manifest + config + layers */
  const char *user;
  /* The platform (platform_string of the normalized request) an index was resolved for; "" when the reference named
   * a lone manifest (any platform gets the same image); NULL unknown. The `Always` fast path reuses a stored image
   * only for the same platform. */
  const char *platform;
} store_record;

/* Records that (name:tag | name@repo_digest, handler) is the image described. A tag that pointed to another image
 * for this handler moves (the other image keeps its other names). Every referenced blob must be present. The
 * change is durable (index.json rewritten atomically) before it is visible. */
int store_record_image(store *s, const store_record *rec, crimage_error **err);

/* Finds an image for handler by: full id ("sha256:<hex>"), bare hex id or a unique id prefix (at least 3 hex
 * digits), an exact normalized repo tag ("docker.io/library/busybox:latest") or repo digest
 * ("docker.io/library/busybox@sha256:..."). Returns 1 and *ret when found, 0 when absent, negative on error (an
 * ambiguous prefix is INVALID_ARGUMENT). */
int store_find_image(store *s, const char *handler, const char *key, store_image **ret, crimage_error **err);
/* Lists the images of handler (NULL: of every handler). */
int store_list_images(store *s, const char *handler, store_image ***ret, size_t *ret_n, crimage_error **err);
/* Removes the record (id) for handler with all its names, then deletes blobs no remaining record references.
 * Returns 0 also when absent (idempotent). */
int store_remove_image(store *s, const char *handler, const char *id, crimage_error **err);

/* ---- unpacked layers ----
 * A layer unpacked for overlayfs lives in <root>/layers/<alg>/<hex of its diff_id>, shared by every image (of any
 * handler) whose record lists that diff_id, and removed with the last of them, unless a keeper still uses it. */

/* The directory of the layer with this diff_id (caller frees); NULL for an invalid digest. */
char *store_layer_path(store *s, const char *diff_id);
/* The directory holding the layer directories of one algorithm (<root>/layers/sha256), created at open. */
const char *store_layers_dir(const store *s);
bool store_layer_exists(store *s, const char *diff_id);
/* A keeper says whether a layer directory is still in use outside the records (a snapshot containerd has): such a
 * layer is not deleted when its last record goes. Called with the store's write lock held: it must not call back
 * into the store. */
typedef bool (*store_layer_keeper_fn)(void *userdata, const char *dir);
void store_set_layer_keeper(store *s, store_layer_keeper_fn fn, void *userdata);

/* A pull holds the store from before it checks which blobs are present until it has recorded the image (or
 * failed). While any hold is active the blob deletions of store_remove_image (and of a re-record) are deferred to
 * the release of the last hold, so a concurrent removal never deletes a shared layer a pull has just decided not to
 * download. Holds nest and count; every store_hold needs one store_release of what it returned. */
typedef struct store_holder store_holder;
store_holder *store_hold(store *s);
void store_release(store_holder *h); /* NULL is fine */
/* The holder relies on digest (a blob, a partial download, or the unpacked layer of a diff_id): the sweep of
 * unreferenced content leaves it alone while h is held, and its retention starts again. Pin before looking at
 * whether it is there. */
void store_pin(store_holder *h, const char *digest);

/* One sweep of unreferenced content (see store_options): blobs no record references, partial ingests no writer
 * holds (an empty one at once), unpacked layers no record lists and no keeper uses (left by a crash between
 * unpacking and recording, or by a removal while a keeper still used them), unless a holder pinned them or a
 * deferred removal waits for them. Content pinned by running pulls does not count against the size limit. Call it
 * once the keeper is set. */
void store_sweep(store *s);
/* Sweeps now, then on a thread of the store until store_close: every minute (or a quarter of the retention, at
 * least every second) and soon after a hold is released, at most once a second. Call it once the keeper is set. */
int store_start_sweeper(store *s, crimage_error **err);

/* Usage of the store: bytes and inodes used under root, and the mount point that holds root. */
typedef struct store_usage {
  char *mountpoint;
  uint64_t used_bytes;
  uint64_t inodes_used;
  int64_t timestamp_ns;
} store_usage;
int store_get_usage(store *s, store_usage *ret, crimage_error **err);
void store_usage_clear(store_usage *u);

#endif
