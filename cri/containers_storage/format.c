#include "format.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "common/digest.h"
#include "common/util.h"

int cs_lock_open(const char *path, cs_lock *ret, crimage_error **err)
{
  int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0)
    return crimage_error_set(err, CRIMAGE_INTERNAL, errno, "open lock file `%s`", path);
  cs_lock l = {.fd = fd};
  struct stat st;
  int r = fstat(fd, &st) < 0 ? -errno : 0;
  /* A new lock file gets its first marker at once: a reader compares the marker it read with the next one. */
  if (r == 0 && st.st_size < CS_LAST_WRITER_LEN) {
    r = cs_lock_acquire(&l, err);
    if (r == 0) {
      r = cs_lock_touch(&l, err);
      cs_lock_release(&l);
    }
    if (r < 0) {
      close(fd);
      return crimage_error_wrap(err, "lock file `%s`", path);
    }
  } else if (r < 0) {
    close(fd);
    return crimage_error_set(err, CRIMAGE_INTERNAL, -r, "stat lock file `%s`", path);
  }
  *ret = l;
  return 0;
}

void cs_lock_close(cs_lock *l)
{
  if (l->fd >= 0)
    close(l->fd);
  l->fd = -1;
}

int cs_lock_acquire(cs_lock *l, crimage_error **err)
{
  struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 0};
  while (fcntl(l->fd, F_SETLKW, &fl) < 0)
    if (errno != EINTR)
      return crimage_error_set(err, CRIMAGE_INTERNAL, errno, "take a containers-storage lock");
  return 0;
}

void cs_lock_release(cs_lock *l)
{
  struct flock fl = {.l_type = F_UNLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 0};
  (void) fcntl(l->fd, F_SETLK, &fl);
}

static void put_le(unsigned char *p, uint64_t v, int n)
{
  for (int i = 0; i < n; i++)
    p[i] = (unsigned char) (v >> (8 * i));
}

int cs_lock_touch(cs_lock *l, crimage_error **err)
{
  /* As containers/storage composes it: 8 bytes of time (ns, little-endian), 8 of a counter, 4 of the pid, the
   * rest random. The counter is only there to tell two touches of one process within one clock tick apart. */
  static atomic_uint_fast64_t counter;
  unsigned char lw[CS_LAST_WRITER_LEN];
  put_le(lw, (uint64_t) now_realtime_ns(), 8);
  put_le(lw + 8, (uint64_t) atomic_fetch_add(&counter, 1) + 1, 8);
  put_le(lw + 16, (uint64_t) getpid(), 4);
  if (RAND_bytes(lw + 20, CS_LAST_WRITER_LEN - 20) != 1)
    return crimage_error_set(err, CRIMAGE_INTERNAL, EIO, "random bytes for a last-writer marker");
  ssize_t n = pwrite(l->fd, lw, sizeof(lw), 0);
  if (n != (ssize_t) sizeof(lw))
    return crimage_error_set(err, CRIMAGE_INTERNAL, n < 0 ? errno : ENOSPC, "write a last-writer marker");
  return 0;
}

void cs_layer_id(const char *parent_id, const char *diff_id, char *out)
{
  if (str_empty(parent_id)) {
    snprintf(out, CS_ID_LEN + 1, "%s", digest_hex(diff_id));
    return;
  }
  cleanup_free char *s = xasprintf("%s+%s", parent_id, digest_hex(diff_id));
  char d[DIGEST_MAX_LEN + 1];
  digest_sha256(s, strlen(s), d);
  snprintf(out, CS_ID_LEN + 1, "%s", digest_hex(d));
}

char *cs_big_data_file(const char *key)
{
  bool plain = true;
  for (const char *p = key; *p && plain; p++)
    plain = *p == '.' || (*p >= '0' && *p <= '9') || (*p >= 'a' && *p <= 'z');
  if (plain)
    return xstrdup(key);
  size_t len = strlen(key);
  char *out = xmalloc(2 + 4 * ((len + 2) / 3) + 1);
  out[0] = '=';
  EVP_EncodeBlock((unsigned char *) out + 1, (const unsigned char *) key, (int) len);
  return out;
}

int cs_new_link(char *out, crimage_error **err)
{
  static const char alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
  unsigned char b[(CS_LINK_LEN * 5 + 7) / 8];
  if (RAND_bytes(b, sizeof(b)) != 1)
    return crimage_error_set(err, CRIMAGE_INTERNAL, EIO, "random bytes for a layer link");
  /* Base32 (RFC 4648), 5 bits per character, most significant first. */
  for (int i = 0; i < CS_LINK_LEN; i++) {
    int bit = i * 5, byte = bit / 8, shift = bit % 8;
    unsigned v = (unsigned) b[byte] << 8 | (byte + 1 < (int) sizeof(b) ? b[byte + 1] : 0);
    out[i] = alphabet[(v >> (11 - shift)) & 31];
  }
  out[CS_LINK_LEN] = '\0';
  return 0;
}

char *cs_time_string(int64_t ns)
{
  time_t sec = (time_t) (ns / 1000000000);
  long frac = (long) (ns % 1000000000);
  struct tm tm;
  gmtime_r(&sec, &tm);
  char base[32], fs[16] = "";
  strftime(base, sizeof(base), "%Y-%m-%dT%H:%M:%S", &tm);
  if (frac) {
    snprintf(fs, sizeof(fs), ".%09ld", frac);
    for (size_t n = strlen(fs); fs[n - 1] == '0'; n--)
      fs[n - 1] = '\0';
  }
  return xasprintf("%s%sZ", base, fs);
}

static bool digits(const char *s, size_t n)
{
  for (size_t i = 0; i < n; i++)
    if (!isdigit((unsigned char) s[i]))
      return false;
  return true;
}

bool cs_time_valid(const char *s)
{
  /* 2006-01-02T15:04:05 */
  if (!s || strlen(s) < 20 || !digits(s, 4) || s[4] != '-' || !digits(s + 5, 2) || s[7] != '-' ||
      !digits(s + 8, 2) || s[10] != 'T' || !digits(s + 11, 2) || s[13] != ':' || !digits(s + 14, 2) ||
      s[16] != ':' || !digits(s + 17, 2))
    return false;
  const char *p = s + 19;
  if (*p == '.') {
    size_t n = strspn(p + 1, "0123456789");
    if (n == 0 || n > 9)
      return false;
    p += 1 + n;
  }
  if (streq(p, "Z"))
    return true;
  return (*p == '+' || *p == '-') && strlen(p) == 6 && digits(p + 1, 2) && p[3] == ':' && digits(p + 4, 2);
}
