/* A growable byte buffer with a hard maximum size, for anything read from the network or a file we do not trust. */
#ifndef CRIMAGE_COMMON_DYNBUF_H
#define CRIMAGE_COMMON_DYNBUF_H

#include <stddef.h>

typedef struct dynbuf {
  char *data; /* always NUL-terminated when non-NULL */
  size_t len;
  size_t cap;
  size_t max;
} dynbuf;

void dynbuf_init(dynbuf *b, size_t max);
/* Returns 0, or -ENOBUFS when the result would exceed the maximum (the buffer is left unchanged). */
int dynbuf_append(dynbuf *b, const void *data, size_t len);
int dynbuf_append_str(dynbuf *b, const char *s);
int dynbuf_printf(dynbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void dynbuf_reset(dynbuf *b);
void dynbuf_free(dynbuf *b);
/* Hands the data to the caller (never NULL) and resets the buffer. */
char *dynbuf_take(dynbuf *b, size_t *ret_len);
static inline void dynbuf_freep(dynbuf *b) { dynbuf_free(b); }
#define cleanup_dynbuf __attribute__((cleanup(dynbuf_freep)))

#endif
