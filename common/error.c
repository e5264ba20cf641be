#include <errno.h>
#include <stdarg.h>

#include "error.h"
#include "util.h"

static int error_return(const crimage_error *e) { return -(e->errnum > 0 ? e->errnum : EIO); }

int crimage_error_set(crimage_error **err, crimage_status status, int errnum, const char *fmt, ...)
{
  int result = -(errnum > 0 ? errnum : EIO);
  if (!err || *err)
    return result;

  va_list ap;
  va_start(ap, fmt);
  char *msg = NULL;
  if (vasprintf(&msg, fmt, ap) < 0)
    abort();
  va_end(ap);

  crimage_error *e = xcalloc(1, sizeof(*e));
  e->status = status;
  e->errnum = errnum > 0 ? errnum : 0;
  if (errnum > 0) {
    e->message = xasprintf("%s: %s", msg, strerror(errnum));
    free(msg);
  } else {
    e->message = msg;
  }
  *err = e;
  return result;
}

int crimage_error_wrap(crimage_error **err, const char *fmt, ...)
{
  if (!err || !*err)
    return -EIO;
  va_list ap;
  va_start(ap, fmt);
  char *prefix = NULL;
  if (vasprintf(&prefix, fmt, ap) < 0)
    abort();
  va_end(ap);
  char *msg = xasprintf("%s: %s", prefix, (*err)->message);
  free(prefix);
  free((*err)->message);
  (*err)->message = msg;
  return error_return(*err);
}

void crimage_error_free(crimage_error *err)
{
  if (!err)
    return;
  free(err->message);
  free(err);
}

void crimage_error_clear(crimage_error **err)
{
  crimage_error_free(*err);
  *err = NULL;
}

const char *crimage_status_name(crimage_status status)
{
  static const char *const names[] = {
      "OK",           "CANCELLED",         "UNKNOWN",           "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
      "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED",     "OUT_OF_RANGE",
      "UNIMPLEMENTED", "INTERNAL",          "UNAVAILABLE",       "DATA_LOSS",        "UNAUTHENTICATED",
  };
  if ((unsigned) status < ARRAY_SIZE(names))
    return names[status];
  return "UNKNOWN";
}
