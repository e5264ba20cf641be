#include "tree.h"

#include <errno.h>
#include <limits.h>
#include <string.h>

#include "common/digest.h"
#include "common/fsutil.h"
#include "common/log.h"
#include "common/util.h"
#include "pull/manifest.h"

void want_clear(want *w)
{
  for (size_t i = 0; i < w->n_layers; i++) {
    free(w->layers[i].diff_id);
    free(w->layers[i].blob);
    free(w->layers[i].target);
    free(w->layers[i].lower);
    json_object_put(w->layers[i].measured);
  }
  for (size_t i = 0; i < w->n_images; i++) {
    want_image *im = &w->images[i];
    free(im->digest);
    strv_free(im->names);
    free(im->created);
    free(im->manifest);
    free(im->manifest_digest);
    free(im->config);
    free(im->config_digest);
  }
  free(w->layers);
  free(w->images);
}

want_layer *want_find_layer(want *w, const char *id)
{
  for (size_t i = 0; i < w->n_layers; i++)
    if (streq(w->layers[i].id, id))
      return &w->layers[i];
  return NULL;
}

want_image *want_find_image(want *w, const char *id)
{
  for (size_t i = 0; i < w->n_images; i++)
    if (streq(w->images[i].id, id))
      return &w->images[i];
  return NULL;
}

static int compression_of(const char *media_type)
{
  if (str_has_suffix(media_type, "+gzip") || str_has_suffix(media_type, ".gzip"))
    return 2;
  if (str_has_suffix(media_type, "+zstd") || str_has_suffix(media_type, ".zstd"))
    return 4;
  return 0;
}

/* The names containers/image would give the image: its tags, and name@digest for a repository it has no tag of
 * (pulled by digest). */
static char **names_of(const store_image *img)
{
  char **names = xcalloc(1, sizeof(char *));
  for (char **t = img->repo_tags; t && *t; t++)
    strv_add_unique(&names, *t);
  for (char **d = img->repo_digests; d && *d; d++) {
    const char *at = strchr(*d, '@');
    if (!at)
      continue;
    size_t repo_len = (size_t) (at - *d);
    bool tagged = false;
    for (char **t = img->repo_tags; t && *t && !tagged; t++)
      tagged = strncmp(*t, *d, repo_len) == 0 && (*t)[repo_len] == ':' && !strchr(*t + repo_len + 1, '/');
    if (!tagged)
      strv_add_unique(&names, *d);
  }
  return names;
}

/* The config's creation time, as containers/image takes it; the record's when the config has none. */
static char *created_of(const char *config, size_t len, int64_t record_ns)
{
  cleanup_json json_object *o = NULL;
  crimage_error *e = NULL;
  const char *c = NULL;
  if (json_parse(config, len, "image config", IMAGE_CONFIG_JSON_LIMITS, &o, &e) == 0)
    c = json_get_string(o, "created");
  crimage_error_clear(&e);
  return cs_time_valid(c) ? xstrdup(c) : cs_time_string(record_ns);
}

/* Adds the image of one record (its layers first), or says why it cannot be in the tree. */
int want_add(want *w, const cstorage_source *s, crimage_error **err)
{
  const store_image *img = s->img;
  if (!str_has_prefix(img->id, "sha256:") || !digest_valid(img->id))
    return crimage_error_set(err, CRIMAGE_FAILED_PRECONDITION, 0, "image %s: not a sha256 image ID", img->id);
  size_t n = strv_length(img->layers);
  if (strv_length(img->diff_ids) != n)
    return crimage_error_set(err, CRIMAGE_FAILED_PRECONDITION, 0,
                             "image %s: the layers' uncompressed digests are not recorded (pull it again)", img->id);
  want_image *im = want_find_image(w, digest_hex(img->id));
  if (im) {
    /* Another handler's record of the same image (the same config, so the same layers): one image with the names
     * of both, and nothing read again. */
    cleanup_strv char **more = names_of(img);
    for (char **p = more; *p; p++)
      strv_add_unique(&im->names, *p);
    if (img->created_ns > im->record_ns)
      im->record_ns = img->created_ns;
    return 0;
  }
  for (size_t i = 0; i < n; i++)
    if (!store_layer_exists(s->st, img->diff_ids[i]))
      return crimage_error_set(err, CRIMAGE_FAILED_PRECONDITION, 0,
                               "image %s: layer %s is not unpacked (pulled before its handler had a tree: the next "
                               "pull of it unpacks it)",
                               img->id, img->diff_ids[i]);
  char *manifest_data = NULL, *config_data = NULL;
  size_t manifest_len = 0, config_len = 0;
  int r = store_blob_read(s->st, img->manifest_digest, MANIFEST_MAX_SIZE, &manifest_data, &manifest_len, err);
  if (r < 0)
    return crimage_error_wrap(err, "image %s", img->id);
  cleanup_free char *mdata = manifest_data;
  cleanup_manifest manifest *m = NULL;
  r = manifest_parse(mdata, manifest_len, img->manifest_media_type, &m, err);
  if (r < 0)
    return crimage_error_wrap(err, "image %s", img->id);
  if (m->kind != MANIFEST_KIND_IMAGE || m->n_layers != n)
    return crimage_error_set(err, CRIMAGE_FAILED_PRECONDITION, 0, "image %s: its manifest lists other layers",
                             img->id);
  r = store_blob_read(s->st, img->id, IMAGE_CONFIG_MAX_SIZE, &config_data, &config_len, err);
  if (r < 0)
    return crimage_error_wrap(err, "image %s", img->id);
  cleanup_free char *cdata = config_data;
  char id[CS_ID_LEN + 1] = "";
  for (size_t i = 0; i < n; i++) {
    char parent[CS_ID_LEN + 1];
    memcpy(parent, id, sizeof(id));
    cs_layer_id(parent, img->diff_ids[i], id);
    if (want_find_layer(w, id))
      continue;
    w->layers = xrealloc(w->layers, (w->n_layers + 1) * sizeof(*w->layers));
    want_layer *l = &w->layers[w->n_layers++];
    *l = (want_layer){.blob_size = m->layers[i].size, .compression = compression_of(m->layers[i].media_type)};
    memcpy(l->id, id, sizeof(id));
    memcpy(l->parent, parent, sizeof(parent));
    l->diff_id = xstrdup(img->diff_ids[i]);
    l->blob = xstrdup(img->layers[i]);
    l->target = store_layer_path(s->st, img->diff_ids[i]);
  }
  w->images = xrealloc(w->images, (w->n_images + 1) * sizeof(*w->images));
  im = &w->images[w->n_images++];
  *im = (want_image){.record_ns = img->created_ns, .manifest_len = manifest_len, .config_len = config_len};
  snprintf(im->id, sizeof(im->id), "%s", digest_hex(img->id));
  memcpy(im->top, id, sizeof(id));
  const char *rd = img->repo_digests && img->repo_digests[0] ? strchr(img->repo_digests[0], '@') : NULL;
  im->digest = xstrdup(rd ? rd + 1 : img->manifest_digest);
  im->names = names_of(img);
  im->created = created_of(cdata, config_len, img->created_ns);
  im->manifest = TAKE_PTR(mdata);
  im->manifest_digest = xstrdup(img->manifest_digest);
  im->config = TAKE_PTR(cdata);
  im->config_digest = xstrdup(img->id);
  return 0;
}

/* containers/storage refuses a store in which two images share a name: the newer record keeps it. */
static void settle_names(want *w)
{
  for (size_t i = 0; i < w->n_images; i++) {
    want_image *a = &w->images[i];
    char **keep = xcalloc(strv_length(a->names) + 1, sizeof(char *));
    size_t k = 0;
    for (char **p = a->names; *p; p++) {
      bool lost = false;
      for (size_t j = 0; j < w->n_images && !lost; j++) {
        const want_image *b = &w->images[j];
        lost = j != i && strv_contains(b->names, *p) &&
               (b->record_ns > a->record_ns || (b->record_ns == a->record_ns && j < i));
      }
      if (lost)
        log_warn("containers-storage: name %s goes to another image than %s", *p, a->id);
      else
        keep[k++] = xstrdup(*p);
    }
    strv_free(a->names);
    a->names = keep;
  }
}

static int cmp_image(const void *x, const void *y)
{
  return strcmp(((const want_image *) x)->id, ((const want_image *) y)->id);
}

void want_settle(want *w)
{
  settle_names(w);
  if (w->n_images)
    qsort(w->images, w->n_images, sizeof(*w->images), cmp_image);
}
