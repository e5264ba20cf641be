/* The ordered list of candidate credentials for an image, built as kubelet builds it: the pod's Secrets first (one
 * keyring merged from all of them, in order), then the node keyring (the node's docker config file) together with
 * the exec credential providers' results (one keyring, kubelet's providersDockerKeyring), then the docker credential
 * helper the node config names for the registry. Identical credentials are kept once, at their first place. */
#ifndef CRIMAGE_AUTH_RESOLVER_H
#define CRIMAGE_AUTH_RESOLVER_H

#include <stddef.h>
#include <stdint.h>

#include "auth/credential.h"
#include "auth/keyring.h"
#include "common/error.h"

typedef struct auth_resolver_options {
  char *const *docker_config_paths; /* node docker config files, first valid wins; NULL = kubelet's search order */
  const char *kubelet_root_dir;     /* first place of the default search; NULL = /var/lib/kubelet */
  const char *provider_config;      /* CredentialProviderConfig file; NULL = no exec providers */
  const char *provider_bin_dir;     /* where the plugins are */
  int64_t provider_timeout_ms;      /* <= 0: one minute, as kubelet */
  const char *helper_dir;           /* where docker-credential-* helpers are; NULL = $PATH */
  int64_t helper_timeout_ms;        /* <= 0: 30 s */
} auth_resolver_options;

typedef struct auth_resolver auth_resolver;

/* Fails when the provider config is invalid; a missing or invalid docker config file is no error (the next one in
 * the search order is used, or none). */
int auth_resolver_new(const auth_resolver_options *o, auth_resolver **ret, crimage_error **err);
void auth_resolver_free(auth_resolver *r);
static inline void auth_resolver_freep(auth_resolver **r) { auth_resolver_free(*r); }
#define cleanup_auth_resolver __attribute__((cleanup(auth_resolver_freep)))

/* Thread-safe. image_name_normalized is the image without tag or digest ("docker.io/library/busybox");
 * registry_host its registry host[:port] (NULL = the first component of the name). Appends the candidates to ret
 * in the order to try them, each with its `source` and server_address = registry_host. A failing provider plugin
 * or credential helper is logged and skipped (as kubelet does); an empty result means "pull anonymously". The node
 * docker config is reread when its files change. */
int auth_resolve(auth_resolver *r, const char *image_name_normalized, const char *registry_host, keyring **secrets,
                 size_t n_secrets, credential_list *ret, crimage_error **err);

#endif
