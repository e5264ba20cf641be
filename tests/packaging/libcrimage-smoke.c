/* Built by tests/packaging/run against the installed libcrimage-dev with `pkg-config --cflags --libs crimage`:
 * normalizes a reference and, given a socket, asks that crimaged for ImageFsInfo through the library's client. */
#include <crimage.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv)
{
  crimage_error *err = NULL;
  char *ref = NULL;
  if (crimage_reference_normalize("busybox", NULL, &ref, &err) < 0 || strcmp(ref, "docker.io/library/busybox:latest"))
    return fprintf(stderr, "normalize: %s\n", err ? err->message : ref), 1;
  printf("libcrimage %s: busybox is %s\n", crimage_version(), ref);
  free(ref);
  if (argc > 1) {
    crimage_client *c = NULL;
    crimage_fs_usage *fs = NULL;
    size_t n = 0;
    if (crimage_client_connect(argv[1], &c, &err) < 0 || crimage_client_fs_info(c, &fs, &n, &err) < 0 || n == 0)
      return fprintf(stderr, "fsinfo: %s\n", err ? err->message : "no image filesystem"), 1;
    printf("image filesystem %s: %llu bytes used\n", fs[0].mountpoint, (unsigned long long)fs[0].used_bytes);
    crimage_fs_usage_free(fs, n);
    crimage_client_close(c);
  }
  return 0;
}
