#include <errno.h>
#include <stdarg.h>
#include <time.h>

#include "util.h"

void *xmalloc(size_t n)
{
  void *p = malloc(n ? n : 1);
  if (!p)
    abort();
  return p;
}

void *xcalloc(size_t n, size_t m)
{
  void *p = calloc(n ? n : 1, m ? m : 1);
  if (!p)
    abort();
  return p;
}

void *xrealloc(void *p, size_t n)
{
  p = realloc(p, n ? n : 1);
  if (!p)
    abort();
  return p;
}

char *xstrdup(const char *s)
{
  char *r = strdup(s ? s : "");
  if (!r)
    abort();
  return r;
}

char *xstrndup(const char *s, size_t n)
{
  char *r = strndup(s, n);
  if (!r)
    abort();
  return r;
}

char *xasprintf(const char *fmt, ...)
{
  va_list ap;
  char *r = NULL;
  va_start(ap, fmt);
  if (vasprintf(&r, fmt, ap) < 0)
    abort();
  va_end(ap);
  return r;
}

bool str_has_prefix(const char *s, const char *prefix) { return strncmp(s, prefix, strlen(prefix)) == 0; }

bool str_has_suffix(const char *s, const char *suffix)
{
  size_t ls = strlen(s), lx = strlen(suffix);
  return ls >= lx && memcmp(s + ls - lx, suffix, lx) == 0;
}

void strv_free(char **v)
{
  if (!v)
    return;
  for (char **i = v; *i; i++)
    free(*i);
  free(v);
}

size_t strv_length(char *const *v)
{
  size_t n = 0;
  while (v && v[n])
    n++;
  return n;
}

bool strv_contains(char *const *v, const char *s)
{
  for (size_t i = 0; v && v[i]; i++)
    if (streq(v[i], s))
      return true;
  return false;
}

bool strv_add_unique(char ***v, const char *s)
{
  if (strv_contains(*v, s))
    return false;
  size_t n = strv_length(*v);
  *v = xrealloc(*v, (n + 2) * sizeof(char *));
  (*v)[n] = xstrdup(s);
  (*v)[n + 1] = NULL;
  return true;
}

char **strv_copy(char *const *v)
{
  size_t n = strv_length(v);
  char **r = xcalloc(n + 1, sizeof(char *));
  for (size_t i = 0; i < n; i++)
    r[i] = xstrdup(v[i]);
  return r;
}

bool strv_remove(char **v, const char *s)
{
  for (size_t i = 0; v && v[i]; i++) {
    if (streq(v[i], s)) {
      free(v[i]);
      memmove(&v[i], &v[i + 1], (strv_length(&v[i + 1]) + 1) * sizeof(char *));
      return true;
    }
  }
  return false;
}

void secret_free(char *s)
{
  if (!s)
    return;
  explicit_bzero(s, strlen(s));
  free(s);
}

int parse_duration_ms(const char *s, int64_t *ret_ms)
{
  /* The subset of Go's time.ParseDuration that Kubernetes configs use: a sequence of <number><unit>. */
  static const struct {
    const char *unit;
    double ms;
  } units[] = {{"ms", 1}, {"h", 3600000}, {"m", 60000}, {"s", 1000}, {"us", 0.001}, {"µs", 0.001}, {"ns", 0.000001}};
  if (str_empty(s))
    return -EINVAL;
  if (streq(s, "0")) {
    *ret_ms = 0;
    return 0;
  }
  double total = 0;
  const char *p = s;
  while (*p) {
    /* Go's syntax, [0-9]*(.[0-9]*)?: strtod alone would also take a sign, an exponent, hex, "inf" and "nan" (and a
     * NaN would make the conversion below undefined). */
    size_t int_digits = strspn(p, "0123456789"), frac_digits = 0, n = int_digits;
    if (p[n] == '.') {
      frac_digits = strspn(p + n + 1, "0123456789");
      n += 1 + frac_digits;
    }
    if (int_digits + frac_digits == 0 || n > 32)
      return -EINVAL;
    char num[33];
    memcpy(num, p, n);
    num[n] = '\0';
    errno = 0;
    double v = strtod(num, NULL);
    if (errno)
      return -ERANGE;
    p += n;
    size_t i;
    for (i = 0; i < ARRAY_SIZE(units); i++) {
      size_t l = strlen(units[i].unit);
      if (strncmp(p, units[i].unit, l) == 0) {
        /* "m" must not swallow the "m" of "ms". */
        if (streq(units[i].unit, "m") && p[1] == 's')
          continue;
        total += v * units[i].ms;
        p += l;
        break;
      }
    }
    if (i == ARRAY_SIZE(units))
      return -EINVAL;
    if (total > 9.2e15)
      return -ERANGE;
  }
  *ret_ms = (int64_t) total;
  return 0;
}

/* The length of the well-formed UTF-8 sequence at p (left bytes there), or 0 when there is none. */
static size_t utf8_seq(const unsigned char *p, size_t left)
{
  unsigned char c = *p;
  if (c < 0x80)
    return 1;
  size_t n;
  unsigned char lo = 0x80, hi = 0xbf; /* the allowed range of the second byte */
  if (c >= 0xc2 && c <= 0xdf) {
    n = 2;
  } else if (c >= 0xe0 && c <= 0xef) {
    n = 3;
    if (c == 0xe0)
      lo = 0xa0; /* overlong */
    else if (c == 0xed)
      hi = 0x9f; /* surrogates */
  } else if (c >= 0xf0 && c <= 0xf4) {
    n = 4;
    if (c == 0xf0)
      lo = 0x90; /* overlong */
    else if (c == 0xf4)
      hi = 0x8f; /* above U+10FFFF */
  } else {
    return 0; /* a continuation byte, an overlong lead (c0, c1) or f5..ff */
  }
  if (left < n || p[1] < lo || p[1] > hi)
    return 0;
  for (size_t i = 2; i < n; i++)
    if (p[i] < 0x80 || p[i] > 0xbf)
      return 0;
  return n;
}

bool utf8_valid(const char *s, size_t len)
{
  const unsigned char *p = (const unsigned char *) s, *end = p + len;
  while (p < end) {
    size_t n = utf8_seq(p, (size_t) (end - p));
    if (!n)
      return false;
    p += n;
  }
  return true;
}

size_t utf8_repair(char *s)
{
  size_t fixed = 0, len = strlen(s);
  unsigned char *p = (unsigned char *) s, *end = p + len;
  while (p < end) {
    size_t n = utf8_seq(p, (size_t) (end - p));
    if (!n) {
      *p = '?';
      fixed++;
      n = 1;
    }
    p += n;
  }
  return fixed;
}

int parse_u64_decimal(const char *s, uint64_t *ret)
{
  if (str_empty(s))
    return -EINVAL;
  uint64_t v = 0;
  bool overflow = false;
  for (const char *p = s; *p; p++) {
    if (*p < '0' || *p > '9')
      return -EINVAL;
    unsigned d = (unsigned) (*p - '0');
    if (v > (UINT64_MAX - d) / 10)
      overflow = true;
    else
      v = v * 10 + d;
  }
  *ret = overflow ? UINT64_MAX : v;
  return overflow ? -ERANGE : 0;
}

int64_t now_monotonic_ms(void)
{
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t) ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int64_t now_realtime_ns(void)
{
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (int64_t) ts.tv_sec * 1000000000 + ts.tv_nsec;
}
