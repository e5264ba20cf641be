/* Image pull policies (Always, IfNotPresent, Never) and their Kubernetes defaulting. */
#ifndef CRIMAGE_PULL_POLICY_H
#define CRIMAGE_PULL_POLICY_H

#include <stdbool.h>

#include "common/error.h"
#include "pull/reference.h"

typedef enum {
  PULL_POLICY_ALWAYS,
  PULL_POLICY_IF_NOT_PRESENT,
  PULL_POLICY_NEVER,
} pull_policy;

/* The policy Kubernetes applies when none is given: a digest -> IfNotPresent; ":latest" or no tag -> Always;
 * any other tag -> IfNotPresent. */
pull_policy pull_policy_default_for(const image_ref *r);
/* The same from the image string as the user wrote it; fails (INVALID_ARGUMENT) when it is not a reference. */
int pull_policy_default(const char *image, pull_policy *ret, crimage_error **err);
/* "Always", "IfNotPresent", "Never" (exact spelling, as in a pod spec). Returns 0 or -EINVAL. */
int pull_policy_parse(const char *s, pull_policy *ret);
const char *pull_policy_name(pull_policy p);

#endif
