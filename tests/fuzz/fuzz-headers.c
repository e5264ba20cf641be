/* Response headers a registry sends (pull/registry.h): WWW-Authenticate challenges (RFC 7235), Retry-After,
 * Content-Length and Content-Range. The first byte picks the parser. */
#include <stdlib.h>

#include "fuzz.h"
#include "pull/registry.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
  if (size == 0)
    return 0;
  cleanup_free char *s = fuzz_cstr(data + 1, size - 1);
  switch (data[0] % 4) {
  case 0: {
    auth_challenge ch[REGISTRY_MAX_CHALLENGES];
    size_t n = 0;
    crimage_error *err = NULL;
    /* Appending to what is there, as the client does with several header lines. */
    if (auth_challenges_parse(s, ch, &n, &err) == 0)
      (void) auth_challenges_parse(s, ch, &n, &err);
    if (n > REGISTRY_MAX_CHALLENGES)
      abort();
    for (size_t i = 0; i < n; i++) {
      if (ch[i].n_params > REGISTRY_MAX_CHALLENGE_PARAMS)
        abort();
      (void) auth_challenge_param(&ch[i], "realm");
      (void) auth_challenge_param(&ch[i], "SCOPE");
    }
    auth_challenges_clear(ch, n);
    crimage_error_free(err);
    break;
  }
  case 1: {
    int64_t ms = registry_retry_after_ms(s, 1700000000);
    if (ms < -1 || ms > REGISTRY_MAX_RETRY_AFTER_MS)
      abort();
    break;
  }
  case 2:
    if (registry_content_length(s) < -1)
      abort();
    break;
  default: {
    uint64_t first = 0;
    (void) registry_content_range_first(s, &first);
    break;
  }
  }
  return 0;
}
