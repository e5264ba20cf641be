/* Kubernetes image pull Secrets (auth/secrets.h): a YAML or JSON stream of Secrets and Lists, each turned into a
 * keyring. */
#include "auth/secrets.h"
#include "fuzz.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
  keyring **v = NULL;
  size_t n = 0;
  crimage_error *err = NULL;
  if (secrets_parse((const char *) data, size, "fuzz", &v, &n, &err) == 0)
    keyring_array_free(v, n);
  crimage_error_free(err);
  return 0;
}
