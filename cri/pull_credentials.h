/* The credentials crimaged finds itself for a PullImage that carries none (crictl, pre-pulls, the CLI without
 * --creds), as kubelet would: Secrets from a directory of manifests first, then the node's docker config together
 * with the exec credential providers, then docker credential helpers. Each candidate is tried in turn until one
 * works; only when none matched does the pull go anonymous. */
#ifndef CRIMAGE_CRI_PULL_CREDENTIALS_H
#define CRIMAGE_CRI_PULL_CREDENTIALS_H

#include <stdint.h>

#include "auth/credential.h"
#include "common/error.h"
#include "pull/reference.h"

/* Longest part of one failure message kept in the combined error. */
#define PULL_CREDENTIALS_MAX_FAILURE 1024
/* Longest combined error message. */
#define PULL_CREDENTIALS_MAX_MESSAGE (16 * 1024)

typedef struct pull_credentials_options {
  char *const *docker_config_paths; /* NULL or empty = kubelet's search order */
  const char *kubelet_root_dir;     /* NULL = /var/lib/kubelet */
  const char *provider_config;      /* NULL or "" = no exec credential providers */
  const char *provider_bin_dir;
  int64_t provider_timeout_ms;      /* <= 0: one minute */
  const char *secrets_dir;          /* NULL or "" = no Secrets */
} pull_credentials_options;

typedef struct pull_credentials pull_credentials;

/* Fails when the credential provider config is invalid. */
int pull_credentials_new(const pull_credentials_options *o, pull_credentials **ret, crimage_error **err);
void pull_credentials_free(pull_credentials *pc);

/* Appends the candidates for ref, in the order to try them. Thread-safe. */
int pull_credentials_resolve(pull_credentials *pc, const image_ref *ref, credential_list *ret, crimage_error **err);

/* One pull with one credential (NULL = anonymous). */
typedef int (*pull_attempt_fn)(void *userdata, const credential *cred, void **ret_result, crimage_error **err);

/* Runs fn once anonymously when cands is empty, else with each candidate in order until one succeeds. A CANCELLED
 * attempt ends the sequence with its error. When every candidate fails, the error lists each failure with a
 * description of the credential (source and username, never a secret) and carries the last failure's status. */
int pull_credentials_try(const credential_list *cands, pull_attempt_fn fn, void *userdata, void **ret_result,
                         crimage_error **err);

#endif
