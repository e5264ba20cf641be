/* Temporary directories and files of the unit tests. Include after <cmocka.h>: failures are cmocka assertions. */
#pragma once

#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "common/error.h"
#include "common/fsutil.h"
#include "common/util.h"

/* A fresh directory /tmp/test-<name>-XXXXXX (free the name). */
static inline char *test_mkdtemp(const char *name)
{
  char *d = xasprintf("/tmp/test-%s-XXXXXX", name);
  assert_non_null(mkdtemp(d));
  return d;
}

/* Removes dir and everything below it. */
static inline void test_rm_rf(const char *dir)
{
  cleanup_free char *cmd = xasprintf("rm -rf '%s'", dir);
  assert_int_equal(system(cmd), 0);
}

/* Writes content to path with mode; a reader never sees it half written. */
static inline void test_put(const char *path, const char *content, mode_t mode)
{
  cleanup_error crimage_error *err = NULL;
  assert_int_equal(write_file_atomic(path, content, strlen(content), mode, &err), 0);
}
