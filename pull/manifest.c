/* Manifest and index parsing. Everything here comes from a registry we do not trust: sizes, counts, types and
 * digests are checked before anything is used. */
#include "pull/manifest.h"

#include <errno.h>
#include <string.h>

#include "common/digest.h"
#include "common/dynbuf.h"
#include "common/json.h"
#include "common/util.h"

uint64_t manifest_image_size(const manifest *m, size_t manifest_len)
{
  /* Descriptor sizes are checked to be >= 0 when parsed. */
  uint64_t total = u64_add_sat(manifest_len, (uint64_t) m->config.size);
  for (size_t i = 0; i < m->n_layers; i++)
    total = u64_add_sat(total, (uint64_t) m->layers[i].size);
  return total > INT64_MAX ? INT64_MAX : total;
}

bool manifest_media_type_is_index(const char *mt)
{
  return mt && (streq(mt, MEDIA_TYPE_OCI_INDEX) || streq(mt, MEDIA_TYPE_DOCKER_LIST));
}

bool manifest_media_type_is_image(const char *mt)
{
  return mt && (streq(mt, MEDIA_TYPE_OCI_MANIFEST) || streq(mt, MEDIA_TYPE_DOCKER_MANIFEST));
}

/* Layers we download and record. */
static bool layer_type_distributable(const char *mt)
{
  static const char *const types[] = {
      "application/vnd.oci.image.layer.v1.tar",
      "application/vnd.oci.image.layer.v1.tar+gzip",
      "application/vnd.oci.image.layer.v1.tar+zstd",
      "application/vnd.docker.image.rootfs.diff.tar.gzip",
      "application/vnd.docker.image.rootfs.diff.tar",
  };
  for (size_t i = 0; i < ARRAY_SIZE(types); i++)
    if (streq(mt, types[i]))
      return true;
  return false;
}

/* Layers that must not be fetched from the registry (Windows base layers and the like): skipped. */
static bool layer_type_foreign(const char *mt)
{
  return str_has_prefix(mt, "application/vnd.oci.image.layer.nondistributable.v1.tar") ||
         streq(mt, "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip");
}

static void descriptor_clear(manifest_descriptor *d)
{
  free(d->media_type);
  free(d->digest);
  memset(d, 0, sizeof(*d));
}

void manifest_free(manifest *m)
{
  if (!m)
    return;
  free(m->media_type);
  descriptor_clear(&m->config);
  for (size_t i = 0; i < m->n_layers; i++)
    descriptor_clear(&m->layers[i]);
  free(m->layers);
  for (size_t i = 0; i < m->n_manifests; i++)
    descriptor_clear(&m->manifests[i]);
  free(m->manifests);
  free(m);
}

static int copy_platform_field(json_object *o, const char *key, char *dst, size_t size, const char *what,
                               crimage_error **err)
{
  const char *v = json_get_string(o, key);
  if (!v)
    return 0;
  if (strlen(v) >= size)
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "%s: platform %s too long", what, key);
  strcpy(dst, v);
  return 0;
}

static int parse_descriptor(json_object *o, const char *what, bool want_platform, manifest_descriptor *ret,
                            crimage_error **err)
{
  if (!o || !json_object_is_type(o, json_type_object))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "%s: not an object", what);
  const char *mt = json_get_string(o, "mediaType");
  const char *dg = json_get_string(o, "digest");
  int64_t size;
  if (str_empty(mt))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "%s: missing mediaType", what);
  if (strlen(mt) > 255)
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "%s: mediaType too long", what);
  if (!dg || !digest_valid(dg))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "%s: missing or invalid digest", what);
  json_object *sz;
  if (!json_object_object_get_ex(o, "size", &sz) || !json_object_is_type(sz, json_type_int))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "%s: missing or invalid size", what);
  size = json_object_get_int64(sz);
  if (size < 0)
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "%s: negative size", what);

  manifest_descriptor d = {0};
  json_object *plat = json_get_object(o, "platform");
  if (want_platform && plat) {
    int r = copy_platform_field(plat, "os", d.platform.os, sizeof(d.platform.os), what, err);
    if (r == 0)
      r = copy_platform_field(plat, "architecture", d.platform.architecture, sizeof(d.platform.architecture), what,
                              err);
    if (r == 0)
      r = copy_platform_field(plat, "variant", d.platform.variant, sizeof(d.platform.variant), what, err);
    if (r < 0)
      return r;
    d.has_platform = d.platform.os[0] && d.platform.architecture[0];
    if (d.has_platform)
      platform_normalize(&d.platform);
  }
  d.media_type = xstrdup(mt);
  d.digest = xstrdup(dg);
  d.size = size;
  *ret = d;
  return 0;
}

static int parse_image(json_object *root, manifest *m, crimage_error **err)
{
  int r = parse_descriptor(json_get_object(root, "config"), "manifest config", false, &m->config, err);
  if (r < 0)
    return r;
  if (!streq(m->config.media_type, MEDIA_TYPE_OCI_CONFIG) && !streq(m->config.media_type, MEDIA_TYPE_DOCKER_CONFIG))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0,
                             "manifest config has media type %s: not a container image", m->config.media_type);
  if (m->config.size > (int64_t) IMAGE_CONFIG_MAX_SIZE)
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "image config of %lld bytes exceeds the limit",
                             (long long) m->config.size);

  json_object *layers = json_get_array(root, "layers");
  if (!layers)
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "manifest has no layers array");
  size_t n = json_object_array_length(layers);
  if (n > MANIFEST_MAX_LAYERS)
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "manifest has %zu layers, more than the limit of %d",
                             n, MANIFEST_MAX_LAYERS);
  m->layers = xcalloc(n ? n : 1, sizeof(*m->layers));
  for (size_t i = 0; i < n; i++) {
    char what[64];
    snprintf(what, sizeof(what), "manifest layer %zu", i);
    manifest_descriptor d;
    r = parse_descriptor(json_object_array_get_idx(layers, i), what, false, &d, err);
    if (r < 0)
      return r;
    if (layer_type_foreign(d.media_type)) {
      descriptor_clear(&d);
      m->n_skipped_layers++;
      continue;
    }
    if (!layer_type_distributable(d.media_type)) {
      r = crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "%s has unsupported media type %s", what,
                            d.media_type);
      descriptor_clear(&d);
      return r;
    }
    m->layers[m->n_layers++] = d;
  }
  return 0;
}

static int parse_index(json_object *root, manifest *m, crimage_error **err)
{
  json_object *list = json_get_array(root, "manifests");
  if (!list)
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "index has no manifests array");
  size_t n = json_object_array_length(list);
  if (n > MANIFEST_MAX_ENTRIES)
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "index has %zu manifests, more than the limit of %d",
                             n, MANIFEST_MAX_ENTRIES);
  m->manifests = xcalloc(n ? n : 1, sizeof(*m->manifests));
  for (size_t i = 0; i < n; i++) {
    char what[64];
    snprintf(what, sizeof(what), "index entry %zu", i);
    int r = parse_descriptor(json_object_array_get_idx(list, i), what, true, &m->manifests[i], err);
    if (r < 0)
      return r;
    m->n_manifests++;
  }
  return 0;
}

int manifest_parse(const char *data, size_t len, const char *content_type, manifest **ret, crimage_error **err)
{
  if (len > MANIFEST_MAX_SIZE)
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "manifest of %zu bytes exceeds the limit of %u",
                             len, MANIFEST_MAX_SIZE);
  cleanup_json json_object *root = NULL;
  int r = json_parse(data, len, "manifest", MANIFEST_JSON_LIMITS, &root, err);
  if (r < 0)
    return r;
  if (!json_object_is_type(root, json_type_object))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "manifest is not a JSON object");

  int64_t schema = 0;
  if (!json_get_int64(root, "schemaVersion", &schema) || schema != 2)
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0,
                             "manifest schemaVersion is not 2 (Docker schema 1 images are not supported)");

  /* The Content-Type may carry parameters ("; charset=utf-8"). */
  char ct[256] = "";
  if (content_type) {
    size_t n = strcspn(content_type, "; \t");
    if (n < sizeof(ct)) {
      memcpy(ct, content_type, n);
      ct[n] = 0;
    }
  }
  const char *mt = json_get_string(root, "mediaType");
  bool ct_known = manifest_media_type_is_image(ct) || manifest_media_type_is_index(ct);
  if (mt && ct_known && !streq(mt, ct))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0,
                             "manifest mediaType %s disagrees with the Content-Type %s", mt, ct);
  if (!mt && ct_known)
    mt = ct;
  if (!mt) {
    /* The OCI spec makes mediaType optional: tell the two OCI kinds apart by their shape. */
    if (json_get_array(root, "manifests"))
      mt = MEDIA_TYPE_OCI_INDEX;
    else if (json_get_object(root, "config"))
      mt = MEDIA_TYPE_OCI_MANIFEST;
    else
      return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "manifest has no mediaType");
  }

  manifest *m = xcalloc(1, sizeof(*m));
  m->media_type = xstrdup(mt);
  if (manifest_media_type_is_index(mt)) {
    m->kind = MANIFEST_KIND_INDEX;
    r = parse_index(root, m, err);
  } else if (manifest_media_type_is_image(mt)) {
    m->kind = MANIFEST_KIND_IMAGE;
    r = parse_image(root, m, err);
  } else {
    r = crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "unsupported manifest media type %.100s", mt);
  }
  if (r < 0) {
    manifest_free(m);
    return r;
  }
  *ret = m;
  return 0;
}

int manifest_select_platform(const manifest *index, const platform *want, const manifest_descriptor **ret,
                             crimage_error **err)
{
  const manifest_descriptor *match = NULL;
  if (index->kind != MANIFEST_KIND_INDEX)
    return crimage_error_set(err, CRIMAGE_INTERNAL, 0, "not an index");
  for (size_t i = 0; i < index->n_manifests; i++) {
    const manifest_descriptor *d = &index->manifests[i];
    if (!d->has_platform || !manifest_media_type_is_image(d->media_type))
      continue;
    if (streq(d->platform.os, want->os) && streq(d->platform.architecture, want->architecture) &&
        streq(d->platform.variant, want->variant)) {
      match = d;
      break;
    }
    if (!match && platform_match(want, &d->platform))
      match = d;
  }
  if (match) {
    *ret = match;
    return 0;
  }

  char buf[64];
  cleanup_dynbuf dynbuf avail;
  dynbuf_init(&avail, 4096);
  for (size_t i = 0; i < index->n_manifests; i++) {
    const manifest_descriptor *d = &index->manifests[i];
    if (!d->has_platform || !manifest_media_type_is_image(d->media_type) || streq(d->platform.os, "unknown"))
      continue;
    if (dynbuf_printf(&avail, "%s%s", avail.len ? ", " : "", platform_string(&d->platform, buf, sizeof(buf))) < 0)
      break;
  }
  return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "no manifest for platform %s in the index; available: %s",
                           platform_string(want, buf, sizeof(buf)), avail.len ? avail.data : "none");
}

/* Config.User and rootfs.diff_ids of an image config. *ret_diff_ids (NULL-terminated) is NULL when the config has
 * none or they cannot be matched to the layers (n_skipped foreign layers were left out of the manifest). */
int image_config_parse(const char *data, size_t len, size_t n_layers, size_t n_skipped, char **ret_user,
                       char ***ret_diff_ids, crimage_error **err)
{
  cleanup_json json_object *root = NULL;
  if (len > IMAGE_CONFIG_MAX_SIZE)
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "image config of %zu bytes exceeds the limit of %u",
                             len, IMAGE_CONFIG_MAX_SIZE);
  int r = json_parse(data, len, "image config", IMAGE_CONFIG_JSON_LIMITS, &root, err);
  if (r < 0)
    return r;
  if (!json_object_is_type(root, json_type_object))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "image config is not a JSON object");
  json_object *cfg = json_get_object(root, "config"), *uo = NULL;
  const char *user = json_get_string(cfg, "User");
  /* The user goes to kubelet (Image.uid / username, checked against runAsNonRoot): one that a C string would cut
   * short ("nobody\u0000") or that holds control characters is refused, not reported as something else. */
  if (!user && cfg && json_object_object_get_ex(cfg, "User", &uo) && json_object_is_type(uo, json_type_string))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "image config: config.User contains a NUL byte");
  for (const unsigned char *p = (const unsigned char *) (user ? user : ""); *p; p++)
    if (*p < 0x20 || *p == 0x7f)
      return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "image config: config.User contains a control "
                                                                 "character");
  json_object *ids = json_get_array(json_get_object(root, "rootfs"), "diff_ids");
  size_t n = ids ? json_object_array_length(ids) : 0;
  char **diff_ids = NULL;
  if (ids && n_skipped == 0) {
    if (n != n_layers)
      return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "image config lists %zu diff_ids for %zu layers", n,
                               n_layers);
    diff_ids = xcalloc(n + 1, sizeof(char *));
    for (size_t i = 0; i < n; i++) {
      const char *d = json_object_get_string(json_object_array_get_idx(ids, i));
      if (!d || !digest_valid(d)) {
        strv_free(diff_ids);
        return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "image config: diff_ids[%zu] is not a digest", i);
      }
      diff_ids[i] = xstrdup(d);
    }
  }
  *ret_user = xstrdup(user ? user : "");
  *ret_diff_ids = diff_ids;
  return 0;
}
