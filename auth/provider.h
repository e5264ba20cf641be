/* kubelet's exec credential providers: a CredentialProviderConfig (kubelet.config.k8s.io/v1, YAML or JSON) lists
 * plugins, each an executable <bin dir>/<name> run for the images its matchImages patterns match. The plugin reads
 * a CredentialProviderRequest on stdin and prints a CredentialProviderResponse whose `auth` map (match pattern ->
 * username/password) becomes credentials, cached per image, registry or globally for the response's duration.
 * Concurrent requests for the same image share one run of the plugin. */
#ifndef CRIMAGE_AUTH_PROVIDER_H
#define CRIMAGE_AUTH_PROVIDER_H

#include <stddef.h>
#include <stdint.h>

#include "auth/keyring.h"
#include "common/error.h"

#define PROVIDER_MAX_CONFIG_SIZE (1024 * 1024)
#define PROVIDER_MAX_RESPONSE_SIZE (1024 * 1024)
/* What parsing a CredentialProviderConfig or a plugin's response may build (json_limits); a response holds
 * secrets. */
#define PROVIDER_CONFIG_JSON_LIMITS JSON_LIMITS(8u << 20, 1024)
#define PROVIDER_RESPONSE_JSON_LIMITS JSON_LIMITS_QUIET(8u << 20, KEYRING_MAX_ENTRIES)
#define PROVIDER_MAX_STDERR 2048
#define PROVIDER_DEFAULT_TIMEOUT_MS 60000
#define PROVIDER_MAX_CACHE_ENTRIES 1024

typedef struct provider_set provider_set;

/* Parses and validates a config as kubelet does (at least one provider; names unique, without '/' or spaces, not
 * "." or ".."; a supported apiVersion; at least one valid matchImages pattern; defaultCacheDuration present and
 * not negative) and checks that every plugin exists in bin_dir. timeout_ms <= 0 means one minute. */
int provider_set_parse(const char *data, size_t len, const char *what, const char *bin_dir, int64_t timeout_ms,
                       provider_set **ret, crimage_error **err);
int provider_set_load(const char *config_path, const char *bin_dir, int64_t timeout_ms, provider_set **ret,
                      crimage_error **err);
void provider_set_free(provider_set *ps);
size_t provider_set_size(const provider_set *ps);

/* Adds to k the credentials of every provider whose matchImages match image (normalized name without tag or
 * digest), in config order, from the cache or by running the plugin. A plugin that fails contributes nothing: the
 * others still run, and the first failure is returned (with *err set; it names the provider and includes the
 * plugin's stderr, never its stdout). */
int provider_set_provide(provider_set *ps, const char *image, keyring *k, crimage_error **err);

/* What the provider at index of ps makes of a plugin's stdout (out, len): the keyring of its response, checked as
 * provider_set_provide does (kind, apiVersion, cacheKeyType, cacheDuration, auth), without caching it; for tests
 * and fuzzing. */
int provider_set_parse_response(provider_set *ps, size_t index, const char *out, size_t len, keyring **ret,
                                crimage_error **err);

/* How many callers are currently running or waiting for a plugin run for image, over all providers (a test hook
 * to prove that concurrent identical requests share one run). */
size_t provider_set_pending(provider_set *ps, const char *image);

#endif
