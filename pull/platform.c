/* OCI platforms. Architecture and OS names follow GOARCH/GOOS as the image-index spec requires; the aliases that
 * uname(2), Debian and older tooling use are mapped onto them.
 *
 * Matching is deliberately strict: os and architecture must be equal and the variant must be equal after the
 * defaults are applied (arm64 -> v8, arm -> v7; an amd64 "v1" is no variant). An arm/v7 node therefore does not
 * fall back to arm/v6 or arm/v5 images even though it could run them: picking the wrong one of several entries
 * silently is worse than a clear "no matching platform" error. */
#include <ctype.h>
#include <errno.h>
#include <stdarg.h>
#include <sys/utsname.h>

#include "common/util.h"
#include "pull/platform.h"

/* Copies src into a fixed-size field, cutting it to fit. */
static void set_field(char *dst, size_t size, const char *src)
{
  size_t n = strnlen(src, size - 1);
  memmove(dst, src, n);
  dst[n] = '\0';
}

static void lowercase(char *s)
{
  for (; *s; s++)
    *s = (char) tolower((unsigned char) *s);
}

struct arch_alias {
  const char *name;
  const char *arch;
  const char *variant; /* NULL: keep the given variant */
};

/* uname -m values, Debian architecture names and other spellings seen in the wild. */
static const struct arch_alias arch_aliases[] = {
    {"x86_64", "amd64", NULL},  {"x86-64", "amd64", NULL},  {"aarch64", "arm64", NULL}, {"armhf", "arm", "v7"},
    {"armel", "arm", "v6"},     {"armv7l", "arm", "v7"},    {"armv7", "arm", "v7"},     {"armv6l", "arm", "v6"},
    {"armv6", "arm", "v6"},     {"armv5tel", "arm", "v5"},  {"armv5l", "arm", "v5"},    {"i386", "386", NULL},
    {"i486", "386", NULL},      {"i586", "386", NULL},      {"i686", "386", NULL},      {"ppc64el", "ppc64le", NULL},
    {"loongarch64", "loong64", NULL},
};

void platform_normalize(platform *p)
{
  lowercase(p->os);
  lowercase(p->architecture);
  lowercase(p->variant);
  for (size_t i = 0; i < ARRAY_SIZE(arch_aliases); i++) {
    if (streq(p->architecture, arch_aliases[i].name)) {
      set_field(p->architecture, sizeof(p->architecture), arch_aliases[i].arch);
      if (arch_aliases[i].variant)
        set_field(p->variant, sizeof(p->variant), arch_aliases[i].variant);
      break;
    }
  }
  if (streq(p->architecture, "arm64")) {
    /* "8" and "v8" are both seen; arm64 images without a variant are v8 images. */
    if (!*p->variant || streq(p->variant, "8"))
      set_field(p->variant, sizeof(p->variant), "v8");
  } else if (streq(p->architecture, "arm")) {
    if (!*p->variant)
      set_field(p->variant, sizeof(p->variant), "v7");
    else if (streq(p->variant, "7") || streq(p->variant, "6") || streq(p->variant, "5")) {
      char v[4] = {'v', p->variant[0], '\0'};
      set_field(p->variant, sizeof(p->variant), v);
    }
  } else if (streq(p->architecture, "amd64") && streq(p->variant, "v1")) {
    p->variant[0] = '\0';
  }
}

void platform_host(platform *ret)
{
  platform p = {0};
  struct utsname u;
  set_field(p.os, sizeof(p.os), "linux");
  if (uname(&u) == 0) {
    set_field(p.os, sizeof(p.os), u.sysname);
    set_field(p.architecture, sizeof(p.architecture), u.machine);
  } else {
    /* uname(2) does not fail in practice; the build target is the best remaining guess. */
#if defined(__x86_64__)
    set_field(p.architecture, sizeof(p.architecture), "amd64");
#elif defined(__aarch64__)
    set_field(p.architecture, sizeof(p.architecture), "arm64");
#else
    set_field(p.architecture, sizeof(p.architecture), "unknown");
#endif
  }
  platform_normalize(&p);
  *ret = p;
}

__attribute__((format(printf, 2, 3))) static int platform_error(crimage_error **err, const char *fmt, ...)
{
  cleanup_free char *msg = NULL;
  va_list ap;
  va_start(ap, fmt);
  if (vasprintf(&msg, fmt, ap) < 0)
    abort();
  va_end(ap);
  crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "%s", msg);
  return -EINVAL;
}

static bool valid_field_char(char c) { return isalnum((unsigned char) c) || c == '_' || c == '.' || c == '-'; }

int platform_parse(const char *s, platform *ret, crimage_error **err)
{
  if (str_empty(s))
    return platform_error(err, "empty platform (expected os/arch[/variant])");

  platform p = {0};
  char *fields[3] = {p.os, p.architecture, p.variant};
  size_t sizes[3] = {sizeof(p.os), sizeof(p.architecture), sizeof(p.variant)};
  size_t nfield = 0, len = 0;
  for (const char *c = s;; c++) {
    if (*c == '/' || *c == '\0') {
      if (len == 0)
        return platform_error(err,
                                 "invalid platform \"%.64s\": empty component (expected os/arch[/variant])", s);
      nfield++;
      len = 0;
      if (*c == '\0')
        break;
      if (nfield == 3)
        return platform_error(err,
                                 "invalid platform \"%.64s\": too many components (expected os/arch[/variant])", s);
      continue;
    }
    if (!valid_field_char(*c))
      return platform_error(err,
                               "invalid platform \"%.64s\": invalid character (allowed: letters, digits, '.', '_', '-')",
                               s);
    if (len + 1 >= sizes[nfield])
      return platform_error(err, "invalid platform \"%.64s\": component too long",
                               s);
    fields[nfield][len++] = *c;
  }
  if (nfield < 2)
    return platform_error(err,
                             "invalid platform \"%.64s\": missing architecture (expected os/arch[/variant])", s);
  platform_normalize(&p);
  *ret = p;
  return 0;
}

bool platform_match(const platform *want, const platform *candidate)
{
  /* Normalizing copies keeps callers that pass raw index entries correct. */
  platform w = *want, c = *candidate;
  platform_normalize(&w);
  platform_normalize(&c);
  return streq(w.os, c.os) && streq(w.architecture, c.architecture) && streq(w.variant, c.variant);
}

const char *platform_string(const platform *p, char *buf, size_t size)
{
  if (size == 0)
    return buf;
  snprintf(buf, size, "%s/%s%s%s", p->os, p->architecture, *p->variant ? "/" : "", p->variant);
  return buf;
}
