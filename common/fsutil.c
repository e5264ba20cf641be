#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <dirent.h>
#include <sys/stat.h>

#include "fsutil.h"
#include "util.h"

int read_file(const char *path, size_t max_size, char **ret_data, size_t *ret_len, crimage_error **err)
{
  cleanup_close int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0)
    return crimage_error_set(err, errno == ENOENT ? CRIMAGE_NOT_FOUND : CRIMAGE_INTERNAL, errno, "open `%s`", path);
  struct stat st;
  if (fstat(fd, &st) < 0)
    return crimage_error_set(err, CRIMAGE_INTERNAL, errno, "stat `%s`", path);
  if (!S_ISREG(st.st_mode))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, EINVAL, "`%s` is not a regular file", path);
  if ((uint64_t) st.st_size > max_size)
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, EFBIG, "`%s` is larger than %zu bytes", path, max_size);
  size_t cap = (size_t) st.st_size;
  char *data = xmalloc(cap + 1);
  size_t len = 0;
  for (;;) {
    if (len == cap) {
      /* The file grew since fstat: allow it up to the limit. */
      if (cap >= max_size) {
        char c;
        ssize_t n = read(fd, &c, 1);
        if (n > 0) {
          free(data);
          return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, EFBIG, "`%s` is larger than %zu bytes", path,
                                   max_size);
        }
        break;
      }
      cap = cap * 2 + 4096 > max_size ? max_size : cap * 2 + 4096;
      data = xrealloc(data, cap + 1);
    }
    ssize_t n = read(fd, data + len, cap - len);
    if (n < 0 && errno == EINTR)
      continue;
    if (n < 0) {
      int e = errno;
      free(data);
      return crimage_error_set(err, CRIMAGE_INTERNAL, e, "read `%s`", path);
    }
    if (n == 0)
      break;
    len += (size_t) n;
  }
  data[len] = '\0';
  *ret_data = data;
  if (ret_len)
    *ret_len = len;
  return 0;
}

int write_all(int fd, const void *buf, size_t len)
{
  const char *p = buf;
  while (len > 0) {
    ssize_t n = write(fd, p, len);
    if (n < 0 && errno == EINTR)
      continue;
    if (n < 0)
      return -errno;
    p += n;
    len -= (size_t) n;
  }
  return 0;
}

int fsync_dir(const char *dir)
{
  cleanup_close int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0)
    return -errno;
  if (fsync(fd) < 0)
    return -errno;
  return 0;
}

int fsync_parent(const char *path)
{
  cleanup_free char *copy = xstrdup(path);
  return fsync_dir(dirname(copy));
}

int write_file_atomic(const char *path, const void *data, size_t len, mode_t mode, crimage_error **err)
{
  cleanup_free char *tmp = xasprintf("%s.tmp.XXXXXX", path);
  cleanup_close int fd = mkostemp(tmp, O_CLOEXEC);
  if (fd < 0)
    return crimage_error_set(err, CRIMAGE_INTERNAL, errno, "create temporary file for `%s`", path);
  int r = write_all(fd, data, len);
  if (r == 0 && fchmod(fd, mode) < 0)
    r = -errno;
  if (r == 0 && fsync(fd) < 0)
    r = -errno;
  if (r == 0 && rename(tmp, path) < 0)
    r = -errno;
  if (r < 0) {
    unlink(tmp);
    return crimage_error_set(err, CRIMAGE_INTERNAL, -r, "write `%s`", path);
  }
  r = fsync_parent(path);
  if (r < 0)
    return crimage_error_set(err, CRIMAGE_INTERNAL, -r, "fsync directory of `%s`", path);
  return 0;
}

int mkdir_p(const char *path, mode_t mode, crimage_error **err)
{
  cleanup_free char *p = xstrdup(path);
  for (char *s = p + 1; *s; s++) {
    if (*s != '/')
      continue;
    *s = '\0';
    if (mkdir(p, mode) < 0 && errno != EEXIST)
      return crimage_error_set(err, CRIMAGE_INTERNAL, errno, "mkdir `%s`", p);
    *s = '/';
  }
  if (mkdir(p, mode) < 0 && errno != EEXIST)
    return crimage_error_set(err, CRIMAGE_INTERNAL, errno, "mkdir `%s`", p);
  return 0;
}

/* Removes name (of any type) under dirfd. Directories are emptied depth first holding two fds at most (a deep tree
 * must not run out of them): after a subdirectory is removed, its parent is entered again through "..", which is
 * safe because the tree is the unpacker's own (nothing renames it meanwhile) and ".." is never a symlink. */
int rm_tree_at(int dirfd, const char *name)
{
  if (unlinkat(dirfd, name, 0) == 0 || errno == ENOENT)
    return 0;
  if (errno != EISDIR)
    return -errno;
  int cur = openat(dirfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (cur < 0)
    return -errno;
  char **stack = NULL; /* names of the directories entered below name */
  size_t depth = 0, cap = 0;
  int r = 0;
  for (;;) {
    int dfd = dup(cur);
    DIR *d = dfd >= 0 ? fdopendir(dfd) : NULL;
    if (!d) {
      r = -errno;
      if (dfd >= 0)
        close(dfd);
      break;
    }
    rewinddir(d); /* the offset is shared with cur, which an earlier pass moved */
    char *sub = NULL;
    struct dirent *de;
    while ((errno = 0, de = readdir(d))) {
      if (streq(de->d_name, ".") || streq(de->d_name, ".."))
        continue;
      if (unlinkat(cur, de->d_name, 0) == 0)
        continue;
      if (errno != EISDIR) {
        r = -errno;
        break;
      }
      sub = xstrdup(de->d_name);
      break;
    }
    if (!de && errno)
      r = -errno;
    closedir(d);
    if (r < 0) {
      free(sub);
      break;
    }
    if (sub) {
      int next = openat(cur, sub, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
      if (next < 0) {
        r = -errno;
        free(sub);
        break;
      }
      close(cur);
      cur = next;
      if (depth == cap) {
        cap = cap ? cap * 2 : 16;
        stack = xrealloc(stack, cap * sizeof(*stack));
      }
      stack[depth++] = sub;
      continue;
    }
    /* cur is empty */
    if (depth == 0)
      break;
    int up = openat(cur, "..", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (up < 0) {
      r = -errno;
      break;
    }
    close(cur);
    cur = up;
    depth--;
    if (unlinkat(cur, stack[depth], AT_REMOVEDIR) < 0 && errno != ENOENT) {
      r = -errno;
      free(stack[depth]);
      break;
    }
    free(stack[depth]);
  }
  close(cur);
  for (size_t i = 0; i < depth; i++)
    free(stack[i]);
  free(stack);
  if (r < 0)
    return r;
  if (unlinkat(dirfd, name, AT_REMOVEDIR) < 0 && errno != ENOENT)
    return -errno;
  return 0;
}
