/* A docker keyring as kubelet builds it: match patterns (normalized docker config keys) with their credentials,
 * plus the docker credential-helper settings of the config.json it came from.
 *
 * Lookup walks the keys in reverse sorted order (longer, more specific keys first) and returns every credential
 * whose key matches; when none does and the image is on Docker Hub, the `index.docker.io` entry is used.
 * A keyring is immutable once built and shared between threads by reference counting. */
#ifndef CRIMAGE_AUTH_KEYRING_H
#define CRIMAGE_AUTH_KEYRING_H

#include <json-c/json.h>
#include <stdbool.h>
#include <stddef.h>

#include "auth/credential.h"
#include "common/error.h"

/* Largest docker config file or Secret payload accepted, and most entries in one. */
#define KEYRING_MAX_FILE_SIZE (1024 * 1024)
#define KEYRING_MAX_ENTRIES 4096
/* What parsing a docker config may build (json_limits): a map of at most KEYRING_MAX_ENTRIES registries, 8 MiB of
 * tree; errors never quote it (it holds secrets). */
#define KEYRING_JSON_LIMITS JSON_LIMITS_QUIET(8u << 20, KEYRING_MAX_ENTRIES)

typedef struct keyring keyring;

keyring *keyring_new(void);
keyring *keyring_ref(keyring *k);
/* Drops a reference; the last one wipes the credentials. NULL is fine. */
void keyring_unref(keyring *k);
static inline void keyring_unrefp(keyring **k) { keyring_unref(*k); }
#define cleanup_keyring __attribute__((cleanup(keyring_unrefp)))
/* Unrefs n keyrings and frees the array. */
void keyring_array_free(keyring **v, size_t n);

/* Adds a credential (copied; its source replaced by source when source is non-NULL) under a docker config key,
 * which is normalized with auth_config_key_normalize. Returns 0 or -EINVAL for a key without a host. */
int keyring_add(keyring *k, const char *key, const credential *c, const char *source);
/* Adds a docker config map {"<key>": {"auth": "...", "username": ..., ...}, ...}: the `auths` object of a
 * config.json, the content of a .dockercfg, a Secret's payload or a provider response. Entries carrying no
 * credential are skipped. what names the input in errors. */
int keyring_add_config(keyring *k, json_object *map, const char *source, const char *what, crimage_error **err);
/* Adds every entry of another keyring, in its insertion order. */
void keyring_add_keyring(keyring *k, const keyring *from);

/* Parses a config.json document ({"auths": {...}, "credHelpers": {...}, "credsStore": "..."}). */
int keyring_add_docker_config_json(keyring *k, const char *data, size_t len, const char *source, const char *what,
                                   crimage_error **err);
/* Parses a legacy .dockercfg document (the bare map). */
int keyring_add_dockercfg(keyring *k, const char *data, size_t len, const char *source, const char *what,
                          crimage_error **err);
/* Loads one file; a name ending in ".dockercfg" is read as the legacy format, anything else as config.json. The
 * credentials' source is "config.json <path>" or ".dockercfg <path>". */
int keyring_load_file(const char *path, keyring **ret, crimage_error **err);

/* kubelet's node search: for each name in {config.json, .dockercfg}, in this order, each directory of
 * {kubelet_root_dir (NULL = /var/lib/kubelet), the working directory, $HOME/.docker, /.docker} (for .dockercfg:
 * $HOME and / instead of the .docker dirs); the first file that exists and parses wins. Fills a NULL-terminated
 * list of the paths tried. */
char **keyring_node_search_paths(const char *kubelet_root_dir);
/* Loads the first valid file of paths (NULL = keyring_node_search_paths(NULL)). When none is valid, returns an
 * empty keyring (not an error): a node without credentials pulls anonymously. ret_path (optional) gets the file
 * used or NULL. */
int keyring_load_node(char *const *paths, keyring **ret, char **ret_path);

/* Appends copies of every match for image (normalized name without tag or digest) to ret, most specific first.
 * Returns the number added. */
size_t keyring_lookup(const keyring *k, const char *image, credential_list *ret);
size_t keyring_size(const keyring *k);

/* The docker credential helper configured for a registry host[:port] in the config.json this keyring came from:
 * its credHelpers entry, else credsStore; NULL when none. */
const char *keyring_cred_helper(const keyring *k, const char *registry_host);
/* Where the config this keyring came from lives (for helper sources), may be NULL. */
const char *keyring_origin(const keyring *k);

#endif
