/* The crimage command's pure helpers (sizes, IDs, tags, tables, crictl-shaped JSON, option parsing) and the
 * client's failure paths against sockets where no CRI service answers. */
#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/un.h>

#include <cmocka.h>

#include "common/json.h"
#include "common/util.h"
#include "crimage.h"
#include "plugin/cli_format.h"
#include "plugin/cli_options.h"

static void check_size(uint64_t bytes, const char *want)
{
  char buf[32];
  cli_format_size(bytes, buf, sizeof(buf));
  assert_string_equal(buf, want);
}

static void test_format_size(void **state)
{
  check_size(0, "0B");
  check_size(772, "772B");
  check_size(999, "999B");
  check_size(1000, "1kB");
  check_size(1500, "1.5kB");
  check_size(772788, "773kB");
  check_size(999499, "999kB");
  check_size(999999, "1MB"); /* not "1e+03kB" */
  check_size(4270000, "4.27MB");
  check_size(123456789, "123MB");
  check_size(5000000000ULL, "5GB");
  check_size(UINT64_MAX, "18.4EB");
}

static void test_short_id(void **state)
{
  cleanup_free char *a = cli_short_id("sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef");
  assert_string_equal(a, "0123456789abc");
  cleanup_free char *b = cli_short_id("0123456789abcdef");
  assert_string_equal(b, "0123456789abc");
  cleanup_free char *c = cli_short_id("abc");
  assert_string_equal(c, "abc");
  cleanup_free char *d = cli_short_id(NULL);
  assert_string_equal(d, "");
  cleanup_free char *e = cli_short_id("sha256:");
  assert_string_equal(e, "");
}

static void check_split(const char *in, const char *repo, const char *tag)
{
  cleanup_free char *r = NULL, *t = NULL;
  cli_split_repo_tag(in, &r, &t);
  assert_string_equal(r, repo);
  assert_string_equal(t, tag);
}

static void test_split_repo_tag(void **state)
{
  check_split("docker.io/library/busybox:latest", "docker.io/library/busybox", "latest");
  check_split("localhost:5000/team/app:1.0", "localhost:5000/team/app", "1.0");
  check_split("localhost:5000/team/app", "localhost:5000/team/app", CLI_NONE);
  check_split("busybox", "busybox", CLI_NONE);
  check_split("busybox@sha256:abcd", "busybox", CLI_NONE);
  check_split("registry.k8s.io/pause:3.5@sha256:abcd", "registry.k8s.io/pause", "3.5");
  check_split("", "", CLI_NONE);
}

static void test_repo_from_digests(void **state)
{
  char *digests[] = {"docker.io/library/busybox@sha256:abcd", "other@sha256:ef", NULL};
  cleanup_free char *a = cli_repo_from_digests(digests);
  assert_string_equal(a, "docker.io/library/busybox");
  char *none[] = {NULL};
  cleanup_free char *b = cli_repo_from_digests(none);
  assert_string_equal(b, CLI_NONE);
  cleanup_free char *c = cli_repo_from_digests(NULL);
  assert_string_equal(c, CLI_NONE);
  char *bad[] = {"@sha256:abcd", NULL};
  cleanup_free char *d = cli_repo_from_digests(bad);
  assert_string_equal(d, CLI_NONE);
}

static void test_printable(void **state)
{
  cleanup_free char *a = cli_printable("a\x1b[31mb\n\x7f" "c");
  assert_string_equal(a, "a?[31mb??c");
  cleanup_free char *b = cli_printable(NULL);
  assert_string_equal(b, "");
  cleanup_free char *c = cli_printable("caf\xc3\xa9"); /* UTF-8 stays */
  assert_string_equal(c, "caf\xc3\xa9");
}

static char *print_table(const cli_table *t)
{
  char *out = NULL;
  size_t len = 0;
  FILE *f = open_memstream(&out, &len);
  assert_non_null(f);
  cli_table_print(t, f);
  fclose(f);
  return out;
}

static void test_table(void **state)
{
  const char *headers[] = {"IMAGE", "TAG", "IMAGE ID", "SIZE"};
  cli_table *t = cli_table_new(4, headers);
  const char *r1[] = {"docker.io/library/busybox", "latest", "0123456789abc", "4.27MB"};
  const char *r2[] = {"docker.io/library/alpine", "3", "fedcba9876543", "773kB"};
  const char *r3[] = {"docker.io/library/alpine", "3.19", "\x1b]0;x", "1B"};
  cli_table_add_row(t, r1);
  cli_table_add_row(t, r2);
  cli_table_add_row(t, r3);
  cli_table_sort(t);
  cleanup_free char *out = print_table(t);
  assert_string_equal(out, "IMAGE                       TAG      IMAGE ID        SIZE\n"
                           "docker.io/library/alpine    3        fedcba9876543   773kB\n"
                           "docker.io/library/alpine    3.19     ?]0;x           1B\n"
                           "docker.io/library/busybox   latest   0123456789abc   4.27MB\n");
  cli_table_free(t);

  /* Rows equal in the first columns are ordered by the next ones. */
  const char *h3[] = {"IMAGE", "TAG", "HANDLER"};
  t = cli_table_new(3, h3);
  const char *k[] = {"busybox", "latest", "kata"};
  const char *d[] = {"busybox", "latest", "(default)"};
  const char *a[] = {"alpine", "latest", "runc"};
  cli_table_add_row(t, k);
  cli_table_add_row(t, d);
  cli_table_add_row(t, a);
  cli_table_sort(t);
  cleanup_free char *sorted = print_table(t);
  assert_string_equal(sorted, "IMAGE     TAG      HANDLER\n"
                              "alpine    latest   runc\n"
                              "busybox   latest   (default)\n"
                              "busybox   latest   kata\n");
  cli_table_free(t);

  /* A header alone. */
  t = cli_table_new(4, headers);
  cleanup_free char *empty = print_table(t);
  assert_string_equal(empty, "IMAGE   TAG   IMAGE ID   SIZE\n");
  cli_table_free(t);
}

static crimage_image *make_image(void)
{
  crimage_image *img = xcalloc(1, sizeof(*img));
  img->id = xstrdup("sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef");
  img->repo_tags = xcalloc(3, sizeof(char *));
  img->repo_tags[0] = xstrdup("docker.io/library/busybox:latest");
  img->repo_tags[1] = xstrdup("docker.io/library/busybox:1.36");
  img->repo_digests = xcalloc(1, sizeof(char *));
  img->size = 18446744073709551615ULL; /* above 2^53: must survive as a string */
  img->username = xstrdup("");
  img->spec_image = xstrdup("");
  img->runtime_handler = xstrdup("");
  return img;
}

static json_object *roundtrip(json_object *o)
{
  /* What a reader of the printed JSON sees. */
  char *out = NULL;
  size_t len = 0;
  FILE *f = open_memstream(&out, &len);
  cli_json_print(o, f);
  fclose(f);
  json_object *parsed = NULL;
  crimage_error *err = NULL;
  assert_int_equal(json_parse(out, len, "output", JSON_LIMITS(1u << 20, 1000), &parsed, &err), 0);
  assert_int_equal(out[len - 1], '\n');
  free(out);
  return parsed;
}

static void test_image_json(void **state)
{
  crimage_image *img = make_image();
  cleanup_json json_object *o1 = cli_image_to_json(img);
  cleanup_json json_object *j = roundtrip(o1);
  assert_string_equal(json_get_string(j, "id"), img->id);
  json_object *tags = json_get_array(j, "repoTags");
  assert_non_null(tags);
  assert_int_equal(json_object_array_length(tags), 2);
  assert_string_equal(json_object_get_string(json_object_array_get_idx(tags, 1)), "docker.io/library/busybox:1.36");
  assert_int_equal(json_object_array_length(json_get_array(j, "repoDigests")), 0);
  assert_string_equal(json_get_string(j, "size"), "18446744073709551615");
  json_object *v = NULL;
  assert_true(json_object_object_get_ex(j, "uid", &v));
  assert_null(v); /* absent Int64Value: null, as crictl prints it */
  assert_true(json_object_object_get_ex(j, "spec", &v));
  assert_null(v);
  assert_string_equal(json_get_string(j, "username"), "");
  assert_true(json_object_object_get_ex(j, "pinned", &v));
  assert_false(json_object_get_boolean(v));
  assert_false(json_object_object_get_ex(j, "imageSource", NULL));

  img->has_uid = true;
  img->uid = 1002;
  img->has_spec = true;
  free(img->runtime_handler);
  img->runtime_handler = xstrdup("kata");
  img->pinned = true;
  cleanup_json json_object *o2 = cli_image_to_json(img);
  cleanup_json json_object *k = roundtrip(o2);
  assert_string_equal(json_get_string(json_get_object(k, "uid"), "value"), "1002");
  assert_string_equal(json_get_string(json_get_object(k, "spec"), "runtimeHandler"), "kata");
  assert_true(json_object_object_get_ex(k, "pinned", &v));
  assert_true(json_object_get_boolean(v));
  /* cri/api.proto has no Image.image_source (no upstream version has it): nothing to print */
  assert_false(json_object_object_get_ex(k, "imageSource", NULL));
  crimage_image_free(img);
}

static void test_fs_usage_json(void **state)
{
  crimage_fs_usage u[1] = {{.mountpoint = "/var/lib/crimage", .used_bytes = 123456789, .inodes_used = 42,
                            .timestamp_ns = 1700000000000000000}};
  cleanup_json json_object *o = cli_fs_usage_to_json(u, 1);
  cleanup_json json_object *j = roundtrip(o);
  json_object *status = json_get_object(j, "status");
  assert_non_null(status);
  assert_int_equal(json_object_array_length(json_get_array(status, "containerFilesystems")), 0);
  json_object *fss = json_get_array(status, "imageFilesystems");
  assert_int_equal(json_object_array_length(fss), 1);
  json_object *f = json_object_array_get_idx(fss, 0);
  assert_string_equal(json_get_string(f, "timestamp"), "1700000000000000000");
  assert_string_equal(json_get_string(json_get_object(f, "fsId"), "mountpoint"), "/var/lib/crimage");
  assert_string_equal(json_get_string(json_get_object(f, "usedBytes"), "value"), "123456789");
  assert_string_equal(json_get_string(json_get_object(f, "inodesUsed"), "value"), "42");
}

static void test_parse_output(void **state)
{
  cli_output o = CLI_OUTPUT_DEFAULT;
  assert_int_equal(cli_parse_output("json", &o), 0);
  assert_int_equal(o, CLI_OUTPUT_JSON);
  assert_int_equal(cli_parse_output("table", &o), 0);
  assert_int_equal(o, CLI_OUTPUT_TABLE);
  assert_int_equal(cli_parse_output("yaml", &o), -EINVAL);
  assert_int_equal(cli_parse_output("JSON", &o), -EINVAL);
  assert_int_equal(cli_parse_output("", &o), -EINVAL);
  assert_int_equal(cli_parse_output(NULL, &o), -EINVAL);
  assert_int_equal(o, CLI_OUTPUT_TABLE);
}

static void test_socket_path(void **state)
{
  assert_string_equal(cli_socket_path("/a.sock", "/b.sock"), "/a.sock");
  assert_string_equal(cli_socket_path(NULL, "/b.sock"), "/b.sock");
  assert_string_equal(cli_socket_path("", "/b.sock"), "/b.sock");
  assert_string_equal(cli_socket_path(NULL, ""), CLI_DEFAULT_SOCKET);
  assert_string_equal(cli_socket_path(NULL, NULL), "/run/crimage/crimage.sock");
}

static void test_parse_creds(void **state)
{
  char *u = NULL, *p = NULL;
  assert_int_equal(cli_parse_creds("bob:s3:cr:et", &u, &p), 0);
  assert_string_equal(u, "bob");
  assert_string_equal(p, "s3:cr:et");
  free(u);
  secret_free(p);
  assert_int_equal(cli_parse_creds("bob:", &u, &p), 0);
  assert_string_equal(u, "bob");
  assert_string_equal(p, "");
  free(u);
  secret_free(p);
  u = p = NULL;
  assert_int_equal(cli_parse_creds("bob", &u, &p), -EINVAL);
  assert_int_equal(cli_parse_creds(":secret", &u, &p), -EINVAL);
  assert_int_equal(cli_parse_creds("", &u, &p), -EINVAL);
  assert_int_equal(cli_parse_creds(NULL, &u, &p), -EINVAL);
  assert_null(u);
  assert_null(p);
}

static void test_take_secret(void **state)
{
  char arg[] = "hunter2";
  cleanup_secret char *copy = cli_take_secret(arg);
  assert_string_equal(copy, "hunter2");
  for (size_t i = 0; i < sizeof(arg); i++)
    assert_int_equal(arg[i], 0);
  assert_null(cli_take_secret(NULL));
}

static int read_secret_from(const char *data, size_t len, char **ret, char *rest, size_t rest_len)
{
  int fds[2];
  assert_int_equal(pipe(fds), 0);
  /* Pipes hold 64 KiB: enough for every input here without a writer thread. */
  assert_int_equal(write(fds[1], data, len), (ssize_t) len);
  close(fds[1]);
  int r = cli_read_secret(fds[0], ret);
  if (rest) {
    ssize_t n = read(fds[0], rest, rest_len - 1);
    rest[n > 0 ? n : 0] = '\0';
  }
  close(fds[0]);
  return r;
}

static void test_read_secret(void **state)
{
  char *s = NULL;
  char rest[64];
  assert_int_equal(read_secret_from("pw:with:colons\nnext line\n", 25, &s, rest, sizeof(rest)), 0);
  assert_string_equal(s, "pw:with:colons");
  assert_string_equal(rest, "next line\n"); /* nothing past the first line is consumed */
  secret_free(s);

  assert_int_equal(read_secret_from("crlf\r\n", 6, &s, NULL, 0), 0);
  assert_string_equal(s, "crlf");
  secret_free(s);

  assert_int_equal(read_secret_from("no newline", 10, &s, NULL, 0), 0);
  assert_string_equal(s, "no newline");
  secret_free(s);

  s = NULL;
  assert_int_equal(read_secret_from("", 0, &s, NULL, 0), -EINVAL);
  assert_int_equal(read_secret_from("\n", 1, &s, NULL, 0), -EINVAL);

  char big[CLI_MAX_SECRET + 2];
  memset(big, 'x', sizeof(big));
  assert_int_equal(read_secret_from(big, CLI_MAX_SECRET + 1, &s, NULL, 0), -E2BIG);
  assert_int_equal(read_secret_from(big, CLI_MAX_SECRET, &s, NULL, 0), 0);
  assert_int_equal(strlen(s), CLI_MAX_SECRET);
  secret_free(s);
  assert_int_equal(read_secret_from(NULL, 0, &s, NULL, 0), -EINVAL);
}

/* ---- the client where no CRI service answers ---- */

static void test_client_bad_address(void **state)
{
  crimage_client *c = NULL;
  crimage_error *err = NULL;
  assert_true(crimage_client_connect("", &c, &err) < 0);
  assert_int_equal(err->status, CRIMAGE_INVALID_ARGUMENT);
  crimage_error_clear(&err);
  assert_true(crimage_client_connect("unix://", &c, &err) < 0);
  assert_int_equal(err->status, CRIMAGE_INVALID_ARGUMENT);
  crimage_error_clear(&err);
  char longpath[200];
  memset(longpath, 'a', sizeof(longpath) - 1);
  longpath[0] = '/';
  longpath[sizeof(longpath) - 1] = '\0';
  assert_true(crimage_client_connect(longpath, &c, &err) < 0);
  assert_int_equal(err->status, CRIMAGE_INVALID_ARGUMENT);
  crimage_error_clear(&err);
  assert_null(c);
}

static void test_client_no_server(void **state)
{
  char dir[] = "/tmp/crimage-test-cli-XXXXXX";
  assert_non_null(mkdtemp(dir));
  cleanup_free char *sock = xasprintf("unix://%s/absent.sock", dir);
  crimage_client *c = NULL;
  crimage_error *err = NULL;
  assert_int_equal(crimage_client_connect(sock, &c, &err), 0);
  crimage_client_set_timeout(c, 30000);

  crimage_image **images = NULL;
  size_t n = 0;
  assert_true(crimage_client_list_images(c, NULL, NULL, &images, &n, &err) < 0);
  assert_int_equal(err->status, CRIMAGE_UNAVAILABLE);
  assert_non_null(strstr(err->message, "ListImages"));
  crimage_error_clear(&err);
  assert_null(images);

  /* Local validation before any call. */
  assert_true(crimage_client_pull(c, "", NULL, NULL, NULL, NULL, &err) < 0);
  assert_int_equal(err->status, CRIMAGE_INVALID_ARGUMENT);
  crimage_error_clear(&err);
  assert_true(crimage_client_image_status(c, NULL, NULL, false, NULL, NULL, &err) < 0);
  assert_int_equal(err->status, CRIMAGE_INVALID_ARGUMENT);
  crimage_error_clear(&err);
  assert_true(crimage_client_remove_image(c, "", NULL, &err) < 0);
  assert_int_equal(err->status, CRIMAGE_INVALID_ARGUMENT);
  crimage_error_clear(&err);

  crimage_client_close(c);
  rmdir(dir);
}

/* A peer that is not an HTTP/2 server: it answers every connection with garbage and hangs up. */
struct garbage_server {
  int fd;
};

static void *garbage_serve(void *arg)
{
  struct garbage_server *g = arg;
  for (;;) {
    int conn = accept(g->fd, NULL, NULL);
    if (conn < 0)
      return NULL;
    static const char junk[] = "HTTP/1.0 200 OK\r\n\r\n\xff\xfe garbage \x00\x01\x02";
    ssize_t w = write(conn, junk, sizeof(junk));
    (void) w;
    close(conn);
  }
}

static void test_client_garbage_server(void **state)
{
  char dir[] = "/tmp/crimage-test-cli-XXXXXX";
  assert_non_null(mkdtemp(dir));
  struct sockaddr_un addr = {.sun_family = AF_UNIX};
  snprintf(addr.sun_path, sizeof(addr.sun_path), "%s/garbage.sock", dir);
  struct garbage_server g = {.fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0)};
  assert_true(g.fd >= 0);
  assert_int_equal(bind(g.fd, (struct sockaddr *) &addr, sizeof(addr)), 0);
  assert_int_equal(listen(g.fd, 16), 0);
  pthread_t thread;
  assert_int_equal(pthread_create(&thread, NULL, garbage_serve, &g), 0);

  crimage_client *c = NULL;
  crimage_error *err = NULL;
  assert_int_equal(crimage_client_connect(addr.sun_path, &c, &err), 0);
  crimage_client_set_timeout(c, 5000);
  crimage_fs_usage *usage = NULL;
  size_t n = 0;
  assert_true(crimage_client_fs_info(c, &usage, &n, &err) < 0);
  assert_non_null(err);
  assert_int_not_equal(err->status, CRIMAGE_OK);
  assert_non_null(strstr(err->message, "ImageFsInfo"));
  crimage_error_clear(&err);
  assert_null(usage);
  crimage_client_close(c);

  shutdown(g.fd, SHUT_RDWR);
  pthread_join(thread, NULL);
  close(g.fd);
  unlink(addr.sun_path);
  rmdir(dir);
}

int main(void)
{
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_format_size),       cmocka_unit_test(test_short_id),
      cmocka_unit_test(test_split_repo_tag),    cmocka_unit_test(test_repo_from_digests),
      cmocka_unit_test(test_printable),         cmocka_unit_test(test_table),
      cmocka_unit_test(test_image_json),        cmocka_unit_test(test_fs_usage_json),
      cmocka_unit_test(test_parse_output),      cmocka_unit_test(test_socket_path),
      cmocka_unit_test(test_parse_creds),       cmocka_unit_test(test_take_secret),
      cmocka_unit_test(test_read_secret),       cmocka_unit_test(test_client_bad_address),
      cmocka_unit_test(test_client_no_server),  cmocka_unit_test(test_client_garbage_server),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
