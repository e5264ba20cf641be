/* Checks of a request's protobuf wire bytes that unpacking cannot make. protobuf-c unpacks a string field into a
 * NUL-terminated copy, so a NUL inside it silently cuts the string short ("<name>\0junk" acts on <name>), and it
 * takes any bytes for a string, where protobuf requires UTF-8. Walking the bytes against the message descriptor
 * (recursively, into every nested message and map entry) finds both, for every field of every service. */
#ifndef CRIMAGE_CRI_WIRE_H
#define CRIMAGE_CRI_WIRE_H

#include <protobuf-c/protobuf-c.h>
#include <stddef.h>
#include <stdint.h>

#include "common/error.h"

#define WIRE_MAX_DEPTH 32       /* nested messages; CRI requests nest 4 deep */
#define WIRE_MAX_FIELDS 65536   /* field values in one request, so unpacking one costs a bounded number of
                                   allocations (a pod's annotations are at most 256 KiB in Kubernetes) */

/* Returns 0 when every string field of the message desc (data, len) is valid UTF-8 without a NUL; otherwise
 * INVALID_ARGUMENT naming the field by its path ("image.runtime_handler", "auth.password"; never its value), also
 * for more than WIRE_MAX_FIELDS values or WIRE_MAX_DEPTH levels. Returns -EBADMSG without setting *err when the
 * bytes are no well-formed protobuf at all: the caller reports a request that does not parse. */
int wire_validate(const ProtobufCMessageDescriptor *desc, const uint8_t *data, size_t len, crimage_error **err);

/* The last line of defence for replies: whatever got into the data a reply is built from (the store checks what it
 * records and loads), a reply must stay valid protobuf, or strict clients refuse it whole, and one bad image would
 * break every ListImages. Replaces each byte of the message's string fields (recursively) that is not part of
 * well-formed UTF-8 by '?', in place. Returns how many strings it changed; *ret_first (may be NULL) gets the name
 * of the first such field. */
size_t wire_repair_strings(ProtobufCMessage *msg, const char **ret_first);

#endif
