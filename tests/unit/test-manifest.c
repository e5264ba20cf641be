/* Manifest and index parsing, limits and platform selection. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "common/dynbuf.h"
#include "common/util.h"
#include "pull/manifest.h"
#include "peak-rss.h"

#define D1 "sha256:1111111111111111111111111111111111111111111111111111111111111111"
#define D2 "sha256:2222222222222222222222222222222222222222222222222222222222222222"
#define D3 "sha256:3333333333333333333333333333333333333333333333333333333333333333"
#define D4 "sha256:4444444444444444444444444444444444444444444444444444444444444444"

static manifest *parse_ok(const char *json, const char *ct)
{
  manifest *m = NULL;
  crimage_error *err = NULL;
  int r = manifest_parse(json, strlen(json), ct, &m, &err);
  if (r < 0)
    fail_msg("unexpected error: %s", err->message);
  assert_non_null(m);
  return m;
}

static crimage_error *parse_err(const char *json, const char *ct)
{
  manifest *m = NULL;
  crimage_error *err = NULL;
  int r = manifest_parse(json, strlen(json), ct, &m, &err);
  assert_true(r < 0);
  assert_null(m);
  assert_non_null(err);
  return err;
}

static void test_oci_manifest(void **state)
{
  const char *j = "{\"schemaVersion\":2,\"mediaType\":\"" MEDIA_TYPE_OCI_MANIFEST "\","
                  "\"config\":{\"mediaType\":\"" MEDIA_TYPE_OCI_CONFIG "\",\"digest\":\"" D1 "\",\"size\":100},"
                  "\"layers\":[{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar+gzip\",\"digest\":\"" D2
                  "\",\"size\":2000},"
                  "{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar+zstd\",\"digest\":\"" D3 "\",\"size\":3}]}";
  manifest *m = parse_ok(j, MEDIA_TYPE_OCI_MANIFEST);
  assert_int_equal(m->kind, MANIFEST_KIND_IMAGE);
  assert_string_equal(m->media_type, MEDIA_TYPE_OCI_MANIFEST);
  assert_string_equal(m->config.digest, D1);
  assert_int_equal(m->config.size, 100);
  assert_int_equal(m->n_layers, 2);
  assert_string_equal(m->layers[0].digest, D2);
  assert_int_equal(m->layers[0].size, 2000);
  assert_string_equal(m->layers[1].digest, D3);
  manifest_free(m);

  /* mediaType is optional in OCI: the Content-Type tells, or the shape does. */
  const char *nomt = "{\"schemaVersion\":2,"
                     "\"config\":{\"mediaType\":\"" MEDIA_TYPE_OCI_CONFIG "\",\"digest\":\"" D1 "\",\"size\":1},"
                     "\"layers\":[]}";
  m = parse_ok(nomt, "application/json");
  assert_string_equal(m->media_type, MEDIA_TYPE_OCI_MANIFEST);
  assert_int_equal(m->n_layers, 0);
  manifest_free(m);
}

static void test_docker_manifest(void **state)
{
  const char *j = "{\"schemaVersion\":2,\"mediaType\":\"" MEDIA_TYPE_DOCKER_MANIFEST "\","
                  "\"config\":{\"mediaType\":\"" MEDIA_TYPE_DOCKER_CONFIG "\",\"digest\":\"" D1 "\",\"size\":7},"
                  "\"layers\":[{\"mediaType\":\"application/vnd.docker.image.rootfs.diff.tar.gzip\",\"digest\":\"" D2
                  "\",\"size\":5},"
                  "{\"mediaType\":\"application/vnd.docker.image.rootfs.foreign.diff.tar.gzip\",\"digest\":\"" D3
                  "\",\"size\":9,\"urls\":[\"https://example.invalid/x\"]},"
                  "{\"mediaType\":\"application/vnd.docker.image.rootfs.diff.tar.gzip\",\"digest\":\"" D4
                  "\",\"size\":6}]}";
  manifest *m = parse_ok(j, MEDIA_TYPE_DOCKER_MANIFEST "; charset=utf-8");
  assert_int_equal(m->kind, MANIFEST_KIND_IMAGE);
  assert_string_equal(m->media_type, MEDIA_TYPE_DOCKER_MANIFEST);
  /* the foreign layer is skipped */
  assert_int_equal(m->n_layers, 2);
  assert_int_equal(m->n_skipped_layers, 1);
  assert_string_equal(m->layers[0].digest, D2);
  assert_string_equal(m->layers[1].digest, D4);
  manifest_free(m);
}

#define ENTRY(mt, dg, os, arch, variant)                                                                              \
  "{\"mediaType\":\"" mt "\",\"digest\":\"" dg "\",\"size\":10,\"platform\":{\"os\":\"" os                           \
  "\",\"architecture\":\"" arch "\"" variant "}}"

static const char *oci_index =
    "{\"schemaVersion\":2,\"mediaType\":\"" MEDIA_TYPE_OCI_INDEX "\",\"manifests\":["
    ENTRY(MEDIA_TYPE_OCI_MANIFEST, D1, "linux", "amd64", "") ","
    ENTRY(MEDIA_TYPE_OCI_MANIFEST, D2, "linux", "arm64", "") ","
    ENTRY(MEDIA_TYPE_OCI_MANIFEST, D3, "linux", "arm", ",\"variant\":\"v6\"") ","
    ENTRY(MEDIA_TYPE_OCI_MANIFEST, D4, "unknown", "unknown", "") "]}";

static void test_oci_index(void **state)
{
  manifest *m = parse_ok(oci_index, MEDIA_TYPE_OCI_INDEX);
  assert_int_equal(m->kind, MANIFEST_KIND_INDEX);
  assert_int_equal(m->n_manifests, 4);
  assert_true(m->manifests[0].has_platform);
  assert_string_equal(m->manifests[0].platform.architecture, "amd64");
  /* arm64 without a variant is normalized to v8 */
  assert_string_equal(m->manifests[1].platform.variant, "v8");
  manifest_free(m);
}

static void test_docker_list(void **state)
{
  const char *j = "{\"schemaVersion\":2,\"mediaType\":\"" MEDIA_TYPE_DOCKER_LIST "\",\"manifests\":["
                  ENTRY(MEDIA_TYPE_DOCKER_MANIFEST, D1, "linux", "amd64", "") ","
                  ENTRY(MEDIA_TYPE_DOCKER_MANIFEST, D2, "linux", "arm64", ",\"variant\":\"v8\"") "]}";
  manifest *m = parse_ok(j, NULL);
  assert_int_equal(m->kind, MANIFEST_KIND_INDEX);
  assert_string_equal(m->media_type, MEDIA_TYPE_DOCKER_LIST);
  assert_int_equal(m->n_manifests, 2);
  manifest_free(m);
}

static void select_expect(const char *os, const char *arch, const char *variant, const char *want_digest)
{
  manifest *m = parse_ok(oci_index, NULL);
  platform want = {0};
  snprintf(want.os, sizeof(want.os), "%s", os);
  snprintf(want.architecture, sizeof(want.architecture), "%s", arch);
  snprintf(want.variant, sizeof(want.variant), "%s", variant);
  platform_normalize(&want);
  const manifest_descriptor *d = NULL;
  crimage_error *err = NULL;
  int r = manifest_select_platform(m, &want, &d, &err);
  if (r < 0)
    fail_msg("select failed: %s", err->message);
  assert_string_equal(d->digest, want_digest);
  manifest_free(m);
}

static void test_select_platform(void **state)
{
  select_expect("linux", "amd64", "", D1);
  select_expect("linux", "x86_64", "", D1);
  /* arm64 defaults to v8 on both sides */
  select_expect("linux", "arm64", "", D2);
  select_expect("linux", "arm64", "v8", D2);
  select_expect("linux", "aarch64", "", D2);
  select_expect("linux", "arm", "v6", D3);
}

static void test_select_platform_none(void **state)
{
  manifest *m = parse_ok(oci_index, NULL);
  platform want = {.os = "linux", .architecture = "s390x"};
  const manifest_descriptor *d = NULL;
  crimage_error *err = NULL;
  int r = manifest_select_platform(m, &want, &d, &err);
  assert_true(r < 0);
  assert_int_equal(err->status, CRIMAGE_INVALID_ARGUMENT);
  assert_non_null(strstr(err->message, "linux/s390x"));
  assert_non_null(strstr(err->message, "linux/amd64, linux/arm64/v8, linux/arm/v6"));
  /* attestation entries (unknown/unknown) are not offered as platforms */
  assert_null(strstr(err->message, "unknown"));
  crimage_error_free(err);
  manifest_free(m);
}

static void expect_invalid(const char *json, const char *ct, const char *needle)
{
  crimage_error *err = parse_err(json, ct);
  assert_int_equal(err->status, CRIMAGE_INVALID_ARGUMENT);
  if (!strstr(err->message, needle))
    fail_msg("message \"%s\" lacks \"%s\"", err->message, needle);
  crimage_error_free(err);
}

static void test_bad_json(void **state)
{
  expect_invalid("", NULL, "manifest");
  expect_invalid("{", NULL, "manifest");
  expect_invalid("[1,2]", NULL, "not a JSON object");
  expect_invalid("{\"schemaVersion\":1,\"name\":\"x\"}", NULL, "schemaVersion");
  expect_invalid("{\"schemaVersion\":2} trailing", NULL, "manifest");
  expect_invalid("{\"schemaVersion\":2,\"mediaType\":\"text/plain\"}", NULL, "unsupported manifest media type");
  expect_invalid("{\"schemaVersion\":2}", NULL, "no mediaType");
  /* the document and the Content-Type disagree */
  expect_invalid("{\"schemaVersion\":2,\"mediaType\":\"" MEDIA_TYPE_OCI_INDEX "\",\"manifests\":[]}",
                 MEDIA_TYPE_DOCKER_MANIFEST, "disagrees");
  /* bad descriptors */
  expect_invalid("{\"schemaVersion\":2,\"mediaType\":\"" MEDIA_TYPE_OCI_MANIFEST "\",\"config\":{\"mediaType\":\"" 
                 MEDIA_TYPE_OCI_CONFIG "\",\"digest\":\"sha256:abc\",\"size\":1},\"layers\":[]}",
                 NULL, "digest");
  expect_invalid("{\"schemaVersion\":2,\"mediaType\":\"" MEDIA_TYPE_OCI_MANIFEST "\",\"config\":{\"mediaType\":\""
                 MEDIA_TYPE_OCI_CONFIG "\",\"digest\":\"" D1 "\",\"size\":-1},\"layers\":[]}",
                 NULL, "size");
  expect_invalid("{\"schemaVersion\":2,\"mediaType\":\"" MEDIA_TYPE_OCI_MANIFEST "\",\"config\":{\"mediaType\":\""
                 "application/vnd.cncf.helm.config.v1+json\",\"digest\":\"" D1 "\",\"size\":1},\"layers\":[]}",
                 NULL, "not a container image");
  expect_invalid("{\"schemaVersion\":2,\"mediaType\":\"" MEDIA_TYPE_OCI_MANIFEST "\",\"config\":{\"mediaType\":\""
                 MEDIA_TYPE_OCI_CONFIG "\",\"digest\":\"" D1 "\",\"size\":1},\"layers\":[{\"mediaType\":\"text/x\","
                 "\"digest\":\"" D2 "\",\"size\":1}]}",
                 NULL, "unsupported media type text/x");
  expect_invalid("{\"schemaVersion\":2,\"mediaType\":\"" MEDIA_TYPE_OCI_MANIFEST "\",\"config\":{\"mediaType\":\""
                 MEDIA_TYPE_OCI_CONFIG "\",\"digest\":\"" D1 "\",\"size\":1}}",
                 NULL, "no layers");
  expect_invalid("{\"schemaVersion\":2,\"mediaType\":\"" MEDIA_TYPE_OCI_INDEX "\",\"manifests\":[7]}", NULL,
                 "index entry 0");
}

static void test_limits(void **state)
{
  /* too many layers */
  dynbuf b;
  dynbuf_init(&b, 8u * 1024 * 1024);
  dynbuf_printf(&b, "{\"schemaVersion\":2,\"mediaType\":\"" MEDIA_TYPE_OCI_MANIFEST "\",\"config\":{\"mediaType\":\""
                    MEDIA_TYPE_OCI_CONFIG "\",\"digest\":\"" D1 "\",\"size\":1},\"layers\":[");
  for (int i = 0; i < MANIFEST_MAX_LAYERS + 1; i++)
    dynbuf_printf(&b, "%s{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar\",\"digest\":\"" D2 "\",\"size\":1}",
                  i ? "," : "");
  dynbuf_printf(&b, "]}");
  crimage_error *err = parse_err(b.data, NULL);
  /* refused by the scanner before json-c builds anything */
  assert_non_null(strstr(err->message, "an array `layers` has more than 1000 elements"));
  crimage_error_free(err);

  /* too deep */
  dynbuf_reset(&b);
  dynbuf_printf(&b, "{\"schemaVersion\":2,\"x\":");
  for (int i = 0; i < 200; i++)
    dynbuf_printf(&b, "[");
  for (int i = 0; i < 200; i++)
    dynbuf_printf(&b, "]");
  dynbuf_printf(&b, "}");
  err = parse_err(b.data, NULL);
  assert_int_equal(err->status, CRIMAGE_INVALID_ARGUMENT);
  crimage_error_free(err);

  /* too big: the size is checked before parsing */
  manifest *m = NULL;
  err = NULL;
  assert_true(manifest_parse(b.data, MANIFEST_MAX_SIZE + 1, NULL, &m, &err) < 0);
  assert_non_null(strstr(err->message, "exceeds the limit"));
  crimage_error_free(err);
  dynbuf_free(&b);
}

/* The image size sums sizes a registry sent: it saturates at INT64_MAX instead of wrapping (kubelet reads it as an
 * int64, so a wrapped or larger sum would be negative or tiny there). */
static void test_image_size(void **state)
{
  const char *small = "{\"schemaVersion\":2,\"mediaType\":\"" MEDIA_TYPE_OCI_MANIFEST "\","
                      "\"config\":{\"mediaType\":\"" MEDIA_TYPE_OCI_CONFIG "\",\"digest\":\"" D1 "\",\"size\":100},"
                      "\"layers\":[{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar+gzip\",\"digest\":\"" D2
                      "\",\"size\":2000}]}";
  manifest *m = parse_ok(small, MEDIA_TYPE_OCI_MANIFEST);
  assert_true(manifest_image_size(m, 500) == 2600);
  manifest_free(m);
  const char *huge = "{\"schemaVersion\":2,\"mediaType\":\"" MEDIA_TYPE_OCI_MANIFEST "\","
                     "\"config\":{\"mediaType\":\"" MEDIA_TYPE_OCI_CONFIG "\",\"digest\":\"" D1 "\",\"size\":100},"
                     "\"layers\":[{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar+gzip\",\"digest\":\"" D2
                     "\",\"size\":9223372036854775807},"
                     "{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar+gzip\",\"digest\":\"" D3
                     "\",\"size\":9223372036854775807}]}";
  m = parse_ok(huge, MEDIA_TYPE_OCI_MANIFEST);
  assert_true(manifest_image_size(m, 1000) == INT64_MAX);
  manifest_free(m);
}

static void test_config_user(void **state)
{
  char *user = NULL;
  crimage_error *err = NULL;
  const char *c1 = "{\"architecture\":\"amd64\",\"config\":{\"User\":\"1003:1004\"}}";
  char **diff_ids = NULL;
  assert_int_equal(image_config_parse(c1, strlen(c1), 0, 0, &user, &diff_ids, &err), 0);
  assert_string_equal(user, "1003:1004");
  assert_null(diff_ids);
  free(user);
  const char *c2 = "{\"architecture\":\"amd64\"}";
  assert_int_equal(image_config_parse(c2, strlen(c2), 0, 0, &user, &diff_ids, &err), 0);
  assert_string_equal(user, "");
  free(user);
  assert_true(image_config_parse("nope", 4, 0, 0, &user, &diff_ids, &err) < 0);
  crimage_error_free(err);
  err = NULL;

  /* Strings go to CRI replies: JSON that is not UTF-8 is refused, and so is a user a C string would cut short. */
  struct {
    const char *json, *want;
  } bad[] = {
      {"{\"config\":{\"User\":\"ro\xffot\"}}", "invalid JSON"},
      {"{\"config\":{\"User\":\"1000\"},\"x\":\"\xc0\xaf\"}", "invalid JSON"},
      {"{\"config\":{\"User\":\"nobody\\u0000root\"}}", "config.User contains a NUL byte"},
      {"{\"config\":{\"User\":\"www\\ndata\"}}", "config.User contains a control character"},
  };
  for (size_t i = 0; i < ARRAY_SIZE(bad); i++) {
    assert_true(image_config_parse(bad[i].json, strlen(bad[i].json), 0, 0, &user, &diff_ids, &err) < 0);
    if (!strstr(err->message, bad[i].want))
      fail_msg("case %zu: \"%s\" does not say \"%s\"", i, err->message, bad[i].want);
    crimage_error_free(err);
    err = NULL;
  }
  const char *utf8 = "{\"config\":{\"User\":\"j\xc3\xb6rg\"}}";
  assert_int_equal(image_config_parse(utf8, strlen(utf8), 0, 0, &user, &diff_ids, &err), 0);
  assert_string_equal(user, "j\xc3\xb6rg");
  free(user);

  /* diff_ids: one digest per layer, or an error naming the problem. */
  const char *c3 = "{\"config\":{},\"rootfs\":{\"type\":\"layers\",\"diff_ids\":[\"sha256:"
                   "0000000000000000000000000000000000000000000000000000000000000000\"]}}";
  assert_int_equal(image_config_parse(c3, strlen(c3), 1, 0, &user, &diff_ids, &err), 0);
  assert_non_null(diff_ids);
  assert_string_equal(diff_ids[0], "sha256:0000000000000000000000000000000000000000000000000000000000000000");
  assert_null(diff_ids[1]);
  strv_free(diff_ids);
  free(user);
  diff_ids = NULL;
  assert_true(image_config_parse(c3, strlen(c3), 2, 0, &user, &diff_ids, &err) < 0);
  assert_non_null(strstr(err->message, "1 diff_ids for 2 layers"));
  crimage_error_free(err);
}

typedef struct doc {
  dynbuf b;
  bool config;
} doc;

static int parse_doc(void *arg)
{
  doc *d = arg;
  crimage_error *err = NULL;
  int r;
  if (d->config) {
    char *user = NULL, **diff_ids = NULL;
    r = image_config_parse(d->b.data, d->b.len, 0, 0, &user, &diff_ids, &err);
    free(user);
    strv_free(diff_ids);
  } else {
    manifest *m = NULL;
    r = manifest_parse(d->b.data, d->b.len, NULL, &m, &err);
    manifest_free(m);
  }
  crimage_error_free(err);
  return r;
}

/* n copies of unit after head, then tail. */
static void fill(doc *d, size_t max, const char *head, const char *unit, size_t n, const char *tail)
{
  dynbuf_init(&d->b, max);
  assert_int_equal(dynbuf_append_str(&d->b, head), 0);
  for (size_t i = 0; i < n; i++)
    assert_int_equal(dynbuf_printf(&d->b, "%s%s", i ? "," : "", unit), 0);
  assert_int_equal(dynbuf_append_str(&d->b, tail), 0);
}

/* Refused before json-c builds anything, at a small cost: a 3 MB manifest of a million empty layer objects (it
 * took about 800 MB before), an index of a million entries, an 8 MiB config of empty objects (a correct digest made
 * it accepted, at about 2.2 GB), and one whose lists stay short but whose tree would be large. */
static void test_hostile_cost(void **state)
{
  struct {
    const char *head, *unit, *tail;
    size_t n;
    bool config;
    const char *why;
  } cases[] = {
      {"{\"schemaVersion\":2,\"mediaType\":\"" MEDIA_TYPE_OCI_MANIFEST "\",\"config\":{\"mediaType\":\""
       MEDIA_TYPE_OCI_CONFIG "\",\"digest\":\"" D1 "\",\"size\":1},\"layers\":[", "{}", "]}", 1000000, false,
       "an array `layers` has more than 1000 elements"},
      {"{\"schemaVersion\":2,\"mediaType\":\"" MEDIA_TYPE_OCI_INDEX "\",\"manifests\":[", "{}", "]}", 1000000, false,
       "an array `manifests` has more than 1000 elements"},
      {"{\"architecture\":\"amd64\",\"os\":\"linux\",\"junk\":[", "{}", "]}", (IMAGE_CONFIG_MAX_SIZE - 100) / 3,
       true, "an array `junk` has more than 10000 elements"},
      {"{\"architecture\":\"amd64\",\"os\":\"linux\",\"junk\":[", "[{},{},{},{},{},{},{},{},{},{}]", "]}",
       (IMAGE_CONFIG_MAX_SIZE - 100) / 32, true, "too many values"},
      {"{\"schemaVersion\":2,\"x\":[",
       "[{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}]", "]}", 1000,
       false, "too many values"},
  };
  for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
    doc d = {.config = cases[i].config};
    fill(&d, 16u << 20, cases[i].head, cases[i].unit, cases[i].n, cases[i].tail);
    assert_true(d.b.len <= (d.config ? IMAGE_CONFIG_MAX_SIZE : MANIFEST_MAX_SIZE));
    int r = 0;
    long kib = test_peak_rss_kib(parse_doc, &d, &r);
    assert_true(kib >= 0);
    assert_true(r < 0);
    if (kib > 8 * 1024)
      fail_msg("case %zu (%zu bytes): refusing it took %ld KiB", i, d.b.len, kib);
    crimage_error *err = NULL;
    manifest *m = NULL;
    char *user = NULL, **diff_ids = NULL;
    if (d.config)
      assert_true(image_config_parse(d.b.data, d.b.len, 0, 0, &user, &diff_ids, &err) < 0);
    else
      assert_true(manifest_parse(d.b.data, d.b.len, NULL, &m, &err) < 0);
    if (!strstr(err->message, cases[i].why))
      fail_msg("case %zu: \"%s\" does not say \"%s\"", i, err->message, cases[i].why);
    crimage_error_free(err);
    dynbuf_free(&d.b);
  }

  /* Within the limits, the costliest config (about 24 MiB estimated: a text padded to 32 bytes of tree per byte)
   * stays below 64 MiB; the size of a config is checked before anything else. */
  doc d = {.config = true};
  size_t pad = (24u << 20) / 32;
  cleanup_free char *padding = xmalloc(pad + 1);
  memset(padding, 'x', pad);
  padding[pad] = '\0';
  cleanup_free char *head = xasprintf("{\"architecture\":\"amd64\",\"os\":\"linux\",\"pad\":\"%s\",\"junk\":[", padding);
  fill(&d, 16u << 20, head, "[{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}]",
       950, "]}");
  int r = -1;
  long kib = test_peak_rss_kib(parse_doc, &d, &r);
  assert_int_equal(r, 0);
  if (tests_accurate_rss() && kib > 64 * 1024)
    fail_msg("a config within the limits took %ld KiB", kib);
  dynbuf_free(&d.b);
  char *user = NULL, **diff_ids = NULL;
  crimage_error *err = NULL;
  cleanup_free char *big = xmalloc(IMAGE_CONFIG_MAX_SIZE + 1);
  memset(big, ' ', IMAGE_CONFIG_MAX_SIZE + 1);
  big[0] = '{';
  big[IMAGE_CONFIG_MAX_SIZE] = '}';
  assert_true(image_config_parse(big, IMAGE_CONFIG_MAX_SIZE + 1, 0, 0, &user, &diff_ids, &err) < 0);
  assert_non_null(strstr(err->message, "exceeds the limit"));
  crimage_error_free(err);
}

int main(void)
{
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_oci_manifest),        cmocka_unit_test(test_docker_manifest),
      cmocka_unit_test(test_oci_index),           cmocka_unit_test(test_docker_list),
      cmocka_unit_test(test_select_platform),     cmocka_unit_test(test_select_platform_none),
      cmocka_unit_test(test_bad_json),            cmocka_unit_test(test_limits),
      cmocka_unit_test(test_config_user),         cmocka_unit_test(test_image_size),
      cmocka_unit_test(test_hostile_cost),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
