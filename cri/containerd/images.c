/* Client of containerd.services.images.v1.Images: Get, List, Create, Update, Delete. */
#include <errno.h>

#include "common/util.h"
#include "cri/containerd/containerd.h"
#include "cri/containerd/images.pb-c.h"

#define IMAGES_SERVICE "/containerd.services.images.v1.Images/"
/* Records in one List reply at most: a namespace holds far fewer images than this. */
#define LIST_MAX 100000

void ctrd_image_free(ctrd_image *img)
{
  if (!img)
    return;
  free(img->name);
  free(img->target.media_type);
  free(img->target.digest);
  strv_free(img->label_keys);
  strv_free(img->label_values);
  free(img);
}

void ctrd_image_list_free(ctrd_image **list, size_t n)
{
  for (size_t i = 0; i < n; i++)
    ctrd_image_free(list[i]);
  free(list);
}

const char *ctrd_image_label(const ctrd_image *img, const char *key)
{
  for (size_t i = 0; img->label_keys && img->label_keys[i]; i++)
    if (streq(img->label_keys[i], key))
      return img->label_values[i];
  return NULL;
}

static ctrd_image *image_from_pb(const Containerd__Services__Images__V1__Image *in)
{
  ctrd_image *img = xcalloc(1, sizeof(*img));
  img->name = xstrdup(in->name ? in->name : "");
  if (in->target) {
    img->target.media_type = xstrdup(in->target->media_type ? in->target->media_type : "");
    img->target.digest = xstrdup(in->target->digest ? in->target->digest : "");
    img->target.size = in->target->size;
  } else {
    img->target.media_type = xstrdup("");
    img->target.digest = xstrdup("");
  }
  img->label_keys = xcalloc(in->n_labels + 1, sizeof(char *));
  img->label_values = xcalloc(in->n_labels + 1, sizeof(char *));
  for (size_t i = 0; i < in->n_labels; i++) {
    img->label_keys[i] = xstrdup(in->labels[i]->key ? in->labels[i]->key : "");
    img->label_values[i] = xstrdup(in->labels[i]->value ? in->labels[i]->value : "");
  }
  return img;
}

int ctrd_images_get(const ctrd_ctx *c, const char *name, ctrd_image **ret, crimage_error **err)
{
  rpc_metadata md[2];
  size_t n_md = ctrd_metadata(c, md);
  Containerd__Services__Images__V1__GetImageRequest req = CONTAINERD__SERVICES__IMAGES__V1__GET_IMAGE_REQUEST__INIT;
  req.name = (char *) name;
  ProtobufCMessage *reply = NULL;
  crimage_error *e = NULL;
  int r = rpc_client_unary(c->rpc, IMAGES_SERVICE "Get", md, n_md, c->timeout_ms, &req.base,
                           &containerd__services__images__v1__get_image_response__descriptor, &reply, &e);
  if (r < 0)
    return ctrd_not_found(&e, err) ? 0 : r;
  const Containerd__Services__Images__V1__GetImageResponse *resp =
      (const Containerd__Services__Images__V1__GetImageResponse *) reply;
  r = resp->image ? 1 : 0;
  if (resp->image)
    *ret = image_from_pb(resp->image);
  protobuf_c_message_free_unpacked(reply, NULL);
  return r;
}

int ctrd_images_list(const ctrd_ctx *c, const char *filter, ctrd_image ***ret, size_t *ret_n, crimage_error **err)
{
  rpc_metadata md[2];
  size_t n_md = ctrd_metadata(c, md);
  Containerd__Services__Images__V1__ListImagesRequest req =
      CONTAINERD__SERVICES__IMAGES__V1__LIST_IMAGES_REQUEST__INIT;
  char *filters[1] = {(char *) filter};
  if (filter) {
    req.filters = filters;
    req.n_filters = 1;
  }
  ProtobufCMessage *reply = NULL;
  int r = rpc_client_unary(c->rpc, IMAGES_SERVICE "List", md, n_md, c->timeout_ms, &req.base,
                           &containerd__services__images__v1__list_images_response__descriptor, &reply, err);
  if (r < 0)
    return r;
  const Containerd__Services__Images__V1__ListImagesResponse *resp =
      (const Containerd__Services__Images__V1__ListImagesResponse *) reply;
  if (resp->n_images > LIST_MAX) {
    protobuf_c_message_free_unpacked(reply, NULL);
    return crimage_error_set(err, CRIMAGE_RESOURCE_EXHAUSTED, 0, "containerd lists %zu images, more than %d",
                             resp->n_images, LIST_MAX);
  }
  ctrd_image **list = xcalloc(resp->n_images + 1, sizeof(*list));
  for (size_t i = 0; i < resp->n_images; i++)
    list[i] = image_from_pb(resp->images[i]);
  *ret = list;
  *ret_n = resp->n_images;
  protobuf_c_message_free_unpacked(reply, NULL);
  return 0;
}

/* Create (update false) or Update of a record with target (NULL: unchanged) and labels; an update changes only
 * the target (when given) and the labels named. */
static int put_call(const ctrd_ctx *c, const char *name, const ctrd_descriptor *target, const ctrd_label *labels,
                    size_t n_labels, bool update, crimage_error **err)
{
  rpc_metadata md[2];
  size_t n_md = ctrd_metadata(c, md);
  Containerd__Types__Descriptor desc = CONTAINERD__TYPES__DESCRIPTOR__INIT;
  Containerd__Services__Images__V1__Image img = CONTAINERD__SERVICES__IMAGES__V1__IMAGE__INIT;
  img.name = (char *) name;
  if (target) {
    desc.media_type = target->media_type;
    desc.digest = target->digest;
    desc.size = target->size;
    img.target = &desc;
  }
  Containerd__Services__Images__V1__Image__LabelsEntry entries[n_labels ? n_labels : 1];
  Containerd__Services__Images__V1__Image__LabelsEntry *entry_ptrs[n_labels ? n_labels : 1];
  char *paths[n_labels + 1];
  size_t n_paths = 0;
  if (update && target)
    paths[n_paths++] = xstrdup("target");
  for (size_t i = 0; i < n_labels; i++) {
    if (update)
      paths[n_paths++] = xasprintf("labels.%s", labels[i].key);
    if (!labels[i].value)
      continue;
    containerd__services__images__v1__image__labels_entry__init(&entries[img.n_labels]);
    entries[img.n_labels].key = (char *) labels[i].key;
    entries[img.n_labels].value = (char *) labels[i].value;
    entry_ptrs[img.n_labels] = &entries[img.n_labels];
    img.n_labels++;
  }
  img.labels = entry_ptrs;
  ProtobufCMessage *reply = NULL;
  int r;
  if (update) {
    Google__Protobuf__FieldMask mask = GOOGLE__PROTOBUF__FIELD_MASK__INIT;
    mask.paths = paths;
    mask.n_paths = n_paths;
    Containerd__Services__Images__V1__UpdateImageRequest req =
        CONTAINERD__SERVICES__IMAGES__V1__UPDATE_IMAGE_REQUEST__INIT;
    req.image = &img;
    req.update_mask = &mask;
    r = rpc_client_unary(c->rpc, IMAGES_SERVICE "Update", md, n_md, c->timeout_ms, &req.base,
                         &containerd__services__images__v1__update_image_response__descriptor, &reply, err);
  } else {
    Containerd__Services__Images__V1__CreateImageRequest req =
        CONTAINERD__SERVICES__IMAGES__V1__CREATE_IMAGE_REQUEST__INIT;
    req.image = &img;
    r = rpc_client_unary(c->rpc, IMAGES_SERVICE "Create", md, n_md, c->timeout_ms, &req.base,
                         &containerd__services__images__v1__create_image_response__descriptor, &reply, err);
  }
  for (size_t i = 0; i < n_paths; i++)
    free(paths[i]);
  if (reply)
    protobuf_c_message_free_unpacked(reply, NULL);
  return r;
}

int ctrd_images_put(const ctrd_ctx *c, const char *name, const ctrd_descriptor *target, const ctrd_label *labels,
                    size_t n_labels, crimage_error **err)
{
  crimage_error *e = NULL;
  int r = put_call(c, name, target, labels, n_labels, false, &e);
  if (r < 0 && e->status == CRIMAGE_ALREADY_EXISTS) {
    crimage_error_clear(&e);
    return put_call(c, name, target, labels, n_labels, true, err);
  }
  if (r < 0)
    *err = e;
  return r;
}

int ctrd_images_update_labels(const ctrd_ctx *c, const char *name, const ctrd_label *labels, size_t n_labels,
                              crimage_error **err)
{
  return put_call(c, name, NULL, labels, n_labels, true, err);
}

int ctrd_images_delete(const ctrd_ctx *c, const char *name, crimage_error **err)
{
  rpc_metadata md[2];
  size_t n_md = ctrd_metadata(c, md);
  Containerd__Services__Images__V1__DeleteImageRequest req =
      CONTAINERD__SERVICES__IMAGES__V1__DELETE_IMAGE_REQUEST__INIT;
  req.name = (char *) name;
  ProtobufCMessage *reply = NULL;
  crimage_error *e = NULL;
  int r = rpc_client_unary(c->rpc, IMAGES_SERVICE "Delete", md, n_md, c->timeout_ms, &req.base,
                           &google__protobuf__empty__descriptor, &reply, &e);
  if (reply)
    protobuf_c_message_free_unpacked(reply, NULL);
  if (r < 0)
    return ctrd_not_found(&e, err) ? 0 : r;
  return 0;
}
