/* One data model for config files, Secrets and plugin I/O: json-c objects, parsed from JSON or from YAML with
 * limits on size and nesting. */
#ifndef CRIMAGE_COMMON_JSON_H
#define CRIMAGE_COMMON_JSON_H

#include <json-c/json.h>
#include <stdbool.h>
#include <stdint.h>

#include "error.h"
#include "util.h"

#define JSON_MAX_DEPTH 64

static inline void json_putp(json_object **o)
{
  if (*o)
    json_object_put(*o);
}
#define cleanup_json _cleanup_(json_putp)

/* Parses exactly one JSON document (trailing garbage is an error). what names the input in error messages. Its
 * strings must be UTF-8, as JSON requires (RFC 8259): what a registry sends ends up in CRI replies, where protobuf
 * requires UTF-8. */
int json_parse(const char *data, size_t len, const char *what, json_object **ret, crimage_error **err);
/* The same, but strings may hold any bytes: for a document whose entries are checked one by one, so that one bad
 * entry does not make the whole document unreadable (the store's index.json). */
int json_parse_any_bytes(const char *data, size_t len, const char *what, json_object **ret, crimage_error **err);
/* Parses one YAML document into json-c objects: mappings -> objects, sequences -> arrays, plain scalars that look
 * like null/bool/int/float get that type, everything else is a string. JSON is YAML, so this reads both. */
int yaml_parse(const char *data, size_t len, const char *what, json_object **ret, crimage_error **err);
/* Parses every document of a YAML stream ("---"-separated) into a json-c array, in order; empty documents are
 * skipped, so the array may be empty. At most max_documents documents. */
int yaml_parse_all(const char *data, size_t len, const char *what, size_t max_documents, json_object **ret,
                   crimage_error **err);
/* Reads a file (at most max_size bytes) and parses it with yaml_parse. */
int yaml_parse_file(const char *path, size_t max_size, json_object **ret, crimage_error **err);

/* Typed getters that return NULL/default when the key is missing or has another type (or, for a string, holds a
 * NUL). */
const char *json_get_string(json_object *o, const char *key);
json_object *json_get_object(json_object *o, const char *key);
json_object *json_get_array(json_object *o, const char *key);
bool json_get_int64(json_object *o, const char *key, int64_t *ret);

#endif
