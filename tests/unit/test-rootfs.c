/* rootfs_flatten and rootfs_mount on layer directories built here as the unpacker lays them out (overlay whiteouts:
 * 0/0 character devices, trusted.overlay.opaque=y): the overlay rules (deletions, opaque directories, a directory
 * replacing a non-directory and back, the topmost layer's directory attributes and xattrs), hard links, sparse
 * files, sockets and fifos, lower-layer symlinks pointing at a canary directory outside (which must stay empty),
 * the root of a layer being opaque, and dir left as found on failure; each with openat2 and with the O_NOFOLLOW
 * walk. Needs root (owners, devices, trusted.* xattrs, mounts), as the command does. */
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/un.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <cmocka.h>

#include "common/util.h"
#include "plugin/rootfs.h"
#include "test-files.h"

#define MTIME 1600000000

typedef struct fixture {
  char *top;    /* /tmp/test-rootfs-XXXXXX */
  char *canary; /* top/canary: must stay empty */
  char *out;    /* top/out: the copy (absent until made) */
  rootfs_options opts;
} fixture;

static int setup(void **state)
{
  fixture *f = xcalloc(1, sizeof(*f));
  f->top = test_mkdtemp("rootfs");
  f->canary = xasprintf("%s/canary", f->top);
  f->out = xasprintf("%s/out", f->top);
  assert_int_equal(mkdir(f->canary, 0755), 0);
  *state = f;
  return 0;
}

static int setup_walk(void **state)
{
  setup(state);
  ((fixture *) *state)->opts.walk_only = true;
  return 0;
}

static int teardown(void **state)
{
  fixture *f = *state;
  test_rm_rf(f->top);
  free(f->top);
  free(f->canary);
  free(f->out);
  free(f);
  return 0;
}

/* top/<layer>/<rel> */
static char *at(fixture *f, const char *layer, const char *rel)
{
  return xasprintf("%s/%s%s%s", f->top, layer, *rel ? "/" : "", rel);
}

static void mk_dir(fixture *f, const char *layer, const char *rel, mode_t mode)
{
  cleanup_free char *p = at(f, layer, rel);
  assert_int_equal(mkdir(p, mode), 0);
  assert_int_equal(chmod(p, mode), 0);
}

static void mk_file(fixture *f, const char *layer, const char *rel, const char *content)
{
  cleanup_free char *p = at(f, layer, rel);
  test_put(p, content, 0644);
}

static void mk_whiteout(fixture *f, const char *layer, const char *rel)
{
  cleanup_free char *p = at(f, layer, rel);
  assert_int_equal(mknod(p, S_IFCHR | 0, makedev(0, 0)), 0);
}

static void mk_opaque(fixture *f, const char *layer, const char *rel)
{
  cleanup_free char *p = at(f, layer, rel);
  assert_int_equal(setxattr(p, "trusted.overlay.opaque", "y", 1, 0), 0);
}

static void mk_symlink(fixture *f, const char *layer, const char *rel, const char *target)
{
  cleanup_free char *p = at(f, layer, rel);
  assert_int_equal(symlink(target, p), 0);
}

static void set_mtime(const char *p)
{
  struct timespec ts[2] = {{.tv_sec = MTIME}, {.tv_sec = MTIME}};
  assert_int_equal(utimensat(AT_FDCWD, p, ts, AT_SYMLINK_NOFOLLOW), 0);
}

static char *out_path(fixture *f, const char *rel) { return xasprintf("%s/%s", f->out, rel); }

static bool out_exists(fixture *f, const char *rel)
{
  cleanup_free char *p = out_path(f, rel);
  struct stat st;
  return lstat(p, &st) == 0;
}

static mode_t out_type(fixture *f, const char *rel)
{
  cleanup_free char *p = out_path(f, rel);
  struct stat st;
  assert_int_equal(lstat(p, &st), 0);
  return st.st_mode & S_IFMT;
}

static void assert_content(fixture *f, const char *rel, const char *want)
{
  cleanup_free char *p = out_path(f, rel);
  cleanup_free char *data = NULL;
  cleanup_error crimage_error *err = NULL;
  assert_int_equal(read_file(p, 1 << 20, &data, NULL, &err), 0);
  assert_string_equal(data, want);
}

static void assert_canary_empty(fixture *f)
{
  cleanup_free char *cmd = xasprintf("test -z \"$(ls -A '%s')\"", f->canary);
  assert_int_equal(system(cmd), 0);
}

static int flatten(fixture *f, char *const *layers, crimage_error **err)
{
  char *paths[8] = {0};
  for (size_t i = 0; layers[i]; i++)
    paths[i] = at(f, layers[i], "");
  int r = rootfs_flatten(paths, f->out, &f->opts, err);
  for (size_t i = 0; paths[i]; i++)
    free(paths[i]);
  return r;
}

/* Three layers with each overlay rule, checked name by name. */
static void test_overlay_rules(void **state)
{
  fixture *f = *state;
  mk_dir(f, "l1", "", 0755);
  mk_dir(f, "l1", "a", 0755);
  mk_file(f, "l1", "a/x", "x1");
  mk_file(f, "l1", "a/y", "y1");
  mk_dir(f, "l1", "b", 0755);
  mk_file(f, "l1", "b/old", "old");
  mk_file(f, "l1", "c", "c is a file");
  mk_dir(f, "l1", "d", 0755);
  mk_file(f, "l1", "d/below", "below");
  mk_symlink(f, "l1", "etc", f->canary); /* absolute, out of the tree */
  mk_symlink(f, "l1", "rel", "../../../../../../../../../../../../tmp");
  mk_file(f, "l1", "hl", "linked");
  cleanup_free char *hl = at(f, "l1", "hl"), *hl2 = at(f, "l1", "a/hl2");
  assert_int_equal(link(hl, hl2), 0);
  cleanup_free char *fifo = at(f, "l1", "fifo");
  assert_int_equal(mkfifo(fifo, 0640), 0);
  cleanup_free char *dev = at(f, "l1", "null");
  assert_int_equal(mknod(dev, S_IFCHR | 0666, makedev(1, 3)), 0);
  assert_int_equal(chmod(dev, 0666), 0); /* past the umask */
  cleanup_free char *suid = at(f, "l1", "su");
  test_put(suid, "su", 0644);
  assert_int_equal(chown(suid, 0, 5), 0);
  assert_int_equal(chmod(suid, 04755), 0);
  assert_int_equal(setxattr(suid, "user.note", "n", 1, 0), 0);
  set_mtime(suid);
  cleanup_free char *sock = at(f, "l1", "sock");
  int s = socket(AF_UNIX, SOCK_STREAM, 0);
  struct sockaddr_un sa = {.sun_family = AF_UNIX};
  snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", sock);
  assert_int_equal(bind(s, (struct sockaddr *) &sa, sizeof(sa)), 0);
  close(s);

  mk_dir(f, "l2", "", 0755);
  mk_dir(f, "l2", "a", 0700);
  mk_whiteout(f, "l2", "a/x");
  mk_dir(f, "l2", "b", 0755);
  mk_opaque(f, "l2", "b");
  mk_file(f, "l2", "b/new", "new");
  mk_dir(f, "l2", "c", 0755); /* a file becomes a directory */
  mk_file(f, "l2", "c/f", "f");
  mk_symlink(f, "l2", "d", f->canary); /* a directory becomes a symlink out of the tree */
  mk_whiteout(f, "l2", "fifo");

  mk_dir(f, "l3", "", 0755);
  mk_dir(f, "l3", "etc", 0755); /* replaces the symlink: written into the copy, not into the canary */
  mk_file(f, "l3", "etc/passwd", "root");
  mk_dir(f, "l3", "rel", 0755);
  mk_file(f, "l3", "rel/f", "rel");
  mk_dir(f, "l3", "d", 0755); /* back to a directory: the symlink hid l1's d/below */
  mk_file(f, "l3", "d/above", "above");

  cleanup_error crimage_error *err = NULL;
  int r = flatten(f, (char *[]){"l1", "l2", "l3", NULL}, &err);
  assert_int_equal(r, 0);
  assert_canary_empty(f);

  assert_false(out_exists(f, "a/x"));
  assert_content(f, "a/y", "y1");
  assert_false(out_exists(f, "b/old"));
  assert_content(f, "b/new", "new");
  assert_int_equal(out_type(f, "c"), S_IFDIR);
  assert_content(f, "c/f", "f");
  assert_int_equal(out_type(f, "d"), S_IFDIR);
  assert_false(out_exists(f, "d/below"));
  assert_content(f, "d/above", "above");
  assert_int_equal(out_type(f, "etc"), S_IFDIR);
  assert_content(f, "etc/passwd", "root");
  assert_content(f, "rel/f", "rel");
  assert_false(out_exists(f, "fifo"));
  assert_int_equal(out_type(f, "sock"), S_IFSOCK);

  struct stat a, b, st;
  cleanup_free char *o_hl = out_path(f, "hl"), *o_hl2 = out_path(f, "a/hl2"), *o_a = out_path(f, "a");
  assert_int_equal(lstat(o_hl, &a), 0);
  assert_int_equal(lstat(o_hl2, &b), 0);
  assert_true(a.st_ino == b.st_ino && a.st_nlink == 2);
  assert_int_equal(lstat(hl, &st), 0);
  assert_true(st.st_ino != a.st_ino && st.st_nlink == 2); /* the store's inode is not shared */
  assert_int_equal(lstat(o_a, &st), 0);
  assert_int_equal(st.st_mode & 07777, 0700); /* the topmost layer's mode */

  cleanup_free char *o_null = out_path(f, "null"), *o_su = out_path(f, "su");
  assert_int_equal(lstat(o_null, &st), 0);
  assert_true(S_ISCHR(st.st_mode) && st.st_rdev == makedev(1, 3) && (st.st_mode & 07777) == 0666);
  assert_int_equal(lstat(o_su, &st), 0);
  assert_int_equal(st.st_mode & 07777, 04755);
  assert_int_equal(st.st_gid, 5);
  assert_int_equal(st.st_mtime, MTIME);
  char v[4];
  assert_int_equal(getxattr(o_su, "user.note", v, sizeof(v)), 1);
}

/* A merged directory has the topmost layer's owner, mode, mtime and xattrs, not a mix. */
static void test_merged_directory_attributes(void **state)
{
  fixture *f = *state;
  mk_dir(f, "l1", "", 0755);
  mk_dir(f, "l1", "m", 0700);
  mk_file(f, "l1", "m/one", "1");
  cleanup_free char *m1 = at(f, "l1", "m"), *m2 = at(f, "l2", "m");
  assert_int_equal(chown(m1, 5, 5), 0);
  assert_int_equal(setxattr(m1, "user.lower", "1", 1, 0), 0);
  mk_dir(f, "l2", "", 0755);
  mk_dir(f, "l2", "m", 02775);
  mk_file(f, "l2", "m/two", "2");
  assert_int_equal(chown(m2, 7, 8), 0);
  assert_int_equal(chmod(m2, 02775), 0);
  assert_int_equal(setxattr(m2, "user.upper", "2", 1, 0), 0);
  set_mtime(m2);

  cleanup_error crimage_error *err = NULL;
  assert_int_equal(flatten(f, (char *[]){"l1", "l2", NULL}, &err), 0);
  cleanup_free char *o = out_path(f, "m");
  struct stat st;
  assert_int_equal(lstat(o, &st), 0);
  assert_int_equal(st.st_uid, 7);
  assert_int_equal(st.st_gid, 8);
  assert_int_equal(st.st_mode & 07777, 02775);
  assert_int_equal(st.st_mtime, MTIME); /* set after the entries were written into it */
  char v[4];
  assert_int_equal(getxattr(o, "user.upper", v, sizeof(v)), 1);
  assert_int_equal(getxattr(o, "user.lower", v, sizeof(v)), -1);
  assert_int_equal(getxattr(o, "trusted.overlay.opaque", v, sizeof(v)), -1);
  assert_content(f, "m/one", "1");
  assert_content(f, "m/two", "2");
}

/* An opaque layer root hides all below it (the image spec's meaning of ./.wh..wh..opq). */
static void test_opaque_root(void **state)
{
  fixture *f = *state;
  mk_dir(f, "l1", "", 0755);
  mk_file(f, "l1", "gone", "gone");
  mk_dir(f, "l2", "", 0750);
  mk_opaque(f, "l2", "");
  mk_file(f, "l2", "kept", "kept");
  cleanup_error crimage_error *err = NULL;
  assert_int_equal(flatten(f, (char *[]){"l1", "l2", NULL}, &err), 0);
  assert_false(out_exists(f, "gone"));
  assert_content(f, "kept", "kept");
  struct stat st;
  assert_int_equal(lstat(f->out, &st), 0);
  assert_int_equal(st.st_mode & 07777, 0750); /* dir gets the top layer root's mode */
}

/* Holes stay holes. */
static void test_sparse_file(void **state)
{
  fixture *f = *state;
  mk_dir(f, "l1", "", 0755);
  cleanup_free char *p = at(f, "l1", "sparse");
  cleanup_close int fd = open(p, O_WRONLY | O_CREAT | O_EXCL, 0644);
  assert_true(fd >= 0);
  assert_int_equal(pwrite(fd, "end", 3, 64 << 20), 3);
  assert_int_equal(pwrite(fd, "start", 5, 0), 5);
  cleanup_error crimage_error *err = NULL;
  assert_int_equal(flatten(f, (char *[]){"l1", NULL}, &err), 0);
  cleanup_free char *o = out_path(f, "sparse");
  struct stat st;
  assert_int_equal(lstat(o, &st), 0);
  assert_int_equal(st.st_size, (64 << 20) + 3);
  assert_true(st.st_blocks * 512 < (1 << 20));
  cleanup_close int in = open(o, O_RDONLY);
  char buf[6] = {0};
  assert_int_equal(pread(in, buf, 5, 0), 5);
  assert_string_equal(buf, "start");
  assert_int_equal(pread(in, buf, 3, 64 << 20), 3);
  buf[3] = '\0';
  assert_string_equal(buf, "end");
}

/* A failure leaves dir as it was: removed when the copy created it, empty when it was; a non-empty dir is refused
 * untouched. */
static void test_dir_left_as_found(void **state)
{
  fixture *f = *state;
  mk_dir(f, "l1", "", 0755);
  mk_file(f, "l1", "f", "f");
  cleanup_error crimage_error *err = NULL;
  assert_true(flatten(f, (char *[]){"l1", "missing", NULL}, &err) < 0);
  assert_non_null(strstr(err->message, "applying layer 2 of 2"));
  assert_false(access(f->out, F_OK) == 0);
  crimage_error_clear(&err);

  assert_int_equal(mkdir(f->out, 0755), 0);
  assert_true(flatten(f, (char *[]){"l1", "missing", NULL}, &err) < 0);
  assert_false(out_exists(f, "f"));
  assert_true(access(f->out, F_OK) == 0);
  crimage_error_clear(&err);

  cleanup_free char *mine = out_path(f, "mine");
  test_put(mine, "mine", 0644);
  assert_int_equal(flatten(f, (char *[]){"l1", NULL}, &err), -ENOTEMPTY);
  assert_int_equal(err->status, CRIMAGE_FAILED_PRECONDITION);
  assert_false(out_exists(f, "f"));
  assert_true(out_exists(f, "mine"));
}

/* Two layers are an overlay, one a bind mount; both read-only, refused on a mount point, undone by umount. */
static void test_mount(void **state)
{
  fixture *f = *state;
  mk_dir(f, "l1", "", 0755);
  mk_file(f, "l1", "a", "a");
  mk_file(f, "l1", "gone", "gone");
  mk_dir(f, "l2", "", 0755);
  mk_whiteout(f, "l2", "gone");
  assert_int_equal(mkdir(f->out, 0755), 0);
  cleanup_free char *l1 = at(f, "l1", ""), *l2 = at(f, "l2", "");
  for (int n = 2; n >= 1; n--) {
    char *layers[] = {l1, n == 2 ? l2 : NULL, NULL};
    cleanup_error crimage_error *err = NULL;
    assert_int_equal(rootfs_mount(layers, f->out, &err), 0);
    assert_content(f, "a", "a");
    assert_true(out_exists(f, "gone") == (n == 1));
    cleanup_free char *p = out_path(f, "new");
    assert_true(open(p, O_WRONLY | O_CREAT, 0644) < 0 && errno == EROFS);
    assert_int_equal(rootfs_mount(layers, f->out, &err), -EBUSY);
    assert_non_null(strstr(err->message, "mount point already"));
    crimage_error_clear(&err);
    assert_int_equal(rootfs_umount(f->out, &err), 0);
    assert_false(out_exists(f, "a"));
  }
  cleanup_error crimage_error *err = NULL;
  assert_int_equal(rootfs_umount(f->out, &err), -EINVAL);
  assert_int_equal(err->status, CRIMAGE_FAILED_PRECONDITION);
}

int main(void)
{
  if (geteuid() != 0) {
    fprintf(stderr, "test-rootfs needs root; skipped\n");
    return 77;
  }
  const struct CMUnitTest tests[] = {
      cmocka_unit_test_setup_teardown(test_overlay_rules, setup, teardown),
      cmocka_unit_test_setup_teardown(test_overlay_rules, setup_walk, teardown),
      cmocka_unit_test_setup_teardown(test_merged_directory_attributes, setup, teardown),
      cmocka_unit_test_setup_teardown(test_merged_directory_attributes, setup_walk, teardown),
      cmocka_unit_test_setup_teardown(test_opaque_root, setup, teardown),
      cmocka_unit_test_setup_teardown(test_sparse_file, setup, teardown),
      cmocka_unit_test_setup_teardown(test_dir_left_as_found, setup, teardown),
      cmocka_unit_test_setup_teardown(test_mount, setup, teardown),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
