/* CRI request messages as they arrive on the socket (cri/wire.h, then protobuf-c): the first byte picks the
 * method of runtime.v1.ImageService or crimage.v1.PullProgress, the rest is its request. wire_validate walks the
 * bytes; what it accepts is unpacked, its strings repaired (a no-op on what wire_validate accepted) and freed. */
#include <stdlib.h>

#include "cri/api.pb-c.h"
#include "cri/crimage.pb-c.h"
#include "cri/wire.h"
#include "fuzz.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
  if (size == 0)
    return 0;
  const ProtobufCServiceDescriptor *services[] = {&runtime__v1__image_service__descriptor,
                                                  &crimage__v1__pull_progress__descriptor};
  size_t n0 = services[0]->n_methods, pick = data[0] % (n0 + services[1]->n_methods);
  const ProtobufCMessageDescriptor *desc =
      pick < n0 ? services[0]->methods[pick].input : services[1]->methods[pick - n0].input;
  crimage_error *err = NULL;
  int r = wire_validate(desc, data + 1, size - 1, &err);
  crimage_error_free(err);
  if (r == 0) {
    ProtobufCMessage *msg = protobuf_c_message_unpack(desc, NULL, size - 1, data + 1);
    if (msg) {
      const char *field = NULL;
      if (wire_repair_strings(msg, &field) != 0)
        abort(); /* wire_validate let a string through that is not UTF-8 */
      protobuf_c_message_free_unpacked(msg, NULL);
    }
  }
  return 0;
}
