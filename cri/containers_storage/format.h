/* containers/storage's on-disk conventions the tree must follow to be read as its own: lock files with their
 * last-writer marker, layer IDs, big-data file names, the overlay driver's short link names and Go's time format. */
#ifndef CRIMAGE_CRI_CONTAINERS_STORAGE_FORMAT_H
#define CRIMAGE_CRI_CONTAINERS_STORAGE_FORMAT_H

#include <stdbool.h>
#include <stdint.h>

#include "common/error.h"

#define CS_ID_LEN 64        /* hex of a sha256 */
#define CS_LINK_LEN 26      /* the overlay driver's short names under overlay/l/ */
#define CS_LAST_WRITER_LEN 64

/* A containers/storage lock file (images.lock, layers.lock): an fcntl write lock on the whole file while the store
 * changes, and at offset 0 a 64-byte last-writer marker (time, counter, pid, random bytes) that is renewed with
 * every change; readers that see another marker than they last read reload the store. */
typedef struct cs_lock {
  int fd;
} cs_lock;
/* Opens path (creating it with a first marker). */
int cs_lock_open(const char *path, cs_lock *ret, crimage_error **err);
void cs_lock_close(cs_lock *l);
/* Waits for the write lock (readers hold read locks only briefly). */
int cs_lock_acquire(cs_lock *l, crimage_error **err);
/* Writes a new marker; with the lock held. */
int cs_lock_touch(cs_lock *l, crimage_error **err);
void cs_lock_release(cs_lock *l);

/* The ID of a layer as containers/image gives it when it stores an image: the diff_id's hex for a base layer, else
 * the hex of sha256("<parent ID>+<diff_id hex>"). out: CS_ID_LEN + 1 bytes. */
void cs_layer_id(const char *parent_id, const char *diff_id, char *out);
/* The file name of an image's big-data item: the key itself when it is made of [0-9a-z.] only, else "=" and the
 * base64 of the key (caller frees). */
char *cs_big_data_file(const char *key);
/* A new short link name: CS_LINK_LEN characters of base32 (A-Z, 2-7) of random bytes. out: CS_LINK_LEN + 1. */
int cs_new_link(char *out, crimage_error **err);
/* ns since the epoch as Go's encoding/json writes a UTC time.Time (RFC 3339, nanoseconds without trailing zeros;
 * caller frees). */
char *cs_time_string(int64_t ns);
/* Whether s is an RFC 3339 time Go's time.Time reads ("2006-01-02T15:04:05[.frac](Z|±hh:mm)"). */
bool cs_time_valid(const char *s);

#endif
