/* Hands crimage's images to CRI-O (and podman, buildah: the same containers/storage library) through a
 * containers-storage tree they read as an additional image store (storage.conf `additionalimagestores`, CRI-O's
 * `overlay.imagestore`): the overlay driver's layout, written in containers/storage's own formats, read-only to
 * them. The layers are crimage's unpacked layer directories themselves: each layer's `diff` is a symlink to one, so
 * nothing is extracted twice. crimage owns the tree: it holds exactly the images of the records given to it. */
#ifndef CRIMAGE_CRI_CONTAINERS_STORAGE_CSTORAGE_H
#define CRIMAGE_CRI_CONTAINERS_STORAGE_CSTORAGE_H

#include <stdbool.h>
#include <stddef.h>

#include "common/error.h"
#include "pull/store.h"

typedef struct cstorage cstorage;

/* Opens (creating) the tree at root: overlay-images/, overlay-layers/ with their lock files, overlay/l/. One
 * crimaged at a time writes a tree (a lock of its own, <root>/crimage.lock): a second is FAILED_PRECONDITION. */
int cstorage_open(const char *root, cstorage **ret, crimage_error **err);
void cstorage_free(cstorage *cs);
const char *cstorage_root(const cstorage *cs);

/* An image record and the store that holds its manifest, config and unpacked layers. */
typedef struct cstorage_source {
  store *st;
  const store_image *img;
} cstorage_source;

/* Makes the tree hold exactly these images: one image per ID, named by the repo tags of its records (and by
 * name@digest for a repository pulled by digest only); a name claimed by two images goes to the newer record.
 * Layers come first, then images.json, then what is no longer used goes; each file is replaced atomically under
 * containers/storage's lock with its last-writer marker renewed, so a reader sees the old state or the new one,
 * also after a crash. A record that cannot be in the tree (its layers are not unpacked) is left out with a warning,
 * and is the error when it is required_id's (an image ID; NULL: none required); the others are written all the
 * same. Returns the number of images and layers added or removed. */
int cstorage_sync(cstorage *cs, const cstorage_source *src, size_t n, const char *required_id, crimage_error **err);

/* Whether a layer directory of crimage's is the content of a layer of the tree (a store_layer_keeper_fn). Never
 * waits for a running cstorage_sync. */
bool cstorage_layer_in_use(cstorage *cs, const char *dir);

#endif
