/* The JSON and YAML parsers themselves (common/json.h), and what their limits promise: whatever json_parse accepts,
 * the tree json-c built is no bigger than the scanner's estimate said (recounted from the tree with the same
 * figures), so the scanner and json-c read the text alike. The first byte picks JSON, JSON with any bytes, or
 * YAML. */
#include <errno.h>
#include <stdlib.h>

#include "common/json.h"
#include "fuzz.h"

/* The figures of json.c's estimate. */
enum { DOCUMENT = 1024, OBJECT = 800, MEMBER = 128, ARRAY = 160, ELEMENT = 16, SCALAR = 112 };

static uint64_t tree_cost(json_object *o)
{
  switch (json_object_get_type(o)) {
  case json_type_object: {
    uint64_t c = OBJECT;
    json_object_object_foreach(o, k, v) c += MEMBER + strlen(k) + tree_cost(v);
    return c;
  }
  case json_type_array: {
    uint64_t c = ARRAY;
    for (size_t i = 0; i < json_object_array_length(o); i++)
      c += ELEMENT + tree_cost(json_object_array_get_idx(o, i));
    return c;
  }
  case json_type_string:
    return SCALAR + (uint64_t) json_object_get_string_len(o);
  default:
    return SCALAR;
  }
}

/* The scanner's estimate: the least budget it lets through. */
static uint64_t scanner_cost(const char *text, size_t len)
{
  uint64_t lo = 0, hi = UINT64_C(1) << 40;
  while (lo < hi) {
    uint64_t mid = lo + (hi - lo) / 2;
    const json_limits lim = {.max_tree_bytes = mid, .max_elements = SIZE_MAX};
    crimage_error *err = NULL;
    int r = json_check_limits(text, len, "fuzz", &lim, &err);
    crimage_error_free(err);
    if (r == 0)
      hi = mid;
    else if (r == -E2BIG)
      lo = mid + 1;
    else
      return UINT64_MAX; /* refused for something else (depth, a character JSON has not) */
  }
  return lo;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
  if (size == 0)
    return 0;
  const char *text = (const char *) data + 1;
  size_t len = size - 1;
  json_object *o = NULL;
  crimage_error *err = NULL;
  switch (data[0] % 3) {
  case 0:
  case 1: {
    int r = data[0] % 3 == 0 ? json_parse(text, len, "fuzz", JSON_LIMITS(1u << 20, 1000), &o, &err)
                             : json_parse_any_bytes(text, len, "fuzz", JSON_LIMITS(1u << 20, 1000), &o, &err);
    if (r == 0 && tree_cost(o) + DOCUMENT > scanner_cost(text, len))
      abort();
    break;
  }
  default:
    (void) yaml_parse(text, len, "fuzz", JSON_LIMITS(1u << 20, 1000), &o, &err);
    break;
  }
  json_object_put(o);
  crimage_error_free(err);
  return 0;
}
