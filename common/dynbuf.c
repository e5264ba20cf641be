#include <errno.h>
#include <stdarg.h>

#include "dynbuf.h"
#include "util.h"

void dynbuf_init(dynbuf *b, size_t max) { *b = (dynbuf){.max = max}; }

int dynbuf_append(dynbuf *b, const void *data, size_t len)
{
  if (len > b->max || b->len > b->max - len)
    return -ENOBUFS;
  if (b->len + len + 1 > b->cap) {
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + len + 1)
      cap *= 2;
    if (cap > b->max + 1)
      cap = b->max + 1;
    b->data = xrealloc(b->data, cap);
    b->cap = cap;
  }
  if (len)
    memcpy(b->data + b->len, data, len);
  b->len += len;
  b->data[b->len] = '\0';
  return 0;
}

int dynbuf_append_str(dynbuf *b, const char *s) { return dynbuf_append(b, s, strlen(s)); }

int dynbuf_printf(dynbuf *b, const char *fmt, ...)
{
  va_list ap;
  char *s = NULL;
  va_start(ap, fmt);
  int n = vasprintf(&s, fmt, ap);
  va_end(ap);
  if (n < 0)
    abort();
  int result = dynbuf_append(b, s, (size_t) n);
  free(s);
  return result;
}

void dynbuf_reset(dynbuf *b)
{
  b->len = 0;
  if (b->data)
    b->data[0] = '\0';
}

void dynbuf_free(dynbuf *b)
{
  free(b->data);
  b->data = NULL;
  b->len = b->cap = 0;
}

char *dynbuf_take(dynbuf *b, size_t *ret_len)
{
  char *d = b->data ? b->data : xstrdup("");
  if (ret_len)
    *ret_len = b->len;
  b->data = NULL;
  b->len = b->cap = 0;
  return d;
}
