/* Small helpers shared by every module: cleanup attributes, ownership hand-off, string utilities. */
#ifndef CRIMAGE_COMMON_UTIL_H
#define CRIMAGE_COMMON_UTIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define _cleanup_(f) __attribute__((cleanup(f)))

static inline void freep(void *p) { free(*(void **) p); }
static inline void closep(int *fd)
{
  if (*fd >= 0)
    close(*fd);
}
static inline void fclosep(FILE **f)
{
  if (*f)
    fclose(*f);
}
/* Frees a NULL-terminated array of strings. */
void strv_free(char **v);
static inline void strv_freep(char ***v) { strv_free(*v); }

#define cleanup_free _cleanup_(freep)
#define cleanup_close _cleanup_(closep)
#define cleanup_fclose _cleanup_(fclosep)
#define cleanup_strv _cleanup_(strv_freep)

/* Hands ownership of a pointer to the caller: returns it and clears the variable so its cleanup does nothing. */
#define TAKE_PTR(p)                                                                                                    \
  ({                                                                                                                   \
    __typeof__(p) _ptr_ = (p);                                                                                         \
    (p) = NULL;                                                                                                        \
    _ptr_;                                                                                                             \
  })
#define TAKE_FD(fd)                                                                                                    \
  ({                                                                                                                   \
    int _fd_ = (fd);                                                                                                   \
    (fd) = -1;                                                                                                         \
    _fd_;                                                                                                              \
  })

#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

/* Allocation failures abort: a daemon that cannot allocate a few bytes cannot report anything useful either. */
void *xmalloc(size_t n);
void *xcalloc(size_t n, size_t m);
void *xrealloc(void *p, size_t n);
char *xstrdup(const char *s);
char *xstrndup(const char *s, size_t n);
char *xasprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static inline bool streq(const char *a, const char *b) { return strcmp(a, b) == 0; }
static inline bool streq_ptr(const char *a, const char *b)
{
  if (!a || !b)
    return a == b;
  return strcmp(a, b) == 0;
}
static inline bool str_empty(const char *s) { return !s || !*s; }
bool str_has_prefix(const char *s, const char *prefix);
bool str_has_suffix(const char *s, const char *suffix);

/* NULL-terminated string vectors. */
size_t strv_length(char *const *v);
/* Appends a copy of s unless already present; returns true when added. */
bool strv_add_unique(char ***v, const char *s);
bool strv_contains(char *const *v, const char *s);
char **strv_copy(char *const *v);
/* Removes the first entry equal to s; returns true when one was removed. */
bool strv_remove(char **v, const char *s);

/* Overwrites a secret before freeing it, so it does not linger in freed heap memory. */
void secret_free(char *s);
static inline void secret_freep(char **s) { secret_free(*s); }
#define cleanup_secret _cleanup_(secret_freep)

/* Parses a Kubernetes duration ("300ms", "10s", "5m", "1h30m"); ret in milliseconds. Returns 0, -EINVAL, or -ERANGE
 * beyond about 290,000 years. The numbers are plain decimals: no sign, exponent, hex, inf or nan. */
int parse_duration_ms(const char *s, int64_t *ret_ms);

/* A decimal number of digits only (no sign, space or prefix), as HTTP headers and our annotations write numbers.
 * Returns 0; -EINVAL for anything else; -ERANGE when it does not fit, with *ret = UINT64_MAX so that a caller that
 * caps the value can still use it. Never overflows. */
int parse_u64_decimal(const char *s, uint64_t *ret);
/* True when s[0..len) is well-formed UTF-8 (RFC 3629: no overlong forms, no surrogates, nothing above U+10FFFF),
 * as protobuf requires of every string field: a reply with anything else is refused by strict clients. */
bool utf8_valid(const char *s, size_t len);
/* Replaces each byte of s that is not part of a well-formed UTF-8 sequence by '?', in place; returns how many. */
size_t utf8_repair(char *s);

/* a + b, or UINT64_MAX when the sum does not fit: for totals of sizes that came from outside. */
static inline uint64_t u64_add_sat(uint64_t a, uint64_t b) { return a > UINT64_MAX - b ? UINT64_MAX : a + b; }

/* Monotonic and wall clocks in milliseconds / nanoseconds. */
int64_t now_monotonic_ms(void);
int64_t now_realtime_ns(void);

#endif
