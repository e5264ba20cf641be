/* What parsing one document costs: `json-cost KIND FILE` reads FILE, then parses it as the daemon does for KIND
 * (manifest, config, token, registry-error, docker-config, secrets, provider-config, provider-response, credhelper,
 * daemon-config, index-json) and prints one line: kind, bytes, accepted or the error, and the peak resident memory
 * the parse added (VmHWM after it, less VmRSS before it, with the high-water mark reset by /proc/self/clear_refs)
 * and the process's peak (VmHWM: the program, the text read, the parse).
 * bench/json-worst builds the worst documents against each limit and runs this on them. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "auth/credhelper.h"
#include "auth/keyring.h"
#include "auth/provider.h"
#include "auth/secrets.h"
#include "common/fsutil.h"
#include "common/json.h"
#include "common/util.h"
#include "plugin/config.h"
#include "pull/manifest.h"
#include "pull/registry.h"
#include "pull/store.h"

static long status_kib(const char *field)
{
  FILE *f = fopen("/proc/self/status", "re");
  if (!f)
    return -1;
  char line[256];
  long v = -1;
  size_t n = strlen(field);
  while (fgets(line, sizeof(line), f))
    if (strncmp(line, field, n) == 0 && line[n] == ':')
      v = strtol(line + n + 1, NULL, 10);
  fclose(f);
  return v;
}

static int parse_json(const char *data, size_t len, const json_limits *lim, crimage_error **err)
{
  json_object *o = NULL;
  int r = json_parse(data, len, "document", lim, &o, err);
  json_object_put(o);
  return r;
}

static int parse_kind(const char *kind, const char *data, size_t len, crimage_error **err)
{
  if (streq(kind, "manifest")) {
    manifest *m = NULL;
    int r = manifest_parse(data, len, NULL, &m, err);
    manifest_free(m);
    return r;
  }
  if (streq(kind, "config")) {
    char *user = NULL, **diff_ids = NULL;
    int r = image_config_parse(data, len, 0, 0, &user, &diff_ids, err);
    free(user);
    strv_free(diff_ids);
    return r;
  }
  if (streq(kind, "token"))
    return len > REGISTRY_MAX_TOKEN_BODY ? -EFBIG : parse_json(data, len, REGISTRY_TOKEN_JSON_LIMITS, err);
  if (streq(kind, "registry-error"))
    return len > REGISTRY_MAX_ERROR_BODY ? -EFBIG : parse_json(data, len, REGISTRY_ERROR_JSON_LIMITS, err);
  if (streq(kind, "credhelper"))
    return len > CREDHELPER_MAX_OUTPUT ? -EFBIG : parse_json(data, len, CREDHELPER_JSON_LIMITS, err);
  if (streq(kind, "provider-response"))
    return len > PROVIDER_MAX_RESPONSE_SIZE ? -EFBIG : parse_json(data, len, PROVIDER_RESPONSE_JSON_LIMITS, err);
  if (streq(kind, "docker-config")) {
    if (len > KEYRING_MAX_FILE_SIZE)
      return -EFBIG;
    keyring *k = keyring_new();
    int r = keyring_add_docker_config_json(k, data, len, "file", "docker config", err);
    keyring_unref(k);
    return r;
  }
  if (streq(kind, "secrets")) {
    if (len > SECRETS_MAX_FILE_SIZE)
      return -EFBIG;
    keyring **v = NULL;
    size_t n = 0;
    int r = secrets_parse(data, len, "secrets", &v, &n, err);
    keyring_array_free(v, n);
    return r;
  }
  if (streq(kind, "provider-config")) {
    if (len > PROVIDER_MAX_CONFIG_SIZE)
      return -EFBIG;
    provider_set *ps = NULL;
    int r = provider_set_parse(data, len, "providers", "/nonexistent", 1000, &ps, err);
    provider_set_free(ps);
    return r;
  }
  if (streq(kind, "daemon-config")) {
    crimaged_config cfg;
    config_init(&cfg);
    int r = config_load_buffer(&cfg, data, len, "config", err);
    config_clear(&cfg);
    return r;
  }
  if (streq(kind, "index-json")) {
    char root[] = "/tmp/json-cost-store-XXXXXX";
    if (!mkdtemp(root))
      return -errno;
    cleanup_free char *path = xasprintf("%s/index.json", root);
    int r = write_file_atomic(path, data, len, 0644, err);
    store *s = NULL;
    if (r == 0)
      r = store_open(root, &s, err);
    store_close(s);
    cleanup_free char *cmd = xasprintf("rm -rf '%s'", root);
    if (system(cmd) != 0)
      fprintf(stderr, "could not remove %s\n", root);
    return r;
  }
  fprintf(stderr, "unknown kind %s\n", kind);
  exit(2);
}

int main(int argc, char **argv)
{
  if (argc != 3) {
    fprintf(stderr, "usage: json-cost KIND FILE\n");
    return 2;
  }
  cleanup_free char *data = NULL;
  size_t len = 0;
  cleanup_error crimage_error *err = NULL;
  if (read_file(argv[2], 64u << 20, &data, &len, &err) < 0) {
    fprintf(stderr, "%s\n", err->message);
    return 1;
  }
  int fd = open("/proc/self/clear_refs", O_WRONLY | O_CLOEXEC);
  if (fd < 0 || write(fd, "5", 1) != 1) {
    perror("/proc/self/clear_refs");
    return 1;
  }
  close(fd);
  long base = status_kib("VmRSS");
  int r = parse_kind(argv[1], data, len, &err);
  long peak = status_kib("VmHWM");
  printf("%s\t%zu\t%s\t%ld\t%ld\n", argv[1], len, r == 0 ? "accepted" : err ? err->message : strerror(-r),
         peak - base, peak);
  return 0;
}
