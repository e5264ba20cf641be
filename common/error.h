/* Errors that carry context up the stack, crun-style: functions take `crimage_error **err`, fill it on failure
 * and return a negative errno. The status uses the gRPC code numbers so the CRI layer can pass it through as is. */
#ifndef CRIMAGE_COMMON_ERROR_H
#define CRIMAGE_COMMON_ERROR_H

#include "crimage.h" /* crimage_error, crimage_status */

/* Sets *err (if err is non-NULL and *err is NULL: the innermost error wins) and returns -errnum, or -EIO when
 * errnum is 0. The message must never contain a secret. */
int crimage_error_set(crimage_error **err, crimage_status status, int errnum, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
/* Prefixes the message of an existing error with context ("pulling x: <old message>"); returns -errnum of it. */
int crimage_error_wrap(crimage_error **err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Frees *err and sets it to NULL. */
void crimage_error_clear(crimage_error **err);
static inline void crimage_error_freep(crimage_error **err) { crimage_error_clear(err); }
#define cleanup_error _cleanup_(crimage_error_freep)

#endif
