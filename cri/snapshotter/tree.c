/* Walks over a snapshot's directory: its disk usage, and its removal. fts(3) with FTS_NOCHDIR, so no walk changes
 * the daemon's working directory under its other threads, and FTS_XDEV, so nothing mounted below (a container's
 * rootfs, a bind mount) is counted or removed. */
#include <errno.h>
#include <fts.h>
#include <sys/stat.h>

#include "common/util.h"
#include "cri/snapshotter/internal.h"

typedef struct inode_key {
  dev_t dev;
  ino_t ino;
  int64_t bytes;
} inode_key;

static int inode_cmp(const void *a, const void *b)
{
  const inode_key *x = a, *y = b;
  if (x->dev != y->dev)
    return x->dev < y->dev ? -1 : 1;
  if (x->ino != y->ino)
    return x->ino < y->ino ? -1 : 1;
  return 0;
}

static void fts_closep(FTS **f)
{
  if (*f)
    fts_close(*f);
}

int snap_disk_usage(const char *dir, int64_t *ret_size, int64_t *ret_inodes, crimage_error **err)
{
  char *const roots[] = {(char *) dir, NULL};
  __attribute__((cleanup(fts_closep))) FTS *f = fts_open(roots, FTS_PHYSICAL | FTS_NOCHDIR | FTS_XDEV, NULL);
  if (!f)
    return crimage_error_set(err, CRIMAGE_INTERNAL, errno, "walk `%s`", dir);
  int64_t size = 0, inodes = 0;
  /* Like containerd's (continuity's) DiskUsage, a hard-linked inode counts once: only those with several links
   * are remembered, the rest are counted as they come. */
  cleanup_free inode_key *linked = NULL;
  size_t n_linked = 0, cap = 0;
  FTSENT *e;
  errno = 0;
  while ((e = fts_read(f))) {
    switch (e->fts_info) {
    case FTS_DP:
      continue; /* a directory seen again on the way out */
    case FTS_DNR:
    case FTS_ERR:
    case FTS_NS:
      return crimage_error_set(err, CRIMAGE_INTERNAL, e->fts_errno, "walk `%s`", e->fts_path);
    default:
      break;
    }
    const struct stat *st = e->fts_statp;
    int64_t bytes = (int64_t) st->st_blocks * 512;
    if (!S_ISDIR(st->st_mode) && st->st_nlink > 1) {
      if (n_linked == cap) {
        cap = cap ? cap * 2 : 64;
        linked = xrealloc(linked, cap * sizeof(*linked));
      }
      linked[n_linked++] = (inode_key){st->st_dev, st->st_ino, bytes};
      continue;
    }
    size += bytes;
    inodes++;
  }
  if (errno != 0)
    return crimage_error_set(err, CRIMAGE_INTERNAL, errno, "walk `%s`", dir);
  if (n_linked > 0) {
    qsort(linked, n_linked, sizeof(*linked), inode_cmp);
    for (size_t i = 0; i < n_linked; i++) {
      if (i > 0 && inode_cmp(&linked[i - 1], &linked[i]) == 0)
        continue;
      size += linked[i].bytes;
      inodes++;
    }
  }
  *ret_size = size;
  *ret_inodes = inodes;
  return 0;
}

int snap_remove_tree(const char *dir, crimage_error **err)
{
  struct stat st;
  if (lstat(dir, &st) < 0) {
    if (errno == ENOENT)
      return 0;
    return crimage_error_set(err, CRIMAGE_INTERNAL, errno, "remove `%s`", dir);
  }
  char *const roots[] = {(char *) dir, NULL};
  __attribute__((cleanup(fts_closep))) FTS *f = fts_open(roots, FTS_PHYSICAL | FTS_NOCHDIR | FTS_XDEV, NULL);
  if (!f)
    return crimage_error_set(err, CRIMAGE_INTERNAL, errno, "remove `%s`", dir);
  int first_errno = 0;
  const char *what = dir;
  cleanup_free char *failed = NULL;
  FTSENT *e;
  errno = 0;
  while ((e = fts_read(f))) {
    int r = 0;
    switch (e->fts_info) {
    case FTS_D:
      continue; /* removed on the way out (FTS_DP), once empty */
    case FTS_DP:
      r = rmdir(e->fts_accpath);
      break;
    case FTS_DNR:
    case FTS_ERR:
    case FTS_NS:
      errno = e->fts_errno;
      r = -1;
      break;
    default:
      r = unlink(e->fts_accpath);
      break;
    }
    /* Keep going: remove what can be removed and report the first failure (a mount point stays, EBUSY). */
    if (r < 0 && errno != ENOENT && first_errno == 0) {
      first_errno = errno;
      failed = xstrdup(e->fts_path);
    }
    errno = 0;
  }
  if (errno != 0 && first_errno == 0)
    first_errno = errno;
  if (first_errno != 0) {
    if (failed)
      what = failed;
    return crimage_error_set(err, CRIMAGE_INTERNAL, first_errno, "remove `%s`", what);
  }
  return 0;
}
