/* Content digests ("sha256:<hex>") computed with OpenSSL EVP, incrementally as bytes arrive. */
#ifndef CRIMAGE_COMMON_DIGEST_H
#define CRIMAGE_COMMON_DIGEST_H

#include <stdbool.h>
#include <stddef.h>

#define DIGEST_MAX_LEN (7 + 128) /* "sha512:" + 128 hex digits */

typedef struct digester digester;

/* algorithm is "sha256" or "sha512"; NULL when unsupported. */
digester *digester_new(const char *algorithm);
void digester_update(digester *d, const void *data, size_t len);
/* Writes "algo:hex" into out (at least DIGEST_MAX_LEN + 1 bytes). The digester can be reused after digester_reset. */
void digester_final(digester *d, char *out);
void digester_free(digester *d);
static inline void digester_freep(digester **d) { digester_free(*d); }
#define cleanup_digester __attribute__((cleanup(digester_freep)))

/* "sha256:" + 64 lowercase hex, or "sha512:" + 128. */
bool digest_valid(const char *digest);
/* One-shot sha256 of a buffer. */
void digest_sha256(const void *data, size_t len, char *out);
/* The OCI chain ID of a layer on top of parent_chain (NULL or "" for a base layer, whose chain ID is its diff_id):
 * sha256 of "<parent chain> <diff_id>". Writes DIGEST_MAX_LEN + 1 bytes at most into out. */
void digest_chain_id(const char *parent_chain, const char *diff_id, char *out);
/* The hex part of a digest ("sha256:abc" -> "abc"). */
const char *digest_hex(const char *digest);

#endif
