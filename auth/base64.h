/* Standard base64 (RFC 4648 §4) decoding for docker config `auth` fields and Kubernetes Secret `data` values. */
#ifndef CRIMAGE_AUTH_BASE64_H
#define CRIMAGE_AUTH_BASE64_H

#include <stddef.h>

/* Decodes base64 with or without its trailing '=' padding; surrounding whitespace and line breaks inside are
 * ignored. The result is NUL-terminated (the terminator is not counted in ret_len). Returns 0 or -EINVAL. The
 * caller wipes the result when it holds a secret. */
int base64_decode(const char *in, size_t in_len, char **ret, size_t *ret_len);

#endif
