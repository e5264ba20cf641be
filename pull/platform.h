/* OCI platforms (os/architecture/variant) and matching against index entries. */
#ifndef CRIMAGE_PULL_PLATFORM_H
#define CRIMAGE_PULL_PLATFORM_H

#include <stdbool.h>

#include "common/error.h"

typedef struct platform {
  char os[32];
  char architecture[32];
  char variant[32]; /* "" when none */
} platform;

/* The node's own platform, from uname(2) mapped to GOARCH names (x86_64 -> amd64, aarch64 -> arm64/v8, ...). */
void platform_host(platform *ret);
/* Parses "os/arch[/variant]" ("linux/arm64/v8", "windows/amd64"). Normalizes architecture aliases and default
 * variants (arm64 -> v8, arm -> v7). */
int platform_parse(const char *s, platform *ret, crimage_error **err);
/* Normalizes in place: architecture aliases (aarch64 -> arm64, x86_64 -> amd64, armhf -> arm/v7...), default
 * variants (arm64 -> v8, arm -> v7). */
void platform_normalize(platform *p);
/* True when an index entry with platform `candidate` can run on `want`: os and architecture equal, variant equal
 * after defaulting (both sides are normalized on copies first). No fallback: an arm/v7 node does not take an
 * arm/v6 entry, so a selection never silently picks a lesser variant. */
bool platform_match(const platform *want, const platform *candidate);
/* "linux/arm64/v8" into buf. */
const char *platform_string(const platform *p, char *buf, size_t size);

#endif
