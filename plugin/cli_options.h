/* Option helpers of the crimage command, kept apart from cli.c so unit tests can call them. */
#ifndef CRIMAGE_PLUGIN_CLI_OPTIONS_H
#define CRIMAGE_PLUGIN_CLI_OPTIONS_H

#include <stdbool.h>
#include <stddef.h>

#define CLI_DEFAULT_SOCKET "/run/crimage/crimage.sock"
#define CLI_SOCKET_ENV "CRIMAGE_SOCKET"
/* Longest secret read from stdin (--password-stdin). */
#define CLI_MAX_SECRET 4096

typedef enum cli_output {
  CLI_OUTPUT_DEFAULT, /* what the verb prints by default */
  CLI_OUTPUT_TABLE,
  CLI_OUTPUT_JSON,
} cli_output;

/* "table" or "json"; returns 0 or -EINVAL. */
int cli_parse_output(const char *s, cli_output *ret);
/* The socket to use: the flag, else the environment value, else the packaged default. Empty values count as
 * unset. */
const char *cli_socket_path(const char *flag, const char *env);
/* Splits "user:password" on the first ':' (the password may contain ':'). Returns -EINVAL when there is no ':' or
 * the user is empty. The password copy must be freed with secret_free. */
int cli_parse_creds(const char *s, char **ret_user, char **ret_password);
/* Copies a secret given as a command-line argument and overwrites the argument in place, so it neither stays in
 * memory nor shows in /proc/<pid>/cmdline longer than needed. */
char *cli_take_secret(char *arg);
/* Reads one line (the trailing newline dropped) of at most CLI_MAX_SECRET bytes from fd. Returns 0, -EINVAL when
 * empty, -E2BIG when too long, or another negative errno. Free with secret_free. */
int cli_read_secret(int fd, char **ret);

#endif
