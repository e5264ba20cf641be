/* Docker credential helpers: `docker-credential-<name> get` reads a server URL on stdin and prints
 * {"ServerURL": ..., "Username": ..., "Secret": ...}; a Username of "<token>" means Secret is an identity token. */
#ifndef CRIMAGE_AUTH_CREDHELPER_H
#define CRIMAGE_AUTH_CREDHELPER_H

#include <stdint.h>

#include "auth/credential.h"
#include "common/error.h"

#define CREDHELPER_MAX_OUTPUT (64 * 1024)
/* Its output is one flat object holding a secret (json_limits). */
#define CREDHELPER_JSON_LIMITS JSON_LIMITS_QUIET(1u << 20, 64)
#define CREDHELPER_DEFAULT_TIMEOUT_MS 30000

/* The server URL docker hands a helper for a registry host[:port]: Docker Hub is "https://index.docker.io/v1/",
 * anything else the host itself. */
char *credhelper_server_url(const char *registry_host);
/* Runs docker-credential-<helper> (looked up in dir, or $PATH when dir is NULL) for registry_host. *ret is the
 * credential (source "credential helper docker-credential-<helper>") or NULL when the helper has none for that
 * server (not an error). */
int credhelper_get(const char *helper, const char *dir, const char *registry_host, int64_t timeout_ms, credential **ret,
                   crimage_error **err);
/* What credhelper_get makes of a helper's stdout (out, len) for registry_host: a credential, or NULL when it holds
 * none. name is the helper's executable name, for messages (which never quote the output). */
int credhelper_parse_output(const char *name, const char *registry_host, const char *out, size_t len,
                            credential **ret, crimage_error **err);

#endif
