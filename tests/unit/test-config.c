/* crimaged's configuration read from a buffer: what parsing it may cost, and keys whose checks live in the config
 * code. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "common/util.h"
#include "peak-rss.h"
#include "plugin/config.h"

static int load(const char *text, crimaged_config *cfg, crimage_error **err)
{
  config_init(cfg);
  int r = config_load_buffer(cfg, text, strlen(text), "crimage.yaml", err);
  if (r == 0)
    r = config_validate(cfg, err);
  return r;
}

static void load_ok(const char *text, crimaged_config *cfg)
{
  cleanup_error crimage_error *err = NULL;
  if (load(text, cfg, &err) < 0)
    fail_msg("%s", err->message);
}

static void load_fails(const char *text, const char *want)
{
  crimaged_config cfg;
  cleanup_error crimage_error *err = NULL;
  if (load(text, &cfg, &err) == 0)
    fail_msg("accepted: %.100s", text);
  if (!strstr(err->message, want))
    fail_msg("\"%s\" does not say \"%s\"", err->message, want);
  config_clear(&cfg);
}

static int parse_text(void *arg)
{
  crimaged_config cfg;
  crimage_error *err = NULL;
  int r = load(arg, &cfg, &err);
  crimage_error_free(err);
  config_clear(&cfg);
  return r;
}

/* Lists and maps are bounded as libyaml's events arrive, so a 1 MiB config of empty mappings is refused before it
 * becomes a tree of 200 MB. */
static void test_limits(void **state)
{
  cleanup_free char *pins = xstrdup("pinnedImages:\n");
  for (int i = 0; i < 4097; i++) {
    char *n = xasprintf("%s- registry.example/pause:%d\n", pins, i);
    free(pins);
    pins = n;
  }
  load_fails(pins, "a sequence `pinnedImages` has more than 4096 entries");

  size_t n = (1u << 20) / 5 - 1;
  cleanup_free char *text = xmalloc(n * 5 + 1);
  for (size_t i = 0; i < n; i++)
    memcpy(text + i * 5, "- {}\n", 5);
  text[n * 5] = '\0';
  int r = 0;
  long kib = test_peak_rss_kib(parse_text, text, &r);
  assert_true(r < 0);
  assert_true(kib >= 0);
  if (kib > 16 * 1024)
    fail_msg("refusing 200,000 empty mappings took %ld KiB", kib);
  load_fails(text, "has more than 4096 entries");
}

static void test_basic(void **state)
{
  crimaged_config cfg;
  load_ok("root: /var/lib/x\nmaxConcurrentDownloads: 5\nregistries:\n  a.example: {insecure: true}\n", &cfg);
  assert_string_equal(cfg.root, "/var/lib/x");
  assert_int_equal(cfg.max_concurrent_downloads, 5);
  assert_int_equal(cfg.n_registries, 1);
  assert_true(cfg.registries[0].insecure);
  config_clear(&cfg);
  load_fails("nope: 1\n", "unknown config key nope");
  load_fails("{\"root\": [}", "invalid YAML");
}

/* registries.<host>.upstream: false serves a registry from its mirrors only, and needs one. */
static void test_registry_upstream(void **state)
{
  crimaged_config cfg;
  load_ok("registries:\n  docker.io:\n    upstream: false\n    mirrors: [{endpoint: \"https://m.example\"}]\n"
          "  quay.io: {upstream: true}\n",
          &cfg);
  assert_int_equal(cfg.n_registries, 2);
  assert_true(cfg.registries[0].mirrors_only);
  assert_false(cfg.registries[1].mirrors_only);
  config_clear(&cfg);
  load_ok("registries: {docker.io: {mirrors: [\"https://m.example\"]}}\n", &cfg);
  assert_false(cfg.registries[0].mirrors_only);
  config_clear(&cfg);
  load_fails("registries: {docker.io: {upstream: false}}\n",
             "registries.docker.io: upstream: false needs at least one mirror");
  load_fails("registries: {docker.io: {upstream: nope, mirrors: [\"https://m\"]}}\n",
             "config key registries.docker.io.upstream: expected true or false");
}

/* unreferencedBlobRetention and unreferencedBlobMaxBytes (as bytes or a Kubernetes quantity); the packaged config
 * holds the defaults. */
static void test_unreferenced_keys(void **state)
{
  crimaged_config cfg;
  load_ok("unreferencedBlobRetention: 90s\nunreferencedBlobMaxBytes: 500Mi\n", &cfg);
  assert_int_equal(cfg.unreferenced_retention_ms, 90 * 1000);
  assert_int_equal(cfg.unreferenced_max_bytes, 500ull << 20);
  config_clear(&cfg);
  const struct {
    const char *text;
    uint64_t want;
  } sizes[] = {{"0", 0}, {"1073741824", 1ull << 30}, {"\"4Gi\"", 4ull << 30}, {"\"2G\"", 2000000000ull},
               {"\"10k\"", 10000}, {"\"3Ki\"", 3072}, {"\"1Ti\"", 1ull << 40}, {"\"77\"", 77}};
  for (size_t i = 0; i < ARRAY_SIZE(sizes); i++) {
    cleanup_free char *text = xasprintf("unreferencedBlobMaxBytes: %s\n", sizes[i].text);
    load_ok(text, &cfg);
    assert_true(cfg.unreferenced_max_bytes == sizes[i].want);
    config_clear(&cfg);
  }
  const char *bad[] = {"-1", "\"4GB\"", "\"1.5Gi\"", "\" 4Gi\"", "\"Gi\"", "\"99999999999999999999\"",
                       "\"20000000Ti\"", "true"};
  for (size_t i = 0; i < ARRAY_SIZE(bad); i++) {
    cleanup_free char *text = xasprintf("unreferencedBlobMaxBytes: %s\n", bad[i]);
    load_fails(text, "config key unreferencedBlobMaxBytes: expected a number of bytes");
  }
  load_fails("unreferencedBlobRetention: 5\n", "config key unreferencedBlobRetention: expected a duration");

  crimaged_config packaged;
  config_init(&packaged);
  cleanup_error crimage_error *err = NULL;
  if (config_load_file(&packaged, TEST_SRCDIR "/../../packaging/crimage.yaml", &err) < 0)
    fail_msg("%s", err->message);
  config_init(&cfg);
  assert_int_equal(packaged.unreferenced_retention_ms, cfg.unreferenced_retention_ms);
  assert_true(packaged.unreferenced_max_bytes == cfg.unreferenced_max_bytes);
  config_clear(&cfg);
  config_clear(&packaged);
}

static void test_containers_storage(void **state)
{
  crimaged_config cfg;
  load_ok("runtimeHandlers: {}\n", &cfg);
  assert_string_equal(cfg.containers_storage_root, ""); /* off unless set */
  config_clear(&cfg);
  load_ok("containersStorage:\n  root: /var/lib/crimage/containers-storage\nruntimeHandlers:\n  kata:\n"
          "    containersStorage:\n      root: /srv/kata-cs\n  gvisor:\n    containersStorage:\n      root: \"\"\n"
          "  runc: {}\n",
          &cfg);
  assert_string_equal(cfg.containers_storage_root, "/var/lib/crimage/containers-storage");
  assert_int_equal(cfg.n_handlers, 3);
  for (size_t i = 0; i < cfg.n_handlers; i++) {
    const handler_config *h = &cfg.handlers[i];
    if (streq(h->name, "kata"))
      assert_string_equal(h->containers_storage_root, "/srv/kata-cs");
    else if (streq(h->name, "gvisor"))
      assert_string_equal(h->containers_storage_root, ""); /* none for this handler */
    else
      assert_null(h->containers_storage_root); /* as the default */
  }
  config_clear(&cfg);
  load_fails("containersStorage:\n  root: relative\n", "config key containersStorage.root: must be an absolute path");
  load_fails("containersStorage:\n  graphroot: /x\n", "unknown config key containersStorage.graphroot");
  load_fails("containersStorage: /x\n", "config key containersStorage: expected a map");
  load_fails("runtimeHandlers:\n  kata:\n    containersStorage:\n      root: 5\n",
             "config key runtimeHandlers.kata.containersStorage.root: expected a string");
}

int main(void)
{
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_limits),
      cmocka_unit_test(test_basic),
      cmocka_unit_test(test_registry_upstream),
      cmocka_unit_test(test_unreferenced_keys),
      cmocka_unit_test(test_containers_storage),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
