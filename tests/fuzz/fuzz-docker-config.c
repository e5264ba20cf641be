/* Docker config files and .dockercfg maps (auth/keyring.h), then a lookup in what they gave: the first byte picks
 * the format. */
#include <stdlib.h>

#include "auth/keyring.h"
#include "fuzz.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
  if (size == 0)
    return 0;
  keyring *k = keyring_new();
  crimage_error *err = NULL;
  int r = data[0] & 1 ? keyring_add_dockercfg(k, (const char *) data + 1, size - 1, "fuzz", "dockercfg", &err)
                      : keyring_add_docker_config_json(k, (const char *) data + 1, size - 1, "fuzz", "config.json",
                                                       &err);
  if (r == 0) {
    credential_list l = {0};
    (void) keyring_lookup(k, "registry.example:5000/app", &l);
    (void) keyring_lookup(k, "docker.io/library/busybox", &l);
    (void) keyring_cred_helper(k, "registry.example:5000");
    credential_list_clear(&l);
  }
  crimage_error_free(err);
  keyring_unref(k);
  return 0;
}
