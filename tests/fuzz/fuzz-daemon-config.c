/* crimaged's configuration file (plugin/config.h config_load_buffer), then the checks at start-up. */
#include "fuzz.h"
#include "plugin/config.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
  crimaged_config cfg;
  config_init(&cfg);
  crimage_error *err = NULL;
  if (config_load_buffer(&cfg, (const char *) data, size, "crimage.yaml", &err) == 0)
    (void) config_validate(&cfg, &err);
  crimage_error_free(err);
  config_clear(&cfg);
  return 0;
}
