/* The generic gRPC server's own checks, without a socket: what error messages show to clients, and the wire
 * check of request strings (NUL bytes, UTF-8) that protobuf-c's unpacking cannot make. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "common/util.h"
#include "cri/api.pb-c.h"
#include "cri/server.h"
#include "cri/wire.h"

static void test_redact_hides_store_paths(void **state)
{
  rpc_server *s = NULL;
  cleanup_error crimage_error *err = NULL;
  assert_int_equal(rpc_server_new(&s, &err), 0);
  rpc_server_hide_path(s, "/var/lib/crimage", "<store>");
  rpc_server_hide_path(s, "/var/lib/crimage/kata", "<store of handler kata>");
  rpc_server_hide_path(s, "/", "<root>"); /* ignored: it would hide every slash */
  struct {
    const char *in, *out;
  } cases[] = {
      {"open `/var/lib/crimage/blobs/sha256/ab`: No such file", "open `<store>/blobs/sha256/ab`: No such file"},
      {"stat `/var/lib/crimage`", "stat `<store>`"},
      {"/var/lib/crimage", "<store>"},
      /* the longest path wins */
      {"read /var/lib/crimage/kata/index.json", "read <store of handler kata>/index.json"},
      /* another directory that merely starts the same is not the store */
      {"open /var/lib/crimage2/x and /var/lib/crimage.old", "open /var/lib/crimage2/x and /var/lib/crimage.old"},
      {"twice: /var/lib/crimage/a, /var/lib/crimage/b", "twice: <store>/a, <store>/b"},
      {"no path at all / here", "no path at all / here"},
      {"", ""},
  };
  for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
    cleanup_free char *got = rpc_server_redact(s, cases[i].in);
    assert_string_equal(got, cases[i].out);
  }
  rpc_server_free(s);
}

/* Packs msg, then replaces the first '#' of the packed bytes by `with` (a NUL or a byte that is not UTF-8), as a
 * client can send but protobuf-c's own packing of a C string cannot produce. */
static uint8_t *pack_with(const ProtobufCMessage *msg, uint8_t with, size_t *ret_len)
{
  size_t len = protobuf_c_message_get_packed_size(msg);
  uint8_t *buf = xmalloc(len);
  protobuf_c_message_pack(msg, buf);
  uint8_t *hash = memchr(buf, '#', len);
  if (hash)
    *hash = with;
  *ret_len = len;
  return buf;
}

/* Validates msg packed with its '#' replaced by `with`: NULL when valid, else the error message. */
static char *check(const ProtobufCMessage *msg, uint8_t with)
{
  size_t len = 0;
  cleanup_free uint8_t *buf = pack_with(msg, with, &len);
  crimage_error *err = NULL;
  int r = wire_validate(msg->descriptor, buf, len, &err);
  if (r == 0) {
    assert_null(err);
    /* what passes also unpacks */
    ProtobufCMessage *back = protobuf_c_message_unpack(msg->descriptor, NULL, len, buf);
    assert_non_null(back);
    protobuf_c_message_free_unpacked(back, NULL);
    return NULL;
  }
  assert_non_null(err);
  assert_int_equal(err->status, CRIMAGE_INVALID_ARGUMENT);
  char *m = xstrdup(err->message);
  crimage_error_clear(&err);
  return m;
}

static void assert_refused(const ProtobufCMessage *msg, uint8_t with, const char *want)
{
  cleanup_free char *m = check(msg, with);
  if (!m)
    fail_msg("accepted, expected \"%s\"", want);
  if (!strstr(m, want))
    fail_msg("\"%s\" does not say \"%s\"", m, want);
}

static void test_wire_strings(void **state)
{
  /* ImageStatus of "busybox\0junk" acted on busybox */
  Runtime__V1__ImageSpec spec = RUNTIME__V1__IMAGE_SPEC__INIT;
  Runtime__V1__ImageStatusRequest status = RUNTIME__V1__IMAGE_STATUS_REQUEST__INIT;
  status.image = &spec;
  spec.image = "busybox#junk";
  assert_null(check(&status.base, '#'));
  assert_refused(&status.base, '\0', "field image.image contains a NUL byte");
  assert_refused(&status.base, 0xc0, "field image.image is not valid UTF-8");
  assert_refused(&status.base, 0xff, "field image.image is not valid UTF-8");
  spec.image = "busybox";
  spec.runtime_handler = "#";
  assert_refused(&status.base, '\0', "field image.runtime_handler contains a NUL byte");
  spec.runtime_handler = "";

  /* map entries are messages: keys and values are checked alike */
  Runtime__V1__ImageSpec__AnnotationsEntry entry = RUNTIME__V1__IMAGE_SPEC__ANNOTATIONS_ENTRY__INIT;
  Runtime__V1__ImageSpec__AnnotationsEntry *entries[] = {&entry};
  spec.annotations = entries;
  spec.n_annotations = 1;
  entry.key = "k#";
  entry.value = "v";
  assert_refused(&status.base, '\0', "field image.annotations.key contains a NUL byte");
  entry.key = "k";
  entry.value = "v#";
  assert_refused(&status.base, 0x80, "field image.annotations.value is not valid UTF-8");
  spec.n_annotations = 0;

  /* RemoveImage and ListImages get the same check */
  Runtime__V1__RemoveImageRequest rm = RUNTIME__V1__REMOVE_IMAGE_REQUEST__INIT;
  rm.image = &spec;
  spec.image = "busybox#junk";
  assert_refused(&rm.base, '\0', "field image.image contains a NUL byte");
  Runtime__V1__ImageFilter filter = RUNTIME__V1__IMAGE_FILTER__INIT;
  Runtime__V1__ListImagesRequest list = RUNTIME__V1__LIST_IMAGES_REQUEST__INIT;
  list.filter = &filter;
  filter.image = &spec;
  assert_refused(&list.base, '\0', "field filter.image.image contains a NUL byte");

  /* PullImage: the auth fields and the sandbox's annotations too, named but never shown */
  spec.image = "busybox";
  Runtime__V1__AuthConfig auth = RUNTIME__V1__AUTH_CONFIG__INIT;
  Runtime__V1__PullImageRequest pull = RUNTIME__V1__PULL_IMAGE_REQUEST__INIT;
  pull.image = &spec;
  pull.auth = &auth;
  auth.username = "user";
  auth.password = "sec#ret";
  cleanup_free char *m = check(&pull.base, '\0');
  assert_non_null(m);
  assert_non_null(strstr(m, "field auth.password contains a NUL byte"));
  assert_null(strstr(m, "sec"));
  auth.password = "secret";
  Runtime__V1__PodSandboxConfig sandbox = RUNTIME__V1__POD_SANDBOX_CONFIG__INIT;
  Runtime__V1__PodSandboxConfig__AnnotationsEntry pentry = RUNTIME__V1__POD_SANDBOX_CONFIG__ANNOTATIONS_ENTRY__INIT;
  Runtime__V1__PodSandboxConfig__AnnotationsEntry *pentries[] = {&pentry};
  sandbox.annotations = pentries;
  sandbox.n_annotations = 1;
  pentry.key = "io.containerd.cri.runtime-handler";
  pentry.value = "#";
  pull.sandbox_config = &sandbox;
  assert_refused(&pull.base, '\0', "field sandbox_config.annotations.value contains a NUL byte");

  /* UTF-8 beyond ASCII is fine */
  pentry.value = "k\xc3\xa4ta \xe2\x82\xac \xf0\x9f\x90\xb3#";
  assert_null(check(&pull.base, '#'));
}

static void test_wire_malformed_and_limits(void **state)
{
  const ProtobufCMessageDescriptor *d = &runtime__v1__image_status_request__descriptor;
  struct {
    const char *bytes;
    size_t len;
  } bad[] = {
      {"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff", 11}, /* a varint that never ends */
      {"\x0a\x05" "ab", 4},                                      /* shorter than it says */
      {"\x0a\xff\xff\xff\xff\x0f", 6},                          /* 4 GiB */
      {"\x0a\x03\x0a\x01", 4},                                  /* a nested message, itself truncated */
      {"\x07", 1},                                                /* field 0 */
      {"\x0b\x0c", 2},                                           /* a group */
      {"\x11\x01\x02", 3},                                      /* a 64-bit value cut short */
  };
  for (size_t i = 0; i < ARRAY_SIZE(bad); i++) {
    crimage_error *err = NULL;
    assert_int_equal(wire_validate(d, (const uint8_t *) bad[i].bytes, bad[i].len, &err), -EBADMSG);
    assert_null(err);
  }
  /* unknown fields and scalars of any wire type are skipped */
  const char ok[] = "\x10\x01" "\x19" "12345678" "\x25" "1234" "\xfa\x01\x02" "\xff\x00";
  crimage_error *err = NULL;
  assert_int_equal(wire_validate(d, (const uint8_t *) ok, sizeof(ok) - 1, &err), 0);
  assert_int_equal(wire_validate(d, (const uint8_t *) "", 0, &err), 0);

  /* A flood of tiny fields (each an allocation once unpacked) is refused before unpacking. */
  size_t n = WIRE_MAX_FIELDS + 1;
  cleanup_free uint8_t *flood = xmalloc(n * 2);
  for (size_t i = 0; i < n; i++) {
    flood[2 * i] = 0x10; /* field 2 (verbose), varint */
    flood[2 * i + 1] = 0x01;
  }
  assert_true(wire_validate(d, flood, n * 2, &err) < 0);
  assert_non_null(err);
  assert_int_equal(err->status, CRIMAGE_INVALID_ARGUMENT);
  assert_non_null(strstr(err->message, "more than 65536 fields"));
  crimage_error_clear(&err);
  assert_int_equal(wire_validate(d, flood, (n - 1) * 2, &err), 0);
}

/* A reply stays valid protobuf whatever got into the data it is built from. */
static void test_reply_repair(void **state)
{
  Runtime__V1__ListImagesResponse *reply = xmalloc(sizeof(*reply));
  runtime__v1__list_images_response__init(reply);
  reply->n_images = 2;
  reply->images = xcalloc(2, sizeof(*reply->images));
  for (size_t i = 0; i < 2; i++) {
    Runtime__V1__Image *img = xmalloc(sizeof(*img));
    runtime__v1__image__init(img);
    img->id = xstrdup("sha256:abc");
    img->n_repo_tags = 2;
    img->repo_tags = xcalloc(2, sizeof(char *));
    img->repo_tags[0] = xstrdup("docker.io/library/busybox:latest");
    img->repo_tags[1] = xstrdup(i ? "docker.io/library/busybox:\xc3\xa4" : "docker.io/library/busybox:1.36");
    img->spec = xmalloc(sizeof(*img->spec));
    runtime__v1__image_spec__init(img->spec);
    img->spec->image = xstrdup("sha256:abc");
    reply->images[i] = img;
  }
  const char *field = "unset";
  assert_int_equal(wire_repair_strings(&reply->base, &field), 0);
  assert_null(field);
  /* the repair works in place on strings and repeated strings of nested messages */
  free(reply->images[1]->repo_tags[1]);
  reply->images[1]->repo_tags[1] = xstrdup("docker.io/library/busybox:\xff");
  reply->images[0]->spec->runtime_handler = xstrdup("k\xc0ta");
  assert_int_equal(wire_repair_strings(&reply->base, &field), 2);
  assert_non_null(field);
  assert_string_equal(reply->images[1]->repo_tags[1], "docker.io/library/busybox:?");
  assert_string_equal(reply->images[0]->spec->runtime_handler, "k?ta");
  assert_string_equal(reply->images[0]->spec->image, "sha256:abc");
  /* and what is packed now passes the strict check a client makes */
  size_t len = protobuf_c_message_get_packed_size(&reply->base);
  cleanup_free uint8_t *buf = xmalloc(len);
  protobuf_c_message_pack(&reply->base, buf);
  crimage_error *err = NULL;
  assert_int_equal(wire_validate(reply->base.descriptor, buf, len, &err), 0);
  protobuf_c_message_free_unpacked(&reply->base, NULL);
}

int main(void)
{
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_redact_hides_store_paths),
      cmocka_unit_test(test_wire_strings),
      cmocka_unit_test(test_wire_malformed_and_limits),
      cmocka_unit_test(test_reply_repair),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
