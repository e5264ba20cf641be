/* Client of the image service of containerd's CRI plugin (runtime.v1.ImageService on containerd's socket): only
 * ImageStatus, to learn when containerd's CRI has taken in an image another client created. */
#include "common/util.h"
#include "cri/api.pb-c.h"
#include "cri/containerd/containerd.h"

int ctrd_cri_image_present(const ctrd_ctx *c, const char *image, bool *ret, crimage_error **err)
{
  /* The CRI plugin serves its own namespace and reads no namespace metadata. */
  Runtime__V1__ImageSpec spec = RUNTIME__V1__IMAGE_SPEC__INIT;
  spec.image = (char *) image;
  Runtime__V1__ImageStatusRequest req = RUNTIME__V1__IMAGE_STATUS_REQUEST__INIT;
  req.image = &spec;
  ProtobufCMessage *reply = NULL;
  int r = rpc_client_unary(c->rpc, "/runtime.v1.ImageService/ImageStatus", NULL, 0, c->timeout_ms, &req.base,
                           &runtime__v1__image_status_response__descriptor, &reply, err);
  if (r < 0)
    return r;
  *ret = ((Runtime__V1__ImageStatusResponse *) reply)->image != NULL;
  protobuf_c_message_free_unpacked(reply, NULL);
  return 0;
}
