/* What a docker credential helper prints (auth/credhelper.h credhelper_parse_output). */
#include <stdlib.h>

#include "auth/credhelper.h"
#include "fuzz.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
  credential *c = NULL;
  crimage_error *err = NULL;
  if (credhelper_parse_output("docker-credential-fuzz", "registry.example:5000", (const char *) data, size, &c,
                              &err) == 0 &&
      c && !c->server_address)
    abort();
  credential_free(c);
  crimage_error_free(err);
  return 0;
}
