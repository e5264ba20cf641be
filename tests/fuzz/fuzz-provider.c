/* Credential-provider plugins (auth/provider.h): their CredentialProviderConfig (YAML) when the first byte is even,
 * else a plugin's response on stdout, read for a provider of a fixed config (its plugin a file in a directory made
 * once). */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include "auth/provider.h"
#include "common/fsutil.h"
#include "fuzz.h"

static const char config[] = "apiVersion: kubelet.config.k8s.io/v1\n"
                             "kind: CredentialProviderConfig\n"
                             "providers:\n"
                             "- name: fuzz-plugin\n"
                             "  apiVersion: credentialprovider.kubelet.k8s.io/v1\n"
                             "  matchImages: [\"*.example\", \"registry.example:5000\"]\n"
                             "  defaultCacheDuration: 5m\n";

/* The directory holding the (never run) plugin, made on first use and kept for the process. */
static char dir[64];

static void remove_dir(void) { (void) rm_tree_at(AT_FDCWD, dir); }

static const char *bin_dir(void)
{
  if (!dir[0]) {
    atexit(remove_dir);
    snprintf(dir, sizeof(dir), "/tmp/crimage-fuzz-provider-%d", (int) getpid());
    if (mkdir(dir, 0700) < 0 && errno != EEXIST)
      abort();
    char path[128];
    snprintf(path, sizeof(path), "%s/fuzz-plugin", dir);
    int fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC, 0755);
    if (fd < 0)
      abort();
    close(fd);
  }
  return dir;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
  if (size == 0)
    return 0;
  crimage_error *err = NULL;
  provider_set *ps = NULL;
  if ((data[0] & 1) == 0) {
    if (provider_set_parse((const char *) data + 1, size - 1, "fuzz", bin_dir(), 1000, &ps, &err) == 0 &&
        provider_set_size(ps) == 0)
      abort();
  } else {
    if (provider_set_parse(config, sizeof(config) - 1, "config", bin_dir(), 1000, &ps, &err) < 0)
      abort();
    keyring *k = NULL;
    if (provider_set_parse_response(ps, 0, (const char *) data + 1, size - 1, &k, &err) == 0)
      keyring_unref(k);
  }
  provider_set_free(ps);
  crimage_error_free(err);
  return 0;
}
