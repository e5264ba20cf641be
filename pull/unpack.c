/* The layer unpacker (see unpack.h). Two threads per layer:
 *
 *   caller (unpack_write): compressed bytes -> inflate / zstd -> sha256 + size limit -> queue (bounded, blocks)
 *   worker:                queue -> libarchive's tar reader -> entries written under the temporary layer dir
 *
 * The queue is a ring of UNPACK_QUEUE_CHUNKS chunks: the writer fills the chunk at `wr` outside the lock (it is
 * free) and publishes it; libarchive's read callback hands the chunk at `rd` to libarchive, which may keep using it
 * until its next read call, so the chunk is released only then. */
#include "pull/unpack.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <fts.h>
#include <inttypes.h>
#include <linux/openat2.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/types.h>
#include <sys/xattr.h>
#include <time.h>
#include <unistd.h>

#include <archive.h>
#include <archive_entry.h>
#include <isa-l/igzip_lib.h>
#include <zstd.h>

#include "common/fsutil.h"
#include "common/log.h"
#include "common/util.h"

#define TMP_PREFIX ".unpack-"
/* Directory metadata (modes, times) is applied after the last entry; its list holds one path per directory. Bounded
 * on top of max_entries because paths can be long: real layers need a few MB. */
#define DIR_LIST_MAX_BYTES (256u << 20)
#define OPAQUE_XATTR "trusted.overlay.opaque"
#define WH_PREFIX ".wh."
#define WH_META_PREFIX ".wh..wh."
#define WH_OPAQUE ".wh..wh..opq"

typedef struct dir_meta {
  char *path; /* relative to the layer root, "" = the root */
  mode_t mode;
  struct timespec times[2]; /* atime, mtime */
} dir_meta;

struct unpack {
  unpack_limits lim;
  unpack_compression comp;
  char *dir;     /* the final directory, as given */
  char *base;    /* its last component */
  char *tmpname; /* the temporary sibling's name */
  int parentfd;
  int rootfd; /* the temporary directory, O_RDONLY */

  /* ---- writer side (the caller's thread) ---- */
  struct inflate_state *zs; /* gzip */
  bool member_end;          /* the last gzip member ended; more bytes start another one */
  ZSTD_DStream *zd;         /* zstd */
  size_t zstd_hint;         /* the last ZSTD_decompressStream result: 0 = at a frame boundary */
  bool seen_input;
  unsigned char *out; /* decompression output, UNPACK_CHUNK_BYTES */
  digester *digest;
  uint64_t total; /* uncompressed bytes so far */
  bool have_slot; /* the writer owns slots[wr] and has put fill bytes in it */
  size_t fill;
  bool failed; /* an earlier call failed: nothing more is accepted */

  /* ---- shared, under lock ---- */
  pthread_mutex_t lock;
  pthread_cond_t cond; /* any change of the fields below; both sides wait on it */
  unsigned char *slots[UNPACK_QUEUE_CHUNKS];
  size_t slot_len[UNPACK_QUEUE_CHUNKS];
  size_t rd, wr, filled; /* filled counts published chunks, the one libarchive holds included */
  bool held;             /* libarchive holds slots[rd] */
  bool eof;              /* the writer has published its last chunk */
  bool stop;             /* the worker must stop (abort, restart, or the writer failed) */
  bool worker_done;      /* the worker ended; worker_ret says how */
  int worker_ret;
  crimage_error *worker_err;
  bool thread_started;
  pthread_t thread;

  /* ---- worker side (only the worker touches these while it runs) ---- */
  struct archive *a;
  uint64_t n_entries;
  dir_meta *dirs;
  size_t n_dirs, cap_dirs, dir_bytes;
  bool root_seen;
  char *cache_path; /* the last parent directory opened, and its fd (O_PATH) */
  int cache_fd;
  bool no_openat2; /* the kernel has no openat2 (or a seccomp filter hides it): walk instead */
};

void unpack_limits_default(unpack_limits *ret)
{
  *ret = (unpack_limits){
      .max_entries = UNPACK_DEFAULT_MAX_ENTRIES,
      .max_total_bytes = UNPACK_DEFAULT_MAX_TOTAL_BYTES,
      .max_file_size = UNPACK_DEFAULT_MAX_FILE_SIZE,
      .max_path_len = UNPACK_DEFAULT_MAX_PATH_LEN,
      .max_name_len = UNPACK_DEFAULT_MAX_NAME_LEN,
  };
}

int unpack_compression_of(const char *media_type, unpack_compression *ret)
{
  static const struct {
    const char *media_type;
    unpack_compression comp;
  } known[] = {
      {"application/vnd.oci.image.layer.v1.tar", UNPACK_PLAIN},
      {"application/vnd.oci.image.layer.v1.tar+gzip", UNPACK_GZIP},
      {"application/vnd.oci.image.layer.v1.tar+zstd", UNPACK_ZSTD},
      {"application/vnd.oci.image.layer.nondistributable.v1.tar", UNPACK_PLAIN},
      {"application/vnd.oci.image.layer.nondistributable.v1.tar+gzip", UNPACK_GZIP},
      {"application/vnd.oci.image.layer.nondistributable.v1.tar+zstd", UNPACK_ZSTD},
      {"application/vnd.docker.image.rootfs.diff.tar.gzip", UNPACK_GZIP},
      {"application/vnd.docker.image.rootfs.foreign.diff.tar.gzip", UNPACK_GZIP},
  };
  if (!media_type)
    return -ENOTSUP;
  for (size_t i = 0; i < ARRAY_SIZE(known); i++)
    if (streq(media_type, known[i].media_type)) {
      *ret = known[i].comp;
      return 0;
    }
  return -ENOTSUP;
}

/* An entry name fit for an error message: control characters escaped, long names cut with "...". */
static void quote_name(const char *s, char *out, size_t size)
{
  size_t o = 0;
  for (; s && *s; s++) {
    unsigned char c = (unsigned char) *s;
    bool esc = c < 0x20 || c == 0x7f || c == '"' || c == '\\';
    if (o + (esc ? 4 : 1) + 4 > size) {
      memcpy(out + o, "...", 3);
      o += 3;
      break;
    }
    if (esc)
      o += (size_t) snprintf(out + o, size - o, "\\x%02x", c);
    else
      out[o++] = (char) c;
  }
  out[o] = '\0';
}

/* Sets an error whose cause is not an errno (a bad layer, a limit) and returns ret, a negative errno. */
__attribute__((format(printf, 4, 5))) static int fail(crimage_error **err, int ret, crimage_status status,
                                                      const char *fmt, ...)
{
  va_list ap;
  va_start(ap, fmt);
  cleanup_free char *msg = NULL;
  if (vasprintf(&msg, fmt, ap) < 0)
    abort();
  va_end(ap);
  crimage_error_set(err, status, 0, "%s", msg);
  return ret;
}

/* Sets an error about one entry: `layer entry "<name>": <what>`; returns ret. */
__attribute__((format(printf, 6, 7))) static int entry_error(crimage_error **err, int ret, crimage_status status,
                                                             int errnum, const char *name, const char *fmt, ...)
{
  char q[300];
  quote_name(name, q, sizeof(q));
  va_list ap;
  va_start(ap, fmt);
  cleanup_free char *what = NULL;
  if (vasprintf(&what, fmt, ap) < 0)
    abort();
  va_end(ap);
  crimage_error_set(err, status, errnum, "layer entry \"%s\": %s", q, what);
  return ret;
}

#define refuse(err, name, ...) entry_error(err, -EPERM, CRIMAGE_INVALID_ARGUMENT, 0, name, __VA_ARGS__)
#define fs_error(err, name, errnum, ...) entry_error(err, -(errnum), CRIMAGE_INTERNAL, errnum, name, __VA_ARGS__)

/* ---- removing trees ---- */


/* ---- resolving names beneath the layer root ---- */

/* Cleans an archive name into a path relative to the layer root: leading "/" and "./", empty and "." components
 * go, ".." removes the component before it; a ".." that would climb above the root is refused. Returns the path
 * ("" = the root, caller frees) or NULL with *why set. */
static char *clean_path(const char *name, const unpack_limits *lim, const char **why)
{
  size_t n = strlen(name);
  char *out = xmalloc(n + 1);
  size_t o = 0;
  const char *p = name;
  while (*p) {
    while (*p == '/')
      p++;
    const char *start = p;
    while (*p && *p != '/')
      p++;
    size_t len = (size_t) (p - start);
    if (len == 0 || (len == 1 && start[0] == '.'))
      continue;
    if (len == 2 && start[0] == '.' && start[1] == '.') {
      if (o == 0) {
        free(out);
        *why = "the name climbs out of the layer with \"..\"";
        return NULL;
      }
      while (o > 0 && out[o - 1] != '/')
        o--;
      if (o > 0)
        o--; /* the slash */
      continue;
    }
    if (len > lim->max_name_len) {
      free(out);
      *why = "a path component is longer than the limit";
      return NULL;
    }
    if (o > 0)
      out[o++] = '/';
    memcpy(out + o, start, len);
    o += len;
  }
  out[o] = '\0';
  if (o > lim->max_path_len) {
    free(out);
    *why = "the name is longer than the limit";
    return NULL;
  }
  return out;
}

static int sys_openat2(int dirfd, const char *path, int flags, uint64_t resolve)
{
  struct open_how how = {.flags = (uint64_t) flags, .resolve = resolve};
  return (int) syscall(SYS_openat2, dirfd, path, &how, sizeof(how));
}

/* Opens the directory path (relative, "" = root) beneath the layer root without following a symlink. create:
 * missing directories are made (0755, as tar and containerd make the parents an archive leaves implied), and a
 * path through a symlink or a non-directory is refused with an error naming entry. Without create, -ENOENT,
 * -ENOTDIR and -ELOOP (a symlink on the way) are returned without an error set: the caller decides. Returns an fd
 * the caller closes (O_PATH unless open_flags say O_RDONLY). */
static int resolve_dir(unpack *u, const char *path, bool create, int open_flags, const char *entry, int *ret_fd,
                       crimage_error **err)
{
  int flags = open_flags | O_DIRECTORY | O_CLOEXEC;
  if (!*path) {
    int fd = openat(u->rootfd, ".", flags);
    if (fd < 0)
      return fs_error(err, entry, errno, "opening the layer root");
    *ret_fd = fd;
    return 0;
  }
  if (!u->no_openat2) {
    int fd = sys_openat2(u->rootfd, path, flags,
                         RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV);
    if (fd >= 0) {
      *ret_fd = fd;
      return 0;
    }
    switch (errno) {
    case ENOENT:
      if (!create)
        return -ENOENT;
      break; /* the walk below creates what is missing */
    case ELOOP:
      if (!create)
        return -ELOOP;
      return refuse(err, entry, "the path goes through a symlink");
    case ENOTDIR:
      if (!create)
        return -ENOTDIR;
      return refuse(err, entry, "a parent of it is not a directory");
    case EXDEV:
      return refuse(err, entry, "the path leaves the layer");
    case ENOSYS:
    case EPERM: /* a seccomp filter that does not know openat2 */
    case E2BIG:
      u->no_openat2 = true;
      break;
    default:
      return fs_error(err, entry, errno, "opening directory %s", path);
    }
  }
  /* One component at a time, each opened O_PATH | O_NOFOLLOW: a symlink is opened as itself, seen by fstat and
   * refused. The last one is reopened with the flags asked for, from its parent. */
  int cur = -1; /* -1: the root */
  const char *p = path;
  int r = 0;
  while (*p) {
    const char *slash = strchr(p, '/');
    size_t len = slash ? (size_t) (slash - p) : strlen(p);
    cleanup_free char *comp = xstrndup(p, len);
    p += len;
    if (*p == '/')
      p++;
    int base = cur >= 0 ? cur : u->rootfd;
    int next = openat(base, comp, O_PATH | O_NOFOLLOW | O_CLOEXEC);
    if (next < 0 && errno == ENOENT && create) {
      if (mkdirat(base, comp, 0755) < 0) {
        r = fs_error(err, entry, errno, "creating directory %s", comp);
        break;
      }
      /* 0755 whatever the umask; comp is the directory just made */
      if (fchmodat(base, comp, 0755, 0) < 0) {
        r = fs_error(err, entry, errno, "chmod of directory %s", comp);
        break;
      }
      next = openat(base, comp, O_PATH | O_NOFOLLOW | O_CLOEXEC);
    }
    if (next < 0) {
      if (errno == ENOENT && !create) {
        r = -ENOENT;
        break;
      }
      r = fs_error(err, entry, errno, "opening directory %s", comp);
      break;
    }
    struct stat st;
    if (fstat(next, &st) < 0) {
      r = fs_error(err, entry, errno, "stat of %s", comp);
      close(next);
      break;
    }
    if (!S_ISDIR(st.st_mode)) {
      close(next);
      bool link = S_ISLNK(st.st_mode);
      if (!create)
        r = link ? -ELOOP : -ENOTDIR;
      else
        r = refuse(err, entry, link ? "the path goes through a symlink" : "a parent of it is not a directory");
      break;
    }
    if (!*p && (flags & O_PATH) == 0) {
      /* the last component, verified a directory, reopened as asked (O_NOFOLLOW: it is not a symlink) */
      int fd = openat(next, ".", flags);
      close(next);
      if (fd < 0) {
        r = fs_error(err, entry, errno, "opening directory %s", comp);
        break;
      }
      next = fd;
    }
    if (cur >= 0)
      close(cur);
    cur = next;
  }
  if (r < 0) {
    if (cur >= 0)
      close(cur);
    return r;
  }
  *ret_fd = cur;
  return 0;
}

static void cache_drop(unpack *u)
{
  if (u->cache_fd >= 0)
    close(u->cache_fd);
  u->cache_fd = -1;
  free(u->cache_path);
  u->cache_path = NULL;
}

/* The parent directory of an entry, created when missing. Consecutive entries mostly share it: the last one is
 * kept open. That is safe because the cached directory is always the current entry's parent: whatever an entry
 * removes or replaces is below it, so the cached fd never names a removed directory or one a symlink replaced.
 * The fd belongs to the cache: do not close it. */
static int parent_dir(unpack *u, const char *path, const char *entry, int *ret_fd, crimage_error **err)
{
  if (u->cache_path && streq(u->cache_path, path)) {
    *ret_fd = u->cache_fd;
    return 0;
  }
  cache_drop(u);
  int fd = -1;
  int r = resolve_dir(u, path, true, O_PATH, entry, &fd, err);
  if (r < 0)
    return r;
  u->cache_path = xstrdup(path);
  u->cache_fd = fd;
  *ret_fd = fd;
  return 0;
}

/* Removes what is at name in dirfd, for an entry that replaces it (a later tar entry wins, as with tar -x). dirfd
 * is the cached parent directory, which stays valid: only something below it goes. */
static int replace(int dirfd, const char *name, const char *entry, crimage_error **err)
{
  int r = rm_tree_at(dirfd, name);
  if (r < 0)
    return fs_error(err, entry, -r, "removing the earlier entry of that name");
  return 0;
}

/* ---- entry metadata ---- */

static const char *entry_path(struct archive_entry *e)
{
  const char *p = archive_entry_pathname(e);
  /* libarchive gives NULL when a UTF-8 (pax) name has no form in the locale's charset: the bytes are the name */
  return p ? p : archive_entry_pathname_utf8(e);
}

static const char *entry_symlink(struct archive_entry *e)
{
  const char *p = archive_entry_symlink(e);
  return p ? p : archive_entry_symlink_utf8(e);
}

static const char *entry_hardlink(struct archive_entry *e)
{
  const char *p = archive_entry_hardlink(e);
  return p ? p : archive_entry_hardlink_utf8(e);
}

static void entry_times(struct archive_entry *e, struct timespec ts[2])
{
  ts[1].tv_sec = archive_entry_mtime(e);
  ts[1].tv_nsec = archive_entry_mtime_nsec(e);
  if (archive_entry_atime_is_set(e)) {
    ts[0].tv_sec = archive_entry_atime(e);
    ts[0].tv_nsec = archive_entry_atime_nsec(e);
  } else {
    ts[0] = ts[1];
  }
}

static int entry_owner(struct archive_entry *e, const char *entry, uid_t *uid, gid_t *gid, crimage_error **err)
{
  la_int64_t u = archive_entry_uid(e), g = archive_entry_gid(e);
  /* (uid_t) -1 means "leave as is" to chown */
  if (u < 0 || g < 0 || u >= (la_int64_t) UINT32_MAX || g >= (la_int64_t) UINT32_MAX)
    return refuse(err, entry, "owner %" PRId64 ":%" PRId64 " is out of range", (int64_t) u, (int64_t) g);
  *uid = (uid_t) u;
  *gid = (gid_t) g;
  return 0;
}

/* Sets the entry's xattrs on fd (a regular file or directory opened for reading or writing), or, with fd < 0, on
 * name in dirfd without following it (symlinks, devices, fifos: they cannot be opened for fsetxattr). */
static int apply_xattrs(struct archive_entry *e, int fd, int dirfd, const char *name, const char *entry,
                        crimage_error **err)
{
  if (archive_entry_xattr_reset(e) == 0)
    return 0;
  const char *key;
  const void *value;
  size_t size;
  cleanup_free char *proc = NULL;
  while (archive_entry_xattr_next(e, &key, &value, &size) == ARCHIVE_OK) {
    if (!key || !*key)
      continue;
    if (str_has_prefix(key, "trusted.overlay.") || str_has_prefix(key, "user.overlay.")) {
      log_debug("layer entry %s: dropping xattr %s: overlayfs metadata comes from whiteouts only", entry, key);
      continue;
    }
    int r;
    if (fd >= 0) {
      r = fsetxattr(fd, key, value, size, 0);
    } else {
      if (!proc)
        proc = xasprintf("/proc/self/fd/%d/%s", dirfd, name);
      r = lsetxattr(proc, key, value, size, 0);
    }
    if (r == 0)
      continue;
    /* As containerd does: a filesystem without the namespace, and user.* on symlinks and devices (the kernel allows
     * it on files and directories only), are skipped. */
    if (errno == ENOTSUP || (errno == EPERM && str_has_prefix(key, "user."))) {
      log_debug("layer entry %s: xattr %s not set: %s", entry, key, strerror(errno));
      continue;
    }
    return fs_error(err, entry, errno, "setting xattr %s", key);
  }
  return 0;
}

/* The metadata of an entry that is not a regular file or directory, which cannot be opened for writing. */
static int apply_meta_at(struct archive_entry *e, int dirfd, const char *name, bool is_symlink, const char *entry,
                         crimage_error **err)
{
  uid_t uid;
  gid_t gid;
  int r = entry_owner(e, entry, &uid, &gid, err);
  if (r < 0)
    return r;
  if (fchownat(dirfd, name, uid, gid, AT_SYMLINK_NOFOLLOW) < 0)
    return fs_error(err, entry, errno, "chown");
  /* After chown, which clears setuid/setgid. Symlinks have no mode of their own; name was just made by us and is
   * not a symlink, so following it is moot. */
  if (!is_symlink && fchmodat(dirfd, name, archive_entry_perm(e) & 07777, 0) < 0)
    return fs_error(err, entry, errno, "chmod");
  r = apply_xattrs(e, -1, dirfd, name, entry, err);
  if (r < 0)
    return r;
  struct timespec ts[2];
  entry_times(e, ts);
  if (utimensat(dirfd, name, ts, AT_SYMLINK_NOFOLLOW) < 0)
    return fs_error(err, entry, errno, "setting times");
  return 0;
}

static int record_dir(unpack *u, const char *path, struct archive_entry *e, const char *entry, crimage_error **err)
{
  size_t n = strlen(path) + 1;
  if (u->dir_bytes + n > DIR_LIST_MAX_BYTES)
    return entry_error(err, -E2BIG, CRIMAGE_RESOURCE_EXHAUSTED, 0, entry,
                       "the layer's directories have more than %u bytes of names", DIR_LIST_MAX_BYTES);
  if (u->n_dirs == u->cap_dirs) {
    u->cap_dirs = u->cap_dirs ? u->cap_dirs * 2 : 64;
    u->dirs = xrealloc(u->dirs, u->cap_dirs * sizeof(*u->dirs));
  }
  dir_meta *d = &u->dirs[u->n_dirs++];
  d->path = xstrdup(path);
  d->mode = archive_entry_perm(e) & 07777;
  entry_times(e, d->times);
  u->dir_bytes += n;
  return 0;
}

/* ---- entries ---- */

static int write_data(unpack *u, int fd, struct archive_entry *e, const char *entry, crimage_error **err)
{
  int64_t size = archive_entry_size_is_set(e) ? archive_entry_size(e) : 0;
  uint64_t end = 0;
  for (;;) {
    const void *buf;
    size_t len;
    la_int64_t off;
    int r = archive_read_data_block(u->a, &buf, &len, &off);
    if (r == ARCHIVE_EOF)
      break;
    if (r < ARCHIVE_WARN)
      return entry_error(err, -EBADMSG, CRIMAGE_DATA_LOSS, 0, entry, "reading its data: %s",
                         archive_error_string(u->a) ? archive_error_string(u->a) : "tar stream is damaged");
    if (off < 0 || (uint64_t) off + len > u->lim.max_file_size)
      return entry_error(err, -EFBIG, CRIMAGE_RESOURCE_EXHAUSTED, 0, entry,
                         "the file is larger than the limit of %" PRIu64 " bytes", u->lim.max_file_size);
    const char *p = buf;
    while (len > 0) {
      ssize_t n = pwrite(fd, p, len, off);
      if (n < 0 && errno == EINTR)
        continue;
      if (n < 0)
        return fs_error(err, entry, errno, "writing");
      p += n;
      off += n;
      len -= (size_t) n;
    }
    if ((uint64_t) off > end)
      end = (uint64_t) off;
  }
  /* a sparse file's trailing hole */
  if (size > 0 && end < (uint64_t) size && ftruncate(fd, size) < 0)
    return fs_error(err, entry, errno, "truncating");
  return 0;
}

static int extract_file(unpack *u, struct archive_entry *e, int pfd, const char *name, const char *entry,
                        crimage_error **err)
{
  int64_t size = archive_entry_size_is_set(e) ? archive_entry_size(e) : 0;
  if (size < 0 || (uint64_t) size > u->lim.max_file_size)
    return entry_error(err, -EFBIG, CRIMAGE_RESOURCE_EXHAUSTED, 0, entry,
                       "the file is %" PRId64 " bytes, larger than the limit of %" PRIu64, size, u->lim.max_file_size);
  uid_t uid;
  gid_t gid;
  int r = entry_owner(e, entry, &uid, &gid, err);
  if (r < 0)
    return r;
  cleanup_close int fd = openat(pfd, name, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
  if (fd < 0 && errno == EEXIST) {
    r = replace(pfd, name, entry, err);
    if (r < 0)
      return r;
    fd = openat(pfd, name, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
  }
  if (fd < 0)
    return fs_error(err, entry, errno, "creating the file");
  r = write_data(u, fd, e, entry, err);
  if (r < 0)
    return r;
  /* In this order: chown clears setuid/setgid and security.capability, and a write would clear them too. */
  if (fchown(fd, uid, gid) < 0)
    return fs_error(err, entry, errno, "chown");
  if (fchmod(fd, archive_entry_perm(e) & 07777) < 0)
    return fs_error(err, entry, errno, "chmod");
  r = apply_xattrs(e, fd, -1, NULL, entry, err);
  if (r < 0)
    return r;
  struct timespec ts[2];
  entry_times(e, ts);
  if (futimens(fd, ts) < 0)
    return fs_error(err, entry, errno, "setting times");
  return 0;
}

static int extract_dir(unpack *u, struct archive_entry *e, int pfd, const char *name, const char *rel,
                       const char *entry, crimage_error **err)
{
  uid_t uid;
  gid_t gid;
  int r = entry_owner(e, entry, &uid, &gid, err);
  if (r < 0)
    return r;
  cleanup_close int fd = -1;
  if (!*rel) {
    /* "./": the layer root itself */
    fd = openat(u->rootfd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    u->root_seen = true;
  } else {
    /* 0700 until the end, when the directories get their modes and times: entries go into it meanwhile */
    if (mkdirat(pfd, name, 0700) < 0) {
      if (errno != EEXIST)
        return fs_error(err, entry, errno, "creating the directory");
      struct stat st;
      if (fstatat(pfd, name, &st, AT_SYMLINK_NOFOLLOW) < 0)
        return fs_error(err, entry, errno, "stat");
      if (!S_ISDIR(st.st_mode)) { /* a directory replaces a non-directory; directories merge */
        r = replace(pfd, name, entry, err);
        if (r < 0)
          return r;
        if (mkdirat(pfd, name, 0700) < 0)
          return fs_error(err, entry, errno, "creating the directory");
      }
    }
    fd = openat(pfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  }
  if (fd < 0)
    return fs_error(err, entry, errno, "opening the directory");
  if (fchown(fd, uid, gid) < 0)
    return fs_error(err, entry, errno, "chown");
  r = apply_xattrs(e, fd, -1, NULL, entry, err);
  if (r < 0)
    return r;
  return record_dir(u, rel, e, entry, err);
}

static int extract_symlink(unpack *u, struct archive_entry *e, int pfd, const char *name, const char *entry,
                           crimage_error **err)
{
  const char *target = entry_symlink(e);
  if (!target || !*target)
    return refuse(err, entry, "symlink without a target");
  if (strlen(target) > u->lim.max_path_len)
    return refuse(err, entry, "the symlink target is longer than the limit");
  /* The target is only stored: the unpacker never follows a symlink, so where it points does not matter here. */
  if (symlinkat(target, pfd, name) < 0) {
    if (errno != EEXIST)
      return fs_error(err, entry, errno, "creating the symlink");
    int r = replace(pfd, name, entry, err);
    if (r < 0)
      return r;
    if (symlinkat(target, pfd, name) < 0)
      return fs_error(err, entry, errno, "creating the symlink");
  }
  return apply_meta_at(e, pfd, name, true, entry, err);
}

static int extract_node(unpack *u, struct archive_entry *e, mode_t type, int pfd, const char *name, const char *entry,
                        crimage_error **err)
{
  dev_t dev = type == S_IFIFO ? 0 : makedev(archive_entry_rdevmajor(e), archive_entry_rdevminor(e));
  if (mknodat(pfd, name, type | 0600, dev) < 0) {
    if (errno != EEXIST)
      return fs_error(err, entry, errno, "creating the %s", type == S_IFIFO ? "fifo" : "device node");
    int r = replace(pfd, name, entry, err);
    if (r < 0)
      return r;
    if (mknodat(pfd, name, type | 0600, dev) < 0)
      return fs_error(err, entry, errno, "creating the %s", type == S_IFIFO ? "fifo" : "device node");
  }
  return apply_meta_at(e, pfd, name, false, entry, err);
}

static int extract_hardlink(unpack *u, const char *target_raw, int pfd, const char *rel, const char *name,
                            const char *entry, crimage_error **err)
{
  const char *why = NULL;
  cleanup_free char *target = clean_path(target_raw, &u->lim, &why);
  if (!target)
    return refuse(err, entry, "hard link target is outside the layer: %s", why);
  if (!*target)
    return refuse(err, entry, "hard link to the layer root");
  if (streq(target, rel))
    return 0; /* a link to itself: nothing to do */
  const char *slash = strrchr(target, '/');
  cleanup_free char *tparent = slash ? xstrndup(target, (size_t) (slash - target)) : xstrdup("");
  const char *tname = slash ? slash + 1 : target;
  cleanup_close int tfd = -1;
  char q[300];
  quote_name(target, q, sizeof(q));
  int r = resolve_dir(u, tparent, false, O_PATH, entry, &tfd, err);
  if (r == -ENOENT || r == -ENOTDIR)
    return refuse(err, entry, "hard link target \"%s\" is not in the layer", q);
  if (r == -ELOOP)
    return refuse(err, entry, "hard link target \"%s\" goes through a symlink", q);
  if (r < 0)
    return r;
  struct stat st;
  if (fstatat(tfd, tname, &st, AT_SYMLINK_NOFOLLOW) < 0) {
    if (errno == ENOENT)
      return refuse(err, entry, "hard link target \"%s\" is not in the layer", q);
    return fs_error(err, entry, errno, "stat of hard link target \"%s\"", q);
  }
  if (S_ISDIR(st.st_mode))
    return refuse(err, entry, "hard link to directory \"%s\"", q);
  /* flags 0: a symlink target is linked as itself, never followed */
  if (linkat(tfd, tname, pfd, name, 0) < 0) {
    if (errno != EEXIST)
      return fs_error(err, entry, errno, "linking to \"%s\"", q);
    struct stat cur;
    if (fstatat(pfd, name, &cur, AT_SYMLINK_NOFOLLOW) == 0 && cur.st_ino == st.st_ino && cur.st_dev == st.st_dev)
      return 0;
    r = replace(pfd, name, entry, err);
    if (r < 0)
      return r;
    if (linkat(tfd, tname, pfd, name, 0) < 0)
      return fs_error(err, entry, errno, "linking to \"%s\"", q);
  }
  return 0;
}

/* A whiteout `.wh.<name>` in pfd: <name> of the lower layers is deleted, which overlayfs spells as a 0/0 character
 * device (what containerd's overlay snapshotter and docker's overlay2 write). */
static int extract_whiteout(unpack *u, int pfd, const char *name, const char *entry, crimage_error **err)
{
  const char *victim = name + strlen(WH_PREFIX);
  if (!*victim || streq(victim, ".") || streq(victim, ".."))
    return refuse(err, entry, "whiteout of an invalid name");
  if (mknodat(pfd, victim, S_IFCHR | 0, makedev(0, 0)) < 0) {
    if (errno != EEXIST)
      return fs_error(err, entry, errno, "creating the whiteout");
    int r = replace(pfd, victim, entry, err);
    if (r < 0)
      return r;
    if (mknodat(pfd, victim, S_IFCHR | 0, makedev(0, 0)) < 0)
      return fs_error(err, entry, errno, "creating the whiteout");
  }
  return 0;
}

/* `.wh..wh..opq`: the directory hides everything of the lower layers. */
static int extract_opaque(int pfd, const char *entry, crimage_error **err)
{
  cleanup_close int fd = openat(pfd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0)
    return fs_error(err, entry, errno, "opening the directory");
  if (fsetxattr(fd, OPAQUE_XATTR, "y", 1, 0) < 0)
    return fs_error(err, entry, errno, "setting %s", OPAQUE_XATTR);
  return 0;
}

static int extract_entry(unpack *u, struct archive_entry *e, crimage_error **err)
{
  const char *raw = entry_path(e);
  if (!raw || !*raw)
    return refuse(err, "", "entry without a name");
  const char *why = NULL;
  cleanup_free char *rel = clean_path(raw, &u->lim, &why);
  if (!rel)
    return refuse(err, raw, "%s", why);
  mode_t type = archive_entry_filetype(e);
  const char *hardlink = entry_hardlink(e);
  if (!*rel) {
    if (type != AE_IFDIR || hardlink)
      return refuse(err, raw, "only a directory can name the layer root");
    return extract_dir(u, e, -1, "", rel, raw, err);
  }
  char *slash = strrchr(rel, '/');
  const char *name = slash ? slash + 1 : rel;
  cleanup_free char *parent = slash ? xstrndup(rel, (size_t) (slash - rel)) : xstrdup("");

  /* aufs metadata directories (.wh..wh.plnk, .wh..wh.orph) and what is in them are not part of the filesystem */
  for (const char *c = rel; c < name; c = strchr(c, '/') + 1)
    if (str_has_prefix(c, WH_META_PREFIX))
      return 0;

  int pfd = -1;
  int r = parent_dir(u, parent, raw, &pfd, err);
  if (r < 0)
    return r;

  if (str_has_prefix(name, WH_PREFIX)) {
    if (streq(name, WH_OPAQUE))
      return extract_opaque(pfd, raw, err);
    if (str_has_prefix(name, WH_META_PREFIX))
      return 0; /* aufs metadata (.wh..wh.plnk, .wh..wh.aufs): not part of the filesystem */
    return extract_whiteout(u, pfd, name, raw, err);
  }
  if (hardlink && *hardlink)
    return extract_hardlink(u, hardlink, pfd, rel, name, raw, err);

  switch (type) {
  case AE_IFREG:
    return extract_file(u, e, pfd, name, raw, err);
  case AE_IFDIR:
    return extract_dir(u, e, pfd, name, rel, raw, err);
  case AE_IFLNK:
    return extract_symlink(u, e, pfd, name, raw, err);
  case AE_IFCHR:
  case AE_IFBLK:
  case AE_IFIFO:
    return extract_node(u, e, type, pfd, name, raw, err);
  default:
    return refuse(err, raw, "unsupported entry type 0%o", (unsigned) type);
  }
}

/* ---- the worker: libarchive pulls from the queue ---- */

static la_ssize_t queue_read(struct archive *a, void *userdata, const void **buf)
{
  unpack *u = userdata;
  pthread_mutex_lock(&u->lock);
  if (u->held) {
    u->held = false;
    u->rd = (u->rd + 1) % UNPACK_QUEUE_CHUNKS;
    u->filled--;
    pthread_cond_broadcast(&u->cond);
  }
  while (u->filled == 0 && !u->eof && !u->stop)
    pthread_cond_wait(&u->cond, &u->lock);
  if (u->stop) {
    pthread_mutex_unlock(&u->lock);
    archive_set_error(a, ECANCELED, "unpack stopped");
    return -1;
  }
  if (u->filled == 0) { /* eof */
    pthread_mutex_unlock(&u->lock);
    return 0;
  }
  u->held = true;
  *buf = u->slots[u->rd];
  la_ssize_t n = (la_ssize_t) u->slot_len[u->rd];
  pthread_mutex_unlock(&u->lock);
  return n;
}

static int read_archive(unpack *u, crimage_error **err)
{
  for (;;) {
    struct archive_entry *e = NULL;
    int r = archive_read_next_header(u->a, &e);
    if (r == ARCHIVE_EOF)
      return 0;
    if (r < ARCHIVE_WARN || (r == ARCHIVE_RETRY)) {
      const char *msg = archive_error_string(u->a);
      return fail(err, -EBADMSG, CRIMAGE_DATA_LOSS, "layer is not a valid tar archive (after %" PRIu64 " entries): %s",
                  u->n_entries, msg ? msg : "unknown error");
    }
    if (r == ARCHIVE_WARN)
      log_debug("layer entry %s: %s", entry_path(e) ? entry_path(e) : "?", archive_error_string(u->a));
    if (++u->n_entries > u->lim.max_entries)
      return fail(err, -E2BIG, CRIMAGE_RESOURCE_EXHAUSTED, "layer has more than %" PRIu64 " entries, the limit",
                  u->lim.max_entries);
    r = extract_entry(u, e, err);
    if (r < 0)
      return r;
  }
}

/* ---- the writer: decompression, digest, limits, queue ---- */

static int writer_fail(unpack *u, int r)
{
  u->failed = true;
  pthread_mutex_lock(&u->lock);
  u->stop = true;
  pthread_cond_broadcast(&u->cond);
  pthread_mutex_unlock(&u->lock);
  return r;
}

/* The worker's error as the writer's: the worker ended before the stream did. */
static int take_worker_error(unpack *u, crimage_error **err)
{
  pthread_mutex_lock(&u->lock);
  crimage_error *e = TAKE_PTR(u->worker_err);
  int r = u->worker_ret;
  pthread_mutex_unlock(&u->lock);
  if (err && !*err)
    *err = e;
  else
    crimage_error_clear(&e);
  return r < 0 ? r : -EIO;
}

static void publish(unpack *u)
{
  pthread_mutex_lock(&u->lock);
  u->slot_len[u->wr] = u->fill;
  u->wr = (u->wr + 1) % UNPACK_QUEUE_CHUNKS;
  u->filled++;
  pthread_cond_broadcast(&u->cond);
  pthread_mutex_unlock(&u->lock);
  u->have_slot = false;
  u->fill = 0;
}

/* Uncompressed bytes: hashed, counted against the limit and queued for the worker. */
static int emit(unpack *u, const unsigned char *p, size_t len, crimage_error **err)
{
  if (len > u->lim.max_total_bytes - u->total) /* before anything of it is used */
    return fail(err, -EFBIG, CRIMAGE_RESOURCE_EXHAUSTED,
                "layer is larger than the limit of %" PRIu64 " bytes uncompressed", u->lim.max_total_bytes);
  u->total += len;
  digester_update(u->digest, p, len);
  while (len > 0) {
    if (!u->have_slot) {
      pthread_mutex_lock(&u->lock);
      while (u->filled == UNPACK_QUEUE_CHUNKS && !u->worker_done)
        pthread_cond_wait(&u->cond, &u->lock); /* back-pressure */
      bool done = u->worker_done;
      int wr = u->worker_ret;
      pthread_mutex_unlock(&u->lock);
      if (done) {
        if (wr < 0)
          return take_worker_error(u, err);
        return 0; /* the archive ended: the rest (padding) is only hashed */
      }
      u->have_slot = true;
      u->fill = 0;
    }
    size_t n = UNPACK_CHUNK_BYTES - u->fill;
    if (n > len)
      n = len;
    memcpy(u->slots[u->wr] + u->fill, p, n);
    u->fill += n;
    p += n;
    len -= n;
    if (u->fill == UNPACK_CHUNK_BYTES)
      publish(u);
  }
  return 0;
}

static void gzip_start(unpack *u)
{
  isal_inflate_init(u->zs);
  u->zs->crc_flag = ISAL_GZIP; /* the gzip wrapper: its CRC-32 and length are checked too */
  u->member_end = false;
}

static int write_gzip(unpack *u, const unsigned char *p, size_t len, crimage_error **err)
{
  while (len > 0) {
    uint32_t n = len > (1u << 30) ? (1u << 30) : (uint32_t) len; /* avail_in is 32 bits */
    u->zs->next_in = (uint8_t *) p;
    u->zs->avail_in = n;
    for (;;) {
      if (u->member_end) {
        if (u->zs->avail_in == 0)
          break;
        /* Concatenated gzip members form one stream (RFC 1952 §2.2). */
        uint8_t *next = u->zs->next_in;
        uint32_t avail = u->zs->avail_in;
        gzip_start(u);
        u->zs->next_in = next;
        u->zs->avail_in = avail;
      }
      u->zs->next_out = u->out;
      u->zs->avail_out = UNPACK_CHUNK_BYTES;
      int zr = isal_inflate(u->zs);
      if (zr < 0)
        return fail(err, -EBADMSG, CRIMAGE_DATA_LOSS, "layer is not a valid gzip stream (error %d)", zr);
      size_t produced = UNPACK_CHUNK_BYTES - u->zs->avail_out;
      if (produced) {
        int r = emit(u, u->out, produced, err);
        if (r < 0)
          return r;
      }
      if (u->zs->block_state == ISAL_BLOCK_FINISH)
        u->member_end = true;
      else if (u->zs->avail_out > 0 && u->zs->avail_in == 0)
        break; /* needs more input */
    }
    p += n;
    len -= n;
  }
  return 0;
}

static int write_zstd(unpack *u, const unsigned char *p, size_t len, crimage_error **err)
{
  ZSTD_inBuffer in = {.src = p, .size = len, .pos = 0};
  for (;;) {
    ZSTD_outBuffer out = {.dst = u->out, .size = UNPACK_CHUNK_BYTES, .pos = 0};
    size_t zr = ZSTD_decompressStream(u->zd, &out, &in);
    if (ZSTD_isError(zr))
      return fail(err, -EBADMSG, CRIMAGE_DATA_LOSS, "layer is not a valid zstd stream: %s", ZSTD_getErrorName(zr));
    u->zstd_hint = zr;
    if (out.pos) {
      int r = emit(u, u->out, out.pos, err);
      if (r < 0)
        return r;
    }
    /* done when the input is used up and the decoder had room to spare (nothing more is pending) */
    if (in.pos == in.size && out.pos < out.size)
      return 0;
  }
}

int unpack_write(unpack *u, const void *data, size_t len, crimage_error **err)
{
  if (u->failed)
    return fail(err, -EINVAL, CRIMAGE_FAILED_PRECONDITION, "unpack of %s already failed", u->dir);
  if (len == 0)
    return 0;
  u->seen_input = true;
  int r;
  switch (u->comp) {
  case UNPACK_GZIP:
    r = write_gzip(u, data, len, err);
    break;
  case UNPACK_ZSTD:
    r = write_zstd(u, data, len, err);
    break;
  default:
    r = emit(u, data, len, err);
    break;
  }
  if (r < 0)
    return writer_fail(u, r);
  return 0;
}

/* ---- life cycle ---- */

/* Stops the worker (when running) and waits for it. */
static void stop_worker(unpack *u)
{
  if (!u->thread_started)
    return;
  pthread_mutex_lock(&u->lock);
  u->stop = true;
  pthread_cond_broadcast(&u->cond);
  pthread_mutex_unlock(&u->lock);
  pthread_join(u->thread, NULL);
  u->thread_started = false;
}

/* Everything of one pass over the stream, so a restart can begin anew. The worker must have ended. */
static void pass_clear(unpack *u)
{
  if (u->a)
    archive_read_free(u->a);
  u->a = NULL;
  crimage_error_clear(&u->worker_err);
  for (size_t i = 0; i < u->n_dirs; i++)
    free(u->dirs[i].path);
  u->n_dirs = 0;
  u->dir_bytes = 0;
  cache_drop(u);
}

static void *worker_main(void *arg)
{
  unpack *u = arg;
  crimage_error *e = NULL;
  int r = 0;
  /* tar covers ustar, pax and GNU tar (long names, sparse files); empty accepts a zero-length layer. No filter: the
   * bytes are already decompressed, and a tar inside a second compression is not a layer. The open reads ahead to
   * tell the format, so it happens here, where blocking on the queue is fine. */
  u->a = archive_read_new();
  if (!u->a)
    abort();
  /* (libarchive's tar reader bumps a static counter to make up inode numbers for entries, unlocked: helgrind sees
   * parallel unpacks race on it. The numbers are never used here.) */
  archive_read_support_format_tar(u->a);
  archive_read_support_format_gnutar(u->a);
  archive_read_support_format_empty(u->a);
  if (archive_read_open(u->a, u, NULL, queue_read, NULL) != ARCHIVE_OK) {
    const char *msg = archive_error_string(u->a);
    crimage_error_set(&e, CRIMAGE_DATA_LOSS, 0, "layer is not a tar archive: %s", msg ? msg : "unknown format");
    r = -EBADMSG;
  } else {
    r = read_archive(u, &e);
  }
  cache_drop(u);
  pthread_mutex_lock(&u->lock);
  u->worker_done = true;
  u->worker_ret = r;
  u->worker_err = e;
  pthread_cond_broadcast(&u->cond);
  pthread_mutex_unlock(&u->lock);
  return NULL;
}

/* Resets the writer and the queue and starts a worker on them. */
static int start_worker(unpack *u, crimage_error **err)
{
  switch (u->comp) {
  case UNPACK_GZIP:
    gzip_start(u);
    break;
  case UNPACK_ZSTD:
    ZSTD_DCtx_reset(u->zd, ZSTD_reset_session_only);
    break;
  default:
    break;
  }
  u->zstd_hint = 0;
  u->seen_input = false;
  u->total = 0;
  char scratch[DIGEST_MAX_LEN + 1];
  digester_final(u->digest, scratch); /* resets it */
  u->have_slot = false;
  u->fill = 0;
  u->failed = false;
  u->rd = u->wr = u->filled = 0;
  u->held = u->eof = u->stop = u->worker_done = false;
  u->worker_ret = 0;
  u->n_entries = 0;
  u->root_seen = false;

  /* Signals go to the daemon's own threads, never to a worker. */
  sigset_t all, old;
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &old);
  int r = pthread_create(&u->thread, NULL, worker_main, u);
  pthread_sigmask(SIG_SETMASK, &old, NULL);
  if (r != 0)
    return crimage_error_set(err, CRIMAGE_RESOURCE_EXHAUSTED, r, "starting the unpack thread for %s", u->dir);
  u->thread_started = true;
  return 0;
}

static int make_tmpdir(unpack *u, crimage_error **err)
{
  /* <parent>/.unpack-<base>-XXXXXXXX; a long base is cut so the name stays within NAME_MAX */
  for (int attempt = 0; attempt < 100; attempt++) {
    uint32_t rnd;
    if (getrandom(&rnd, sizeof(rnd), 0) != sizeof(rnd))
      rnd = (uint32_t) now_realtime_ns() ^ (uint32_t) attempt;
    char *name = xasprintf(TMP_PREFIX "%.64s-%08" PRIx32, u->base, rnd);
    if (mkdirat(u->parentfd, name, 0700) == 0) {
      u->tmpname = name;
      u->rootfd = openat(u->parentfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
      if (u->rootfd < 0)
        return crimage_error_set(err, CRIMAGE_INTERNAL, errno, "opening the temporary directory of %s", u->dir);
      return 0;
    }
    int e = errno;
    free(name);
    if (e != EEXIST)
      return crimage_error_set(err, CRIMAGE_INTERNAL, e, "creating a temporary directory for %s", u->dir);
  }
  return crimage_error_set(err, CRIMAGE_INTERNAL, EEXIST, "creating a temporary directory for %s", u->dir);
}

static void remove_tmpdir(unpack *u)
{
  if (u->rootfd >= 0)
    close(u->rootfd);
  u->rootfd = -1;
  if (u->tmpname) {
    int r = rm_tree_at(u->parentfd, u->tmpname);
    if (r < 0)
      log_warn("removing the partial layer %s/%s: %s", u->dir, u->tmpname, strerror(-r));
    free(u->tmpname);
    u->tmpname = NULL;
  }
}

static void unpack_free(unpack *u)
{
  stop_worker(u);
  pass_clear(u);
  remove_tmpdir(u);
  if (u->parentfd >= 0)
    close(u->parentfd);
  free(u->zs);
  ZSTD_freeDStream(u->zd);
  free(u->out);
  digester_free(u->digest);
  for (size_t i = 0; i < UNPACK_QUEUE_CHUNKS; i++)
    free(u->slots[i]);
  free(u->dirs);
  pthread_mutex_destroy(&u->lock);
  pthread_cond_destroy(&u->cond);
  free(u->dir);
  free(u->base);
  free(u);
}

void unpack_abort(unpack *u)
{
  if (u)
    unpack_free(u);
}

int unpack_begin(const char *dir, const char *media_type, const unpack_limits *limits, unpack **ret,
                 crimage_error **err)
{
  unpack_compression comp;
  if (unpack_compression_of(media_type, &comp) < 0)
    return fail(err, -ENOTSUP, CRIMAGE_UNIMPLEMENTED, "cannot unpack layers of media type %s",
                media_type ? media_type : "(none)");
  if (str_empty(dir))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, EINVAL, "no layer directory");
  /* split dir into parent and base, ignoring trailing slashes */
  size_t n = strlen(dir);
  while (n > 1 && dir[n - 1] == '/')
    n--;
  cleanup_free char *path = xstrndup(dir, n);
  char *slash = strrchr(path, '/');
  const char *base = slash ? slash + 1 : path;
  if (!*base || streq(base, ".") || streq(base, ".."))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, EINVAL, "layer directory %s has no name", dir);
  cleanup_free char *parent =
      slash ? (slash == path ? xstrdup("/") : xstrndup(path, (size_t) (slash - path))) : xstrdup(".");

  unpack *u = xcalloc(1, sizeof(*u));
  unpack_limits def;
  unpack_limits_default(&def);
  u->lim = limits ? *limits : def;
  if (!u->lim.max_entries)
    u->lim.max_entries = def.max_entries;
  if (!u->lim.max_total_bytes)
    u->lim.max_total_bytes = def.max_total_bytes;
  if (!u->lim.max_file_size)
    u->lim.max_file_size = def.max_file_size;
  if (!u->lim.max_path_len)
    u->lim.max_path_len = def.max_path_len;
  if (!u->lim.max_name_len)
    u->lim.max_name_len = def.max_name_len;
  u->no_openat2 = u->lim.walk_only;
  u->comp = comp;
  u->dir = xstrdup(dir);
  u->base = xstrdup(base);
  u->rootfd = u->cache_fd = -1;
  pthread_mutex_init(&u->lock, NULL);
  pthread_cond_init(&u->cond, NULL);
  u->parentfd = open(parent, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (u->parentfd < 0) {
    int e = errno;
    unpack_free(u);
    return crimage_error_set(err, e == ENOENT ? CRIMAGE_NOT_FOUND : CRIMAGE_INTERNAL, e,
                             "opening the parent of layer directory %s", dir);
  }
  struct stat st;
  if (fstatat(u->parentfd, base, &st, AT_SYMLINK_NOFOLLOW) == 0) {
    unpack_free(u);
    return crimage_error_set(err, CRIMAGE_ALREADY_EXISTS, EEXIST, "layer directory %s", dir);
  }
  if (errno != ENOENT) {
    int e = errno;
    unpack_free(u);
    return crimage_error_set(err, CRIMAGE_INTERNAL, e, "stat of layer directory %s", dir);
  }
  u->digest = digester_new("sha256");
  u->out = xmalloc(UNPACK_CHUNK_BYTES);
  for (size_t i = 0; i < UNPACK_QUEUE_CHUNKS; i++)
    u->slots[i] = xmalloc(UNPACK_CHUNK_BYTES);
  if (comp == UNPACK_GZIP) {
    u->zs = xcalloc(1, sizeof(*u->zs));
  } else if (comp == UNPACK_ZSTD) {
    u->zd = ZSTD_createDStream();
    if (!u->zd)
      abort();
  }
  int r = make_tmpdir(u, err);
  if (r == 0)
    r = start_worker(u, err);
  if (r < 0) {
    unpack_free(u);
    return r;
  }
  *ret = u;
  return 0;
}

int unpack_restart(unpack *u, crimage_error **err)
{
  stop_worker(u);
  pass_clear(u);
  remove_tmpdir(u);
  int r = make_tmpdir(u, err);
  if (r == 0)
    r = start_worker(u, err);
  if (r < 0) {
    u->failed = true;
    return r;
  }
  return 0;
}

/* Modes and times of the directories, after every entry is in (creating entries changes a directory's mtime). */
static int apply_dir_meta(unpack *u, crimage_error **err)
{
  for (size_t i = 0; i < u->n_dirs; i++) {
    const dir_meta *d = &u->dirs[i];
    cleanup_close int fd = -1;
    int r = resolve_dir(u, d->path, false, O_RDONLY, d->path, &fd, err);
    if (r == -ENOENT || r == -ENOTDIR || r == -ELOOP)
      continue; /* replaced by a later entry */
    if (r < 0)
      return r;
    if (fchmod(fd, d->mode) < 0)
      return fs_error(err, d->path, errno, "chmod");
    if (futimens(fd, d->times) < 0)
      return fs_error(err, d->path, errno, "setting times");
  }
  if (!u->root_seen && fchmod(u->rootfd, 0755) < 0)
    return crimage_error_set(err, CRIMAGE_INTERNAL, errno, "chmod of layer directory %s", u->dir);
  return 0;
}

int unpack_finish(unpack *u, const char *expected_diff_id, char ret_diff_id[DIGEST_MAX_LEN + 1], crimage_error **err)
{
  int r = 0;
  if (u->failed) {
    r = crimage_error_set(err, CRIMAGE_FAILED_PRECONDITION, 0, "unpack of %s already failed", u->dir);
    goto out;
  }
  if (u->comp == UNPACK_GZIP && !u->member_end) {
    r = fail(err, -EBADMSG, CRIMAGE_DATA_LOSS, "layer gzip stream is truncated");
    goto out;
  }
  if (u->comp == UNPACK_ZSTD && (!u->seen_input || u->zstd_hint != 0)) {
    r = fail(err, -EBADMSG, CRIMAGE_DATA_LOSS, "layer zstd stream is truncated");
    goto out;
  }
  if (u->have_slot && u->fill > 0)
    publish(u);
  pthread_mutex_lock(&u->lock);
  u->eof = true;
  pthread_cond_broadcast(&u->cond);
  pthread_mutex_unlock(&u->lock);
  pthread_join(u->thread, NULL);
  u->thread_started = false;
  if (u->worker_ret < 0) {
    r = take_worker_error(u, err);
    goto out;
  }
  char got[DIGEST_MAX_LEN + 1];
  digester_final(u->digest, got);
  if (expected_diff_id && !streq(expected_diff_id, got)) {
    r = fail(err, -EBADMSG, CRIMAGE_DATA_LOSS, "uncompressed layer hashes to %s, the expected diff_id is %s", got,
             expected_diff_id);
    goto out;
  }
  r = apply_dir_meta(u, err);
  if (r < 0)
    goto out;
  /* One syncfs instead of an fsync per file: the whole layer is durable before its name appears. */
  if (syncfs(u->rootfd) < 0) {
    r = crimage_error_set(err, CRIMAGE_INTERNAL, errno, "syncing layer directory %s", u->dir);
    goto out;
  }
  if (renameat2(u->parentfd, u->tmpname, u->parentfd, u->base, RENAME_NOREPLACE) < 0) {
    int e = errno;
    r = crimage_error_set(err, e == EEXIST ? CRIMAGE_ALREADY_EXISTS : CRIMAGE_INTERNAL, e,
                          "renaming the unpacked layer to %s", u->dir);
    goto out;
  }
  free(u->tmpname);
  u->tmpname = NULL;
  if (fsync(u->parentfd) < 0)
    log_warn("fsync of the parent of %s: %s", u->dir, strerror(errno));
  if (ret_diff_id)
    memcpy(ret_diff_id, got, strlen(got) + 1);
out:
  unpack_free(u);
  return r;
}

int unpack_remove_stale(const char *parent, crimage_error **err)
{
  cleanup_close int fd = open(parent, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0)
    return errno == ENOENT ? 0 : crimage_error_set(err, CRIMAGE_INTERNAL, errno, "opening %s", parent);
  int dfd = dup(fd);
  DIR *d = dfd >= 0 ? fdopendir(dfd) : NULL;
  if (!d) {
    if (dfd >= 0)
      close(dfd);
    return crimage_error_set(err, CRIMAGE_INTERNAL, errno, "reading %s", parent);
  }
  cleanup_strv char **stale = NULL;
  struct dirent *de;
  while ((de = readdir(d)))
    if (str_has_prefix(de->d_name, TMP_PREFIX))
      strv_add_unique(&stale, de->d_name);
  closedir(d);
  for (char **s = stale; s && *s; s++) {
    log_info("removing the partial layer %s/%s left by an interrupted unpack", parent, *s);
    int r = rm_tree_at(fd, *s);
    if (r < 0)
      return crimage_error_set(err, CRIMAGE_INTERNAL, -r, "removing %s/%s", parent, *s);
  }
  return 0;
}

typedef struct linked_inode {
  dev_t dev;
  ino_t ino;
  uint64_t bytes;
} linked_inode;

static int cmp_linked(const void *a, const void *b)
{
  const linked_inode *x = a, *y = b;
  if (x->dev != y->dev)
    return x->dev < y->dev ? -1 : 1;
  return x->ino < y->ino ? -1 : x->ino > y->ino;
}

int unpack_dir_usage(const char *dir, uint64_t *ret_bytes, uint64_t *ret_inodes, crimage_error **err)
{
  char *paths[] = {(char *) dir, NULL};
  FTS *fts = fts_open(paths, FTS_PHYSICAL | FTS_XDEV | FTS_NOCHDIR, NULL);
  if (!fts)
    return crimage_error_set(err, CRIMAGE_INTERNAL, errno, "reading %s", dir);
  uint64_t bytes = 0, inodes = 0;
  linked_inode *linked = NULL; /* inodes with more than one link: counted once, after sorting */
  size_t n_linked = 0, cap = 0;
  int r = 0;
  FTSENT *ent;
  while ((ent = fts_read(fts))) {
    if (ent->fts_info == FTS_DP)
      continue;
    if (ent->fts_info == FTS_ERR || ent->fts_info == FTS_DNR || ent->fts_info == FTS_NS) {
      r = crimage_error_set(err, ent->fts_errno == ENOENT ? CRIMAGE_NOT_FOUND : CRIMAGE_INTERNAL, ent->fts_errno,
                            "reading %s", ent->fts_path);
      break;
    }
    const struct stat *st = ent->fts_statp;
    uint64_t b = (uint64_t) st->st_blocks * 512;
    if (!S_ISDIR(st->st_mode) && st->st_nlink > 1) {
      if (n_linked == cap) {
        cap = cap ? cap * 2 : 64;
        linked = xrealloc(linked, cap * sizeof(*linked));
      }
      linked[n_linked++] = (linked_inode){.dev = st->st_dev, .ino = st->st_ino, .bytes = b};
      continue;
    }
    bytes += b;
    inodes++;
  }
  fts_close(fts);
  if (r == 0 && n_linked) {
    qsort(linked, n_linked, sizeof(*linked), cmp_linked);
    for (size_t i = 0; i < n_linked; i++)
      if (i == 0 || cmp_linked(&linked[i - 1], &linked[i]) != 0) {
        bytes += linked[i].bytes;
        inodes++;
      }
  }
  free(linked);
  if (r < 0)
    return r;
  *ret_bytes = bytes;
  *ret_inodes = inodes;
  return 0;
}
