/* Logging to stderr. Under systemd (JOURNAL_STREAM set) each line carries a "<N>" syslog priority prefix that
 * journald turns into the entry's priority; on a terminal it carries the level's name instead. */
#ifndef CRIMAGE_COMMON_LOG_H
#define CRIMAGE_COMMON_LOG_H

#include <syslog.h>

/* LOG_ERR, LOG_WARNING, LOG_INFO, LOG_DEBUG. Set once at start-up, before threads start. */
void log_set_max_level(int level);
int log_get_max_level(void);
/* "error", "warn"/"warning", "info", "debug", "trace" (= debug); -1 if unknown. */
int log_level_from_string(const char *s);
void log_msg(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define log_error(...) log_msg(LOG_ERR, __VA_ARGS__)
#define log_warn(...) log_msg(LOG_WARNING, __VA_ARGS__)
#define log_info(...) log_msg(LOG_INFO, __VA_ARGS__)
#define log_debug(...) log_msg(LOG_DEBUG, __VA_ARGS__)

#endif
