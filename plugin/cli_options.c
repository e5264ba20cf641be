#include <errno.h>

#include "cli_options.h"
#include "common/util.h"

int cli_parse_output(const char *s, cli_output *ret)
{
  if (streq_ptr(s, "table"))
    *ret = CLI_OUTPUT_TABLE;
  else if (streq_ptr(s, "json"))
    *ret = CLI_OUTPUT_JSON;
  else
    return -EINVAL;
  return 0;
}

const char *cli_socket_path(const char *flag, const char *env)
{
  if (!str_empty(flag))
    return flag;
  if (!str_empty(env))
    return env;
  return CLI_DEFAULT_SOCKET;
}

int cli_parse_creds(const char *s, char **ret_user, char **ret_password)
{
  if (!s)
    return -EINVAL;
  const char *colon = strchr(s, ':');
  if (!colon || colon == s)
    return -EINVAL;
  *ret_user = xstrndup(s, (size_t) (colon - s));
  *ret_password = xstrdup(colon + 1);
  return 0;
}

char *cli_take_secret(char *arg)
{
  if (!arg)
    return NULL;
  char *copy = xstrdup(arg);
  explicit_bzero(arg, strlen(arg));
  return copy;
}

int cli_read_secret(int fd, char **ret)
{
  /* Byte by byte so nothing past the first line is consumed, and no stdio buffer keeps a copy. */
  char *buf = xmalloc(CLI_MAX_SECRET + 1);
  size_t n = 0;
  for (;;) {
    char ch;
    ssize_t r = read(fd, &ch, 1);
    if (r < 0 && errno == EINTR)
      continue;
    if (r < 0) {
      int e = errno;
      explicit_bzero(buf, n);
      free(buf);
      return -e;
    }
    if (r == 0 || ch == '\n')
      break;
    if (n == CLI_MAX_SECRET) {
      explicit_bzero(buf, n);
      free(buf);
      return -E2BIG;
    }
    buf[n++] = ch;
  }
  if (n > 0 && buf[n - 1] == '\r')
    n--;
  buf[n] = '\0';
  if (n == 0) {
    free(buf);
    return -EINVAL;
  }
  *ret = buf;
  return 0;
}
