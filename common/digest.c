#include <openssl/evp.h>

#include "digest.h"
#include "util.h"

struct digester {
  EVP_MD_CTX *ctx;
  const EVP_MD *md;
  const char *name;
};

digester *digester_new(const char *algorithm)
{
  const EVP_MD *md = NULL;
  const char *name = NULL;
  if (streq(algorithm, "sha256")) {
    md = EVP_sha256();
    name = "sha256";
  } else if (streq(algorithm, "sha512")) {
    md = EVP_sha512();
    name = "sha512";
  } else {
    return NULL;
  }
  digester *d = xcalloc(1, sizeof(*d));
  d->ctx = EVP_MD_CTX_new();
  if (!d->ctx || EVP_DigestInit_ex(d->ctx, md, NULL) != 1)
    abort();
  d->md = md;
  d->name = name;
  return d;
}

void digester_update(digester *d, const void *data, size_t len)
{
  if (len && EVP_DigestUpdate(d->ctx, data, len) != 1)
    abort();
}

void digester_final(digester *d, char *out)
{
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int n = 0;
  if (EVP_DigestFinal_ex(d->ctx, md, &n) != 1)
    abort();
  size_t off = (size_t) sprintf(out, "%s:", d->name);
  for (unsigned int i = 0; i < n; i++)
    off += (size_t) sprintf(out + off, "%02x", md[i]);
  /* Ready for another round. */
  if (EVP_DigestInit_ex(d->ctx, d->md, NULL) != 1)
    abort();
}

void digester_free(digester *d)
{
  if (!d)
    return;
  EVP_MD_CTX_free(d->ctx);
  free(d);
}

static bool all_lower_hex(const char *s, size_t n)
{
  for (size_t i = 0; i < n; i++)
    if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f')))
      return false;
  return s[n] == '\0';
}

bool digest_valid(const char *digest)
{
  if (!digest)
    return false;
  if (str_has_prefix(digest, "sha256:"))
    return strlen(digest + 7) == 64 && all_lower_hex(digest + 7, 64);
  if (str_has_prefix(digest, "sha512:"))
    return strlen(digest + 7) == 128 && all_lower_hex(digest + 7, 128);
  return false;
}

void digest_sha256(const void *data, size_t len, char *out)
{
  digester *d = digester_new("sha256");
  digester_update(d, data, len);
  digester_final(d, out);
  digester_free(d);
}

const char *digest_hex(const char *digest)
{
  const char *c = strchr(digest, ':');
  return c ? c + 1 : digest;
}

void digest_chain_id(const char *parent_chain, const char *diff_id, char *out)
{
  if (!parent_chain || !*parent_chain) {
    snprintf(out, DIGEST_MAX_LEN + 1, "%s", diff_id);
    return;
  }
  digester *d = digester_new("sha256");
  digester_update(d, parent_chain, strlen(parent_chain));
  digester_update(d, " ", 1);
  digester_update(d, diff_id, strlen(diff_id));
  digester_final(d, out);
  digester_free(d);
}
