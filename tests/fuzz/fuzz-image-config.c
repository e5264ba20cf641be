/* Image configs from a registry (pull/manifest.h image_config_parse): the user and diff_ids a pull records. The
 * first byte gives the number of layers to match the diff_ids to, and whether foreign layers were skipped. */
#include <stdlib.h>

#include "fuzz.h"
#include "pull/manifest.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
  if (size == 0)
    return 0;
  size_t n_layers = data[0] & 0x7f, n_skipped = data[0] >> 7;
  char *user = NULL, **diff_ids = NULL;
  crimage_error *err = NULL;
  if (image_config_parse((const char *) data + 1, size - 1, n_layers, n_skipped, &user, &diff_ids, &err) == 0) {
    if (!user || (diff_ids && strv_length(diff_ids) != n_layers))
      abort();
  }
  free(user);
  strv_free(diff_ids);
  crimage_error_free(err);
  return 0;
}
