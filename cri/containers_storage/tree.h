/* The writer's parts: what a tree is to hold, computed from crimage's records (want.c), and the overlay driver's
 * layer directories (layer_dir.c). */
#ifndef CRIMAGE_CRI_CONTAINERS_STORAGE_TREE_H
#define CRIMAGE_CRI_CONTAINERS_STORAGE_TREE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/error.h"
#include "common/json.h"
#include "cstorage.h"
#include "format.h"

typedef struct want_layer {
  char id[CS_ID_LEN + 1];
  char parent[CS_ID_LEN + 1]; /* "" for a base layer */
  char *diff_id;
  char *blob; /* the compressed blob's digest and size, as the manifest gives them */
  int64_t blob_size;
  int compression; /* containers/storage's archive.Compression: 0 none, 2 gzip, 4 zstd */
  char *target;    /* crimage's unpacked layer directory */
  char link[CS_LINK_LEN + 1];
  char *lower; /* the overlay driver's lower file: the parents' links, nearest first; NULL for a base layer */
  int64_t created_ns;
  json_object *measured; /* diff-size, uidset and gidset, as measured when the layer entered the tree */
} want_layer;

typedef struct want_image {
  char id[CS_ID_LEN + 1];
  char *digest;
  char **names;
  char top[CS_ID_LEN + 1];
  char *created;
  char *manifest;
  size_t manifest_len;
  char *manifest_digest;
  char *config;
  size_t config_len;
  char *config_digest;
  int64_t record_ns;
} want_image;

typedef struct want {
  want_layer *layers;
  size_t n_layers;
  want_image *images;
  size_t n_images;
} want;

void want_clear(want *w);
want_layer *want_find_layer(want *w, const char *id);
want_image *want_find_image(want *w, const char *id);
/* Adds the image of one record (its layers first, base first), or says why it cannot be in the tree. */
int want_add(want *w, const cstorage_source *s, crimage_error **err);
/* Takes every name claimed by two images from the older record's (containers/storage refuses a store in which two
 * images share a name) and orders the images by ID. */
void want_settle(want *w);

/* Whether overlay/<id> is the complete layer l is to be; its link name and age go into l then. */
bool layer_dir_complete(int driver_fd, int links_fd, want_layer *l);
/* Makes overlay/<id> and its short link, as the overlay driver's create() leaves a layer. */
int layer_dir_create(int driver_fd, int links_fd, want_layer *l, crimage_error **err);
/* diff-size, uidset and gidset of a layer directory, measured. */
json_object *layer_measure(const char *dir);
/* The same, as layers.json (old_layers) already holds them for id; NULL when it does not. */
json_object *layer_measured_before(json_object *old_layers, const char *id);

#endif
