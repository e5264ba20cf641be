/* Flattening and mounting an image's unpacked layers (see rootfs.h).
 *
 * Flattening applies the layers to dir from the lowest up with overlayfs' rules, so that the copy is what an
 * overlay mount of them shows:
 *   - a whiteout (0/0 character device) deletes whatever is below it under that name and is not copied;
 *   - any other non-directory replaces whatever is below it;
 *   - a directory merges with a directory below it, unless it is opaque, and replaces anything else; a merged
 *     directory has the owner, mode, times and xattrs of its topmost layer.
 *
 * Each layer and dir are walked together, holding one directory fd of each per level, and every change is a
 * one-name *at() call on the fd of its directory in dir that does not follow that name (mkdirat, mknodat,
 * symlinkat, linkat without AT_SYMLINK_FOLLOW, unlinkat, O_NOFOLLOW, AT_SYMLINK_NOFOLLOW). A symlink an earlier
 * layer left in dir (etc -> /host) is therefore only ever replaced (a later layer's etc/ is a directory in its
 * tree, which replaces the symlink), never gone through. The two things that need a path in dir (the first name of
 * a hard link, and the directories whose modes and times are set at the end) resolve it beneath dir with openat2
 * and RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS, or with an O_NOFOLLOW walk where openat2 is missing. The layers
 * themselves (crimaged's store, root's) are opened with O_NOFOLLOW too. */
#include "plugin/rootfs.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/limits.h>
#include <linux/openat2.h>
#include <search.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/types.h>
#include <sys/xattr.h>
#include <unistd.h>

#include "common/dynbuf.h"
#include "common/fsutil.h"
#include "common/log.h"
#include "common/util.h"

#define OPAQUE_XATTR "trusted.overlay.opaque"
/* The directories' modes and times are kept until the end (an entry written into a directory changes its mtime);
 * bounded because paths can be long: real images need a few MB. */
#define DIR_LIST_MAX_BYTES (256u << 20)
/* Data that cannot go through copy_file_range is copied in chunks of this size. */
#define COPY_CHUNK_BYTES (128u * 1024)
/* fds the rest of the process may hold besides the two per directory level of the walk. */
#define FD_RESERVE 64
/* A path of PATH_MAX bytes has at most this many components: no layer can be deeper. */
#define MAX_DEPTH (PATH_MAX / 2)

typedef struct dir_meta {
  char *path; /* relative to dir, "" = dir itself */
  mode_t mode;
  struct timespec times[2]; /* atime, mtime */
} dir_meta;

/* An inode of the current layer with several names, and where its first name was copied to. */
typedef struct link_seen {
  dev_t dev;
  ino_t ino;
  char *path; /* relative to dir */
} link_seen;

typedef struct flatten {
  int rootfd;        /* dir */
  const char *layer; /* the layer being applied, for messages */
  void *links;       /* tsearch tree of link_seen: the current layer's hard-linked inodes copied so far */
  dir_meta *dirs;    /* every directory of every layer, in the order applied: a later entry of a path wins */
  size_t n_dirs, cap_dirs, dir_bytes;
  unsigned max_depth;
  bool no_openat2;
  char *src_names; /* xattr name lists, XATTR_LIST_MAX bytes each */
  char *dst_names;
  char *value; /* an xattr value, XATTR_SIZE_MAX bytes */
  char *chunk; /* COPY_CHUNK_BYTES */
} flatten;

/* Sets an error about one entry: `/<path> (layer <dir>): <what>` (without the layer once all are applied);
 * returns -errnum (-EIO for 0). */
__attribute__((format(printf, 5, 6))) static int entry_fail(flatten *f, crimage_error **err, int errnum,
                                                            const char *path, const char *fmt, ...)
{
  va_list ap;
  va_start(ap, fmt);
  cleanup_free char *what = NULL;
  if (vasprintf(&what, fmt, ap) < 0)
    abort();
  va_end(ap);
  /* the CLI makes the message printable: names with control characters cannot drive the terminal */
  crimage_status status = errnum == EPERM || errnum == EACCES ? CRIMAGE_PERMISSION_DENIED : CRIMAGE_INTERNAL;
  if (!f->layer)
    return crimage_error_set(err, status, errnum, "/%s: %s", path, what);
  return crimage_error_set(err, status, errnum, "/%s (layer %s): %s", path, f->layer, what);
}

/* ---- resolving paths beneath dir ---- */

static int sys_openat2(int dirfd, const char *path, int flags, uint64_t resolve)
{
  struct open_how how = {.flags = (uint64_t) flags, .resolve = resolve};
  return (int) syscall(SYS_openat2, dirfd, path, &how, sizeof(how));
}

/* Opens the directory path (relative, "" = dir) beneath dir without following any symlink, O_RDONLY. Returns 0,
 * or -errno without an error set (-ENOENT, -ENOTDIR, -ELOOP for a symlink on the way): the caller decides. */
static int open_beneath(flatten *f, const char *path, int *ret_fd)
{
  const int flags = O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC;
  if (!*path) {
    int fd = openat(f->rootfd, ".", flags);
    if (fd < 0)
      return -errno;
    *ret_fd = fd;
    return 0;
  }
  if (!f->no_openat2) {
    int fd = sys_openat2(f->rootfd, path, flags,
                         RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV);
    if (fd >= 0) {
      *ret_fd = fd;
      return 0;
    }
    if (errno != ENOSYS && errno != EPERM && errno != E2BIG) /* EPERM: a seccomp filter that does not know it */
      return -errno;
    f->no_openat2 = true;
  }
  /* One component at a time, each the last name of its openat: O_NOFOLLOW refuses a symlink (ELOOP). */
  int cur = openat(f->rootfd, ".", flags);
  if (cur < 0)
    return -errno;
  for (const char *p = path; *p;) {
    size_t len = strcspn(p, "/");
    cleanup_free char *comp = xstrndup(p, len);
    p += len;
    p += strspn(p, "/");
    int next = openat(cur, comp, flags);
    int e = errno;
    close(cur);
    if (next < 0)
      return -e;
    cur = next;
  }
  *ret_fd = cur;
  return 0;
}

/* ---- xattrs ---- */

/* overlayfs' own metadata (whiteouts, redirects): it has no meaning in a plain tree. */
static bool overlay_xattr(const char *name)
{
  return str_has_prefix(name, "trusted.overlay.") || str_has_prefix(name, "user.overlay.");
}

/* An inode to read or write xattrs of: by fd (regular files, directories), or by name in a directory fd through
 * /proc/self/fd (symlinks and nodes, which cannot be opened for that; the l*xattr calls do not follow the name). */
typedef struct xnode {
  int fd;
  char proc[64];
} xnode;

static xnode xnode_fd(int fd) { return (xnode){.fd = fd}; }

static xnode xnode_at(int dirfd)
{
  xnode x = {.fd = -1};
  snprintf(x.proc, sizeof(x.proc), "/proc/self/fd/%d/", dirfd); /* the name is appended at each call */
  return x;
}

static ssize_t x_list(const xnode *x, const char *name, char *buf, size_t size)
{
  if (x->fd >= 0)
    return flistxattr(x->fd, buf, size);
  cleanup_free char *p = xasprintf("%s%s", x->proc, name);
  return llistxattr(p, buf, size);
}

static ssize_t x_get(const xnode *x, const char *name, const char *key, char *buf, size_t size)
{
  if (x->fd >= 0)
    return fgetxattr(x->fd, key, buf, size);
  cleanup_free char *p = xasprintf("%s%s", x->proc, name);
  return lgetxattr(p, key, buf, size);
}

static int x_set(const xnode *x, const char *name, const char *key, const char *value, size_t size)
{
  if (x->fd >= 0)
    return fsetxattr(x->fd, key, value, size, 0);
  cleanup_free char *p = xasprintf("%s%s", x->proc, name);
  return lsetxattr(p, key, value, size, 0);
}

static bool names_contain(const char *list, ssize_t len, const char *key)
{
  for (const char *k = list; k < list + len; k += strlen(k) + 1)
    if (streq(k, key))
      return true;
  return false;
}

/* Copies the xattrs of src (name in a layer directory) to dst (name in dir). replace: dst may already have some
 * (a merged directory): those src does not have go, since the topmost layer's directory is the one shown. */
static int copy_xattrs(flatten *f, const xnode *src, const xnode *dst, const char *name, bool replace,
                       const char *path, crimage_error **err)
{
  ssize_t len = x_list(src, name, f->src_names, XATTR_LIST_MAX);
  if (len < 0 && errno != ENOTSUP)
    return entry_fail(f, err, errno, path, "listing xattrs");
  if (len < 0)
    len = 0;
  for (const char *key = f->src_names; key < f->src_names + len; key += strlen(key) + 1) {
    if (overlay_xattr(key))
      continue;
    ssize_t n = x_get(src, name, key, f->value, XATTR_SIZE_MAX);
    if (n < 0 && errno == ENODATA)
      continue; /* gone meanwhile */
    if (n < 0)
      return entry_fail(f, err, errno, path, "reading xattr %s", key);
    if (x_set(dst, name, key, f->value, (size_t) n) == 0)
      continue;
    /* As the unpacker does: a filesystem of dir without the namespace, or user.* where the kernel refuses it
     * (symlinks, devices), is skipped rather than failing the copy. */
    if (errno == ENOTSUP || (errno == EPERM && str_has_prefix(key, "user."))) {
      log_debug("/%s: xattr %s not copied: %s", path, key, strerror(errno));
      continue;
    }
    return entry_fail(f, err, errno, path, "setting xattr %s", key);
  }
  if (!replace)
    return 0;
  ssize_t dlen = x_list(dst, name, f->dst_names, XATTR_LIST_MAX);
  if (dlen < 0 && errno != ENOTSUP)
    return entry_fail(f, err, errno, path, "listing xattrs of the copy");
  for (const char *key = f->dst_names; dlen > 0 && key < f->dst_names + dlen; key += strlen(key) + 1) {
    /* security.selinux is the host's label of the copy, set by the kernel on every new file: not a lower
     * layer's to take away */
    if (names_contain(f->src_names, len, key) || streq(key, "security.selinux"))
      continue;
    if (fremovexattr(dst->fd, key) < 0 && errno != ENODATA)
      return entry_fail(f, err, errno, path, "removing xattr %s of a lower layer", key);
  }
  return 0;
}

/* ---- entries ---- */

static void times_of(const struct stat *st, struct timespec ts[2])
{
  ts[0] = st->st_atim;
  ts[1] = st->st_mtim;
}

/* Removes name (of any type, a directory with everything in it) from the directory fd of dir; absent is fine. */
static int remove_at(flatten *f, int dst, const char *name, const char *path, crimage_error **err)
{
  int r = rm_tree_at(dst, name);
  if (r < 0)
    return entry_fail(f, err, -r, path, "removing what the layers below put there");
  return 0;
}

static int pwrite_all(int fd, const char *buf, size_t len, off_t off)
{
  while (len > 0) {
    ssize_t n = pwrite(fd, buf, len, off);
    if (n < 0 && errno == EINTR)
      continue;
    if (n < 0)
      return -errno;
    buf += n;
    off += n;
    len -= (size_t) n;
  }
  return 0;
}

/* Copies the bytes of in to out: the data segments only (holes stay holes where both filesystems allow it), by
 * copy_file_range (which may share blocks copy-on-write: a later write to the copy still never reaches the
 * layer), else with read and write. */
static int copy_data(flatten *f, int in, int out, off_t size, const char *path, crimage_error **err)
{
  bool plain = false;
  off_t off = 0;
  while (off < size) {
    off_t data = lseek(in, off, SEEK_DATA);
    if (data < 0 && errno == ENXIO)
      break; /* only a hole is left */
    if (data < 0)
      data = off; /* no SEEK_DATA here: all of it */
    off_t hole = lseek(in, data, SEEK_HOLE);
    if (hole < 0 || hole > size)
      hole = size;
    off_t pos = data;
    while (pos < hole) {
      size_t want = (size_t) (hole - pos);
      ssize_t n = -1;
      if (!plain) {
        off_t ipos = pos, opos = pos;
        n = copy_file_range(in, &ipos, out, &opos, want, 0);
        if (n < 0 && (errno == EXDEV || errno == ENOSYS || errno == EINVAL || errno == EOPNOTSUPP ||
                      errno == EBADF || errno == EPERM)) {
          plain = true; /* e.g. across filesystems on old kernels, or a filesystem that has no such copy */
          continue;
        }
      } else {
        n = pread(in, f->chunk, want < COPY_CHUNK_BYTES ? want : COPY_CHUNK_BYTES, pos);
        int r = n > 0 ? pwrite_all(out, f->chunk, (size_t) n, pos) : 0;
        if (r < 0)
          return entry_fail(f, err, -r, path, "writing the copy");
      }
      if (n < 0 && errno == EINTR)
        continue;
      if (n < 0)
        return entry_fail(f, err, errno, path, "copying the file");
      if (n == 0)
        return entry_fail(f, err, EIO, path, "the file got shorter while it was copied");
      pos += n;
    }
    off = hole;
  }
  /* the size, with a trailing hole */
  if (ftruncate(out, size) < 0)
    return entry_fail(f, err, errno, path, "setting the size of the copy");
  return 0;
}

static int copy_file(flatten *f, int src, int dst, const char *name, const struct stat *st, const char *path,
                     crimage_error **err)
{
  /* O_NOATIME: reading the copy's source leaves the layer's atimes alone (root may ask for it on any file) */
  cleanup_close int in = openat(src, name, O_RDONLY | O_NOFOLLOW | O_NOCTTY | O_CLOEXEC | O_NOATIME);
  if (in < 0 && errno == EPERM)
    in = openat(src, name, O_RDONLY | O_NOFOLLOW | O_NOCTTY | O_CLOEXEC);
  if (in < 0)
    return entry_fail(f, err, errno, path, "opening the file");
  cleanup_close int out = openat(dst, name, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
  if (out < 0)
    return entry_fail(f, err, errno, path, "creating the copy");
  int r = copy_data(f, in, out, st->st_size, path, err);
  if (r < 0)
    return r;
  /* In this order: chown clears setuid, setgid and security.capability, and a write would too. */
  if (fchown(out, st->st_uid, st->st_gid) < 0)
    return entry_fail(f, err, errno, path, "chown");
  if (fchmod(out, st->st_mode & 07777) < 0)
    return entry_fail(f, err, errno, path, "chmod");
  xnode xs = xnode_fd(in), xd = xnode_fd(out);
  r = copy_xattrs(f, &xs, &xd, name, false, path, err);
  if (r < 0)
    return r;
  struct timespec ts[2];
  times_of(st, ts);
  if (futimens(out, ts) < 0)
    return entry_fail(f, err, errno, path, "setting times");
  return 0;
}

/* The metadata of something made by name (a symlink or a node), which cannot be opened to write it. */
static int meta_at(flatten *f, int src, int dst, const char *name, const struct stat *st, const char *path,
                   crimage_error **err)
{
  if (fchownat(dst, name, st->st_uid, st->st_gid, AT_SYMLINK_NOFOLLOW) < 0)
    return entry_fail(f, err, errno, path, "chown");
  /* after chown, which clears setuid and setgid; symlinks have no mode of their own */
  if (!S_ISLNK(st->st_mode) && fchmodat(dst, name, st->st_mode & 07777, AT_SYMLINK_NOFOLLOW) < 0)
    return entry_fail(f, err, errno, path, "chmod");
  xnode xs = xnode_at(src), xd = xnode_at(dst);
  int r = copy_xattrs(f, &xs, &xd, name, false, path, err);
  if (r < 0)
    return r;
  struct timespec ts[2];
  times_of(st, ts);
  if (utimensat(dst, name, ts, AT_SYMLINK_NOFOLLOW) < 0)
    return entry_fail(f, err, errno, path, "setting times");
  return 0;
}

static int copy_symlink(flatten *f, int src, int dst, const char *name, const struct stat *st, const char *path,
                        crimage_error **err)
{
  char target[PATH_MAX + 1];
  ssize_t n = readlinkat(src, name, target, sizeof(target));
  if (n < 0)
    return entry_fail(f, err, errno, path, "reading the symlink");
  if ((size_t) n == sizeof(target))
    return entry_fail(f, err, ENAMETOOLONG, path, "reading the symlink");
  target[n] = '\0';
  /* only stored: where it points does not matter, nothing here follows it */
  if (symlinkat(target, dst, name) < 0)
    return entry_fail(f, err, errno, path, "creating the symlink");
  return meta_at(f, src, dst, name, st, path, err);
}

static int copy_node(flatten *f, int src, int dst, const char *name, const struct stat *st, const char *path,
                     crimage_error **err)
{
  if (mknodat(dst, name, (st->st_mode & S_IFMT) | 0600, st->st_rdev) < 0) {
    const char *kind = S_ISFIFO(st->st_mode) ? "fifo" : S_ISSOCK(st->st_mode) ? "socket" : "device node";
    return entry_fail(f, err, errno, path, "creating the %s", kind);
  }
  return meta_at(f, src, dst, name, st, path, err);
}

/* ---- hard links ---- */

static int link_cmp(const void *a, const void *b)
{
  const link_seen *x = a, *y = b;
  if (x->dev != y->dev)
    return x->dev < y->dev ? -1 : 1;
  if (x->ino != y->ino)
    return x->ino < y->ino ? -1 : 1;
  return 0;
}

static void link_free(void *p)
{
  link_seen *l = p;
  free(l->path);
  free(l);
}

/* When another name of this inode of the layer was copied already, links name to that copy: returns 1. 0 when
 * this is its first name. */
static int link_again(flatten *f, int dst, const char *name, const struct stat *st, const char *path,
                      crimage_error **err)
{
  link_seen key = {.dev = st->st_dev, .ino = st->st_ino};
  link_seen **seen = tfind(&key, &f->links, link_cmp);
  if (!seen)
    return 0;
  const char *first = (*seen)->path;
  const char *slash = strrchr(first, '/');
  cleanup_free char *parent = slash ? xstrndup(first, (size_t) (slash - first)) : xstrdup("");
  cleanup_close int pfd = -1;
  int r = open_beneath(f, parent, &pfd);
  if (r < 0)
    return entry_fail(f, err, -r, path, "opening the directory of /%s, its other name", first);
  /* flags 0: the first name is linked as itself, never followed */
  if (linkat(pfd, slash ? slash + 1 : first, dst, name, 0) < 0)
    return entry_fail(f, err, errno, path, "linking to /%s, its other name", first);
  return 1;
}

static void link_remember(flatten *f, const struct stat *st, const char *path)
{
  link_seen *l = xmalloc(sizeof(*l));
  *l = (link_seen){.dev = st->st_dev, .ino = st->st_ino, .path = xstrdup(path)};
  link_seen **in = tsearch(l, &f->links, link_cmp);
  if (!in)
    abort(); /* out of memory, as xmalloc would */
  if (*in != l)
    link_free(l);
}

/* ---- directories ---- */

static int record_dir(flatten *f, const char *path, const struct stat *st, crimage_error **err)
{
  size_t n = strlen(path) + 1;
  if (f->dir_bytes + n > DIR_LIST_MAX_BYTES)
    return entry_fail(f, err, E2BIG, path, "the layers' directories have more than %u bytes of names",
                      DIR_LIST_MAX_BYTES);
  if (f->n_dirs == f->cap_dirs) {
    f->cap_dirs = f->cap_dirs ? f->cap_dirs * 2 : 64;
    f->dirs = xrealloc(f->dirs, f->cap_dirs * sizeof(*f->dirs));
  }
  dir_meta *d = &f->dirs[f->n_dirs++];
  d->path = xstrdup(path);
  d->mode = st->st_mode & 07777;
  times_of(st, d->times);
  f->dir_bytes += n;
  return 0;
}

static bool is_opaque(int fd)
{
  char v;
  return fgetxattr(fd, OPAQUE_XATTR, &v, 1) == 1 && v == 'y';
}

/* The owner and xattrs of a layer's directory onto its copy, and its mode and times kept for the end. */
static int dir_attrs(flatten *f, int sfd, int dfd, const struct stat *st, bool merged, const char *path,
                     crimage_error **err)
{
  if (fchown(dfd, st->st_uid, st->st_gid) < 0)
    return entry_fail(f, err, errno, path, "chown");
  xnode xs = xnode_fd(sfd), xd = xnode_fd(dfd);
  int r = copy_xattrs(f, &xs, &xd, "", merged, path, err);
  if (r < 0)
    return r;
  return record_dir(f, path, st, err);
}

static int apply_tree(flatten *f, int src, int dst, const char *rel, unsigned depth, crimage_error **err);

static int apply_dir(flatten *f, int src, int dst, const char *name, const struct stat *st, const char *path,
                     unsigned depth, crimage_error **err)
{
  if (depth >= f->max_depth)
    return entry_fail(f, err, EMFILE, path, "nested deeper than %u directories (the open files limit)",
                      f->max_depth);
  cleanup_close int sfd = openat(src, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (sfd < 0)
    return entry_fail(f, err, errno, path, "opening the directory");
  struct stat cur;
  bool merged = fstatat(dst, name, &cur, AT_SYMLINK_NOFOLLOW) == 0;
  if (!merged && errno != ENOENT)
    return entry_fail(f, err, errno, path, "stat of the copy");
  /* A directory replaces a non-directory below it; an opaque one also replaces a directory: removing what is
   * there and starting afresh is both. */
  if (merged && (!S_ISDIR(cur.st_mode) || is_opaque(sfd))) {
    int r = remove_at(f, dst, name, path, err);
    if (r < 0)
      return r;
    merged = false;
  }
  /* 0700 until the end, when the directories get their modes and times */
  if (!merged && mkdirat(dst, name, 0700) < 0)
    return entry_fail(f, err, errno, path, "creating the directory");
  cleanup_close int dfd = openat(dst, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (dfd < 0)
    return entry_fail(f, err, errno, path, "opening the directory copy");
  int r = dir_attrs(f, sfd, dfd, st, merged, path, err);
  if (r < 0)
    return r;
  return apply_tree(f, sfd, dfd, path, depth + 1, err);
}

static int apply_entry(flatten *f, int src, int dst, const char *name, const char *path, unsigned depth,
                       crimage_error **err)
{
  struct stat st;
  if (fstatat(src, name, &st, AT_SYMLINK_NOFOLLOW) < 0)
    return entry_fail(f, err, errno, path, "stat");
  if (S_ISCHR(st.st_mode) && st.st_rdev == makedev(0, 0))
    return remove_at(f, dst, name, path, err); /* a whiteout */
  if (S_ISDIR(st.st_mode))
    return apply_dir(f, src, dst, name, &st, path, depth, err);
  int r = remove_at(f, dst, name, path, err);
  if (r < 0)
    return r;
  bool linked = st.st_nlink > 1;
  if (linked) {
    r = link_again(f, dst, name, &st, path, err);
    if (r != 0)
      return r < 0 ? r : 0;
  }
  switch (st.st_mode & S_IFMT) {
  case S_IFREG:
    r = copy_file(f, src, dst, name, &st, path, err);
    break;
  case S_IFLNK:
    r = copy_symlink(f, src, dst, name, &st, path, err);
    break;
  case S_IFCHR:
  case S_IFBLK:
  case S_IFIFO:
  case S_IFSOCK:
    r = copy_node(f, src, dst, name, &st, path, err);
    break;
  default:
    return entry_fail(f, err, EINVAL, path, "unknown file type 0%o", (unsigned) (st.st_mode & S_IFMT));
  }
  if (r == 0 && linked)
    link_remember(f, &st, path);
  return r;
}

static int name_cmp(const void *a, const void *b) { return strcmp(*(char *const *) a, *(char *const *) b); }

/* The names in a directory, sorted (so that which name of a hard link is copied first does not depend on the
 * order on disk). Read whole and closed before descending: the walk then holds two fds per level, not three. */
static int list_names(flatten *f, int fd, const char *path, char ***ret, crimage_error **err)
{
  int dfd = openat(fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  DIR *d = dfd >= 0 ? fdopendir(dfd) : NULL;
  if (!d) {
    int e = errno;
    if (dfd >= 0)
      close(dfd);
    return entry_fail(f, err, e, path, "reading the directory");
  }
  char **names = xcalloc(1, sizeof(char *));
  size_t n = 0;
  struct dirent *de;
  while ((errno = 0, de = readdir(d))) {
    if (streq(de->d_name, ".") || streq(de->d_name, ".."))
      continue;
    names = xrealloc(names, (n + 2) * sizeof(char *));
    names[n++] = xstrdup(de->d_name);
    names[n] = NULL;
  }
  int e = errno;
  closedir(d);
  if (e) {
    strv_free(names);
    return entry_fail(f, err, e, path, "reading the directory");
  }
  qsort(names, n, sizeof(char *), name_cmp);
  *ret = names;
  return 0;
}

static int apply_tree(flatten *f, int src, int dst, const char *rel, unsigned depth, crimage_error **err)
{
  cleanup_strv char **names = NULL;
  int r = list_names(f, src, rel, &names, err);
  if (r < 0)
    return r;
  for (size_t i = 0; names[i]; i++) {
    cleanup_free char *path = *rel ? xasprintf("%s/%s", rel, names[i]) : xstrdup(names[i]);
    r = apply_entry(f, src, dst, names[i], path, depth, err);
    if (r < 0)
      return r;
  }
  return 0;
}

/* Removes everything in the directory fd. */
static int clear_dir(flatten *f, int fd, crimage_error **err)
{
  cleanup_strv char **names = NULL;
  int r = list_names(f, fd, "", &names, err);
  if (r < 0)
    return r;
  for (size_t i = 0; names[i]; i++) {
    r = remove_at(f, fd, names[i], names[i], err);
    if (r < 0)
      return r;
  }
  return 0;
}

static int apply_layer(flatten *f, const char *layer, crimage_error **err)
{
  f->layer = layer;
  cleanup_close int lfd = open(layer, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (lfd < 0)
    return crimage_error_set(err, errno == ENOENT ? CRIMAGE_NOT_FOUND : CRIMAGE_INTERNAL, errno,
                             "opening layer %s", layer);
  struct stat st;
  if (fstat(lfd, &st) < 0)
    return crimage_error_set(err, CRIMAGE_INTERNAL, errno, "stat of layer %s", layer);
  /* The image spec's opaque root hides every layer below (overlayfs would ignore it at a layer's root). */
  if (is_opaque(lfd)) {
    int r = clear_dir(f, f->rootfd, err);
    if (r < 0)
      return r;
  }
  int r = dir_attrs(f, lfd, f->rootfd, &st, true, "", err);
  if (r < 0)
    return r;
  r = apply_tree(f, lfd, f->rootfd, "", 1, err);
  /* hard links never span layers: each layer has its own */
  tdestroy(f->links, link_free);
  f->links = NULL;
  return r;
}

/* The directories' modes and times, the topmost layer's of each: every record in order, so a later layer's
 * overrides an earlier one's; a record whose directory a later layer removed or replaced finds nothing (or a
 * non-directory, or a symlink) and is skipped. */
static int finish_dirs(flatten *f, crimage_error **err)
{
  f->layer = NULL;
  for (size_t i = 0; i < f->n_dirs; i++) {
    const dir_meta *d = &f->dirs[i];
    cleanup_close int fd = -1;
    int r = open_beneath(f, d->path, &fd);
    if (r == -ENOENT || r == -ENOTDIR || r == -ELOOP)
      continue;
    if (r < 0)
      return entry_fail(f, err, -r, d->path, "opening the directory");
    if (fchmod(fd, d->mode) < 0)
      return entry_fail(f, err, errno, d->path, "chmod");
    if (futimens(fd, d->times) < 0)
      return entry_fail(f, err, errno, d->path, "setting times");
  }
  return 0;
}

/* How deep the walk may go with the open files limit: two fds per level. */
static unsigned depth_limit(void)
{
  struct rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) < 0 || rl.rlim_cur == RLIM_INFINITY)
    return MAX_DEPTH;
  if (rl.rlim_cur <= FD_RESERVE + 2)
    return 1;
  rlim_t levels = (rl.rlim_cur - FD_RESERVE) / 2;
  return levels < MAX_DEPTH ? (unsigned) levels : MAX_DEPTH;
}

/* Opens dir for flattening into: created when absent, else it must be an empty directory. */
static int open_target(const char *dir, bool *ret_created, int *ret_fd, crimage_error **err)
{
  bool created = mkdir(dir, 0700) == 0;
  if (!created && errno != EEXIST)
    return crimage_error_set(err, errno == ENOENT ? CRIMAGE_NOT_FOUND : CRIMAGE_INTERNAL, errno, "creating %s",
                             dir);
  /* dir itself may be a symlink to a directory: the caller named it */
  int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0)
    return crimage_error_set(err, errno == ENOTDIR ? CRIMAGE_FAILED_PRECONDITION : CRIMAGE_INTERNAL, errno,
                             "opening %s", dir);
  if (!created) {
    int dfd = dup(fd);
    DIR *d = dfd >= 0 ? fdopendir(dfd) : NULL;
    if (!d) {
      int e = errno;
      if (dfd >= 0)
        close(dfd);
      close(fd);
      return crimage_error_set(err, CRIMAGE_INTERNAL, e, "reading %s", dir);
    }
    struct dirent *de;
    bool empty = true;
    while (empty && (de = readdir(d)))
      empty = streq(de->d_name, ".") || streq(de->d_name, "..");
    closedir(d);
    if (!empty) {
      close(fd);
      crimage_error_set(err, CRIMAGE_FAILED_PRECONDITION, 0,
                        "%s is not empty (the rootfs goes into an empty or new directory)", dir);
      return -ENOTEMPTY;
    }
  }
  *ret_created = created;
  *ret_fd = fd;
  return 0;
}

int rootfs_flatten(char *const *layers, const char *dir, const rootfs_options *opts, crimage_error **err)
{
  if (!layers || !layers[0])
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, EINVAL, "no layers to flatten");
  bool created = false;
  int rootfd = -1;
  int r = open_target(dir, &created, &rootfd, err);
  if (r < 0)
    return r;
  flatten f = {
      .rootfd = rootfd,
      .max_depth = depth_limit(),
      .no_openat2 = opts && opts->walk_only,
      .src_names = xmalloc(XATTR_LIST_MAX),
      .dst_names = xmalloc(XATTR_LIST_MAX),
      .value = xmalloc(XATTR_SIZE_MAX),
      .chunk = xmalloc(COPY_CHUNK_BYTES),
  };
  size_t n = strv_length(layers);
  for (size_t i = 0; r >= 0 && i < n; i++) {
    r = apply_layer(&f, layers[i], err);
    if (r < 0)
      crimage_error_wrap(err, "applying layer %zu of %zu", i + 1, n);
  }
  if (r >= 0)
    r = finish_dirs(&f, err);
  if (r < 0) {
    /* leave dir as it was found */
    crimage_error *cerr = NULL;
    if (clear_dir(&f, rootfd, &cerr) < 0) {
      log_warn("cannot remove the partial copy in %s: %s", dir, cerr->message);
      crimage_error_free(cerr);
    } else if (created && rmdir(dir) < 0) {
      log_warn("cannot remove %s: %s", dir, strerror(errno));
    }
  }
  for (size_t i = 0; i < f.n_dirs; i++)
    free(f.dirs[i].path);
  free(f.dirs);
  free(f.src_names);
  free(f.dst_names);
  free(f.value);
  free(f.chunk);
  close(rootfd);
  return r;
}

/* ---- mounting ---- */

/* True when dir is the root of a mount (statx knows since Linux 5.8; before, a device differing from the
 * parent's, which misses bind mounts within one filesystem). */
static bool is_mount_point(const char *dir)
{
  struct statx stx;
  if (statx(AT_FDCWD, dir, 0, STATX_BASIC_STATS, &stx) == 0 && (stx.stx_attributes_mask & STATX_ATTR_MOUNT_ROOT))
    return (stx.stx_attributes & STATX_ATTR_MOUNT_ROOT) != 0;
  struct stat here, up;
  cleanup_free char *parent = xasprintf("%s/..", dir);
  return stat(dir, &here) == 0 && stat(parent, &up) == 0 && here.st_dev != up.st_dev;
}

static int mount_error(int errnum, const char *dir, const char *what, crimage_error **err)
{
  switch (errnum) {
  case EPERM:
    return crimage_error_set(err, CRIMAGE_PERMISSION_DENIED, errnum, "%s on %s (mounting needs root)", what, dir);
  case EBUSY:
    return crimage_error_set(err, CRIMAGE_FAILED_PRECONDITION, errnum, "%s on %s", what, dir);
  case ENODEV:
    return crimage_error_set(err, CRIMAGE_FAILED_PRECONDITION, errnum, "%s on %s (this kernel has no overlayfs)",
                             what, dir);
  case EINVAL:
    return crimage_error_set(err, CRIMAGE_FAILED_PRECONDITION, errnum,
                             "%s on %s (overlayfs refused the layers: the kernel log says why)", what, dir);
  default:
    return crimage_error_set(err, CRIMAGE_INTERNAL, errnum, "%s on %s", what, dir);
  }
}

/* Characters that would end a path in the options string (',' separates options, ':' layers, '\\' escapes). */
static bool plain_path(const char *p) { return !strpbrk(p, ",:\\"); }

int rootfs_mount(char *const *layers, const char *dir, crimage_error **err)
{
  size_t n = strv_length(layers);
  if (n == 0)
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, EINVAL, "no layers to mount");
  struct stat st;
  if (stat(dir, &st) < 0)
    return crimage_error_set(err, errno == ENOENT ? CRIMAGE_NOT_FOUND : CRIMAGE_INTERNAL, errno, "%s", dir);
  if (!S_ISDIR(st.st_mode))
    return crimage_error_set(err, CRIMAGE_FAILED_PRECONDITION, ENOTDIR, "%s", dir);
  /* a second mount would hide the first, and one umount would then not undo this */
  if (is_mount_point(dir)) {
    crimage_error_set(err, CRIMAGE_FAILED_PRECONDITION, 0, "%s is a mount point already (crimage umount %s first)",
                      dir, dir);
    return -EBUSY;
  }

  if (n == 1) {
    /* overlayfs wants two lower layers when it has no upper one: one layer is a bind mount, made read-only by a
     * remount (a bind mount takes MS_RDONLY only that way) */
    if (mount(layers[0], dir, "none", MS_BIND, NULL) < 0)
      return mount_error(errno, dir, "bind-mounting the layer", err);
    if (mount("none", dir, "none", MS_REMOUNT | MS_BIND | MS_RDONLY, NULL) < 0) {
      int e = errno;
      umount2(dir, MNT_DETACH);
      return mount_error(e, dir, "making the bind mount read-only", err);
    }
    return 0;
  }

  /* lowerdir lists the topmost layer first. mount(2) takes at most a page of options and cuts the rest, so a long
   * list (about 40 layers in /var/lib/crimage), or paths with characters the options syntax reserves, go as
   * /proc/self/fd/N of directories opened here: overlayfs resolves each when it mounts. */
  long page = sysconf(_SC_PAGESIZE);
  size_t max = page > 0 ? (size_t) page - 1 : 4095;
  bool plain = true;
  size_t len = strlen("lowerdir=");
  for (size_t i = 0; i < n; i++) {
    plain = plain && plain_path(layers[i]);
    len += strlen(layers[i]) + 1;
  }
  cleanup_free int *fds = NULL;
  if (!plain || len > max) {
    fds = xmalloc(n * sizeof(int));
    for (size_t i = 0; i < n; i++)
      fds[i] = -1;
  }
  cleanup_dynbuf dynbuf opts;
  dynbuf_init(&opts, max);
  int r = dynbuf_append_str(&opts, "lowerdir=");
  for (size_t i = n; r == 0 && i-- > 0;) {
    if (i + 1 < n)
      r = dynbuf_append_str(&opts, ":");
    if (r == 0 && !fds) {
      r = dynbuf_append_str(&opts, layers[i]);
    } else if (r == 0) {
      fds[i] = open(layers[i], O_PATH | O_DIRECTORY | O_CLOEXEC);
      if (fds[i] < 0) {
        r = crimage_error_set(err, errno == ENOENT ? CRIMAGE_NOT_FOUND : CRIMAGE_INTERNAL, errno,
                              "opening layer %s", layers[i]);
        break;
      }
      r = dynbuf_printf(&opts, "/proc/self/fd/%d", fds[i]);
    }
  }
  if (r == -ENOBUFS)
    r = crimage_error_set(err, CRIMAGE_RESOURCE_EXHAUSTED, E2BIG,
                          "%zu layers do not fit in one overlay mount's options (%zu bytes)", n, max);
  if (r == 0 && mount("overlay", dir, "overlay", MS_RDONLY, opts.data) < 0)
    r = mount_error(errno, dir, "mounting the overlay", err);
  for (size_t i = 0; fds && i < n; i++)
    if (fds[i] >= 0)
      close(fds[i]);
  return r < 0 ? r : 0;
}

int rootfs_umount(const char *dir, crimage_error **err)
{
  if (umount2(dir, UMOUNT_NOFOLLOW) == 0)
    return 0;
  switch (errno) {
  case EINVAL:
    crimage_error_set(err, CRIMAGE_FAILED_PRECONDITION, 0, "%s is not a mount point", dir);
    return -EINVAL;
  case ENOENT:
    return crimage_error_set(err, CRIMAGE_NOT_FOUND, errno, "%s", dir);
  case EBUSY:
    return crimage_error_set(err, CRIMAGE_FAILED_PRECONDITION, errno, "unmounting %s (a process still uses it)", dir);
  case EPERM:
    return crimage_error_set(err, CRIMAGE_PERMISSION_DENIED, errno, "unmounting %s (that needs root)", dir);
  default:
    return crimage_error_set(err, CRIMAGE_INTERNAL, errno, "unmounting %s", dir);
  }
}
