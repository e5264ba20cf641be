/* Image references with the grammar of the OCI distribution reference format, normalized the way docker's
 * ParseNormalizedNamed does (and so the way kubelet, containerd and crictl see them):
 *
 *   reference      := name [ ":" tag ] [ "@" digest ]
 *   name           := [ domain "/" ] path-component { "/" path-component }
 *   domain         := host [ ":" port ]           host := domain-name | "[" ipv6 "]"
 *   domain-name    := component { "." component } component := [A-Za-z0-9] | [A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9]
 *   path-component := [a-z0-9]+ { ( "." | "_" | "__" | "-"+ ) [a-z0-9]+ }
 *   tag            := [A-Za-z0-9_][A-Za-z0-9._-]{0,127}
 *   digest         := "sha256:" 64 lowercase hex | "sha512:" 128 lowercase hex
 *
 * The first "/"-separated component is a domain only when it contains '.' or ':', is "localhost", or has an
 * uppercase letter (lowercase is mandatory in paths, so an uppercase first component can only be a host). */
#include <ctype.h>
#include <errno.h>
#include <stdarg.h>

#include "common/util.h"
#include "pull/reference.h"

/* Longer inputs are refused before any parsing: no legitimate reference comes close (name <= 255, tag <= 128,
 * digest <= 135 plus separators). */
#define REFERENCE_INPUT_MAX 1024
#define REFERENCE_NAME_MAX 255
#define REFERENCE_TAG_MAX 128
/* How much of a bad input is quoted back in an error message. */
#define REFERENCE_QUOTE_MAX 300

#define LEGACY_DEFAULT_DOMAIN "index.docker.io"
#define OFFICIAL_REPO_PREFIX "library/"

/* The input as it may appear in a message: bounded, with control characters and quotes escaped so a log line
 * cannot be forged through an image name. */
static char *quote_input(const char *s)
{
  size_t n = strnlen(s, REFERENCE_QUOTE_MAX + 1);
  bool truncated = n > REFERENCE_QUOTE_MAX;
  if (truncated)
    n = REFERENCE_QUOTE_MAX;
  char *out = xmalloc(n * 4 + 4);
  char *p = out;
  for (size_t i = 0; i < n; i++) {
    unsigned char c = (unsigned char) s[i];
    if (c == '"' || c == '\\') {
      *p++ = '\\';
      *p++ = (char) c;
    } else if (c < 0x20 || c == 0x7f) {
      p += sprintf(p, "\\x%02x", c);
    } else {
      *p++ = (char) c;
    }
  }
  if (truncated)
    p = stpcpy(p, "...");
  *p = '\0';
  return out;
}

__attribute__((format(printf, 3, 4))) static int ref_error(crimage_error **err, const char *input, const char *fmt,
                                                          ...)
{
  cleanup_free char *q = quote_input(input);
  cleanup_free char *problem = NULL;
  va_list ap;
  va_start(ap, fmt);
  if (vasprintf(&problem, fmt, ap) < 0)
    abort();
  va_end(ap);
  /* errnum 0: the message is complete as is, without a strerror() suffix. */
  crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "invalid reference \"%s\": %s", q, problem);
  return -EINVAL;
}

static bool is_lower_alnum(char c) { return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9'); }
static bool is_alnum(char c) { return is_lower_alnum(c) || (c >= 'A' && c <= 'Z'); }
static bool is_hex_lower(char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); }
static bool has_upper(const char *s, size_t n)
{
  for (size_t i = 0; i < n; i++)
    if (s[i] >= 'A' && s[i] <= 'Z')
      return true;
  return false;
}

/* path-component, exactly n bytes of s. */
static bool valid_path_component(const char *s, size_t n)
{
  size_t i = 0;
  if (n == 0 || !is_lower_alnum(s[0]))
    return false;
  while (i < n) {
    while (i < n && is_lower_alnum(s[i]))
      i++;
    if (i == n)
      return true;
    /* separator: ".", "_", "__" or one or more "-" */
    if (s[i] == '.')
      i++;
    else if (s[i] == '_')
      i += (i + 1 < n && s[i + 1] == '_') ? 2 : 1;
    else if (s[i] == '-')
      while (i < n && s[i] == '-')
        i++;
    else
      return false;
    if (i == n || !is_lower_alnum(s[i]))
      return false;
  }
  return true;
}

static bool valid_domain_component(const char *s, size_t n)
{
  if (n == 0 || !is_alnum(s[0]) || !is_alnum(s[n - 1]))
    return false;
  for (size_t i = 0; i < n; i++)
    if (!is_alnum(s[i]) && s[i] != '-')
      return false;
  return true;
}

/* host[:port] where host is a dotted name, an IPv4 address (a dotted name of digits) or a bracketed IPv6 address. */
static bool valid_domain(const char *s, size_t n)
{
  size_t host_end;
  if (n > 0 && s[0] == '[') {
    const char *close = memchr(s, ']', n);
    if (!close || close == s + 1)
      return false;
    for (const char *p = s + 1; p < close; p++)
      if (!isxdigit((unsigned char) *p) && *p != ':')
        return false;
    host_end = (size_t) (close - s) + 1;
  } else {
    host_end = 0;
    while (host_end < n && s[host_end] != ':')
      host_end++;
    size_t start = 0;
    for (size_t i = 0; i <= host_end; i++) {
      if (i == host_end || s[i] == '.') {
        if (!valid_domain_component(s + start, i - start))
          return false;
        start = i + 1;
      }
    }
  }
  if (host_end == n)
    return true;
  if (s[host_end] != ':' || host_end + 1 == n)
    return false;
  for (size_t i = host_end + 1; i < n; i++)
    if (s[i] < '0' || s[i] > '9')
      return false;
  return true;
}

static bool valid_tag(const char *s)
{
  size_t n = strlen(s);
  if (n == 0 || n > REFERENCE_TAG_MAX)
    return false;
  if (!is_alnum(s[0]) && s[0] != '_')
    return false;
  for (size_t i = 1; i < n; i++)
    if (!is_alnum(s[i]) && s[i] != '_' && s[i] != '.' && s[i] != '-')
      return false;
  return true;
}

static int check_digest(const char *input, const char *d, crimage_error **err)
{
  const char *colon = strchr(d, ':');
  if (!colon || colon == d)
    return ref_error(err, input, "invalid digest (expected <algorithm>:<hex>)");
  size_t alg_len = (size_t) (colon - d);
  size_t want;
  if (alg_len == 6 && memcmp(d, "sha256", 6) == 0)
    want = 64;
  else if (alg_len == 6 && memcmp(d, "sha512", 6) == 0)
    want = 128;
  else
    return ref_error(err, input, "unsupported digest algorithm \"%.*s\" (only sha256 and sha512 are supported)",
                     (int) (alg_len > 32 ? 32 : alg_len), d);
  const char *hex = colon + 1;
  size_t n = strlen(hex);
  for (size_t i = 0; i < n; i++)
    if (!is_hex_lower(hex[i]))
      return ref_error(err, input, "invalid %.*s digest: not lowercase hexadecimal", (int) alg_len, d);
  if (n != want)
    return ref_error(err, input, "invalid %.*s digest: %zu hex digits instead of %zu", (int) alg_len, d, n, want);
  return 0;
}

static bool is_hex64(const char *s)
{
  if (strlen(s) != 64)
    return false;
  for (size_t i = 0; i < 64; i++)
    if (!is_hex_lower(s[i]))
      return false;
  return true;
}

void reference_free(image_ref *r)
{
  if (!r)
    return;
  free(r->domain);
  free(r->path);
  free(r->tag);
  free(r->digest);
  free(r);
}

int reference_parse(const char *s, const char *default_registry, image_ref **ret, crimage_error **err)
{
  if (!s || !*s)
    return ref_error(err, s ? s : "", "empty reference");
  size_t len = strnlen(s, REFERENCE_INPUT_MAX + 1);
  if (len > REFERENCE_INPUT_MAX)
    return ref_error(err, s, "longer than %d characters", REFERENCE_INPUT_MAX);
  for (size_t i = 0; i < len; i++) {
    unsigned char c = (unsigned char) s[i];
    if (c <= 0x20 || c >= 0x7f)
      return ref_error(err, s, "contains whitespace, control or non-ASCII characters");
  }
  if (is_hex64(s))
    return ref_error(err, s, "a 64-character hexadecimal string is an image ID, not a repository name");

  const char *registry = default_registry && *default_registry ? default_registry : REFERENCE_DEFAULT_REGISTRY;
  if (streq(registry, LEGACY_DEFAULT_DOMAIN))
    registry = REFERENCE_DEFAULT_REGISTRY;
  if (!valid_domain(registry, strlen(registry)))
    return ref_error(err, s, "default registry \"%.*s\" is not a valid host[:port]", REFERENCE_QUOTE_MAX, registry);

  cleanup_free char *work = xstrdup(s);

  /* Name and tag never contain '@', so the digest is whatever follows the first one. */
  cleanup_free char *digest = NULL;
  char *at = strchr(work, '@');
  if (at) {
    *at = '\0';
    if (check_digest(s, at + 1, err) < 0)
      return -EINVAL;
    digest = xstrdup(at + 1);
  }

  /* The tag follows the last ':' that comes after the last '/' (a ':' before it is a port). */
  cleanup_free char *tag = NULL;
  char *slash = strrchr(work, '/');
  char *colon = strrchr(slash ? slash : work, ':');
  if (colon) {
    *colon = '\0';
    if (!valid_tag(colon + 1)) {
      if (colon[1] == '\0')
        return ref_error(err, s, "empty tag");
      if (strlen(colon + 1) > REFERENCE_TAG_MAX)
        return ref_error(err, s, "tag longer than %d characters", REFERENCE_TAG_MAX);
      return ref_error(err, s, "invalid tag (allowed: [A-Za-z0-9_][A-Za-z0-9._-]*)");
    }
    tag = xstrdup(colon + 1);
  }

  if (!*work)
    return ref_error(err, s, "missing repository name");

  /* Domain detection as splitDockerDomain does it. */
  cleanup_free char *domain = NULL;
  const char *remainder;
  char *first_slash = strchr(work, '/');
  size_t first_len = first_slash ? (size_t) (first_slash - work) : 0;
  if (first_slash && (memchr(work, '.', first_len) || memchr(work, ':', first_len) ||
                      (first_len == 9 && memcmp(work, "localhost", 9) == 0) || has_upper(work, first_len))) {
    if (!valid_domain(work, first_len))
      return ref_error(err, s, "invalid registry host \"%.*s\"", (int) first_len, work);
    domain = xstrndup(work, first_len);
    if (streq(domain, LEGACY_DEFAULT_DOMAIN)) {
      free(domain);
      domain = xstrdup(REFERENCE_DEFAULT_REGISTRY);
    }
    remainder = first_slash + 1;
  } else {
    domain = xstrdup(registry);
    remainder = work;
  }

  if (!*remainder)
    return ref_error(err, s, "missing repository name");
  if (has_upper(remainder, strlen(remainder)))
    return ref_error(err, s, "repository name must be lowercase");

  cleanup_free char *path = NULL;
  if (streq(domain, REFERENCE_DEFAULT_REGISTRY) && !strchr(remainder, '/'))
    path = xasprintf(OFFICIAL_REPO_PREFIX "%s", remainder);
  else
    path = xstrdup(remainder);

  const char *start = path;
  for (const char *p = path;; p++) {
    if (*p == '/' || *p == '\0') {
      if (p == start)
        return ref_error(err, s, "empty path component in repository name");
      if (!valid_path_component(start, (size_t) (p - start)))
        return ref_error(err, s, "invalid repository name component \"%.*s\" (allowed: lowercase letters, digits "
                                 "and the separators '.', '_', '__', '-')",
                         (int) (p - start), start);
      if (*p == '\0')
        break;
      start = p + 1;
    }
  }

  if (strlen(domain) + 1 + strlen(path) > REFERENCE_NAME_MAX)
    return ref_error(err, s, "repository name longer than %d characters", REFERENCE_NAME_MAX);

  image_ref *r = xcalloc(1, sizeof(*r));
  r->tag_given = tag != NULL;
  if (!tag && !digest)
    tag = xstrdup("latest");
  r->domain = TAKE_PTR(domain);
  r->path = TAKE_PTR(path);
  r->tag = TAKE_PTR(tag);
  r->digest = TAKE_PTR(digest);
  *ret = r;
  return 0;
}

char *reference_name(const image_ref *r) { return xasprintf("%s/%s", r->domain, r->path); }

char *reference_tagged(const image_ref *r)
{
  if (!r->tag)
    return NULL;
  return xasprintf("%s/%s:%s", r->domain, r->path, r->tag);
}

char *reference_digested(const image_ref *r)
{
  if (!r->digest)
    return NULL;
  return xasprintf("%s/%s@%s", r->domain, r->path, r->digest);
}

char *reference_string(const image_ref *r)
{
  return xasprintf("%s/%s%s%s%s%s", r->domain, r->path, r->tag ? ":" : "", r->tag ? r->tag : "",
                   r->digest ? "@" : "", r->digest ? r->digest : "");
}

int crimage_reference_normalize(const char *image, const char *default_registry, char **ret_normalized,
                                crimage_error **err)
{
  cleanup_reference image_ref *r = NULL;
  int ret = reference_parse(image, default_registry, &r, err);
  if (ret < 0)
    return ret;
  if (ret_normalized)
    *ret_normalized = reference_string(r);
  return 0;
}
