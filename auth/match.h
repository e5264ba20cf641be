/* kubelet's registry URL matcher, shared by docker config keyrings, Secrets and credential-provider matchImages.
 *
 * A pattern is a schemeless URL host[:port][/path]. It matches an image name (normalized, without tag or digest:
 * "docker.io/library/busybox") when the ports are equal (no port matches only no port), the hosts have the same
 * number of '.'-separated labels and each image label matches the pattern label as a glob ('*', '?', '[...]', so a
 * wildcard never crosses a '.'), and the pattern path is a plain string prefix of the image path. */
#ifndef CRIMAGE_AUTH_MATCH_H
#define CRIMAGE_AUTH_MATCH_H

#include <stdbool.h>

/* Matches one pattern against one image name. */
bool auth_url_match(const char *pattern, const char *image);
/* Whether a pattern is well formed (what kubelet's matchImages validation accepts): non-empty, no whitespace or
 * control characters, a host, a numeric port if any, and valid glob brackets. */
bool auth_url_pattern_valid(const char *pattern);
/* Turns a docker config key into a match pattern the way kubelet does: a scheme (added as https:// when absent)
 * and a leading /v1/ or /v2/ path are dropped; a path of "/" or nothing leaves the host[:port] alone. Returns a new
 * string, or NULL when the key has no host. */
char *auth_config_key_normalize(const char *key);
/* Whether an image name is on Docker Hub as kubelet decides it (first component docker.io or index.docker.io, or
 * one that is neither a host nor host:port, or a single component). */
bool auth_image_is_docker_hub(const char *image);
/* The registry part of an image name (its first component), as a new string. */
char *auth_image_registry(const char *image);

#endif
