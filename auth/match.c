#include <fnmatch.h>
#include <string.h>

#include "auth/match.h"
#include "common/util.h"

/* Splits a schemeless URL into host[:port] and path, as url.Parse("https://" + s) does, except that '?' is a glob
 * character of the host rather than the start of a query: the authority runs to the first '/'; userinfo before an
 * '@' is dropped. */
typedef struct url_parts {
  char *host; /* without port */
  char *port; /* "" when absent */
  char *path; /* "" when absent */
} url_parts;

static void url_parts_free(url_parts *u)
{
  free(u->host);
  free(u->port);
  free(u->path);
}

static void split_host_port(const char *authority, size_t len, url_parts *u)
{
  /* net.SplitHostPort: "[v6]:port", "host:port"; anything else (no colon, several colons) is all host. */
  const char *close = len > 0 && authority[0] == '[' ? memchr(authority, ']', len) : NULL;
  if (close && memchr(authority, ':', (size_t) (close - authority))) {
    /* An IPv6 literal, not a bracket expression; compared without its brackets. */
    size_t after = len - (size_t) (close + 1 - authority);
    u->host = xstrndup(authority + 1, (size_t) (close - authority - 1));
    u->port = after > 0 && close[1] == ':' ? xstrndup(close + 2, after - 1) : xstrdup("");
    return;
  } else {
    const char *colon = memchr(authority, ':', len);
    if (colon && !memchr(colon + 1, ':', len - (size_t) (colon + 1 - authority))) {
      u->host = xstrndup(authority, (size_t) (colon - authority));
      u->port = xstrndup(colon + 1, len - (size_t) (colon + 1 - authority));
      return;
    }
  }
  u->host = xstrndup(authority, len);
  u->port = xstrdup("");
}

static void url_split(const char *s, url_parts *u)
{
  size_t alen = strcspn(s, "/");
  const char *authority = s;
  const char *at = NULL;
  for (size_t i = 0; i < alen; i++)
    if (s[i] == '@')
      at = s + i;
  if (at) {
    alen -= (size_t) (at + 1 - s);
    authority = at + 1;
  }
  split_host_port(authority, alen, u);
  const char *rest = authority + alen;
  u->path = xstrdup(rest);
}

static size_t count_labels(const char *host)
{
  size_t n = 1;
  for (const char *p = host; *p; p++)
    if (*p == '.')
      n++;
  return n;
}

bool auth_url_match(const char *pattern, const char *image)
{
  if (!pattern || !image)
    return false;
  _cleanup_(url_parts_free) url_parts g = {0};
  _cleanup_(url_parts_free) url_parts t = {0};
  url_split(pattern, &g);
  url_split(image, &t);
  if (!streq(g.port, t.port))
    return false;
  if (count_labels(g.host) != count_labels(t.host))
    return false;
  if (!str_has_prefix(t.path, g.path))
    return false;
  /* Label by label, so that no wildcard can ever match a '.'. */
  char *gs = NULL, *ts = NULL;
  for (char *gl = strtok_r(g.host, ".", &gs), *tl = strtok_r(t.host, ".", &ts); gl || tl;
       gl = strtok_r(NULL, ".", &gs), tl = strtok_r(NULL, ".", &ts)) {
    if (!gl || !tl)
      return false; /* empty labels in different places ("a..b" against "a.b.c") */
    if (fnmatch(gl, tl, FNM_NOESCAPE) != 0)
      return false;
  }
  return true;
}

static bool glob_brackets_valid(const char *p)
{
  for (; *p; p++) {
    if (*p != '[')
      continue;
    p++;
    if (*p == '!' || *p == '^')
      p++;
    if (*p == ']')
      p++; /* a leading ']' is a literal member */
    while (*p && *p != ']')
      p++;
    if (!*p)
      return false;
  }
  return true;
}

bool auth_url_pattern_valid(const char *pattern)
{
  if (str_empty(pattern) || strlen(pattern) > 4096)
    return false;
  for (const char *p = pattern; *p; p++)
    if ((unsigned char) *p <= ' ' || *p == 0x7f)
      return false;
  _cleanup_(url_parts_free) url_parts u = {0};
  url_split(pattern, &u);
  if (str_empty(u.host))
    return false;
  if (strspn(u.port, "0123456789") != strlen(u.port))
    return false;
  return glob_brackets_valid(u.host);
}

char *auth_config_key_normalize(const char *key)
{
  if (!key)
    return NULL;
  const char *s = key;
  if (str_has_prefix(s, "https://"))
    s += strlen("https://");
  else if (str_has_prefix(s, "http://"))
    s += strlen("http://");
  size_t alen = strcspn(s, "/");
  const char *at = NULL;
  for (size_t i = 0; i < alen; i++)
    if (s[i] == '@')
      at = s + i;
  const char *authority = at ? at + 1 : s;
  size_t authority_len = at ? alen - (size_t) (at + 1 - s) : alen;
  if (authority_len == 0)
    return NULL;
  const char *rest = s + alen;
  size_t path_len = strlen(rest);
  const char *path = rest;
  /* docker treats host/v1/ and host/v2/ as the host itself. */
  if (path_len >= 4 && (strncmp(path, "/v1/", 4) == 0 || strncmp(path, "/v2/", 4) == 0)) {
    path += 3;
    path_len -= 3;
  }
  if (path_len == 0 || (path_len == 1 && path[0] == '/'))
    return xstrndup(authority, authority_len);
  return xasprintf("%.*s%.*s", (int) authority_len, authority, (int) path_len, path);
}

bool auth_image_is_docker_hub(const char *image)
{
  if (str_empty(image))
    return false;
  size_t first = strcspn(image, "/");
  if (first == 0)
    return false;
  if (image[first] == '\0')
    return true;
  if ((first == strlen("docker.io") && strncmp(image, "docker.io", first) == 0) ||
      (first == strlen("index.docker.io") && strncmp(image, "index.docker.io", first) == 0))
    return true;
  /* "library/busybox": the first component is not a host. */
  return !memchr(image, '.', first) && !memchr(image, ':', first);
}

char *auth_image_registry(const char *image) { return xstrndup(image, strcspn(image, "/")); }
