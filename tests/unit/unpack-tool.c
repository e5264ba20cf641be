/* unpack-tool MEDIA_TYPE BLOB DIR: unpacks one layer blob into DIR with the layer unpacker, feeding it in the
 * chunks a download would (64 KiB), and prints its diff_id. Used by the umoci comparison and by hand to time the
 * unpacker ("-" reads the blob from standard input). Exit status 1 with the error on stderr when it fails. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "common/util.h"
#include "pull/unpack.h"

int main(int argc, char **argv)
{
  if (argc != 4) {
    fprintf(stderr, "usage: %s MEDIA_TYPE BLOB|- DIR\n", argv[0]);
    return 2;
  }
  int fd = streq(argv[2], "-") ? STDIN_FILENO : open(argv[2], O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    fprintf(stderr, "%s: %s\n", argv[2], strerror(errno));
    return 1;
  }
  crimage_error *err = NULL;
  unpack *u = NULL;
  if (unpack_begin(argv[3], argv[1], NULL, &u, &err) < 0)
    goto fail;
  static char buf[64 * 1024];
  for (;;) {
    ssize_t n = read(fd, buf, sizeof(buf));
    if (n < 0 && errno == EINTR)
      continue;
    if (n < 0) {
      fprintf(stderr, "%s: %s\n", argv[2], strerror(errno));
      unpack_abort(u);
      return 1;
    }
    if (n == 0)
      break;
    if (unpack_write(u, buf, (size_t) n, &err) < 0) {
      unpack_abort(u);
      goto fail;
    }
  }
  char diff_id[DIGEST_MAX_LEN + 1];
  if (unpack_finish(u, NULL, diff_id, &err) < 0)
    goto fail;
  if (fd != STDIN_FILENO)
    close(fd);
  printf("%s\n", diff_id);
  return 0;
fail:
  fprintf(stderr, "unpack-tool: %s\n", err ? err->message : "failed");
  crimage_error_free(err);
  return 1;
}
