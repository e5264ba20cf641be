/* The layer unpacker on real files: layers are built in the test with libarchive's writer (pax), compressed with
 * zlib or libzstd (or not), fed in chunks as a download would, and the resulting directory is checked entry by
 * entry: types, modes (setuid/setgid/sticky), owners, times, xattrs, hard links, devices, whiteouts and opaque
 * directories. Malicious layers (traversal, symlink and hard-link escapes, a gzip bomb, a million entries) must be
 * refused with an error naming the problem, with nothing written outside the layer (a canary directory beside it
 * stays empty) and nothing left behind. Needs root (owners, devices, trusted.* xattrs), as the daemon does. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <locale.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <archive.h>
#include <archive_entry.h>
#include <zlib.h>
#include <zstd.h>

#include <cmocka.h>

#include "common/digest.h"
#include "common/dynbuf.h"
#include "common/util.h"
#include "pull/unpack.h"
#include "test-files.h"

#define MT_TAR "application/vnd.oci.image.layer.v1.tar"
#define MT_GZIP "application/vnd.oci.image.layer.v1.tar+gzip"
#define MT_ZSTD "application/vnd.oci.image.layer.v1.tar+zstd"
#define MT_DOCKER "application/vnd.docker.image.rootfs.diff.tar.gzip"

#define MTIME 1600000000
#define MTIME_NSEC 123456789

typedef struct fixture {
  char *top;            /* /tmp/test-unpack-XXXXXX */
  char *layers;         /* top/layers: the parent of the layer directories */
  char *canary;         /* top/canary: must stay empty */
  char *layer;          /* top/layers/L */
  const char *top_want; /* what top holds: "canary layers" unless a test puts something there */
  bool walk_only;       /* resolve with the O_NOFOLLOW walk instead of openat2 */
} fixture;

static int setup_walk(void **state);

static int setup(void **state)
{
  fixture *f = xcalloc(1, sizeof(*f));
  f->top = test_mkdtemp("unpack");
  f->layers = xasprintf("%s/layers", f->top);
  f->canary = xasprintf("%s/canary", f->top);
  f->layer = xasprintf("%s/L", f->layers);
  f->top_want = "canary layers";
  assert_int_equal(mkdir(f->layers, 0755), 0);
  assert_int_equal(mkdir(f->canary, 0755), 0);
  *state = f;
  return 0;
}

static int setup_walk(void **state)
{
  setup(state);
  ((fixture *) *state)->walk_only = true;
  return 0;
}

static int teardown(void **state)
{
  fixture *f = *state;
  test_rm_rf(f->top);
  free(f->top);
  free(f->layers);
  free(f->canary);
  free(f->layer);
  free(f);
  return 0;
}

/* ---- building layers ---- */

typedef struct tar_ent {
  const char *name;
  mode_t type; /* AE_IFREG (default), AE_IFDIR, AE_IFLNK, AE_IFCHR, AE_IFBLK, AE_IFIFO */
  mode_t perm; /* default 0644, 0755 for directories */
  const char *data;
  const char *symlink;
  const char *hardlink;
  int64_t uid, gid;
  int64_t size; /* header size without data (only with no data); 0 = strlen(data) */
  unsigned major, minor;
  const char *xattr, *xattr_value; /* one xattr */
  const char *xattr2;
  const void *xattr2_value;
  size_t xattr2_len;
} tar_ent;

typedef struct tarb {
  struct archive *a;
  dynbuf buf;
  bool stop; /* refuse further output (a header whose data is never written) */
} tarb;

static la_ssize_t tar_out(struct archive *a, void *userdata, const void *data, size_t len)
{
  tarb *t = userdata;
  if (t->stop)
    return -1;
  assert_int_equal(dynbuf_append(&t->buf, data, len), 0);
  return (la_ssize_t) len;
}

static void tar_begin_fmt(tarb *t, bool ustar)
{
  memset(t, 0, sizeof(*t));
  dynbuf_init(&t->buf, 256u << 20);
  t->a = archive_write_new();
  assert_non_null(t->a);
  assert_int_equal(ustar ? archive_write_set_format_ustar(t->a) : archive_write_set_format_pax(t->a), ARCHIVE_OK);
  /* no blocking: every header and data write reaches the buffer at once (the lazy generators read it) */
  assert_int_equal(archive_write_set_bytes_per_block(t->a, 0), ARCHIVE_OK);
  assert_int_equal(archive_write_open(t->a, t, NULL, tar_out, NULL), ARCHIVE_OK);
}

static void tar_begin(tarb *t) { tar_begin_fmt(t, false); }

static void tar_add(tarb *t, const tar_ent *te)
{
  struct archive_entry *e = archive_entry_new();
  archive_entry_set_pathname(e, te->name);
  mode_t type = te->type ? te->type : AE_IFREG;
  if (te->hardlink) {
    archive_entry_set_hardlink(e, te->hardlink);
    type = AE_IFREG;
  }
  archive_entry_set_filetype(e, type);
  archive_entry_set_perm(e, te->perm ? te->perm : (type == AE_IFDIR ? 0755 : 0644));
  archive_entry_set_uid(e, te->uid);
  archive_entry_set_gid(e, te->gid);
  archive_entry_set_mtime(e, MTIME, MTIME_NSEC);
  size_t len = te->data ? strlen(te->data) : 0;
  archive_entry_set_size(e, te->hardlink || type != AE_IFREG ? 0 : (te->size ? te->size : (int64_t) len));
  if (te->symlink)
    archive_entry_set_symlink(e, te->symlink);
  if (type == AE_IFCHR || type == AE_IFBLK) {
    archive_entry_set_rdevmajor(e, te->major);
    archive_entry_set_rdevminor(e, te->minor);
  }
  if (te->xattr)
    archive_entry_xattr_add_entry(e, te->xattr, te->xattr_value, strlen(te->xattr_value));
  if (te->xattr2)
    archive_entry_xattr_add_entry(e, te->xattr2, te->xattr2_value, te->xattr2_len);
  int hr = archive_write_header(t->a, e);
  if (hr != ARCHIVE_OK)
    fail_msg("writing header %s: %s", te->name, archive_error_string(t->a));
  if (len)
    assert_int_equal(archive_write_data(t->a, te->data, len), (la_ssize_t) len);
  archive_entry_free(e);
}

static char *tar_end(tarb *t, size_t *ret_len)
{
  assert_int_equal(archive_write_close(t->a), ARCHIVE_OK);
  archive_write_free(t->a);
  return dynbuf_take(&t->buf, ret_len);
}

static char *tar_of(const tar_ent *ents, size_t n, size_t *ret_len)
{
  tarb t;
  tar_begin(&t);
  for (size_t i = 0; i < n; i++)
    tar_add(&t, &ents[i]);
  return tar_end(&t, ret_len);
}

static char *gzip_of(const void *data, size_t len, size_t *ret_len)
{
  z_stream zs = {0};
  assert_int_equal(deflateInit2(&zs, 6, Z_DEFLATED, 15 + 16, 8, Z_DEFAULT_STRATEGY), Z_OK);
  size_t cap = deflateBound(&zs, len) + 64;
  char *out = xmalloc(cap);
  zs.next_in = (Bytef *) data;
  zs.avail_in = (uInt) len;
  zs.next_out = (Bytef *) out;
  zs.avail_out = (uInt) cap;
  assert_int_equal(deflate(&zs, Z_FINISH), Z_STREAM_END);
  *ret_len = zs.total_out;
  deflateEnd(&zs);
  return out;
}

static char *zstd_of(const void *data, size_t len, size_t *ret_len)
{
  size_t cap = ZSTD_compressBound(len);
  char *out = xmalloc(cap);
  size_t n = ZSTD_compress(out, cap, data, len, 3);
  assert_false(ZSTD_isError(n));
  *ret_len = n;
  return out;
}

static char *compress_as(const char *media_type, const char *tar, size_t len, size_t *ret_len)
{
  if (streq(media_type, MT_ZSTD))
    return zstd_of(tar, len, ret_len);
  if (streq(media_type, MT_TAR)) {
    *ret_len = len;
    char *c = xmalloc(len ? len : 1);
    memcpy(c, tar, len);
    return c;
  }
  return gzip_of(tar, len, ret_len);
}

/* ---- feeding ---- */

/* Feeds data in chunks of chunk bytes. Returns 0 or the first error. */
static int feed(unpack *u, const void *data, size_t len, size_t chunk, crimage_error **err)
{
  const char *p = data;
  while (len > 0) {
    size_t n = len < chunk ? len : chunk;
    int r = unpack_write(u, p, n, err);
    if (r < 0)
      return r;
    p += n;
    len -= n;
  }
  return 0;
}

/* Unpacks blob into dir; returns the result and the error (caller frees) in *ret_err; diff_id optional. */
static int unpack_blob(const char *dir, const char *media_type, const unpack_limits *lim, const void *blob, size_t len,
                       size_t chunk, char *diff_id, crimage_error **ret_err)
{
  unpack *u = NULL;
  int r = unpack_begin(dir, media_type, lim, &u, ret_err);
  if (r < 0)
    return r;
  r = feed(u, blob, len, chunk, ret_err);
  if (r < 0) {
    unpack_abort(u);
    return r;
  }
  return unpack_finish(u, NULL, diff_id, ret_err);
}

/* ---- checking ---- */

static void check_stat(const char *dir, const char *rel, mode_t type, mode_t perm, uid_t uid, gid_t gid)
{
  cleanup_free char *p = xasprintf("%s/%s", dir, rel);
  struct stat st;
  if (lstat(p, &st) < 0)
    fail_msg("%s: %s", p, strerror(errno));
  if ((st.st_mode & S_IFMT) != type)
    fail_msg("%s: type 0%o, want 0%o", p, st.st_mode & S_IFMT, type);
  if (type != S_IFLNK && (st.st_mode & 07777) != perm)
    fail_msg("%s: mode 0%o, want 0%o", p, st.st_mode & 07777, perm);
  assert_int_equal(st.st_uid, uid);
  assert_int_equal(st.st_gid, gid);
  if (st.st_mtim.tv_sec != MTIME || st.st_mtim.tv_nsec != MTIME_NSEC)
    fail_msg("%s: mtime %lld.%09ld, want %d.%09d", p, (long long) st.st_mtim.tv_sec, st.st_mtim.tv_nsec, MTIME,
             MTIME_NSEC);
}

static char *read_all(const char *path)
{
  char *data = NULL;
  cleanup_error crimage_error *err = NULL;
  if (read_file(path, 1 << 20, &data, NULL, &err) < 0)
    fail_msg("%s: %s", path, err->message);
  return data;
}

static void check_content(const char *dir, const char *rel, const char *want)
{
  cleanup_free char *p = xasprintf("%s/%s", dir, rel);
  cleanup_free char *got = read_all(p);
  assert_string_equal(got, want);
}

static void check_xattr(const char *dir, const char *rel, const char *name, const void *want, size_t want_len)
{
  cleanup_free char *p = xasprintf("%s/%s", dir, rel);
  char buf[256];
  ssize_t n = lgetxattr(p, name, buf, sizeof(buf));
  if (n < 0)
    fail_msg("%s: xattr %s: %s", p, name, strerror(errno));
  assert_int_equal((size_t) n, want_len);
  assert_memory_equal(buf, want, want_len);
}

static bool has_xattr(const char *dir, const char *rel, const char *name)
{
  cleanup_free char *p = xasprintf("%s/%s", dir, rel);
  char buf[256];
  return lgetxattr(p, name, buf, sizeof(buf)) >= 0;
}

static bool exists(const char *dir, const char *rel)
{
  cleanup_free char *p = xasprintf("%s/%s", dir, rel);
  struct stat st;
  return lstat(p, &st) == 0;
}

/* The names in dir, sorted and joined with spaces ("" when empty). */
static char *list_dir(const char *dir)
{
  DIR *d = opendir(dir);
  assert_non_null(d);
  char **names = NULL;
  struct dirent *de;
  while ((de = readdir(d)))
    if (!streq(de->d_name, ".") && !streq(de->d_name, ".."))
      strv_add_unique(&names, de->d_name);
  closedir(d);
  size_t n = strv_length(names);
  for (size_t i = 0; i < n; i++)
    for (size_t j = i + 1; j < n; j++)
      if (strcmp(names[j], names[i]) < 0) {
        char *x = names[i];
        names[i] = names[j];
        names[j] = x;
      }
  dynbuf b;
  dynbuf_init(&b, 1 << 20);
  for (size_t i = 0; i < n; i++)
    assert_int_equal(dynbuf_printf(&b, "%s%s", i ? " " : "", names[i]), 0);
  strv_free(names);
  return dynbuf_take(&b, NULL);
}

/* Nothing outside the layer: the canary is empty, top holds only canary and layers, and layers only what is
 * expected ("" after a failure: no layer, no temporary directory). */
static void check_nothing_outside(const fixture *f, const char *want_layers)
{
  cleanup_free char *top = list_dir(f->top);
  assert_string_equal(top, f->top_want);
  cleanup_free char *canary = list_dir(f->canary);
  assert_string_equal(canary, "");
  cleanup_free char *layers = list_dir(f->layers);
  assert_string_equal(layers, want_layers);
}

/* Unpacks a layer that must be refused; the error must contain want. */
static void check_refused(fixture *f, const char *media_type, const unpack_limits *lim, const char *tar, size_t tar_len,
                          const char *want)
{
  size_t blob_len;
  cleanup_free char *blob = compress_as(media_type, tar, tar_len, &blob_len);
  cleanup_error crimage_error *err = NULL;
  unpack_limits l = lim ? *lim : (unpack_limits){0};
  l.walk_only = f->walk_only;
  int r = unpack_blob(f->layer, media_type, &l, blob, blob_len, 4096, NULL, &err);
  assert_true(r < 0);
  assert_non_null(err);
  if (!strstr(err->message, want))
    fail_msg("error \"%s\" does not say \"%s\"", err->message, want);
  check_nothing_outside(f, "");
}

/* ---- a layer with everything ---- */

static const unsigned char capability[] = {0x01, 0x00, 0x00, 0x02, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00,
                                           0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00};

static const tar_ent full_layer[] = {
    {.name = "./", .type = AE_IFDIR, .perm = 0751},
    {.name = "./etc/", .type = AE_IFDIR},
    {.name = "./etc/passwd", .data = "root:x:0:0:root:/root:/bin/sh\n"},
    {.name = "./etc/shadow", .data = "root:*:1::::::\n", .perm = 0640, .gid = 42},
    {.name = "./usr/", .type = AE_IFDIR},
    {.name = "./usr/bin/", .type = AE_IFDIR, .perm = 0755},
    {.name = "./usr/bin/su", .data = "#!/bin/true\n", .perm = 04755},
    {.name = "./usr/bin/wall", .data = "wall\n", .perm = 02755, .gid = 5},
    {.name = "./usr/bin/ping",
     .data = "ping\n",
     .perm = 0755,
     .xattr2 = "security.capability",
     .xattr2_value = capability,
     .xattr2_len = sizeof(capability)},
    {.name = "./usr/bin/[", .hardlink = "./usr/bin/su"},
    {.name = "./usr/bin/sh", .type = AE_IFLNK, .symlink = "/bin/busybox"},
    {.name = "./usr/lib", .type = AE_IFLNK, .symlink = "../lib"},
    {.name = "./tmp/", .type = AE_IFDIR, .perm = 01777},
    {.name = "./srv/",
     .type = AE_IFDIR,
     .perm = 02775,
     .uid = 1000,
     .gid = 1000,
     .xattr = "user.dir",
     .xattr_value = "d"},
    {.name = "./srv/data",
     .data = "data",
     .perm = 0600,
     .uid = 1000,
     .gid = 1001,
     .xattr = "user.mime",
     .xattr_value = "text/plain"},
    {.name = "./srv/empty", .data = "", .perm = 0444},
    {.name = "./dev/", .type = AE_IFDIR},
    {.name = "./dev/null", .type = AE_IFCHR, .perm = 0666, .major = 1, .minor = 3},
    {.name = "./dev/sda", .type = AE_IFBLK, .perm = 0660, .major = 8, .minor = 0, .gid = 6},
    {.name = "./dev/pipe", .type = AE_IFIFO, .perm = 0620},
    {.name = "./implied/parent/file", .data = "deep"},
    {.name = "./caf\xc3\xa9/\xe2\x98\x83", .data = "snow"},
};

static void check_full_layer(const char *d)
{
  check_stat(d, ".", S_IFDIR, 0751, 0, 0);
  check_stat(d, "etc", S_IFDIR, 0755, 0, 0);
  check_stat(d, "etc/passwd", S_IFREG, 0644, 0, 0);
  check_content(d, "etc/passwd", "root:x:0:0:root:/root:/bin/sh\n");
  check_stat(d, "etc/shadow", S_IFREG, 0640, 0, 42);
  check_stat(d, "usr/bin/su", S_IFREG, 04755, 0, 0);
  check_stat(d, "usr/bin/wall", S_IFREG, 02755, 0, 5);
  check_stat(d, "usr/bin/ping", S_IFREG, 0755, 0, 0);
  check_xattr(d, "usr/bin/ping", "security.capability", capability, sizeof(capability));
  /* the hard link shares the inode */
  cleanup_free char *su = xasprintf("%s/usr/bin/su", d), *br = xasprintf("%s/usr/bin/[", d);
  struct stat a, b;
  assert_int_equal(lstat(su, &a), 0);
  assert_int_equal(lstat(br, &b), 0);
  assert_int_equal(a.st_ino, b.st_ino);
  assert_int_equal(a.st_nlink, 2);
  check_stat(d, "usr/bin/sh", S_IFLNK, 0, 0, 0);
  cleanup_free char *sh = xasprintf("%s/usr/bin/sh", d);
  char target[64] = {0};
  assert_int_equal(readlink(sh, target, sizeof(target) - 1), strlen("/bin/busybox"));
  assert_string_equal(target, "/bin/busybox");
  check_stat(d, "usr/lib", S_IFLNK, 0, 0, 0);
  check_stat(d, "tmp", S_IFDIR, 01777, 0, 0);
  check_stat(d, "srv", S_IFDIR, 02775, 1000, 1000);
  check_xattr(d, "srv", "user.dir", "d", 1);
  check_stat(d, "srv/data", S_IFREG, 0600, 1000, 1001);
  check_xattr(d, "srv/data", "user.mime", "text/plain", 10);
  check_stat(d, "srv/empty", S_IFREG, 0444, 0, 0);
  check_content(d, "srv/empty", "");
  check_stat(d, "dev/null", S_IFCHR, 0666, 0, 0);
  check_stat(d, "dev/sda", S_IFBLK, 0660, 0, 6);
  check_stat(d, "dev/pipe", S_IFIFO, 0620, 0, 0);
  cleanup_free char *null = xasprintf("%s/dev/null", d);
  assert_int_equal(lstat(null, &a), 0);
  assert_int_equal(major(a.st_rdev), 1);
  assert_int_equal(minor(a.st_rdev), 3);
  /* parents a layer leaves implied: 0755 root */
  cleanup_free char *implied = xasprintf("%s/implied/parent", d);
  assert_int_equal(lstat(implied, &a), 0);
  assert_true(S_ISDIR(a.st_mode));
  assert_int_equal(a.st_mode & 07777, 0755);
  check_content(d, "implied/parent/file", "deep");
  check_content(d, "caf\xc3\xa9/\xe2\x98\x83", "snow");
}

static void unpack_full(void **state, const char *media_type, size_t chunk)
{
  fixture *f = *state;
  size_t tar_len, blob_len;
  cleanup_free char *tar = tar_of(full_layer, ARRAY_SIZE(full_layer), &tar_len);
  cleanup_free char *blob = compress_as(media_type, tar, tar_len, &blob_len);
  char want[DIGEST_MAX_LEN + 1], got[DIGEST_MAX_LEN + 1];
  digest_sha256(tar, tar_len, want);
  cleanup_error crimage_error *err = NULL;
  unpack_limits lim = {.walk_only = f->walk_only};
  int r = unpack_blob(f->layer, media_type, &lim, blob, blob_len, chunk, got, &err);
  if (r < 0)
    fail_msg("%s: %s", media_type, err->message);
  assert_string_equal(got, want);
  check_full_layer(f->layer);
  check_nothing_outside(f, "L");
}

static void test_plain(void **state) { unpack_full(state, MT_TAR, 100); }
static void test_gzip(void **state) { unpack_full(state, MT_GZIP, 7); }
static void test_zstd(void **state) { unpack_full(state, MT_ZSTD, 1000); }
static void test_docker_gzip(void **state) { unpack_full(state, MT_DOCKER, 1 << 20); }

/* One write call with many times the queue: the writer blocks and goes on as the worker drains it. */
static void test_large_single_write(void **state)
{
  fixture *f = *state;
  size_t big = 24u << 20;
  char *data = xmalloc(big + 1);
  for (size_t i = 0; i < big; i++)
    data[i] = (char) ('a' + (i * 7919 % 26));
  data[big] = '\0';
  tar_ent ents[] = {{.name = "big", .data = data}, {.name = "small", .data = "x"}};
  size_t tar_len, blob_len;
  cleanup_free char *tar = tar_of(ents, 2, &tar_len);
  cleanup_free char *blob = gzip_of(tar, tar_len, &blob_len);
  cleanup_error crimage_error *err = NULL;
  char got[DIGEST_MAX_LEN + 1], want[DIGEST_MAX_LEN + 1];
  digest_sha256(tar, tar_len, want);
  if (unpack_blob(f->layer, MT_GZIP, NULL, blob, blob_len, blob_len, got, &err) < 0)
    fail_msg("%s", err->message);
  assert_string_equal(got, want);
  cleanup_free char *p = xasprintf("%s/big", f->layer);
  cleanup_free char *back = NULL;
  size_t back_len = 0;
  assert_int_equal(read_file(p, big + 1, &back, &back_len, &err), 0);
  assert_int_equal(back_len, big);
  assert_memory_equal(back, data, big);
  free(data);
}

/* ---- whiteouts ---- */

static void test_whiteouts(void **state)
{
  fixture *f = *state;
  tar_ent ents[] = {
      {.name = "etc/", .type = AE_IFDIR},
      {.name = "etc/.wh.motd"},
      {.name = ".wh.gone-dir"},
      {.name = "var/", .type = AE_IFDIR, .perm = 0700},
      {.name = "var/.wh..wh..opq"},
      {.name = "var/new", .data = "new"},
      {.name = "implied/.wh..wh..opq"}, /* the directory comes after its marker */
      {.name = "implied/", .type = AE_IFDIR, .perm = 0710},
      {.name = ".wh..wh.plnk/", .type = AE_IFDIR},
      {.name = ".wh..wh.plnk/123.456", .data = "aufs"},
      {.name = ".wh..wh.aufs"},
      {.name = "replaced", .data = "first"},
      {.name = ".wh.replaced"}, /* deletes the file of this same layer, as a sequential apply would */
  };
  size_t tar_len, blob_len;
  cleanup_free char *tar = tar_of(ents, ARRAY_SIZE(ents), &tar_len);
  cleanup_free char *blob = gzip_of(tar, tar_len, &blob_len);
  cleanup_error crimage_error *err = NULL;
  if (unpack_blob(f->layer, MT_GZIP, NULL, blob, blob_len, 512, NULL, &err) < 0)
    fail_msg("%s", err->message);
  const char *d = f->layer;
  struct stat st;
  const char *whiteouts[] = {"etc/motd", "gone-dir", "replaced"};
  for (size_t i = 0; i < ARRAY_SIZE(whiteouts); i++) {
    cleanup_free char *p = xasprintf("%s/%s", d, whiteouts[i]);
    assert_int_equal(lstat(p, &st), 0);
    assert_true(S_ISCHR(st.st_mode));
    assert_int_equal(st.st_rdev, makedev(0, 0));
  }
  assert_false(exists(d, "etc/.wh.motd"));
  assert_false(exists(d, ".wh.gone-dir"));
  check_xattr(d, "var", "trusted.overlay.opaque", "y", 1);
  assert_false(exists(d, "var/.wh..wh..opq"));
  check_content(d, "var/new", "new");
  check_stat(d, "var", S_IFDIR, 0700, 0, 0);
  check_xattr(d, "implied", "trusted.overlay.opaque", "y", 1);
  check_stat(d, "implied", S_IFDIR, 0710, 0, 0);
  assert_false(has_xattr(d, "etc", "trusted.overlay.opaque"));
  assert_false(exists(d, ".wh..wh.plnk"));
  assert_false(exists(d, ".wh..wh.aufs"));
  cleanup_free char *top = list_dir(d);
  assert_string_equal(top, "etc gone-dir implied replaced var");
}

/* xattrs in the archive that overlayfs would act on are dropped; only whiteouts make overlay metadata. */
static void test_overlay_xattrs_dropped(void **state)
{
  fixture *f = *state;
  tar_ent ents[] = {
      {.name = "d/", .type = AE_IFDIR, .xattr = "trusted.overlay.redirect", .xattr_value = "/etc"},
      {.name = "f",
       .data = "x",
       .xattr = "trusted.overlay.metacopy",
       .xattr_value = "",
       .xattr2 = "user.keep",
       .xattr2_value = "1",
       .xattr2_len = 1},
      {.name = "o/", .type = AE_IFDIR, .xattr = "trusted.overlay.opaque", .xattr_value = "y"},
  };
  size_t tar_len;
  cleanup_free char *tar = tar_of(ents, ARRAY_SIZE(ents), &tar_len);
  cleanup_error crimage_error *err = NULL;
  if (unpack_blob(f->layer, MT_TAR, &(unpack_limits){.walk_only = f->walk_only}, tar, tar_len, 4096, NULL, &err) < 0)
    fail_msg("%s", err->message);
  assert_false(has_xattr(f->layer, "d", "trusted.overlay.redirect"));
  assert_false(has_xattr(f->layer, "f", "trusted.overlay.metacopy"));
  assert_false(has_xattr(f->layer, "o", "trusted.overlay.opaque"));
  check_xattr(f->layer, "f", "user.keep", "1", 1);
}

/* Later entries replace earlier ones of the same name, directories merge. */
static void test_replacements(void **state)
{
  fixture *f = *state;
  tar_ent ents[] = {
      {.name = "a", .data = "file"},
      {.name = "a/", .type = AE_IFDIR, .perm = 0700}, /* a directory replaces the file */
      {.name = "a/x", .data = "x"},
      {.name = "a/", .type = AE_IFDIR, .perm = 0750}, /* merges: a/x stays */
      {.name = "b/", .type = AE_IFDIR},
      {.name = "b/deep/er", .data = "gone"},
      {.name = "b", .data = "now a file"}, /* a file replaces the whole directory */
      {.name = "c", .type = AE_IFLNK, .symlink = "/etc"},
      {.name = "c", .data = "plain"}, /* replaces the symlink; nothing is written through it */
      {.name = "d", .data = "1"},
      {.name = "d", .data = "22"},
      {.name = "e", .data = "e"},
      {.name = "e", .hardlink = "e"}, /* a link to itself: nothing to do */
  };
  size_t tar_len;
  cleanup_free char *tar = tar_of(ents, ARRAY_SIZE(ents), &tar_len);
  cleanup_error crimage_error *err = NULL;
  if (unpack_blob(f->layer, MT_TAR, NULL, tar, tar_len, 333, NULL, &err) < 0)
    fail_msg("%s", err->message);
  check_stat(f->layer, "a", S_IFDIR, 0750, 0, 0);
  check_content(f->layer, "a/x", "x");
  check_stat(f->layer, "b", S_IFREG, 0644, 0, 0);
  check_content(f->layer, "b", "now a file");
  check_stat(f->layer, "c", S_IFREG, 0644, 0, 0);
  check_content(f->layer, "c", "plain");
  check_content(f->layer, "d", "22");
  check_content(f->layer, "e", "e");
}

/* ---- malicious layers ---- */

static void test_traversal(void **state)
{
  fixture *f = *state;
  const char *names[] = {"../x", "../canary/x", "a/../../x", "./../../canary/x", "/../x", "a/b/../../../x"};
  for (size_t i = 0; i < ARRAY_SIZE(names); i++) {
    tar_ent ents[] = {{.name = "ok", .data = "ok"}, {.name = names[i], .data = "pwned"}};
    size_t tar_len;
    cleanup_free char *tar = tar_of(ents, ARRAY_SIZE(ents), &tar_len);
    check_refused(f, MT_GZIP, NULL, tar, tar_len, "climbs out of the layer");
  }
  /* ".." that stays inside is only a name */
  tar_ent ok[] = {{.name = "a/b/../c", .data = "c"}, {.name = "/abs", .data = "abs"}};
  size_t tar_len;
  cleanup_free char *tar = tar_of(ok, ARRAY_SIZE(ok), &tar_len);
  cleanup_error crimage_error *err = NULL;
  if (unpack_blob(f->layer, MT_TAR, &(unpack_limits){.walk_only = f->walk_only}, tar, tar_len, 4096, NULL, &err) < 0)
    fail_msg("%s", err->message);
  check_content(f->layer, "a/c", "c");
  check_content(f->layer, "abs", "abs");
  check_nothing_outside(f, "L");
}

static void test_symlink_escapes(void **state)
{
  fixture *f = *state;
  /* a symlink to / (or to the canary), then a file through it */
  const char *targets[] = {"/", f->canary, "../../canary", "."};
  for (size_t i = 0; i < ARRAY_SIZE(targets); i++) {
    tar_ent ents[] = {
        {.name = "link", .type = AE_IFLNK, .symlink = targets[i]},
        {.name = "link/etc/passwd", .data = "pwned"},
    };
    size_t tar_len;
    cleanup_free char *tar = tar_of(ents, ARRAY_SIZE(ents), &tar_len);
    check_refused(f, MT_GZIP, NULL, tar, tar_len, "goes through a symlink");
  }
  /* the same with a directory entry and a device node through the link */
  tar_ent dir_through[] = {
      {.name = "link", .type = AE_IFLNK, .symlink = f->canary},
      {.name = "link/sub/", .type = AE_IFDIR},
  };
  size_t tar_len;
  cleanup_free char *tar = tar_of(dir_through, ARRAY_SIZE(dir_through), &tar_len);
  check_refused(f, MT_TAR, NULL, tar, tar_len, "goes through a symlink");
  tar_ent node_through[] = {
      {.name = "d/", .type = AE_IFDIR},
      {.name = "d/link", .type = AE_IFLNK, .symlink = "../../../canary"},
      {.name = "d/link/null", .type = AE_IFCHR, .major = 1, .minor = 3},
  };
  cleanup_free char *tar2 = tar_of(node_through, ARRAY_SIZE(node_through), &tar_len);
  check_refused(f, MT_TAR, NULL, tar2, tar_len, "goes through a symlink");
  /* a whiteout or opaque marker through a symlink */
  tar_ent wh_through[] = {
      {.name = "link", .type = AE_IFLNK, .symlink = f->canary},
      {.name = "link/.wh..wh..opq"},
  };
  cleanup_free char *tar3 = tar_of(wh_through, ARRAY_SIZE(wh_through), &tar_len);
  check_refused(f, MT_TAR, NULL, tar3, tar_len, "goes through a symlink");
}

static void test_hardlink_escapes(void **state)
{
  fixture *f = *state;
  cleanup_free char *outside = xasprintf("%s/secret", f->top);
  test_put(outside, "secret", 0600);
  f->top_want = "canary layers secret";
  struct {
    const char *target, *want;
  } cases[] = {
      {"../secret", "outside the layer"}, {"../../secret", "outside the layer"},     {"../L/x", "outside the layer"},
      {outside, "not in the layer"}, /* an absolute name is taken inside the layer, where it is not */
      {"missing", "not in the layer"},    {"link/passwd", "goes through a symlink"}, {"dir", "hard link to directory"},
  };
  for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
    tar_ent ents[] = {
        {.name = "link", .type = AE_IFLNK, .symlink = "/etc"},
        {.name = "dir/", .type = AE_IFDIR},
        {.name = "h", .hardlink = cases[i].target},
    };
    size_t tar_len;
    cleanup_free char *tar = tar_of(ents, ARRAY_SIZE(ents), &tar_len);
    check_refused(f, MT_GZIP, NULL, tar, tar_len, cases[i].want);
  }
  cleanup_free char *back = read_all(outside);
  assert_string_equal(back, "secret");
  /* a hard link to a symlink links the symlink itself */
  tar_ent ok[] = {
      {.name = "link", .type = AE_IFLNK, .symlink = "/etc/passwd"},
      {.name = "h", .hardlink = "link"},
  };
  size_t tar_len;
  cleanup_free char *tar = tar_of(ok, ARRAY_SIZE(ok), &tar_len);
  cleanup_error crimage_error *err = NULL;
  if (unpack_blob(f->layer, MT_TAR, &(unpack_limits){.walk_only = f->walk_only}, tar, tar_len, 4096, NULL, &err) < 0)
    fail_msg("%s", err->message);
  check_stat(f->layer, "h", S_IFLNK, 0, 0, 0);
}

static void test_name_limits(void **state)
{
  fixture *f = *state;
  char longname[300];
  memset(longname, 'n', sizeof(longname) - 1);
  longname[sizeof(longname) - 1] = '\0';
  tar_ent ents[] = {{.name = longname, .data = "x"}};
  size_t tar_len;
  cleanup_free char *tar = tar_of(ents, 1, &tar_len);
  check_refused(f, MT_TAR, NULL, tar, tar_len, "path component is longer than the limit");

  unpack_limits lim = {.max_path_len = 20};
  tar_ent deep[] = {{.name = "aaaa/bbbb/cccc/dddd/eeee", .data = "x"}};
  cleanup_free char *tar2 = tar_of(deep, 1, &tar_len);
  check_refused(f, MT_TAR, &lim, tar2, tar_len, "name is longer than the limit");
  tar_ent target[] = {{.name = "l", .type = AE_IFLNK, .symlink = "/a/very/long/target/name"}};
  cleanup_free char *tar3 = tar_of(target, 1, &tar_len);
  check_refused(f, MT_TAR, &lim, tar3, tar_len, "symlink target is longer than the limit");
}

/* A gzip bomb: a tar header for a 10 GiB file of zeros, then gzip members of 1 MiB of zeros each (1 KiB
 * compressed), repeated up to 10 GiB. It must stop when the limit is crossed, after about limit/1000 compressed
 * bytes, not after 10 GB. */
static void test_gzip_bomb(void **state)
{
  fixture *f = *state;
  const uint64_t bomb = UINT64_C(10) << 30;
  tarb t;
  tar_begin(&t);
  struct archive_entry *e = archive_entry_new();
  archive_entry_set_pathname(e, "zeros");
  archive_entry_set_filetype(e, AE_IFREG);
  archive_entry_set_perm(e, 0644);
  archive_entry_set_size(e, (la_int64_t) bomb);
  assert_int_equal(archive_write_header(t.a, e), ARCHIVE_OK);
  archive_entry_free(e);
  size_t hdr_len;
  cleanup_free char *hdr = dynbuf_take(&t.buf, &hdr_len);
  t.stop = true; /* closing would write the 10 GiB of the entry */
  archive_write_free(t.a);
  size_t first_len, member_len;
  cleanup_free char *first = gzip_of(hdr, hdr_len, &first_len);
  cleanup_free char *zeros = xcalloc(1, 1 << 20);
  cleanup_free char *member = gzip_of(zeros, 1 << 20, &member_len);

  unpack_limits lim = {.max_total_bytes = 64u << 20};
  unpack *u = NULL;
  cleanup_error crimage_error *err = NULL;
  assert_int_equal(unpack_begin(f->layer, MT_GZIP, &lim, &u, &err), 0);
  int r = unpack_write(u, first, first_len, &err);
  uint64_t fed = first_len, members = 0;
  while (r == 0 && members < bomb >> 20) {
    r = unpack_write(u, member, member_len, &err);
    fed += member_len;
    members++;
  }
  assert_true(r < 0);
  assert_non_null(err);
  if (!strstr(err->message, "larger than the limit of 67108864 bytes uncompressed"))
    fail_msg("error: %s", err->message);
  /* stopped at the limit: 64 members and a bit, never the 10240 of the whole bomb */
  assert_true(members <= 65);
  assert_true(fed < (2u << 20));
  unpack_abort(u);
  check_nothing_outside(f, "");

  /* With the default limits the header alone is enough when the file is over max_file_size. */
  tar_begin(&t);
  e = archive_entry_new();
  archive_entry_set_pathname(e, "huge");
  archive_entry_set_filetype(e, AE_IFREG);
  archive_entry_set_perm(e, 0644);
  archive_entry_set_size(e, (la_int64_t) (UNPACK_DEFAULT_MAX_FILE_SIZE + 1));
  assert_int_equal(archive_write_header(t.a, e), ARCHIVE_OK);
  archive_entry_free(e);
  cleanup_free char *hdr2 = dynbuf_take(&t.buf, &hdr_len);
  t.stop = true;
  archive_write_free(t.a);
  crimage_error_clear(&err);
  assert_int_equal(unpack_begin(f->layer, MT_GZIP, NULL, &u, &err), 0);
  size_t hz_len;
  cleanup_free char *hz = gzip_of(hdr2, hdr_len, &hz_len);
  r = unpack_write(u, hz, hz_len, &err);
  for (int i = 0; r == 0 && i < 64; i++)
    r = unpack_write(u, member, member_len, &err);
  if (r == 0)
    r = unpack_finish(u, NULL, NULL, &err);
  else
    unpack_abort(u);
  assert_true(r < 0);
  if (!strstr(err->message, "larger than the limit of 17179869184"))
    fail_msg("error: %s", err->message);
  check_nothing_outside(f, "");
}

/* A million tiny entries, generated as they are fed (a real million-entry archive is 512 MB of headers), against
 * a limit of 5000: it stops soon after the limit. */
static void test_million_entries(void **state)
{
  fixture *f = *state;
  unpack_limits lim = {.max_entries = 5000};
  unpack *u = NULL;
  cleanup_error crimage_error *err = NULL;
  assert_int_equal(unpack_begin(f->layer, MT_TAR, &lim, &u, &err), 0);
  tarb t;
  tar_begin_fmt(&t, true);
  int r = 0;
  unsigned i;
  for (i = 0; i < 1000000 && r == 0; i++) {
    char name[32];
    snprintf(name, sizeof(name), "d%u/f%u", i / 1000, i);
    tar_add(&t, &(tar_ent){.name = name});
    if (t.buf.len >= 64 * 1024) {
      r = unpack_write(u, t.buf.data, t.buf.len, &err);
      dynbuf_reset(&t.buf);
    }
  }
  t.stop = true;
  archive_write_free(t.a);
  dynbuf_free(&t.buf);
  if (r == 0)
    r = unpack_finish(u, NULL, NULL, &err);
  else
    unpack_abort(u);
  assert_true(r < 0);
  if (!strstr(err->message, "more than 5000 entries"))
    fail_msg("error: %s", err->message);
  /* the writer learns of it within a queue's worth of entries (1 MiB of 512-byte entries) */
  assert_true(i < 5000 + 4000);
  check_nothing_outside(f, "");
}

/* ---- broken streams ---- */

static void test_broken_streams(void **state)
{
  fixture *f = *state;
  tar_ent ents[] = {{.name = "a", .data = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"}};
  size_t tar_len, gz_len, zs_len;
  cleanup_free char *tar = tar_of(ents, 1, &tar_len);
  cleanup_free char *gz = gzip_of(tar, tar_len, &gz_len);
  cleanup_free char *zs = zstd_of(tar, tar_len, &zs_len);
  struct {
    const char *mt;
    const char *data;
    size_t len;
    const char *want;
  } cases[] = {
      {MT_GZIP, gz, gz_len - 4, "gzip stream is truncated"},
      {MT_GZIP, tar, tar_len, "not a valid gzip stream"},
      {MT_ZSTD, zs, zs_len - 3, "zstd stream is truncated"},
      {MT_ZSTD, gz, gz_len, "not a valid zstd stream"},
      {MT_ZSTD, "", 0, "zstd stream is truncated"},
      {MT_TAR, tar, 700, "a"}, /* cut inside the data of a */
      {MT_TAR, "this is not a tar archive, just some text that goes on and on for a while............", 84,
       "not a tar archive"},
  };
  for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
    cleanup_error crimage_error *err = NULL;
    int r = unpack_blob(f->layer, cases[i].mt, NULL, cases[i].data, cases[i].len, 50, NULL, &err);
    if (r >= 0)
      fail_msg("case %zu: no error", i);
    if (!strstr(err->message, cases[i].want))
      fail_msg("case %zu: \"%s\" does not say \"%s\"", i, err->message, cases[i].want);
    check_nothing_outside(f, "");
  }
  /* an empty plain layer is an empty directory */
  cleanup_error crimage_error *err = NULL;
  char got[DIGEST_MAX_LEN + 1], want[DIGEST_MAX_LEN + 1];
  digest_sha256("", 0, want);
  assert_int_equal(unpack_blob(f->layer, MT_TAR, NULL, "", 0, 1, got, &err), 0);
  assert_string_equal(got, want);
  cleanup_free char *names = list_dir(f->layer);
  assert_string_equal(names, "");
}

static void test_diff_id_and_exists(void **state)
{
  fixture *f = *state;
  tar_ent ents[] = {{.name = "a", .data = "a"}};
  size_t tar_len;
  cleanup_free char *tar = tar_of(ents, 1, &tar_len);
  char want[DIGEST_MAX_LEN + 1];
  digest_sha256(tar, tar_len, want);
  unpack *u = NULL;
  cleanup_error crimage_error *err = NULL;
  assert_int_equal(unpack_begin(f->layer, MT_TAR, NULL, &u, &err), 0);
  assert_int_equal(unpack_write(u, tar, tar_len, &err), 0);
  int r = unpack_finish(u, "sha256:0000000000000000000000000000000000000000000000000000000000000000", NULL, &err);
  assert_true(r < 0);
  assert_int_equal(err->status, CRIMAGE_DATA_LOSS);
  assert_non_null(strstr(err->message, want));
  check_nothing_outside(f, "");
  crimage_error_clear(&err);

  assert_int_equal(unpack_begin(f->layer, MT_TAR, NULL, &u, &err), 0);
  assert_int_equal(unpack_write(u, tar, tar_len, &err), 0);
  assert_int_equal(unpack_finish(u, want, NULL, &err), 0);
  /* the directory exists now */
  assert_true(unpack_begin(f->layer, MT_TAR, NULL, &u, &err) < 0);
  assert_int_equal(err->status, CRIMAGE_ALREADY_EXISTS);
  crimage_error_clear(&err);
  /* it appeared while unpacking: ALREADY_EXISTS, ours removed */
  cleanup_free char *other = xasprintf("%s/M", f->layers);
  assert_int_equal(unpack_begin(other, MT_TAR, NULL, &u, &err), 0);
  assert_int_equal(unpack_write(u, tar, tar_len, &err), 0);
  assert_int_equal(mkdir(other, 0755), 0);
  assert_true(unpack_finish(u, NULL, NULL, &err) < 0);
  assert_int_equal(err->status, CRIMAGE_ALREADY_EXISTS);
  check_nothing_outside(f, "L M");
  crimage_error_clear(&err);
  /* unknown media types, missing parents */
  assert_int_equal(unpack_begin(other, "application/vnd.oci.image.layer.v1.tar+lz4", NULL, &u, &err), -ENOTSUP);
  assert_int_equal(err->status, CRIMAGE_UNIMPLEMENTED);
  crimage_error_clear(&err);
  assert_true(unpack_begin("/nonexistent/dir/L", MT_TAR, NULL, &u, &err) < 0);
  assert_int_equal(err->status, CRIMAGE_NOT_FOUND);
}

static void test_abort_and_restart(void **state)
{
  fixture *f = *state;
  size_t tar_len, blob_len;
  cleanup_free char *tar = tar_of(full_layer, ARRAY_SIZE(full_layer), &tar_len);
  cleanup_free char *blob = gzip_of(tar, tar_len, &blob_len);
  unpack *u = NULL;
  cleanup_error crimage_error *err = NULL;
  /* abort halfway: nothing stays */
  assert_int_equal(unpack_begin(f->layer, MT_GZIP, NULL, &u, &err), 0);
  assert_int_equal(feed(u, blob, blob_len / 2, 10, &err), 0);
  unpack_abort(u);
  check_nothing_outside(f, "");
  /* abort right away, and abort(NULL) */
  assert_int_equal(unpack_begin(f->layer, MT_GZIP, NULL, &u, &err), 0);
  unpack_abort(u);
  unpack_abort(NULL);
  check_nothing_outside(f, "");
  /* restart halfway, then the whole blob */
  assert_int_equal(unpack_begin(f->layer, MT_GZIP, NULL, &u, &err), 0);
  assert_int_equal(feed(u, blob, blob_len / 2, 10, &err), 0);
  assert_int_equal(unpack_restart(u, &err), 0);
  assert_int_equal(feed(u, blob, blob_len, 10, &err), 0);
  char got[DIGEST_MAX_LEN + 1], want[DIGEST_MAX_LEN + 1];
  digest_sha256(tar, tar_len, want);
  assert_int_equal(unpack_finish(u, want, got, &err), 0);
  assert_string_equal(got, want);
  check_full_layer(f->layer);
  check_nothing_outside(f, "L");
  /* a failed unpack accepts nothing more, and finish reports it */
  cleanup_free char *other = xasprintf("%s/M", f->layers);
  assert_int_equal(unpack_begin(other, MT_GZIP, NULL, &u, &err), 0);
  assert_true(unpack_write(u, "garbage! garbage! garbage! garbage! garbage!", 44, &err) < 0);
  crimage_error_clear(&err);
  assert_true(unpack_write(u, blob, blob_len, &err) < 0);
  assert_non_null(strstr(err->message, "already failed"));
  crimage_error_clear(&err);
  assert_true(unpack_finish(u, NULL, NULL, &err) < 0);
  check_nothing_outside(f, "L");
}

/* Layers unpacked in parallel from several threads, each its own unpack. */
typedef struct par_job {
  const fixture *f;
  int n;
  const char *blob;
  size_t len;
  const char *want;
  int ret;
  char got[DIGEST_MAX_LEN + 1];
} par_job;

static void *par_run(void *arg)
{
  par_job *j = arg;
  cleanup_free char *dir = xasprintf("%s/P%d", j->f->layers, j->n);
  crimage_error *err = NULL;
  j->ret = unpack_blob(dir, MT_GZIP, NULL, j->blob, j->len, 1000 + (size_t) j->n * 77, j->got, &err);
  crimage_error_free(err);
  return NULL;
}

static void test_parallel(void **state)
{
  fixture *f = *state;
  size_t tar_len, blob_len;
  cleanup_free char *tar = tar_of(full_layer, ARRAY_SIZE(full_layer), &tar_len);
  cleanup_free char *blob = gzip_of(tar, tar_len, &blob_len);
  char want[DIGEST_MAX_LEN + 1];
  digest_sha256(tar, tar_len, want);
  par_job jobs[6];
  pthread_t th[6];
  for (int i = 0; i < 6; i++) {
    jobs[i] = (par_job){.f = f, .n = i, .blob = blob, .len = blob_len, .want = want};
    assert_int_equal(pthread_create(&th[i], NULL, par_run, &jobs[i]), 0);
  }
  for (int i = 0; i < 6; i++) {
    pthread_join(th[i], NULL);
    assert_int_equal(jobs[i].ret, 0);
    assert_string_equal(jobs[i].got, want);
    cleanup_free char *dir = xasprintf("%s/P%d", f->layers, i);
    check_full_layer(dir);
  }
  check_nothing_outside(f, "P0 P1 P2 P3 P4 P5");
}

/* A sparse file (pax GNU sparse) keeps its holes and size. */
static void test_sparse(void **state)
{
  fixture *f = *state;
  tarb t;
  tar_begin(&t);
  struct archive_entry *e = archive_entry_new();
  archive_entry_set_pathname(e, "sparse");
  archive_entry_set_filetype(e, AE_IFREG);
  archive_entry_set_perm(e, 0644);
  archive_entry_set_size(e, 1 << 20);
  archive_entry_sparse_add_entry(e, 512 * 1024, 4);
  archive_entry_sparse_add_entry(e, (1 << 20) - 1, 1);
  assert_int_equal(archive_write_header(t.a, e), ARCHIVE_OK);
  /* the writer takes the whole content and skips the holes of the sparse map */
  cleanup_free char *content = xcalloc(1, 1 << 20);
  memcpy(content + 512 * 1024, "DATA", 4);
  content[(1 << 20) - 1] = '!';
  assert_int_equal(archive_write_data(t.a, content, 1 << 20), 1 << 20);
  archive_entry_free(e);
  size_t tar_len;
  cleanup_free char *tar = tar_end(&t, &tar_len);
  cleanup_error crimage_error *err = NULL;
  if (unpack_blob(f->layer, MT_TAR, &(unpack_limits){.walk_only = f->walk_only}, tar, tar_len, 4096, NULL, &err) < 0)
    fail_msg("%s", err->message);
  cleanup_free char *p = xasprintf("%s/sparse", f->layer);
  cleanup_free char *data = NULL;
  size_t len = 0;
  assert_int_equal(read_file(p, 2 << 20, &data, &len, &err), 0);
  assert_int_equal(len, 1 << 20);
  assert_memory_equal(data + 512 * 1024, "DATA", 4);
  assert_int_equal(data[(1 << 20) - 1], '!');
  assert_int_equal(data[0], 0);
}

static void test_remove_stale_and_usage(void **state)
{
  fixture *f = *state;
  cleanup_free char *stale = xasprintf("%s/.unpack-L-12345678", f->layers);
  cleanup_free char *deep = xasprintf("%s/a/b/c", stale);
  cleanup_error crimage_error *err = NULL;
  assert_int_equal(mkdir_p(deep, 0755, &err), 0);
  cleanup_free char *file = xasprintf("%s/a/b/c/f", stale);
  test_put(file, "x", 0644);
  cleanup_free char *keep = xasprintf("%s/keep", f->layers);
  assert_int_equal(mkdir(keep, 0755), 0);
  assert_int_equal(unpack_remove_stale(f->layers, &err), 0);
  check_nothing_outside(f, "keep");

  size_t tar_len;
  cleanup_free char *tar = tar_of(full_layer, ARRAY_SIZE(full_layer), &tar_len);
  assert_int_equal(unpack_blob(f->layer, MT_TAR, NULL, tar, tar_len, 4096, NULL, &err), 0);
  uint64_t bytes = 0, inodes = 0;
  assert_int_equal(unpack_dir_usage(f->layer, &bytes, &inodes, &err), 0);
  /* entries of full_layer (the hard link counted once) plus the implied dirs usr/bin is explicit; implied and
   * implied/parent and café are made: 22 entries - 1 hard link + 3 implied */
  assert_int_equal(inodes, 24);
  assert_true(bytes > 0);
  assert_true(unpack_dir_usage("/nonexistent", &bytes, &inodes, &err) < 0);
}

static void test_media_types(void **state)
{
  unpack_compression c;
  assert_int_equal(unpack_compression_of("application/vnd.oci.image.layer.v1.tar", &c), 0);
  assert_int_equal(c, UNPACK_PLAIN);
  assert_int_equal(unpack_compression_of("application/vnd.oci.image.layer.v1.tar+gzip", &c), 0);
  assert_int_equal(c, UNPACK_GZIP);
  assert_int_equal(unpack_compression_of("application/vnd.oci.image.layer.v1.tar+zstd", &c), 0);
  assert_int_equal(c, UNPACK_ZSTD);
  assert_int_equal(unpack_compression_of("application/vnd.oci.image.layer.nondistributable.v1.tar+gzip", &c), 0);
  assert_int_equal(c, UNPACK_GZIP);
  assert_int_equal(unpack_compression_of("application/vnd.oci.image.layer.nondistributable.v1.tar+zstd", &c), 0);
  assert_int_equal(c, UNPACK_ZSTD);
  assert_int_equal(unpack_compression_of("application/vnd.oci.image.layer.nondistributable.v1.tar", &c), 0);
  assert_int_equal(c, UNPACK_PLAIN);
  assert_int_equal(unpack_compression_of("application/vnd.docker.image.rootfs.diff.tar.gzip", &c), 0);
  assert_int_equal(c, UNPACK_GZIP);
  assert_int_equal(unpack_compression_of("application/vnd.docker.image.rootfs.foreign.diff.tar.gzip", &c), 0);
  assert_int_equal(c, UNPACK_GZIP);
  assert_int_equal(unpack_compression_of("application/vnd.oci.image.config.v1+json", &c), -ENOTSUP);
  assert_int_equal(unpack_compression_of(NULL, &c), -ENOTSUP);
  unpack_limits lim;
  unpack_limits_default(&lim);
  assert_int_equal(lim.max_entries, 1000000);
  assert_int_equal(lim.max_total_bytes, UINT64_C(64) << 30);
  assert_int_equal(lim.max_file_size, UINT64_C(16) << 30);
  assert_int_equal(lim.max_path_len, 4095);
  assert_int_equal(lim.max_name_len, 255);
}

int main(void)
{
  /* The layers are written with UTF-8 names, as image builders do; the worker threads that read them keep the
   * process's "C" locale, as the daemon has: names must come through as their bytes all the same. */
  locale_t utf8 = newlocale(LC_ALL_MASK, "C.UTF-8", (locale_t) 0);
  if (utf8)
    uselocale(utf8);
  if (geteuid() != 0) {
    /* owners, device nodes and trusted.* xattrs need root, as the daemon does */
    fprintf(stderr, "test-unpack needs root; skipped\n");
    return 77;
  }
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_media_types),
      cmocka_unit_test_setup_teardown(test_plain, setup, teardown),
      cmocka_unit_test_setup_teardown(test_gzip, setup, teardown),
      cmocka_unit_test_setup_teardown(test_zstd, setup, teardown),
      cmocka_unit_test_setup_teardown(test_docker_gzip, setup, teardown),
      cmocka_unit_test_setup_teardown(test_large_single_write, setup, teardown),
      cmocka_unit_test_setup_teardown(test_whiteouts, setup, teardown),
      cmocka_unit_test_setup_teardown(test_overlay_xattrs_dropped, setup, teardown),
      cmocka_unit_test_setup_teardown(test_replacements, setup, teardown),
      cmocka_unit_test_setup_teardown(test_traversal, setup, teardown),
      /* the O_NOFOLLOW walk that replaces openat2 on older kernels, on the same layers */
      cmocka_unit_test_setup_teardown(test_gzip, setup_walk, teardown),
      cmocka_unit_test_setup_teardown(test_symlink_escapes, setup_walk, teardown),
      cmocka_unit_test_setup_teardown(test_hardlink_escapes, setup_walk, teardown),
      cmocka_unit_test_setup_teardown(test_traversal, setup_walk, teardown),
      cmocka_unit_test_setup_teardown(test_symlink_escapes, setup, teardown),
      cmocka_unit_test_setup_teardown(test_hardlink_escapes, setup, teardown),
      cmocka_unit_test_setup_teardown(test_name_limits, setup, teardown),
      cmocka_unit_test_setup_teardown(test_gzip_bomb, setup, teardown),
      cmocka_unit_test_setup_teardown(test_million_entries, setup, teardown),
      cmocka_unit_test_setup_teardown(test_broken_streams, setup, teardown),
      cmocka_unit_test_setup_teardown(test_diff_id_and_exists, setup, teardown),
      cmocka_unit_test_setup_teardown(test_abort_and_restart, setup, teardown),
      cmocka_unit_test_setup_teardown(test_parallel, setup, teardown),
      cmocka_unit_test_setup_teardown(test_sparse, setup, teardown),
      cmocka_unit_test_setup_teardown(test_remove_stale_and_usage, setup, teardown),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
