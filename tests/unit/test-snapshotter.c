/* The snapshotter without gRPC: the mounts it hands out (as containerd's overlayfs snapshotter builds them), the
 * semantics and error classes of every operation, its metadata file (reload, crash leftovers, corrupt files refused,
 * bounds), usage, cleanup, registered layers and the remote-snapshot answer, and concurrent use. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/stat.h>

#include <cmocka.h>

#include "common/fsutil.h"
#include "common/json.h"
#include "common/util.h"
#include "cri/snapshotter/internal.h"
#include "cri/snapshotter/snapshotter.h"
#include "test-files.h"

typedef struct fixture {
  char *dir;  /* the test's directory */
  char *root; /* the snapshotter's root in it */
  snapshotter *s;
  bool index_off; /* what the snapshotter adds to overlay mounts on this kernel */
} fixture;

static snapshotter *open_root(const char *root)
{
  snapshotter_options o = {.root = root};
  snapshotter *s = NULL;
  crimage_error *err = NULL;
  int r = snapshotter_open(&o, &s, &err);
  if (r < 0)
    fail_msg("open %s: %s", root, err->message);
  return s;
}

static int setup(void **state)
{
  fixture *f = xcalloc(1, sizeof(*f));
  f->dir = test_mkdtemp("snapshotter");
  f->root = xasprintf("%s/root", f->dir);
  f->s = open_root(f->root);
  f->index_off = access("/sys/module/overlay/parameters/index", F_OK) == 0;
  *state = f;
  return 0;
}

static int teardown(void **state)
{
  fixture *f = *state;
  snapshotter_free(f->s);
  test_rm_rf(f->dir);
  free(f->root);
  free(f->dir);
  free(f);
  return 0;
}

static void reopen(fixture *f)
{
  snapshotter_free(f->s);
  f->s = open_root(f->root);
}

/* ---- helpers that expect success or one error class ---- */

/* The error is passed by address: the call that fills it is an argument too, and C does not order the two. */
static void expect_ok(int r, crimage_error **err)
{
  if (r < 0)
    fail_msg("unexpected error: %s", *err ? (*err)->message : "(none)");
}

/* Asserts r failed with status; the message must name what (NULL: not checked). */
static void expect_error(int r, crimage_error **errp, crimage_status status, const char *what)
{
  crimage_error *err = *errp;
  *errp = NULL;
  if (r >= 0)
    fail_msg("expected %s, got success", crimage_status_name(status));
  assert_non_null(err);
  if (err->status != status)
    fail_msg("expected %s, got %s: %s", crimage_status_name(status), crimage_status_name(err->status), err->message);
  if (what && !strstr(err->message, what))
    fail_msg("`%s` does not name `%s`", err->message, what);
  crimage_error_free(err);
}

static snap_labels labels_of(const char *const *kv)
{
  snap_labels l = {0};
  for (size_t i = 0; kv && kv[i]; i += 2)
    snap_labels_set(&l, kv[i], kv[i + 1]);
  return l;
}

static void prepare(fixture *f, const char *key, const char *parent)
{
  crimage_error *err = NULL;
  snap_mounts m = {0};
  expect_ok(snapshotter_prepare(f->s, key, parent, NULL, &m, &err), &err);
  snap_mounts_clear(&m);
}

static void commit(fixture *f, const char *name, const char *key)
{
  crimage_error *err = NULL;
  expect_ok(snapshotter_commit(f->s, name, key, NULL, &err), &err);
}

/* Prepares key on parent, writes file (relative to the snapshot's root) into its fs, commits it as name. */
static void layer(fixture *f, const char *name, const char *parent, const char *file, const char *content)
{
  cleanup_free char *key = xasprintf("extract %s", name);
  prepare(f, key, parent);
  cleanup_free char *fs = NULL;
  {
    const snap_record *r = snap_meta_find(&f->s->meta, key);
    assert_non_null(r);
    fs = snap_fs_path(f->s, r);
  }
  if (file) {
    cleanup_free char *path = xasprintf("%s/%s", fs, file);
    test_put(path, content, 0644);
  }
  commit(f, name, key);
}

static char *fs_of(fixture *f, const char *name)
{
  const snap_record *r = snap_meta_find(&f->s->meta, name);
  assert_non_null(r);
  return snap_fs_path(f->s, r);
}

static uint64_t id_of(fixture *f, const char *name)
{
  const snap_record *r = snap_meta_find(&f->s->meta, name);
  assert_non_null(r);
  return r->id;
}

/* Asserts one mount of type and source with exactly the options given. */
static void assert_mount(const snap_mounts *m, const char *type, const char *source, const char *const *options)
{
  assert_int_equal(m->n, 1);
  assert_string_equal(m->v[0].type, type);
  assert_string_equal(m->v[0].source, source);
  size_t n = 0;
  while (options[n])
    n++;
  assert_int_equal(strv_length(m->v[0].options), n);
  for (size_t i = 0; i < n; i++)
    assert_string_equal(m->v[0].options[i], options[i]);
}

/* ---- mounts ---- */

static void test_mounts_built(void **state)
{
  snap_mounts m;
  char *one[] = {(char *) "/l/1"};
  char *three[] = {(char *) "/l/3", (char *) "/l/2", (char *) "/l/1"};

  snap_mounts_build(SNAP_KIND_ACTIVE, "/s/fs", "/s/work", NULL, 0, true, &m);
  assert_mount(&m, "bind", "/s/fs", (const char *[]){"rw", "rbind", NULL});
  snap_mounts_clear(&m);
  snap_mounts_build(SNAP_KIND_VIEW, "/s/fs", "/s/work", NULL, 0, true, &m);
  assert_mount(&m, "bind", "/s/fs", (const char *[]){"ro", "rbind", NULL});
  snap_mounts_clear(&m);
  snap_mounts_build(SNAP_KIND_VIEW, "/s/fs", "/s/work", one, 1, true, &m);
  assert_mount(&m, "bind", "/l/1", (const char *[]){"ro", "rbind", NULL});
  snap_mounts_clear(&m);
  snap_mounts_build(SNAP_KIND_ACTIVE, "/s/fs", "/s/work", one, 1, true, &m);
  assert_mount(&m, "overlay", "overlay",
               (const char *[]){"index=off", "workdir=/s/work", "upperdir=/s/fs", "lowerdir=/l/1", NULL});
  snap_mounts_clear(&m);
  snap_mounts_build(SNAP_KIND_ACTIVE, "/s/fs", "/s/work", three, 3, false, &m);
  assert_mount(&m, "overlay", "overlay",
               (const char *[]){"workdir=/s/work", "upperdir=/s/fs", "lowerdir=/l/3:/l/2:/l/1", NULL});
  snap_mounts_clear(&m);
  snap_mounts_build(SNAP_KIND_VIEW, "/s/fs", "/s/work", three, 3, true, &m);
  assert_mount(&m, "overlay", "overlay", (const char *[]){"index=off", "lowerdir=/l/3:/l/2:/l/1", NULL});
  snap_mounts_clear(&m);
}

static void test_mounts_of_snapshots(void **state)
{
  fixture *f = *state;
  crimage_error *err = NULL;
  snap_mounts m = {0};

  mode_t old_umask = umask(077); /* as under crimaged's systemd unit: the modes below must not depend on it */
  expect_ok(snapshotter_prepare(f->s, "base", "", NULL, &m, &err), &err);
  umask(old_umask);
  cleanup_free char *base_fs = fs_of(f, "base");
  cleanup_free char *expect_base = xasprintf("%s/snapshots/%" PRIu64 "/fs", f->root, id_of(f, "base"));
  assert_string_equal(base_fs, expect_base);
  assert_mount(&m, "bind", base_fs, (const char *[]){"rw", "rbind", NULL});
  snap_mounts_clear(&m);
  /* A view and an active snapshot have the directories containerd's snapshotter gives them. */
  struct stat st;
  cleanup_free char *work = snap_work_path(f->s, id_of(f, "base"));
  assert_int_equal(stat(base_fs, &st), 0);
  assert_int_equal(st.st_mode & 07777, 0755);
  assert_int_equal(stat(work, &st), 0);
  assert_int_equal(st.st_mode & 07777, 0711);
  commit(f, "l1", "base");
  layer(f, "l2", "l1", "two", "2");
  layer(f, "l3", "l2", "three", "3");
  cleanup_free char *fs1 = fs_of(f, "l1");
  cleanup_free char *fs2 = fs_of(f, "l2");
  cleanup_free char *fs3 = fs_of(f, "l3");

  expect_ok(snapshotter_view(f->s, "v1", "l1", NULL, &m, &err), &err);
  assert_mount(&m, "bind", fs1, (const char *[]){"ro", "rbind", NULL});
  snap_mounts_clear(&m);
  cleanup_free char *v0 = NULL;
  expect_ok(snapshotter_view(f->s, "v0", "", NULL, &m, &err), &err);
  v0 = fs_of(f, "v0");
  assert_mount(&m, "bind", v0, (const char *[]){"ro", "rbind", NULL});
  snap_mounts_clear(&m);
  cleanup_free char *v0work = snap_work_path(f->s, id_of(f, "v0"));
  assert_int_equal(access(v0work, F_OK), -1); /* a view has no work directory */

  cleanup_free char *lower3 = xasprintf("lowerdir=%s:%s:%s", fs3, fs2, fs1);
  expect_ok(snapshotter_view(f->s, "v3", "l3", NULL, &m, &err), &err);
  if (f->index_off)
    assert_mount(&m, "overlay", "overlay", (const char *[]){"index=off", lower3, NULL});
  else
    assert_mount(&m, "overlay", "overlay", (const char *[]){lower3, NULL});
  snap_mounts_clear(&m);

  expect_ok(snapshotter_prepare(f->s, "rw", "l3", NULL, &m, &err), &err);
  cleanup_free char *rw_fs = fs_of(f, "rw");
  cleanup_free char *rw_work = snap_work_path(f->s, id_of(f, "rw"));
  cleanup_free char *upper = xasprintf("upperdir=%s", rw_fs);
  cleanup_free char *workdir = xasprintf("workdir=%s", rw_work);
  if (f->index_off)
    assert_mount(&m, "overlay", "overlay", (const char *[]){"index=off", workdir, upper, lower3, NULL});
  else
    assert_mount(&m, "overlay", "overlay", (const char *[]){workdir, upper, lower3, NULL});
  snap_mounts_clear(&m);
  /* Mounts gives the same again, after a restart too. */
  reopen(f);
  expect_ok(snapshotter_mounts(f->s, "rw", &m, &err), &err);
  assert_string_equal(m.v[0].options[m.v[0].options[0] && streq(m.v[0].options[0], "index=off") ? 3 : 2], lower3);
  snap_mounts_clear(&m);
  expect_error(snapshotter_mounts(f->s, "l3", &m, &err), &err, CRIMAGE_FAILED_PRECONDITION, "l3");
  expect_error(snapshotter_mounts(f->s, "nothere", &m, &err), &err, CRIMAGE_NOT_FOUND, "nothere");
}

static void test_upper_takes_parent_owner(void **state)
{
  fixture *f = *state;
  if (geteuid() != 0)
    skip();
  prepare(f, "k", "");
  cleanup_free char *fs = fs_of(f, "k");
  assert_int_equal(chown(fs, 1234, 5678), 0);
  commit(f, "base", "k");
  prepare(f, "child", "base");
  cleanup_free char *child = fs_of(f, "child");
  struct stat st;
  assert_int_equal(stat(child, &st), 0);
  assert_int_equal(st.st_uid, 1234);
  assert_int_equal(st.st_gid, 5678);
}

/* ---- semantics and errors ---- */

static void test_errors(void **state)
{
  fixture *f = *state;
  crimage_error *err = NULL;
  snap_mounts m = {0};
  layer(f, "base", "", "a", "a");
  prepare(f, "active", "base");
  expect_ok(snapshotter_view(f->s, "view", "base", NULL, &m, &err), &err);
  snap_mounts_clear(&m);

  expect_error(snapshotter_prepare(f->s, "active", "base", NULL, &m, &err), &err, CRIMAGE_ALREADY_EXISTS, "active");
  expect_error(snapshotter_prepare(f->s, "x", "missing", NULL, &m, &err), &err, CRIMAGE_NOT_FOUND, "missing");
  expect_error(snapshotter_prepare(f->s, "x", "active", NULL, &m, &err), &err, CRIMAGE_INVALID_ARGUMENT, "active");
  expect_error(snapshotter_view(f->s, "x", "view", NULL, &m, &err), &err, CRIMAGE_INVALID_ARGUMENT, "view");
  expect_error(snapshotter_prepare(f->s, "", "base", NULL, &m, &err), &err, CRIMAGE_INVALID_ARGUMENT, "key");

  expect_error(snapshotter_commit(f->s, "base", "active", NULL, &err), &err, CRIMAGE_ALREADY_EXISTS, "base");
  expect_error(snapshotter_commit(f->s, "new", "missing", NULL, &err), &err, CRIMAGE_NOT_FOUND, "missing");
  expect_error(snapshotter_commit(f->s, "new", "view", NULL, &err), &err, CRIMAGE_FAILED_PRECONDITION, "view");
  expect_error(snapshotter_commit(f->s, "new", "base", NULL, &err), &err, CRIMAGE_FAILED_PRECONDITION, "base");

  expect_error(snapshotter_remove(f->s, "base", &err), &err, CRIMAGE_FAILED_PRECONDITION, "base");
  expect_error(snapshotter_remove(f->s, "missing", &err), &err, CRIMAGE_NOT_FOUND, "missing");
  snap_info info = {0};
  expect_error(snapshotter_stat(f->s, "missing", &info, &err), &err, CRIMAGE_NOT_FOUND, "missing");
  int64_t size, inodes;
  expect_error(snapshotter_usage(f->s, "missing", &size, &inodes, &err), &err, CRIMAGE_NOT_FOUND, "missing");

  /* Removing the children frees the parent; a removed active snapshot's directory goes with it. */
  cleanup_free char *active_dir = snap_dir(f->s, id_of(f, "active"));
  expect_ok(snapshotter_remove(f->s, "active", &err), &err);
  assert_int_equal(access(active_dir, F_OK), -1);
  expect_ok(snapshotter_remove(f->s, "view", &err), &err);
  expect_ok(snapshotter_remove(f->s, "base", &err), &err);
  snap_info *list = NULL;
  size_t n = 7;
  expect_ok(snapshotter_list(f->s, NULL, 0, &list, &n, &err), &err);
  assert_int_equal(n, 0);
  snap_info_list_free(list, n);
}

static void test_bounds(void **state)
{
  fixture *f = *state;
  crimage_error *err = NULL;
  snap_mounts m = {0};
  char *long_key = xmalloc(SNAP_MAX_KEY + 2);
  memset(long_key, 'k', SNAP_MAX_KEY + 1);
  long_key[SNAP_MAX_KEY + 1] = '\0';
  expect_error(snapshotter_prepare(f->s, long_key, "", NULL, &m, &err), &err, CRIMAGE_INVALID_ARGUMENT, "key");
  long_key[SNAP_MAX_KEY] = '\0';
  expect_ok(snapshotter_prepare(f->s, long_key, "", NULL, &m, &err), &err); /* the maximum itself is fine */
  snap_mounts_clear(&m);
  free(long_key);
  expect_error(snapshotter_prepare(f->s, "bad\xc3(", "", NULL, &m, &err), &err, CRIMAGE_INVALID_ARGUMENT, "UTF-8");

  /* containerd's label rule: key and value together at most 4096 bytes. */
  char *value = xmalloc(SNAP_MAX_LABEL);
  memset(value, 'v', SNAP_MAX_LABEL - 1);
  value[SNAP_MAX_LABEL - 1] = '\0';
  snap_labels l = labels_of((const char *[]){"kk", value, NULL});
  expect_error(snapshotter_prepare(f->s, "big", "", &l, &m, &err), &err, CRIMAGE_INVALID_ARGUMENT, "maximum size");
  snap_labels_clear(&l);
  value[SNAP_MAX_LABEL - 2] = '\0';
  l = labels_of((const char *[]){"kk", value, NULL});
  expect_ok(snapshotter_prepare(f->s, "big", "", &l, &m, &err), &err);
  snap_mounts_clear(&m);
  snap_labels_clear(&l);
  free(value);

  for (int i = 0; i <= SNAP_MAX_LABELS; i++) {
    char k[16];
    snprintf(k, sizeof(k), "l%d", i);
    snap_labels_set(&l, k, "v");
  }
  expect_error(snapshotter_prepare(f->s, "many", "", &l, &m, &err), &err, CRIMAGE_INVALID_ARGUMENT, "labels");
  snap_labels_clear(&l);
  assert_null(snap_meta_find(&f->s->meta, "many"));
}

static void test_labels_and_update(void **state)
{
  fixture *f = *state;
  crimage_error *err = NULL;
  snap_mounts m = {0};
  snap_labels l = labels_of((const char *[]){"a", "1", "b", "2", "empty", "", NULL});
  expect_ok(snapshotter_prepare(f->s, "k", "", &l, &m, &err), &err);
  snap_mounts_clear(&m);
  snap_labels_clear(&l);
  snap_info info = {0};
  expect_ok(snapshotter_stat(f->s, "k", &info, &err), &err);
  assert_string_equal(info.name, "k");
  assert_string_equal(info.parent, "");
  assert_int_equal(info.kind, SNAP_KIND_ACTIVE);
  assert_int_equal(info.labels.n, 2); /* an empty value is no label */
  assert_true(info.created_ns > 0 && info.created_ns == info.updated_ns);
  int64_t created = info.created_ns;
  snap_info_clear(&info);

  /* labels.<key>: one label set, or removed when info has none. */
  snap_info in = {.name = (char *) "k", .labels = labels_of((const char *[]){"a", "10", "c", "3", NULL})};
  char *paths1[] = {(char *) "labels.a", (char *) "labels.b"};
  snap_info out = {0};
  expect_ok(snapshotter_update(f->s, &in, paths1, 2, &out, &err), &err);
  assert_string_equal(snap_labels_get(&out.labels, "a"), "10");
  assert_null(snap_labels_get(&out.labels, "b"));
  assert_null(snap_labels_get(&out.labels, "c")); /* not in the mask */
  assert_int_equal(out.created_ns, created);
  assert_true(out.updated_ns >= created);
  snap_info_clear(&out);
  /* "labels", or no mask: all of them replaced. */
  char *paths2[] = {(char *) "labels"};
  expect_ok(snapshotter_update(f->s, &in, paths2, 1, &out, &err), &err);
  assert_int_equal(out.labels.n, 2);
  assert_string_equal(snap_labels_get(&out.labels, "c"), "3");
  snap_info_clear(&out);
  snap_labels_clear(&in.labels);
  expect_ok(snapshotter_update(f->s, &in, NULL, 0, &out, &err), &err);
  assert_int_equal(out.labels.n, 0);
  snap_info_clear(&out);
  /* Anything else is refused, and changes nothing. */
  char *paths3[] = {(char *) "labels.x", (char *) "parent"};
  expect_error(snapshotter_update(f->s, &in, paths3, 2, &out, &err), &err, CRIMAGE_INVALID_ARGUMENT, "parent");
  in.name = (char *) "missing";
  expect_error(snapshotter_update(f->s, &in, NULL, 0, &out, &err), &err, CRIMAGE_NOT_FOUND, "missing");
  in.name = (char *) "";
  expect_error(snapshotter_update(f->s, &in, NULL, 0, &out, &err), &err, CRIMAGE_INVALID_ARGUMENT, NULL);

  /* Commit replaces the labels, as containerd's storage does. */
  l = labels_of((const char *[]){"committed", "yes", NULL});
  expect_ok(snapshotter_commit(f->s, "c", "k", &l, &err), &err);
  snap_labels_clear(&l);
  expect_ok(snapshotter_stat(f->s, "c", &info, &err), &err);
  assert_int_equal(info.kind, SNAP_KIND_COMMITTED);
  assert_int_equal(info.labels.n, 1);
  assert_string_equal(snap_labels_get(&info.labels, "committed"), "yes");
  snap_info_clear(&info);
  expect_error(snapshotter_stat(f->s, "k", &info, &err), &err, CRIMAGE_NOT_FOUND, "k");
}

static void test_list_filters(void **state)
{
  fixture *f = *state;
  crimage_error *err = NULL;
  snap_mounts m = {0};
  layer(f, "sha256:base", "", NULL, NULL);
  snap_labels l = labels_of((const char *[]){"containerd.io/snapshot.ref", "sha256:top", "team", "a", NULL});
  prepare(f, "k8s.io/2/extract sha256:top", "sha256:base");
  expect_ok(snapshotter_commit(f->s, "k8s.io/3/sha256:top", "k8s.io/2/extract sha256:top", &l, &err), &err);
  snap_labels_clear(&l);
  expect_ok(snapshotter_view(f->s, "view", "k8s.io/3/sha256:top", NULL, &m, &err), &err);
  snap_mounts_clear(&m);
  prepare(f, "container", "k8s.io/3/sha256:top");

  struct {
    const char *filters[3];
    const char *expect; /* names, in name order, joined by '|' */
  } cases[] = {
      {{NULL}, "container|k8s.io/3/sha256:top|sha256:base|view"},
      {{"kind==committed"}, "k8s.io/3/sha256:top|sha256:base"},
      {{"kind==active", "kind==view"}, "container|view"},
      {{"parent==\"\""}, "sha256:base"},
      {{"parent==k8s.io/3/sha256:top,kind!=view"}, "container"},
      {{"labels.\"containerd.io/snapshot.ref\"==sha256:top,parent==\"sha256:base\""}, "k8s.io/3/sha256:top"},
      {{"labels.team"}, "k8s.io/3/sha256:top"},
      {{"labels.team!=a"}, "container|sha256:base|view"},
      {{"name~=^k8s"}, "k8s.io/3/sha256:top"},
      {{"name==view"}, "view"},
  };
  for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
    size_t nf = 0;
    while (nf < 3 && cases[i].filters[nf])
      nf++;
    snap_info *list = NULL;
    size_t n = 0;
    expect_ok(snapshotter_list(f->s, (char **) cases[i].filters, nf, &list, &n, &err), &err);
    char got[512] = "";
    for (size_t j = 0; j < n; j++) {
      if (j > 0)
        strcat(got, "|");
      strcat(got, list[j].name);
    }
    if (!streq(got, cases[i].expect))
      fail_msg("filters `%s`: got `%s`, want `%s`", nf ? cases[i].filters[0] : "", got, cases[i].expect);
    snap_info_list_free(list, n);
  }
  snap_info *list = NULL;
  size_t n = 0;
  char *bad[] = {(char *) "kind=committed"};
  expect_error(snapshotter_list(f->s, bad, 1, &list, &n, &err), &err, CRIMAGE_INVALID_ARGUMENT, "kind=committed");
}

/* Writes size bytes into path. */
static void put_bytes(const char *path, size_t size)
{
  cleanup_close int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
  assert_true(fd >= 0);
  cleanup_free char *buf = xcalloc(1, size);
  memset(buf, 'x', size);
  assert_int_equal(write_all(fd, buf, size), 0);
}

static void test_usage(void **state)
{
  fixture *f = *state;
  crimage_error *err = NULL;
  prepare(f, "k", "");
  cleanup_free char *fs = fs_of(f, "k");
  cleanup_free char *file = xasprintf("%s/data", fs);
  cleanup_free char *link_path = xasprintf("%s/link", fs);
  cleanup_free char *sub = xasprintf("%s/sub", fs);
  put_bytes(file, 64 * 1024);
  assert_int_equal(link(file, link_path), 0);
  assert_int_equal(mkdir(sub, 0755), 0);
  struct stat st_fs, st_file, st_sub;
  assert_int_equal(stat(fs, &st_fs), 0);
  assert_int_equal(stat(file, &st_file), 0);
  assert_int_equal(stat(sub, &st_sub), 0);
  int64_t want = (st_fs.st_blocks + st_file.st_blocks + st_sub.st_blocks) * 512;

  int64_t size = 0, inodes = 0;
  expect_ok(snapshotter_usage(f->s, "k", &size, &inodes, &err), &err);
  assert_int_equal(inodes, 3); /* fs, the file once for both its names, sub */
  assert_int_equal(size, want);
  /* Committed: what was measured at commit, also after a restart. */
  commit(f, "c", "k");
  put_bytes(file, 4096 * 1024);
  reopen(f);
  expect_ok(snapshotter_usage(f->s, "c", &size, &inodes, &err), &err);
  assert_int_equal(inodes, 3);
  assert_int_equal(size, want);
  /* A view has nothing of its own. */
  snap_mounts m = {0};
  expect_ok(snapshotter_view(f->s, "v", "c", NULL, &m, &err), &err);
  snap_mounts_clear(&m);
  expect_ok(snapshotter_usage(f->s, "v", &size, &inodes, &err), &err);
  assert_int_equal(size, 0);
  assert_int_equal(inodes, 0);
}

/* ---- metadata ---- */

static void test_metadata_survives(void **state)
{
  fixture *f = *state;
  crimage_error *err = NULL;
  snap_labels l = labels_of((const char *[]){"k", "v", NULL});
  layer(f, "base", "", "a", "a");
  snap_mounts m = {0};
  expect_ok(snapshotter_prepare(f->s, "name with spaces/and \xc3\xa9", "base", &l, &m, &err), &err);
  snap_mounts_clear(&m);
  snap_labels_clear(&l);
  snap_info before = {0}, after = {0};
  expect_ok(snapshotter_stat(f->s, "name with spaces/and \xc3\xa9", &before, &err), &err);
  uint64_t next = f->s->meta.next_id;

  reopen(f);
  expect_ok(snapshotter_stat(f->s, "name with spaces/and \xc3\xa9", &after, &err), &err);
  assert_string_equal(after.parent, "base");
  assert_int_equal(after.kind, SNAP_KIND_ACTIVE);
  assert_int_equal(after.created_ns, before.created_ns);
  assert_int_equal(after.updated_ns, before.updated_ns);
  assert_string_equal(snap_labels_get(&after.labels, "k"), "v");
  assert_int_equal(f->s->meta.next_id, next);
  snap_info_clear(&before);
  snap_info_clear(&after);

  /* The file is JSON any tool can read. */
  cleanup_free char *path = xasprintf("%s/metadata.json", f->root);
  cleanup_free char *data = NULL;
  size_t len = 0;
  expect_ok(read_file(path, SNAP_MAX_METADATA, &data, &len, &err), &err);
  cleanup_json json_object *o = NULL;
  expect_ok(json_parse(data, len, path, JSON_LIMITS((size_t) 512 << 20, 100000), &o, &err), &err);
  assert_int_equal(json_object_array_length(json_get_array(o, "snapshots")), 2);
  struct stat st;
  assert_int_equal(stat(path, &st), 0);
  assert_int_equal(st.st_mode & 0777, 0600);
}

/* What a crash leaves: a temporary metadata file, a snapshot directory whose record was never written, a
 * half-made one. The next start ignores them, never reuses their ids, and Cleanup removes them. */
static void test_crash_leftovers(void **state)
{
  fixture *f = *state;
  crimage_error *err = NULL;
  layer(f, "base", "", "a", "a");
  uint64_t used = f->s->meta.next_id;
  snapshotter_free(f->s);
  f->s = NULL;

  cleanup_free char *tmp = xasprintf("%s/metadata.json.tmp.abc123", f->root);
  test_put(tmp, "{half", 0600);
  cleanup_free char *orphan = xasprintf("%s/snapshots/%" PRIu64, f->root, used + 5);
  cleanup_free char *orphan_fs = xasprintf("%s/fs", orphan);
  cleanup_free char *half = xasprintf("%s/snapshots/new-XYZ", f->root);
  cleanup_free char *junk = xasprintf("%s/snapshots/0007", f->root);
  cleanup_free char *huge = xasprintf("%s/snapshots/9007199254740993", f->root); /* past the id range */
  assert_int_equal(mkdir(huge, 0700), 0);
  assert_int_equal(mkdir(orphan, 0700), 0);
  assert_int_equal(mkdir(orphan_fs, 0755), 0);
  assert_int_equal(mkdir(half, 0700), 0);
  assert_int_equal(mkdir(junk, 0700), 0);

  f->s = open_root(f->root);
  assert_int_equal(access(tmp, F_OK), -1);
  assert_true(f->s->meta.next_id > used + 5 && f->s->meta.next_id < used + 10);
  prepare(f, "new", "base");
  assert_true(id_of(f, "new") > used + 5);

  cleanup_free char *base_dir = snap_dir(f->s, id_of(f, "base"));
  cleanup_free char *new_dir = snap_dir(f->s, id_of(f, "new"));
  expect_ok(snapshotter_cleanup(f->s, &err), &err);
  assert_int_equal(access(orphan, F_OK), -1);
  assert_int_equal(access(half, F_OK), -1);
  assert_int_equal(access(junk, F_OK), -1);
  assert_int_equal(access(huge, F_OK), -1);
  assert_int_equal(access(base_dir, F_OK), 0);
  assert_int_equal(access(new_dir, F_OK), 0);
}

/* A failed metadata write changes nothing: not the records, not the directories. */
static void test_failed_write_changes_nothing(void **state)
{
  fixture *f = *state;
  crimage_error *err = NULL;
  layer(f, "base", "", "a", "a");
  prepare(f, "k", "base");
  cleanup_free char *path = xasprintf("%s/metadata.json", f->root);
  cleanup_free char *saved = xasprintf("%s/saved.json", f->dir);
  assert_int_equal(rename(path, saved), 0);
  assert_int_equal(mkdir(path, 0700), 0); /* a directory: renaming a file over it fails */

  snap_mounts m = {0};
  size_t n_before = f->s->meta.n;
  expect_error(snapshotter_prepare(f->s, "x", "base", NULL, &m, &err), &err, CRIMAGE_INTERNAL, "metadata.json");
  expect_error(snapshotter_commit(f->s, "c", "k", NULL, &err), &err, CRIMAGE_INTERNAL, "metadata.json");
  expect_error(snapshotter_remove(f->s, "k", &err), &err, CRIMAGE_INTERNAL, "metadata.json");
  snap_info in = {.name = (char *) "k"}, out = {0};
  expect_error(snapshotter_update(f->s, &in, NULL, 0, &out, &err), &err, CRIMAGE_INTERNAL, "metadata.json");
  assert_int_equal(f->s->meta.n, n_before);
  assert_null(snap_meta_find(&f->s->meta, "x"));
  assert_null(snap_meta_find(&f->s->meta, "c"));
  assert_int_equal(snap_meta_find(&f->s->meta, "k")->kind, SNAP_KIND_ACTIVE);
  cleanup_free char *k_dir = snap_dir(f->s, id_of(f, "k"));
  assert_int_equal(access(k_dir, F_OK), 0);
  /* The directory made for "x" was removed again: only base's and k's are there. */
  cleanup_free char *snapdir = xasprintf("%s/snapshots", f->root);
  size_t entries = 0;
  DIR *d = opendir(snapdir);
  struct dirent *de;
  while ((de = readdir(d)))
    entries += de->d_name[0] != '.';
  closedir(d);
  assert_int_equal(entries, 2);

  assert_int_equal(rmdir(path), 0);
  assert_int_equal(rename(saved, path), 0);
  commit(f, "c", "k");
  reopen(f);
  assert_int_equal(snap_meta_find(&f->s->meta, "c")->kind, SNAP_KIND_COMMITTED);
}

/* Writes text as the metadata of a fresh root and expects opening to fail with DATA_LOSS naming what. */
static void assert_refused_metadata(fixture *f, const char *text, const char *what)
{
  snapshotter_free(f->s);
  f->s = NULL;
  cleanup_free char *path = xasprintf("%s/metadata.json", f->root);
  test_put(path, text, 0600);
  snapshotter_options o = {.root = f->root};
  snapshotter *s = NULL;
  crimage_error *err = NULL;
  int r = snapshotter_open(&o, &s, &err);
  assert_null(s);
  expect_error(r, &err, CRIMAGE_DATA_LOSS, what);
}

#define SNAP(id, name, kind, parent)                                                                                   \
  "{\"id\":" #id ",\"name\":\"" name "\",\"kind\":\"" kind "\",\"parent\":\"" parent "\",\"created\":1,\"updated\":1}"

static void test_corrupt_metadata_refused(void **state)
{
  fixture *f = *state;
  assert_refused_metadata(f, "{\"version\":1,\"nextId\":", "metadata.json");
  assert_refused_metadata(f, "[]", "not snapshot metadata");
  assert_refused_metadata(f, "{\"version\":2,\"nextId\":1,\"snapshots\":[]}", "version 2");
  assert_refused_metadata(f, "{\"version\":1,\"nextId\":9,\"snapshots\":[" SNAP(1, "a", "committed", "") ","
                             SNAP(2, "a", "committed", "") "]}", "`a` is there twice");
  assert_refused_metadata(f, "{\"version\":1,\"nextId\":9,\"snapshots\":[" SNAP(1, "a", "committed", "") ","
                             SNAP(1, "b", "committed", "") "]}", "the id 1");
  assert_refused_metadata(f, "{\"version\":1,\"nextId\":9,\"snapshots\":[" SNAP(1, "a", "active", "gone") "]}",
                          "`gone` of snapshot `a` is missing");
  assert_refused_metadata(f, "{\"version\":1,\"nextId\":9,\"snapshots\":[" SNAP(1, "a", "active", "") ","
                             SNAP(2, "b", "active", "a") "]}", "not committed");
  assert_refused_metadata(f, "{\"version\":1,\"nextId\":9,\"snapshots\":[" SNAP(1, "a", "committed", "b") ","
                             SNAP(2, "b", "committed", "a") "]}", "loop");
  assert_refused_metadata(f, "{\"version\":1,\"nextId\":9,\"snapshots\":[" SNAP(1, "a", "frozen", "") "]}", "kind");
  assert_refused_metadata(f, "{\"version\":1,\"nextId\":2,\"snapshots\":[" SNAP(5, "a", "committed", "") "]}",
                          "past nextId");
  assert_refused_metadata(f, "{\"version\":1,\"nextId\":9,\"snapshots\":[{\"id\":1,\"name\":\"a\",\"kind\":"
                             "\"committed\",\"created\":1,\"updated\":1,\"labels\":{\"x\":1}}]}", "not a string");

  /* Bounded: a file past SNAP_MAX_METADATA is not read at all. */
  snapshotter_free(f->s);
  f->s = NULL;
  cleanup_free char *path = xasprintf("%s/metadata.json", f->root);
  {
    cleanup_close int fd = open(path, O_WRONLY | O_TRUNC);
    assert_true(fd >= 0);
    assert_int_equal(ftruncate(fd, SNAP_MAX_METADATA + 1), 0);
  }
  snapshotter_options o = {.root = f->root};
  crimage_error *err = NULL;
  snapshotter *s = NULL;
  expect_error(snapshotter_open(&o, &s, &err), &err, CRIMAGE_DATA_LOSS, "larger than");
  /* And a good file loads. */
  test_put(path, "{\"version\":1,\"nextId\":9,\"snapshots\":[" SNAP(2, "b", "committed", "a") ","
                 SNAP(1, "a", "committed", "") "]}", 0600);
  f->s = open_root(f->root);
  assert_int_equal(f->s->meta.n, 2);
  assert_string_equal(f->s->meta.v[0]->name, "a"); /* kept in name order */
}

static void test_root_refused(void **state)
{
  fixture *f = *state;
  const char *bad[] = {"relative/root", "", "/tmp/with:colon", "/tmp/with,comma"};
  for (size_t i = 0; i < ARRAY_SIZE(bad); i++) {
    snapshotter_options o = {.root = bad[i]};
    snapshotter *s = NULL;
    crimage_error *err = NULL;
    expect_error(snapshotter_open(&o, &s, &err), &err, CRIMAGE_INVALID_ARGUMENT, NULL);
    assert_null(s);
  }
  (void) f;
}

/* ---- registered layers and the remote-snapshot protocol ---- */

static char *make_layer_dir(fixture *f, const char *name, const char *file)
{
  char *d = xasprintf("%s/layers/%s", f->dir, name);
  crimage_error *err = NULL;
  expect_ok(mkdir_p(d, 0755, &err), &err);
  cleanup_free char *path = xasprintf("%s/%s", d, file);
  test_put(path, file, 0644);
  return d;
}

static void test_registered_layers(void **state)
{
  fixture *f = *state;
  crimage_error *err = NULL;
  snap_mounts m = {0};
  cleanup_free char *d1 = make_layer_dir(f, "one", "bin");
  cleanup_free char *d2 = make_layer_dir(f, "two", "etc");
  expect_ok(snapshotter_add_layer(f->s, "sha256:c1", "", d1, &err), &err);
  cleanup_free char *d2slash = xasprintf("%s/", d2);
  expect_ok(snapshotter_add_layer(f->s, "sha256:c2", "sha256:c1", d2slash, &err), &err);
  assert_true(snapshotter_layer_in_use(f->s, d1));
  assert_true(snapshotter_layer_in_use(f->s, d2));
  assert_false(snapshotter_layer_in_use(f->s, f->dir));

  snap_info info = {0};
  expect_ok(snapshotter_stat(f->s, "sha256:c2", &info, &err), &err);
  assert_int_equal(info.kind, SNAP_KIND_COMMITTED);
  assert_string_equal(info.parent, "sha256:c1");
  assert_string_equal(snap_labels_get(&info.labels, SNAP_LABEL_REF), "sha256:c2");
  snap_info_clear(&info);
  int64_t size = 0, inodes = 0;
  expect_ok(snapshotter_usage(f->s, "sha256:c2", &size, &inodes, &err), &err);
  assert_int_equal(inodes, 2);
  assert_true(size > 0);

  /* The same again is fine (a restart registers what it has); another directory or parent is not. */
  expect_ok(snapshotter_add_layer(f->s, "sha256:c2", "sha256:c1", d2, &err), &err);
  expect_error(snapshotter_add_layer(f->s, "sha256:c2", "sha256:c1", d1, &err), &err, CRIMAGE_ALREADY_EXISTS,
               "sha256:c2");
  expect_error(snapshotter_add_layer(f->s, "sha256:c2", "", d2, &err), &err, CRIMAGE_ALREADY_EXISTS, "sha256:c2");
  expect_error(snapshotter_add_layer(f->s, "sha256:c3", "sha256:nope", d2, &err), &err, CRIMAGE_NOT_FOUND,
               "sha256:nope");
  cleanup_free char *missing = xasprintf("%s/missing", f->dir);
  expect_error(snapshotter_add_layer(f->s, "sha256:c3", "", missing, &err), &err, CRIMAGE_NOT_FOUND, "missing");
  expect_error(snapshotter_add_layer(f->s, "sha256:c3", "", "relative", &err), &err, CRIMAGE_INVALID_ARGUMENT, NULL);
  expect_error(snapshotter_add_layer(f->s, "sha256:c3", "", "/tmp/a:b", &err), &err, CRIMAGE_INVALID_ARGUMENT, NULL);
  cleanup_free char *inside = xasprintf("%s/snapshots", f->root);
  expect_error(snapshotter_add_layer(f->s, "sha256:c3", "", inside, &err), &err, CRIMAGE_INVALID_ARGUMENT, "inside");

  /* Remote-snapshot Prepare: known chain on the same parent: ALREADY_EXISTS, nothing created. */
  size_t n = f->s->meta.n;
  snap_labels ref = labels_of((const char *[]){SNAP_LABEL_REF, "sha256:c2", NULL});
  expect_error(snapshotter_prepare(f->s, "k8s.io/1/extract-1 sha256:c2", "sha256:c1", &ref, &m, &err), &err,
               CRIMAGE_ALREADY_EXISTS, "sha256:c2");
  assert_int_equal(f->s->meta.n, n);
  /* What containerd then lists finds it. */
  char *filter[] = {(char *) "labels.\"containerd.io/snapshot.ref\"==sha256:c2,parent==\"sha256:c1\""};
  snap_info *list = NULL;
  size_t n_list = 0;
  expect_ok(snapshotter_list(f->s, filter, 1, &list, &n_list, &err), &err);
  assert_int_equal(n_list, 1);
  assert_string_equal(list[0].name, "sha256:c2");
  snap_info_list_free(list, n_list);
  /* On another parent, or for a View, it is an ordinary snapshot. */
  expect_ok(snapshotter_prepare(f->s, "k8s.io/1/extract-2 sha256:c2", "", &ref, &m, &err), &err);
  snap_mounts_clear(&m);
  expect_ok(snapshotter_view(f->s, "view of c1", "sha256:c1", &ref, &m, &err), &err);
  /* A registered layer is named in mounts by a short link to it (<root>/l/<id>), so options of many layers fit. */
  cleanup_free char *alias1 = xasprintf("%s/l/%" PRIu64, f->root, id_of(f, "sha256:c1"));
  assert_mount(&m, "bind", alias1, (const char *[]){"ro", "rbind", NULL});
  char target[PATH_MAX];
  ssize_t tn = readlink(alias1, target, sizeof(target) - 1);
  assert_true(tn > 0);
  target[tn] = '\0';
  assert_string_equal(target, d1);
  snap_mounts_clear(&m);
  snap_labels_clear(&ref);
  /* An unknown chain: a normal Prepare. */
  ref = labels_of((const char *[]){SNAP_LABEL_REF, "sha256:unknown", NULL});
  expect_ok(snapshotter_prepare(f->s, "k8s.io/1/extract-3 sha256:unknown", "sha256:c2", &ref, &m, &err), &err);
  snap_labels_clear(&ref);
  cleanup_free char *upper = fs_of(f, "k8s.io/1/extract-3 sha256:unknown");
  cleanup_free char *lower = xasprintf("lowerdir=%s/l/%" PRIu64 ":%s", f->root, id_of(f, "sha256:c2"), alias1);
  assert_string_equal(m.v[0].type, "overlay");
  assert_string_equal(m.v[0].options[strv_length(m.v[0].options) - 1], lower);
  snap_mounts_clear(&m);

  /* A layer committed by containerd (its own name, the ref label) is a known chain too, and a parent for
   * registration by chain ID. */
  snap_labels l = labels_of((const char *[]){SNAP_LABEL_REF, "sha256:c4", NULL});
  expect_ok(snapshotter_commit(f->s, "k8s.io/9/sha256:c4", "k8s.io/1/extract-3 sha256:unknown", &l, &err), &err);
  expect_error(snapshotter_prepare(f->s, "k8s.io/1/extract-4 sha256:c4", "sha256:c2", &l, &m, &err), &err,
               CRIMAGE_ALREADY_EXISTS, "sha256:c4");
  snap_labels_clear(&l);
  cleanup_free char *d5 = make_layer_dir(f, "five", "usr");
  expect_ok(snapshotter_add_layer(f->s, "sha256:c5", "sha256:c4", d5, &err), &err);
  expect_ok(snapshotter_stat(f->s, "sha256:c5", &info, &err), &err);
  assert_string_equal(info.parent, "k8s.io/9/sha256:c4");
  snap_info_clear(&info);

  /* Registered layers survive a restart; removing one forgets it and leaves its directory. */
  reopen(f);
  assert_true(snapshotter_layer_in_use(f->s, d5));
  expect_error(snapshotter_remove(f->s, "sha256:c1", &err), &err, CRIMAGE_FAILED_PRECONDITION, "sha256:c1");
  expect_ok(snapshotter_remove(f->s, "sha256:c5", &err), &err);
  assert_false(snapshotter_layer_in_use(f->s, d5));
  cleanup_free char *d5file = xasprintf("%s/usr", d5);
  assert_int_equal(access(d5file, F_OK), 0);
  /* Cleanup never touches a layer directory either. */
  expect_ok(snapshotter_cleanup(f->s, &err), &err);
  cleanup_free char *d1file = xasprintf("%s/bin", d1);
  assert_int_equal(access(d1file, F_OK), 0);
}

/* ---- concurrency ---- */

typedef struct worker {
  fixture *f;
  int n;
  int failures;
} worker;

static void *worker_run(void *arg)
{
  worker *w = arg;
  for (int i = 0; i < 20; i++) {
    crimage_error *err = NULL;
    char key[64], name[64], view[64];
    snprintf(key, sizeof(key), "w%d-k%d", w->n, i);
    snprintf(name, sizeof(name), "w%d-c%d", w->n, i);
    snprintf(view, sizeof(view), "w%d-v%d", w->n, i);
    snap_mounts m = {0};
    int r = snapshotter_prepare(w->f->s, key, "base", NULL, &m, &err);
    snap_mounts_clear(&m);
    if (r == 0)
      r = snapshotter_commit(w->f->s, name, key, NULL, &err);
    if (r == 0)
      r = snapshotter_view(w->f->s, view, name, NULL, &m, &err);
    snap_mounts_clear(&m);
    if (r == 0 && i % 2 == 0) {
      r = snapshotter_remove(w->f->s, view, &err);
      if (r == 0)
        r = snapshotter_remove(w->f->s, name, &err);
    }
    snap_info *list = NULL;
    size_t n = 0;
    if (r == 0)
      r = snapshotter_list(w->f->s, NULL, 0, &list, &n, &err);
    snap_info_list_free(list, n);
    if (r < 0) {
      w->failures++;
      crimage_error_free(err);
    }
  }
  return NULL;
}

static void test_concurrent(void **state)
{
  fixture *f = *state;
  layer(f, "base", "", "a", "a");
  worker w[4];
  pthread_t t[4];
  for (int i = 0; i < 4; i++) {
    w[i] = (worker){.f = f, .n = i};
    assert_int_equal(pthread_create(&t[i], NULL, worker_run, &w[i]), 0);
  }
  crimage_error *err = NULL;
  for (int i = 0; i < 10; i++)
    expect_ok(snapshotter_cleanup(f->s, &err), &err);
  for (int i = 0; i < 4; i++) {
    pthread_join(t[i], NULL);
    assert_int_equal(w[i].failures, 0);
  }
  /* 1 base + per worker 10 kept commits and their views. */
  assert_int_equal(f->s->meta.n, 1 + 4 * 20);
  reopen(f);
  assert_int_equal(f->s->meta.n, 1 + 4 * 20);
  /* Cleanup running alongside removed nothing that is in use. */
  for (size_t i = 0; i < f->s->meta.n; i++) {
    cleanup_free char *d = snap_dir(f->s, f->s->meta.v[i]->id);
    assert_int_equal(access(d, F_OK), 0);
  }
}

int main(void)
{
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_mounts_built),
      cmocka_unit_test_setup_teardown(test_mounts_of_snapshots, setup, teardown),
      cmocka_unit_test_setup_teardown(test_upper_takes_parent_owner, setup, teardown),
      cmocka_unit_test_setup_teardown(test_errors, setup, teardown),
      cmocka_unit_test_setup_teardown(test_bounds, setup, teardown),
      cmocka_unit_test_setup_teardown(test_labels_and_update, setup, teardown),
      cmocka_unit_test_setup_teardown(test_list_filters, setup, teardown),
      cmocka_unit_test_setup_teardown(test_usage, setup, teardown),
      cmocka_unit_test_setup_teardown(test_metadata_survives, setup, teardown),
      cmocka_unit_test_setup_teardown(test_crash_leftovers, setup, teardown),
      cmocka_unit_test_setup_teardown(test_failed_write_changes_nothing, setup, teardown),
      cmocka_unit_test_setup_teardown(test_corrupt_metadata_refused, setup, teardown),
      cmocka_unit_test_setup_teardown(test_root_refused, setup, teardown),
      cmocka_unit_test_setup_teardown(test_registered_layers, setup, teardown),
      cmocka_unit_test_setup_teardown(test_concurrent, setup, teardown),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
