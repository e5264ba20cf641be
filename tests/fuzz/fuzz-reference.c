/* Image references as kubelet and crictl send them (pull/reference.h): parse, then every rendering of the result,
 * which must parse again to the same reference. */
#include <stdlib.h>

#include "fuzz.h"
#include "pull/reference.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
  cleanup_free char *s = fuzz_cstr(data, size);
  image_ref *ref = NULL;
  crimage_error *err = NULL;
  /* The first byte picks the default registry, as the config may set another one. */
  const char *def = size > 0 && (data[0] & 1) ? "registry.example:5000" : NULL;
  if (reference_parse(s, def, &ref, &err) == 0) {
    cleanup_free char *name = reference_name(ref);
    cleanup_free char *tagged = reference_tagged(ref);
    cleanup_free char *digested = reference_digested(ref);
    cleanup_free char *full = reference_string(ref);
    image_ref *again = NULL;
    crimage_error *err2 = NULL;
    if (reference_parse(full, def, &again, &err2) < 0)
      abort(); /* a normalized reference must parse */
    cleanup_free char *full2 = reference_string(again);
    if (!streq(full, full2))
      abort();
    reference_free(again);
    (void) name;
    (void) tagged;
    (void) digested;
  }
  crimage_error_free(err);
  reference_free(ref);
  return 0;
}
