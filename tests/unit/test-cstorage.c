/* The containers-storage tree: containers/storage's conventions (layer IDs as containers/image computes them,
 * big-data file names, short links, Go time strings, the last-writer marker) and the writer's sync against a real
 * store: what a sync writes, that a second one writes nothing, that removed images and their layers go, that shared
 * layers stay, and that what a crash left is cleaned up. podman reading such a tree is in the integration tests. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/digest.h"
#include "common/fsutil.h"
#include "common/json.h"
#include "common/util.h"
#include "cri/containers_storage/cstorage.h"
#include "cri/containers_storage/format.h"

static void test_layer_ids(void **state)
{
  (void) state;
  char id[CS_ID_LEN + 1];
  const char *d1 = "sha256:808951df4cbbc53a8b7275ae76f01e58702e728b332dfe81cde6ca1789160598";
  cs_layer_id("", d1, id);
  assert_string_equal(id, "808951df4cbbc53a8b7275ae76f01e58702e728b332dfe81cde6ca1789160598");
  /* sha256("<parent>+<diff_id hex>"): the IDs podman gave the same layers when it pulled them itself. */
  char id2[CS_ID_LEN + 1];
  cs_layer_id(id, "sha256:3b4b2a5c6e6a0ce1f0e5cb78f0da6f8dd2f7a7bc2ae4d13ee6e60bbdb1cae8c1", id2);
  char expect[DIGEST_MAX_LEN + 1];
  const char *s = "808951df4cbbc53a8b7275ae76f01e58702e728b332dfe81cde6ca1789160598+"
                  "3b4b2a5c6e6a0ce1f0e5cb78f0da6f8dd2f7a7bc2ae4d13ee6e60bbdb1cae8c1";
  digest_sha256(s, strlen(s), expect);
  assert_string_equal(id2, digest_hex(expect));
}

static void test_big_data_names(void **state)
{
  (void) state;
  char *f = cs_big_data_file("manifest");
  assert_string_equal(f, "manifest");
  free(f);
  /* ':' and '-' are not in [0-9a-z.]: base64 of the key behind '='. */
  f = cs_big_data_file("sha256:ab");
  assert_string_equal(f, "=c2hhMjU2OmFi");
  free(f);
  f = cs_big_data_file("manifest-sha256:940733cbf1e0e41f89e63778203dc30041bb4d8f86a0d133879584cedb6db477");
  assert_string_equal(f, "=bWFuaWZlc3Qtc2hhMjU2Ojk0MDczM2NiZjFlMGU0MWY4OWU2Mzc3ODIwM2RjMzAwNDFiYjRkOGY4NmEwZDEz"
                         "Mzg3OTU4NGNlZGI2ZGI0Nzc=");
  free(f);
}

static void test_links_and_times(void **state)
{
  (void) state;
  char a[CS_LINK_LEN + 1], b[CS_LINK_LEN + 1];
  assert_int_equal(cs_new_link(a, NULL), 0);
  assert_int_equal(cs_new_link(b, NULL), 0);
  assert_int_equal(strlen(a), CS_LINK_LEN);
  assert_int_equal(strspn(a, "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"), CS_LINK_LEN);
  assert_string_not_equal(a, b);
  char *t = cs_time_string(1700000000LL * 1000000000);
  assert_string_equal(t, "2023-11-14T22:13:20Z");
  free(t);
  t = cs_time_string(1700000000LL * 1000000000 + 120000000);
  assert_string_equal(t, "2023-11-14T22:13:20.12Z");
  assert_true(cs_time_valid(t));
  free(t);
  assert_true(cs_time_valid("2023-11-14T22:13:20+01:00"));
  assert_true(cs_time_valid("2023-11-14T22:13:20.123456789Z"));
  assert_false(cs_time_valid("2023-11-14T22:13:20.1234567891Z"));
  assert_false(cs_time_valid("2023-11-14 22:13:20Z"));
  assert_false(cs_time_valid("2023-11-14T22:13:20"));
  assert_false(cs_time_valid(NULL));
}

static void read_marker(const char *path, unsigned char out[CS_LAST_WRITER_LEN])
{
  int fd = open(path, O_RDONLY);
  assert_true(fd >= 0);
  assert_int_equal(pread(fd, out, CS_LAST_WRITER_LEN, 0), CS_LAST_WRITER_LEN);
  close(fd);
}

static void test_lock_marker(void **state)
{
  (void) state;
  char dir[] = "/tmp/crimage-cs-lock-XXXXXX";
  assert_non_null(mkdtemp(dir));
  cleanup_free char *path = xasprintf("%s/images.lock", dir);
  cs_lock l;
  assert_int_equal(cs_lock_open(path, &l, NULL), 0);
  unsigned char m1[CS_LAST_WRITER_LEN], m2[CS_LAST_WRITER_LEN];
  read_marker(path, m1); /* a new lock file has a marker at once */
  assert_int_equal(cs_lock_acquire(&l, NULL), 0);
  assert_int_equal(cs_lock_touch(&l, NULL), 0);
  cs_lock_release(&l);
  read_marker(path, m2);
  assert_memory_not_equal(m1, m2, CS_LAST_WRITER_LEN);
  /* bytes 16..19: the writer's pid, little-endian */
  uint32_t pid = (uint32_t) m2[16] | (uint32_t) m2[17] << 8 | (uint32_t) m2[18] << 16 | (uint32_t) m2[19] << 24;
  assert_int_equal(pid, (uint32_t) getpid());
  cs_lock_close(&l);
  assert_int_equal(rm_tree_at(AT_FDCWD, dir), 0);
}

/* ---- sync against a store ---- */

typedef struct fixture {
  char dir[64];
  store *st;
  cstorage *cs;
  char *cs_root;
} fixture;

static int setup_tree(void **state)
{
  fixture *f = calloc(1, sizeof(*f));
  snprintf(f->dir, sizeof(f->dir), "/tmp/crimage-cs-XXXXXX");
  assert_non_null(mkdtemp(f->dir));
  cleanup_free char *root = xasprintf("%s/store", f->dir);
  assert_int_equal(store_open(root, &f->st, NULL), 0);
  f->cs_root = xasprintf("%s/cs", f->dir);
  assert_int_equal(cstorage_open(f->cs_root, &f->cs, NULL), 0);
  *state = f;
  return 0;
}

static int teardown_tree(void **state)
{
  fixture *f = *state;
  cstorage_free(f->cs);
  store_close(f->st);
  assert_int_equal(rm_tree_at(AT_FDCWD, f->dir), 0);
  free(f->cs_root);
  free(f);
  return 0;
}

static char *put_blob(store *st, const char *data)
{
  char d[DIGEST_MAX_LEN + 1];
  digest_sha256(data, strlen(data), d);
  assert_int_equal(store_blob_put(st, d, data, strlen(data), NULL), 0);
  return xstrdup(d);
}

/* Records image `name` whose layers are "layer-<tag>" for each tag given (their diff_ids the digests of those
 * strings, each unpacked as a directory holding one file), and returns its ID. */
static char *record(store *st, const char *name, const char *const *layer_tags)
{
  size_t n = 0;
  while (layer_tags[n])
    n++;
  char *layers[n + 1], *diff_ids[n + 1];
  cleanup_free char *diff_list = xstrdup("");
  cleanup_free char *layer_list = xstrdup("");
  for (size_t i = 0; i < n; i++) {
    cleanup_free char *blob = xasprintf("blob-%s", layer_tags[i]);
    cleanup_free char *tar = xasprintf("layer-%s", layer_tags[i]);
    layers[i] = put_blob(st, blob);
    char d[DIGEST_MAX_LEN + 1];
    digest_sha256(tar, strlen(tar), d);
    diff_ids[i] = xstrdup(d);
    cleanup_free char *dir = store_layer_path(st, d);
    mkdir(dir, 0755);
    cleanup_free char *file = xasprintf("%s/%s", dir, layer_tags[i]);
    assert_int_equal(write_file_atomic(file, "12345", 5, 0644, NULL), 0);
    char *dl = xasprintf("%s%s\"%s\"", diff_list, i ? "," : "", d);
    free(diff_list);
    diff_list = dl;
    char *ll = xasprintf("%s%s{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar+gzip\",\"digest\":\"%s\","
                         "\"size\":%zu}",
                         layer_list, i ? "," : "", layers[i], strlen(blob));
    free(layer_list);
    layer_list = ll;
  }
  layers[n] = diff_ids[n] = NULL;
  cleanup_free char *config = xasprintf("{\"created\":\"2023-11-14T22:13:20Z\",\"architecture\":\"amd64\",\"os\":"
                                        "\"linux\",\"config\":{\"Cmd\":[\"%s\"]},\"rootfs\":{\"type\":\"layers\","
                                        "\"diff_ids\":[%s]}}",
                                        name, diff_list);
  cleanup_free char *config_digest = put_blob(st, config);
  cleanup_free char *manifest =
      xasprintf("{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"config\":{"
                "\"mediaType\":\"application/vnd.oci.image.config.v1+json\",\"digest\":\"%s\",\"size\":%zu},"
                "\"layers\":[%s]}",
                config_digest, strlen(config), layer_list);
  cleanup_free char *manifest_digest = put_blob(st, manifest);
  store_record rec = {
      .handler = "",
      .name = name,
      .tag = "1",
      .repo_digest = manifest_digest,
      .manifest_digest = manifest_digest,
      .manifest_media_type = "application/vnd.oci.image.manifest.v1+json",
      .manifest_size = strlen(manifest),
      .config_digest = config_digest,
      .layers = (const char *const *) layers,
      .diff_ids = (const char *const *) diff_ids,
      .size = 1,
      .user = "",
      .platform = "",
  };
  assert_int_equal(store_record_image(st, &rec, NULL), 0);
  for (size_t i = 0; i < n; i++) {
    free(layers[i]);
    free(diff_ids[i]);
  }
  return xstrdup(config_digest);
}

static int sync_all(fixture *f, const char *required, crimage_error **err)
{
  store_image **list = NULL;
  size_t n = 0;
  assert_int_equal(store_list_images(f->st, NULL, &list, &n, NULL), 0);
  cstorage_source src[n + 1];
  for (size_t i = 0; i < n; i++)
    src[i] = (cstorage_source){.st = f->st, .img = list[i]};
  int r = cstorage_sync(f->cs, src, n, required, err);
  store_image_list_free(list, n);
  return r;
}

static json_object *load(fixture *f, const char *rel)
{
  cleanup_free char *path = xasprintf("%s/%s", f->cs_root, rel);
  cleanup_free char *data = NULL;
  size_t len = 0;
  assert_int_equal(read_file(path, 1 << 20, &data, &len, NULL), 0);
  json_object *o = NULL;
  assert_int_equal(json_parse(data, len, rel, JSON_LIMITS(1 << 24, 1000), &o, NULL), 0);
  return o;
}

static bool exists(fixture *f, const char *fmt, const char *arg)
{
  cleanup_free char *rel = xasprintf(fmt, arg);
  cleanup_free char *path = xasprintf("%s/%s", f->cs_root, rel);
  struct stat st;
  return lstat(path, &st) == 0;
}

static void test_sync_writes_removes_and_cleans(void **state)
{
  fixture *f = *state;
  cleanup_free char *a = record(f->st, "example.com/a", (const char *const[]){"base", "top-a", NULL});
  cleanup_free char *b = record(f->st, "example.com/b", (const char *const[]){"base", "top-b", NULL});
  unsigned char m1[CS_LAST_WRITER_LEN], m2[CS_LAST_WRITER_LEN];
  cleanup_free char *ilock = xasprintf("%s/overlay-images/images.lock", f->cs_root);
  read_marker(ilock, m1);
  /* 3 layers (the base is shared) + 2 images... the count is of layers created and images/layers removed. */
  assert_true(sync_all(f, a, NULL) >= 3);
  read_marker(ilock, m2);
  assert_memory_not_equal(m1, m2, CS_LAST_WRITER_LEN);

  cleanup_json json_object *images = load(f, "overlay-images/images.json");
  cleanup_json json_object *layers = load(f, "overlay-layers/layers.json");
  assert_int_equal(json_object_array_length(images), 2);
  assert_int_equal(json_object_array_length(layers), 3);
  json_object *img = json_object_array_get_idx(images, 0);
  const char *first = strcmp(digest_hex(a), digest_hex(b)) < 0 ? a : b;
  assert_string_equal(json_get_string(img, "id"), digest_hex(first));
  const char *top = json_get_string(img, "layer");
  assert_non_null(top);
  assert_true(exists(f, "overlay/%s/link", top));
  assert_true(exists(f, "overlay/%s/lower", top));
  cleanup_free char *cfg_file = cs_big_data_file(first);
  cleanup_free char *cfg_rel = xasprintf("%s/%s", digest_hex(first), cfg_file);
  assert_true(exists(f, "overlay-images/%s", cfg_rel));
  /* Every layer's diff is crimage's unpacked directory itself. */
  cleanup_free char *diff_rel = xasprintf("overlay/%s/diff", top);
  cleanup_free char *diff = xasprintf("%s/%s", f->cs_root, diff_rel);
  char target[4096];
  ssize_t n = readlink(diff, target, sizeof(target) - 1);
  assert_true(n > 0);
  target[n] = '\0';
  assert_true(str_has_prefix(target, store_layers_dir(f->st)));
  assert_true(cstorage_layer_in_use(f->cs, target));

  /* Nothing changed: nothing written, the marker stays. */
  assert_int_equal(sync_all(f, NULL, NULL), 0);
  unsigned char m3[CS_LAST_WRITER_LEN];
  read_marker(ilock, m3);
  assert_memory_equal(m2, m3, CS_LAST_WRITER_LEN);

  /* What a crash can leave: a layer directory nothing lists and a temporary images.json. */
  cleanup_free char *stray = xasprintf("%s/overlay/%064d", f->cs_root, 7);
  assert_int_equal(mkdir(stray, 0700), 0);
  cleanup_free char *tmp = xasprintf("%s/overlay-images/images.json.tmp.abcdef", f->cs_root);
  assert_int_equal(write_file_atomic(tmp, "[", 1, 0600, NULL), 0);
  assert_true(sync_all(f, NULL, NULL) >= 1);
  struct stat st;
  assert_int_not_equal(lstat(stray, &st), 0);
  assert_int_not_equal(lstat(tmp, &st), 0);

  /* a goes: its top layer and big data go, the shared base stays for b. */
  assert_int_equal(store_remove_image(f->st, "", a, NULL), 0);
  assert_true(sync_all(f, NULL, NULL) >= 2);
  json_object_put(images);
  json_object_put(layers);
  images = load(f, "overlay-images/images.json");
  layers = load(f, "overlay-layers/layers.json");
  assert_int_equal(json_object_array_length(images), 1);
  assert_int_equal(json_object_array_length(layers), 2);
  assert_false(exists(f, "overlay-images/%s", digest_hex(a)));

  /* A wiped layers.json and a missing layer directory are rebuilt from the records. */
  cleanup_free char *lj = xasprintf("%s/overlay-layers/layers.json", f->cs_root);
  assert_int_equal(unlink(lj), 0);
  const char *btop = json_get_string(json_object_array_get_idx(images, 0), "layer");
  cleanup_free char *btop_dir = xasprintf("overlay/%s", btop);
  int rootfd = open(f->cs_root, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  assert_int_equal(rm_tree_at(rootfd, btop_dir), 0);
  close(rootfd);
  assert_true(sync_all(f, b, NULL) >= 1);
  json_object_put(layers);
  layers = load(f, "overlay-layers/layers.json");
  assert_int_equal(json_object_array_length(layers), 2);
  assert_true(exists(f, "overlay/%s/diff", btop));
}

static void test_sync_required_image_not_unpacked(void **state)
{
  fixture *f = *state;
  cleanup_free char *a = record(f->st, "example.com/a", (const char *const[]){"only", NULL});
  store_image **list = NULL;
  size_t n = 0;
  assert_int_equal(store_list_images(f->st, NULL, &list, &n, NULL), 0);
  assert_int_equal(n, 1);
  cleanup_free char *dir = store_layer_path(f->st, list[0]->diff_ids[0]);
  assert_int_equal(rm_tree_at(AT_FDCWD, dir), 0);
  cstorage_source src = {.st = f->st, .img = list[0]};
  crimage_error *err = NULL;
  assert_true(cstorage_sync(f->cs, &src, 1, a, &err) < 0);
  assert_non_null(err);
  assert_int_equal(err->status, CRIMAGE_FAILED_PRECONDITION);
  assert_non_null(strstr(err->message, "not unpacked"));
  crimage_error_clear(&err);
  /* Not required: left out, the tree stays valid (and empty). */
  assert_true(cstorage_sync(f->cs, &src, 1, NULL, NULL) >= 0);
  store_image_list_free(list, n);
  cleanup_json json_object *images = load(f, "overlay-images/images.json");
  assert_int_equal(json_object_array_length(images), 0);
}

static void test_second_writer_refused(void **state)
{
  fixture *f = *state;
  cstorage *other = NULL;
  crimage_error *err = NULL;
  assert_true(cstorage_open(f->cs_root, &other, &err) < 0);
  assert_int_equal(err->status, CRIMAGE_FAILED_PRECONDITION);
  crimage_error_clear(&err);
  assert_true(cstorage_open("relative/path", &other, &err) < 0);
  assert_int_equal(err->status, CRIMAGE_INVALID_ARGUMENT);
  crimage_error_clear(&err);
}

int main(void)
{
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_layer_ids),
      cmocka_unit_test(test_big_data_names),
      cmocka_unit_test(test_links_and_times),
      cmocka_unit_test(test_lock_marker),
      cmocka_unit_test_setup_teardown(test_sync_writes_removes_and_cleans, setup_tree, teardown_tree),
      cmocka_unit_test_setup_teardown(test_sync_required_image_not_unpacked, setup_tree, teardown_tree),
      cmocka_unit_test_setup_teardown(test_second_writer_refused, setup_tree, teardown_tree),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
