/* Pull policies. The defaulting mirrors the Kubernetes API server: it looks at what the user wrote, so
 * "busybox:latest" and "busybox" both default to Always, and an image named by digest never needs a re-pull. */
#include <errno.h>

#include "common/util.h"
#include "pull/policy.h"

pull_policy pull_policy_default_for(const image_ref *r)
{
  if (r->digest)
    return PULL_POLICY_IF_NOT_PRESENT;
  if (!r->tag_given || streq_ptr(r->tag, "latest"))
    return PULL_POLICY_ALWAYS;
  return PULL_POLICY_IF_NOT_PRESENT;
}

int pull_policy_default(const char *image, pull_policy *ret, crimage_error **err)
{
  cleanup_reference image_ref *r = NULL;
  int res = reference_parse(image, NULL, &r, err);
  if (res < 0)
    return res;
  *ret = pull_policy_default_for(r);
  return 0;
}

static const char *const policy_names[] = {
    [PULL_POLICY_ALWAYS] = "Always",
    [PULL_POLICY_IF_NOT_PRESENT] = "IfNotPresent",
    [PULL_POLICY_NEVER] = "Never",
};

int pull_policy_parse(const char *s, pull_policy *ret)
{
  if (!s)
    return -EINVAL;
  for (size_t i = 0; i < ARRAY_SIZE(policy_names); i++) {
    if (streq(s, policy_names[i])) {
      *ret = (pull_policy) i;
      return 0;
    }
  }
  return -EINVAL;
}

const char *pull_policy_name(pull_policy p)
{
  if ((unsigned) p < ARRAY_SIZE(policy_names))
    return policy_names[p];
  return "Unknown";
}

/* The public face: same numbering as pull_policy (checked below). */
_Static_assert((int) CRIMAGE_PULL_ALWAYS == (int) PULL_POLICY_ALWAYS, "policy numbering");
_Static_assert((int) CRIMAGE_PULL_IF_NOT_PRESENT == (int) PULL_POLICY_IF_NOT_PRESENT, "policy numbering");
_Static_assert((int) CRIMAGE_PULL_NEVER == (int) PULL_POLICY_NEVER, "policy numbering");

int crimage_pull_policy_default(const char *image, crimage_pull_policy *ret, crimage_error **err)
{
  pull_policy p;
  int res = pull_policy_default(image, &p, err);
  if (res < 0)
    return res;
  *ret = (crimage_pull_policy) p;
  return 0;
}

int crimage_pull_policy_parse(const char *s, crimage_pull_policy *ret)
{
  pull_policy p;
  int res = pull_policy_parse(s, &p);
  if (res < 0)
    return res;
  *ret = (crimage_pull_policy) p;
  return 0;
}

const char *crimage_pull_policy_name(crimage_pull_policy p) { return pull_policy_name((pull_policy) p); }
