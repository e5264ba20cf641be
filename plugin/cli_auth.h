/* The CLI's side of registry credentials: `crimage pull --secret FILE...` (image pull Secrets mapped to one
 * PullImage per candidate credential, as kubelet sends them) and `crimage auth` (the candidates for an image, with
 * their source and user name, never a secret). */
#ifndef CRIMAGE_PLUGIN_CLI_AUTH_H
#define CRIMAGE_PLUGIN_CLI_AUTH_H

#include <stdbool.h>

#include "auth/credential.h"
#include "common/error.h"
#include "crimage.h"

/* The candidates the Secrets in files (each a YAML/JSON stream of Secrets, in order) hold for image, in kubelet's
 * order; identical credentials are kept once. */
int cli_auth_secret_candidates(char *const *files, const char *image, credential_list *ret, crimage_error **err);

/* One PullImage with one credential (NULL = none). */
typedef int (*cli_pull_fn)(void *userdata, const crimage_auth *auth, char **ret_ref, crimage_error **err);

/* Calls fn with each candidate of the Secrets in files, in order, until one works (each failure is reported on
 * stderr as it happens); with no candidate, once without credentials. When all fail, *err lists every failure and
 * carries the last one's status. */
int cli_auth_pull(char *const *files, const char *image, const char *what, cli_pull_fn fn, void *userdata,
                  char **ret_ref, crimage_error **err);

/* `crimage auth IMAGE [--secret FILE...] [--docker-config PATH...] [--provider-config FILE --provider-bin-dir DIR]`:
 * argv[0] is the verb. json selects JSON output. Returns the exit code (0, 1, 2). */
int cli_auth_main(int argc, char **argv, bool json);

#endif
