#include <errno.h>
#include <openssl/evp.h>
#include <string.h>

#include "auth/base64.h"
#include "common/util.h"

static bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

int base64_decode(const char *in, size_t in_len, char **ret, size_t *ret_len)
{
  /* EVP_DecodeBlock takes an int length. */
  if (in_len > (size_t) 64 * 1024 * 1024)
    return -EINVAL;
  while (in_len > 0 && is_space(*in)) {
    in++;
    in_len--;
  }
  while (in_len > 0 && is_space(in[in_len - 1]))
    in_len--;

  /* Line breaks inside are ignored, as Go's decoder (which wrote most of these values) does. Count and drop the
   * padding the input has, then put back exactly what a complete 4-character group needs: padded and unpadded
   * forms then decode alike, and the number of padding bytes (which EVP_DecodeBlock decodes as zeros) is known. */
  size_t padded_cap = in_len + 4;
  char *padded = xmalloc(padded_cap);
  if (!padded) /* never: xmalloc aborts; tells the compiler's null analysis so */
    abort();
  size_t len = 0;
  for (size_t i = 0; i < in_len; i++)
    if (in[i] != '\n' && in[i] != '\r')
      padded[len++] = in[i];
  size_t pad_in = 0;
  while (len > 0 && padded[len - 1] == '=' && pad_in < 2) {
    len--;
    pad_in++;
  }
  size_t rem = len % 4;
  size_t pad = rem == 0 ? 0 : 4 - rem;
  bool ok = rem != 1 && (pad_in == 0 || pad_in == pad);
  for (size_t i = 0; ok && i < len; i++) {
    char c = padded[i];
    ok = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '+' || c == '/';
  }
  if (!ok) {
    explicit_bzero(padded, padded_cap);
    free(padded);
    return -EINVAL;
  }
  memset(padded + len, '=', pad);
  size_t padded_len = len + pad;
  padded[padded_len] = '\0';

  size_t out_cap = padded_len / 4 * 3;
  char *out = xmalloc(out_cap + 1);
  int n =
      padded_len == 0 ? 0 : EVP_DecodeBlock((unsigned char *) out, (const unsigned char *) padded, (int) padded_len);
  explicit_bzero(padded, padded_cap);
  free(padded);
  if (n < 0 || (size_t) n < pad) {
    explicit_bzero(out, out_cap + 1);
    free(out);
    return -EINVAL;
  }
  size_t out_len = (size_t) n - pad;
  out[out_len] = '\0';
  *ret = out;
  *ret_len = out_len;
  return 0;
}
