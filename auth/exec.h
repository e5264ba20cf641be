/* Runs a credential program (a kubelet credential-provider plugin or a docker credential helper): input on stdin,
 * bounded stdout and stderr, a deadline after which the program and its process group are killed. */
#ifndef CRIMAGE_AUTH_EXEC_H
#define CRIMAGE_AUTH_EXEC_H

#include <stddef.h>
#include <stdint.h>

#include "common/error.h"

typedef struct auth_exec_options {
  const char *path;  /* executable to run */
  char *const *argv; /* argv[0] included; NULL = {path} */
  char *const *env;  /* "NAME=value" entries added to (and overriding) the host environment; may be NULL */
  const char *input; /* written to stdin, then stdin is closed */
  size_t input_len;
  int64_t timeout_ms; /* <= 0: one minute */
  size_t max_stdout;  /* more is an error */
  size_t max_stderr;  /* more is dropped */
} auth_exec_options;

typedef struct auth_exec_result {
  char *out; /* stdout, NUL-terminated; holds secrets: wipe it (secret_free) */
  size_t out_len;
  char *err;       /* stderr, NUL-terminated, control characters replaced, possibly truncated */
  int exit_status; /* exit code, or 128 + signal */
} auth_exec_result;

void auth_exec_result_clear(auth_exec_result *r);
/* Runs the program to completion. Fails when it cannot start, times out (DEADLINE_EXCEEDED) or writes too much;
 * a non-zero exit is not a failure here (see exit_status). Error messages never include stdout. */
int auth_exec(const auth_exec_options *o, auth_exec_result *ret, crimage_error **err);

#endif
