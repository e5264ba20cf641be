#include <errno.h>

#include "common/dynbuf.h"
#include "common/util.h"
#include "cri/wire.h"

enum { WIRE_VARINT = 0, WIRE_64BIT = 1, WIRE_LENGTH = 2, WIRE_32BIT = 5 };

typedef struct walk {
  size_t fields;
  crimage_error **err;
  /* The names of the fields we are inside, for the message: "image", "annotations", ... */
  const char *path[WIRE_MAX_DEPTH + 1];
} walk;

static bool read_varint(const uint8_t **p, const uint8_t *end, uint64_t *ret)
{
  uint64_t v = 0;
  for (unsigned shift = 0; shift < 64 && *p < end; shift += 7) {
    uint8_t b = *(*p)++;
    v |= (uint64_t) (b & 0x7f) << shift;
    if (!(b & 0x80)) {
      *ret = v;
      return true;
    }
  }
  return false; /* truncated, or longer than 10 bytes */
}

static int field_error(walk *w, unsigned depth, const char *name, const char *problem)
{
  cleanup_dynbuf dynbuf path;
  dynbuf_init(&path, 4096);
  for (unsigned i = 0; i < depth; i++)
    (void) dynbuf_printf(&path, "%s.", w->path[i]);
  (void) dynbuf_append_str(&path, name);
  crimage_error_set(w->err, CRIMAGE_INVALID_ARGUMENT, 0, "field %s %s", path.data, problem);
  return -EINVAL;
}

static int walk_message(walk *w, const ProtobufCMessageDescriptor *desc, const uint8_t *p, const uint8_t *end,
                        unsigned depth)
{
  while (p < end) {
    uint64_t key, n;
    if (!read_varint(&p, end, &key))
      return -EBADMSG;
    if (++w->fields > WIRE_MAX_FIELDS) {
      crimage_error_set(w->err, CRIMAGE_INVALID_ARGUMENT, 0, "the request has more than %d fields", WIRE_MAX_FIELDS);
      return -E2BIG;
    }
    uint64_t number = key >> 3;
    if (number == 0 || number > 536870911) /* 2^29 - 1, the largest field number */
      return -EBADMSG;
    switch (key & 7) {
    case WIRE_VARINT:
      if (!read_varint(&p, end, &n))
        return -EBADMSG;
      break;
    case WIRE_64BIT:
    case WIRE_32BIT: {
      size_t size = (key & 7) == WIRE_64BIT ? 8 : 4;
      if ((size_t) (end - p) < size)
        return -EBADMSG;
      p += size;
      break;
    }
    case WIRE_LENGTH: {
      if (!read_varint(&p, end, &n) || n > (uint64_t) (end - p))
        return -EBADMSG;
      const ProtobufCFieldDescriptor *f = protobuf_c_message_descriptor_get_field(desc, (unsigned) number);
      if (f && f->type == PROTOBUF_C_TYPE_STRING) {
        if (memchr(p, '\0', n))
          return field_error(w, depth, f->name, "contains a NUL byte");
        if (!utf8_valid((const char *) p, n))
          return field_error(w, depth, f->name, "is not valid UTF-8");
      } else if (f && f->type == PROTOBUF_C_TYPE_MESSAGE) {
        if (depth >= WIRE_MAX_DEPTH) {
          crimage_error_set(w->err, CRIMAGE_INVALID_ARGUMENT, 0, "the request nests messages deeper than %d levels",
                            WIRE_MAX_DEPTH);
          return -ELOOP;
        }
        w->path[depth] = f->name;
        int r = walk_message(w, f->descriptor, p, p + n, depth + 1);
        if (r < 0)
          return r;
      }
      /* bytes, packed repeated scalars and unknown fields: any content */
      p += n;
      break;
    }
    default:
      return -EBADMSG; /* groups (3, 4) are not proto3, 6 and 7 do not exist */
    }
  }
  return 0;
}

static size_t repair_string(char *s, const ProtobufCFieldDescriptor *f, const char **ret_first)
{
  /* An unset string is protobuf-c's shared, read-only "": nothing to repair there and nothing written. */
  if (!s || !*s || utf8_valid(s, strlen(s)))
    return 0;
  utf8_repair(s);
  if (ret_first && !*ret_first)
    *ret_first = f->name;
  return 1;
}

static size_t repair_message(ProtobufCMessage *m, unsigned depth, const char **ret_first)
{
  if (!m || depth > WIRE_MAX_DEPTH)
    return 0;
  const ProtobufCMessageDescriptor *d = m->descriptor;
  char *base = (char *) m;
  size_t fixed = 0;
  for (unsigned i = 0; i < d->n_fields; i++) {
    const ProtobufCFieldDescriptor *f = &d->fields[i];
    if (f->type != PROTOBUF_C_TYPE_STRING && f->type != PROTOBUF_C_TYPE_MESSAGE)
      continue;
    if (f->label == PROTOBUF_C_LABEL_REPEATED) {
      size_t n = *(size_t *) (base + f->quantifier_offset);
      void **v = *(void ***) (base + f->offset);
      for (size_t j = 0; j < n && v; j++)
        fixed += f->type == PROTOBUF_C_TYPE_STRING ? repair_string(v[j], f, ret_first)
                                                   : repair_message(v[j], depth + 1, ret_first);
      continue;
    }
    /* a member of a oneof is set only when the oneof's case names it */
    if ((f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF) && *(uint32_t *) (base + f->quantifier_offset) != f->id)
      continue;
    void *v = *(void **) (base + f->offset);
    fixed += f->type == PROTOBUF_C_TYPE_STRING ? repair_string(v, f, ret_first)
                                               : repair_message(v, depth + 1, ret_first);
  }
  return fixed;
}

size_t wire_repair_strings(ProtobufCMessage *msg, const char **ret_first)
{
  if (ret_first)
    *ret_first = NULL;
  return repair_message(msg, 0, ret_first);
}

int wire_validate(const ProtobufCMessageDescriptor *desc, const uint8_t *data, size_t len, crimage_error **err)
{
  walk w = {.err = err};
  return walk_message(&w, desc, data, data + len, 0);
}
