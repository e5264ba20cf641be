/* What every libFuzzer target here shares: the entry point libFuzzer (or tests/fuzz/replay.c, which runs a corpus
 * as a unit test) calls with one input, and a NUL-terminated copy of it for the parsers that take C strings. */
#ifndef CRIMAGE_TESTS_FUZZ_H
#define CRIMAGE_TESTS_FUZZ_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "common/util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* The input as a C string (it may hold NULs: the parser sees what comes before the first one). */
static inline char *fuzz_cstr(const uint8_t *data, size_t size)
{
  char *s = xmalloc(size + 1);
  memcpy(s, data, size);
  s[size] = '\0';
  return s;
}

#endif
