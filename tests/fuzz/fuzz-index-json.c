/* The store's index.json (pull/store.h): a store opened on a root whose index.json is the input, then listed,
 * searched and written back with one more name. The root, made once per process, holds three blobs (the digests
 * of "manifest", "config" and "layer") so that entries naming them survive the check that an image's blobs are
 * stored. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <syslog.h>
#include <unistd.h>

#include "common/digest.h"
#include "common/fsutil.h"
#include "common/log.h"
#include "fuzz.h"
#include "pull/store.h"

static char root_dir[64];

static void remove_root(void) { (void) rm_tree_at(AT_FDCWD, root_dir); }

static const char *root(void)
{
  if (!root_dir[0]) {
    atexit(remove_root);
    log_set_max_level(LOG_CRIT); /* every bad entry is logged: too much for a fuzzer */
    snprintf(root_dir, sizeof(root_dir), "/tmp/crimage-fuzz-store-%d", (int) getpid());
    store *s = NULL;
    crimage_error *err = NULL;
    if (store_open(root_dir, &s, &err) < 0)
      abort();
    const char *blobs[] = {"manifest", "config", "layer"};
    for (size_t i = 0; i < ARRAY_SIZE(blobs); i++) {
      char d[DIGEST_MAX_LEN + 1];
      digest_sha256(blobs[i], strlen(blobs[i]), d);
      if (store_blob_put(s, d, blobs[i], strlen(blobs[i]), &err) < 0)
        abort();
    }
    store_close(s);
  }
  return root_dir;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
  const char *dir = root();
  char path[128];
  snprintf(path, sizeof(path), "%s/index.json", dir);
  int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0)
    abort();
  if (size > 0 && write(fd, data, size) != (ssize_t) size)
    abort();
  close(fd);
  store *s = NULL;
  crimage_error *err = NULL;
  /* Kept for ever: the three blobs must stay for the next input, though no record may reference them. */
  store_options o = {.unreferenced_retention_ms = INT64_MAX / 2, .unreferenced_max_bytes = UINT64_MAX};
  if (store_open_opts(dir, &o, &s, &err) == 0) {
    store_image **list = NULL;
    size_t n = 0;
    if (store_list_images(s, NULL, &list, &n, &err) == 0) {
      for (size_t i = 0; i < n; i++) {
        store_image *img = NULL;
        crimage_error *ferr = NULL;
        if (store_find_image(s, list[i]->handler, list[i]->id, &img, &ferr) != 1)
          abort(); /* a listed image is found by its id */
        store_image_free(img);
        for (char **t = list[i]->repo_tags; *t; t++) {
          if (store_find_image(s, list[i]->handler, *t, &img, &ferr) != 1)
            abort();
          store_image_free(img);
        }
        crimage_error_free(ferr);
      }
      if (n > 0) {
        /* Another name for a loaded image rewrites index.json from the records (a removal would too, but it
         * would delete the three blobs the next inputs need). */
        const store_image *img = list[0];
        store_record rec = {
            .handler = img->handler,
            .name = "docker.io/library/fuzz",
            .tag = "again",
            .manifest_digest = img->manifest_digest,
            .manifest_media_type = img->manifest_media_type,
            .manifest_size = 8,
            .config_digest = img->id,
            .layers = (const char *const *) img->layers,
            .diff_ids = img->diff_ids && img->diff_ids[0] ? (const char *const *) img->diff_ids : NULL,
            .size = img->size,
            .user = img->user,
            .platform = img->platform,
        };
        crimage_error *rerr = NULL;
        if (store_record_image(s, &rec, &rerr) < 0)
          abort(); /* a loaded record is one the store can record */
        crimage_error_free(rerr);
      }
      store_image_list_free(list, n);
    }
    store_close(s);
  }
  crimage_error_free(err);
  return 0;
}
