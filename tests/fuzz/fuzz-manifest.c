/* Manifests and indexes from a registry (pull/manifest.h): parsed with each Content-Type the registry may send (the
 * first byte picks it), then what a pull does with the result: its size, and the platform choice of an index. */
#include <stdlib.h>

#include "fuzz.h"
#include "pull/manifest.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
  static const char *const types[] = {NULL, MEDIA_TYPE_OCI_MANIFEST, MEDIA_TYPE_OCI_INDEX, MEDIA_TYPE_DOCKER_MANIFEST,
                                      MEDIA_TYPE_DOCKER_LIST, "application/json; charset=utf-8"};
  if (size == 0)
    return 0;
  const char *ct = types[data[0] % ARRAY_SIZE(types)];
  manifest *m = NULL;
  crimage_error *err = NULL;
  if (manifest_parse((const char *) data + 1, size - 1, ct, &m, &err) == 0) {
    (void) manifest_image_size(m, size - 1);
    if (m->kind == MANIFEST_KIND_INDEX) {
      const platform plats[] = {{.os = "linux", .architecture = "amd64"},
                                {.os = "linux", .architecture = "arm64", .variant = "v8"},
                                {.os = "windows", .architecture = "amd64"}};
      for (size_t i = 0; i < ARRAY_SIZE(plats); i++) {
        const manifest_descriptor *d = NULL;
        crimage_error *perr = NULL;
        if (manifest_select_platform(m, &plats[i], &d, &perr) == 0 && (!d || !d->digest))
          abort();
        crimage_error_free(perr);
      }
    } else if (m->n_layers > MANIFEST_MAX_LAYERS) {
      abort();
    }
  }
  crimage_error_free(err);
  manifest_free(m);
  return 0;
}
