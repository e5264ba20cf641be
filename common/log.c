#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "log.h"
#include "util.h"

/* The one piece of process-wide state outside the daemon context: the level is written once at start-up and only
 * read afterwards, so every module can log without carrying a logger around. */
static int max_level = LOG_INFO;

void log_set_max_level(int level) { max_level = level; }
int log_get_max_level(void) { return max_level; }

int log_level_from_string(const char *s)
{
  if (streq(s, "error"))
    return LOG_ERR;
  if (streq(s, "warn") || streq(s, "warning"))
    return LOG_WARNING;
  if (streq(s, "info"))
    return LOG_INFO;
  if (streq(s, "debug") || streq(s, "trace"))
    return LOG_DEBUG;
  return -1;
}

void log_msg(int level, const char *fmt, ...)
{
  if (level > max_level)
    return;
  static const char *const names[] = {"emerg", "alert", "crit", "error", "warn", "notice", "info", "debug"};
  char msg[4096];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof(msg), fmt, ap);
  va_end(ap);
  /* One line per entry: a message with a newline would be split into two journal entries. */
  for (char *p = msg; *p; p++)
    if (*p == '\n' || *p == '\r')
      *p = ' ';
  if (getenv("JOURNAL_STREAM")) {
    fprintf(stderr, "<%d>%s\n", level, msg);
  } else {
    struct timespec ts;
    struct tm tm;
    char when[32];
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%S", &tm);
    fprintf(stderr, "%s.%03ldZ %s %s\n", when, ts.tv_nsec / 1000000, names[level & 7], msg);
  }
}
