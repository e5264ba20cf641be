/* Kubernetes image pull Secrets as keyrings: manifests (YAML or JSON) of type kubernetes.io/dockerconfigjson (key
 * .dockerconfigjson = {"auths": {...}}) or kubernetes.io/dockercfg (key .dockercfg = the bare map), values base64
 * in `data` or plain in `stringData`. One keyring per Secret, in the order given; its credentials' source is
 * "secret <namespace>/<name>". */
#ifndef CRIMAGE_AUTH_SECRETS_H
#define CRIMAGE_AUTH_SECRETS_H

#include <json-c/json.h>
#include <stddef.h>

#include "auth/keyring.h"
#include "common/error.h"

#define SECRETS_MAX_FILE_SIZE (4 * 1024 * 1024)
#define SECRETS_MAX_COUNT 1024
/* What parsing a file of Secrets may build (json_limits, all its documents together): a kubectl-made Secret takes
 * about 5 KiB of tree beside its payload, so SECRETS_MAX_COUNT of them fit in 16 MiB; quiet: they hold secrets. */
#define SECRETS_JSON_LIMITS JSON_LIMITS_QUIET(16u << 20, KEYRING_MAX_ENTRIES)

/* One Secret object. what names the input in errors. */
int secret_to_keyring(json_object *secret, const char *what, keyring **ret, crimage_error **err);
/* A YAML/JSON stream: one or several documents ("---"), each a Secret or a List (kind List / SecretList with
 * `items`) of Secrets. Any bad Secret fails the whole input with an error naming it. */
int secrets_parse(const char *data, size_t len, const char *what, keyring ***ret, size_t *ret_n, crimage_error **err);
int secrets_load_file(const char *path, keyring ***ret, size_t *ret_n, crimage_error **err);
/* Every *.yaml, *.yml and *.json regular file of dir (hidden files skipped), in sorted name order. */
int secrets_load_dir(const char *dir, keyring ***ret, size_t *ret_n, crimage_error **err);

/* A directory of Secret manifests, reloaded when its content changes (names, sizes or mtimes). Thread-safe. */
typedef struct secret_dir secret_dir;
secret_dir *secret_dir_new(const char *path);
void secret_dir_free(secret_dir *d);
/* The current keyrings (new references: free with keyring_array_free); a missing directory means none. When a
 * reload fails, the previous keyrings are returned, the failure is logged and also put in *err (if err is non-NULL)
 * for the caller to report, and the return value is still 0. */
int secret_dir_get(secret_dir *d, keyring ***ret, size_t *ret_n, crimage_error **err);

#endif
