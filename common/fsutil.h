/* File helpers with the crash-safety rules of the store: write to a temporary file, fsync, rename, fsync the dir. */
#ifndef CRIMAGE_COMMON_FSUTIL_H
#define CRIMAGE_COMMON_FSUTIL_H

#include <stddef.h>
#include <sys/types.h>

#include "error.h"

/* Reads a whole file of at most max_size bytes; the result is NUL-terminated. */
int read_file(const char *path, size_t max_size, char **ret_data, size_t *ret_len, crimage_error **err);
/* Replaces path atomically with data: the old or the new content survives a crash, never a mix. */
int write_file_atomic(const char *path, const void *data, size_t len, mode_t mode, crimage_error **err);
int mkdir_p(const char *path, mode_t mode, crimage_error **err);
int fsync_dir(const char *dir);
/* fsyncs the directory that contains path. */
int fsync_parent(const char *path);
/* Removes name (of any type, a directory with everything below it) under dirfd without following symlinks.
 * Returns 0 (also when absent) or -errno. */
int rm_tree_at(int dirfd, const char *name);
/* Writes all of buf to fd, retrying on EINTR and short writes. Returns 0 or -errno. */
int write_all(int fd, const void *buf, size_t len);

#endif
