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

/* What building one document's tree may cost. json-c builds the whole tree before the caller sees any of it, and
 * a small text can make a big tree (a 3 MB array of a million empty objects takes about 800 MB), so every parse
 * first measures the text with a scanner that allocates nothing and stops at the first limit crossed; only a text
 * within the limits reaches json-c. The limits are per kind of document, next to its size limit. */
typedef struct json_limits {
  /* An estimate of what json-c allocates for the tree (see JSON_COST_* in json.c: measured on json-c 0.16, it is
   * never below the real figure): an empty object costs about 800 bytes, a number 112, a string 112 + its length. */
  size_t max_tree_bytes;
  /* And at most JSON_TREE_BASE + this many bytes of tree per byte of text (0: no such bound), so that no document
   * costs more than a small multiple of its size: real manifests, configs and docker configs take 2 to 25 times
   * their size, a text of empty objects 270 times. */
  size_t tree_per_byte;
  size_t max_elements; /* members of any one object, elements of any one array */
  bool quiet;          /* the document may hold secrets: errors give offsets, never a key */
} json_limits;

#define JSON_TREE_BASE ((size_t) 64 << 10)
#define JSON_TREE_PER_BYTE 32
#define JSON_LIMITS(tree, elements)                                                                                   \
  (&(const json_limits){.max_tree_bytes = (tree), .tree_per_byte = JSON_TREE_PER_BYTE, .max_elements = (elements)})
#define JSON_LIMITS_QUIET(tree, elements)                                                                             \
  (&(const json_limits){                                                                                              \
      .max_tree_bytes = (tree), .tree_per_byte = JSON_TREE_PER_BYTE, .max_elements = (elements), .quiet = true})

/* Checks text against limits (and JSON_MAX_DEPTH) as json_parse does before building anything; nothing is
 * allocated. INVALID_ARGUMENT naming the limit and the offset. Malformed JSON is not reported here (the parser
 * does that), but it is measured as far as it goes, so what the parser could build before failing is bounded too. */
int json_check_limits(const char *data, size_t len, const char *what, const json_limits *limits, crimage_error **err);

/* Parses exactly one JSON document (RFC 8259, strictly: no comments, single quotes or trailing commas; trailing
 * garbage is an error) within limits. what names the input in error messages. Its strings must be UTF-8, as JSON
 * requires: what a registry sends ends up in CRI replies, where protobuf requires UTF-8. */
int json_parse(const char *data, size_t len, const char *what, const json_limits *limits, json_object **ret,
               crimage_error **err);
/* The same, but strings may hold any bytes: for a document whose entries are checked one by one, so that one bad
 * entry does not make the whole document unreadable (the store's index.json). */
int json_parse_any_bytes(const char *data, size_t len, const char *what, const json_limits *limits,
                         json_object **ret, crimage_error **err);
/* Parses one YAML document into json-c objects: mappings -> objects, sequences -> arrays, plain scalars that look
 * like null/bool/int/float get that type, everything else is a string. JSON is YAML, so this reads both. The
 * limits are counted as libyaml's events arrive, so the tree never grows past them. */
int yaml_parse(const char *data, size_t len, const char *what, const json_limits *limits, json_object **ret,
               crimage_error **err);
/* Parses every document of a YAML stream ("---"-separated) into a json-c array, in order; empty documents are
 * skipped, so the array may be empty. At most max_documents documents; limits cover all of them together. */
int yaml_parse_all(const char *data, size_t len, const char *what, size_t max_documents, const json_limits *limits,
                   json_object **ret, crimage_error **err);
/* Reads a file (at most max_size bytes) and parses it with yaml_parse. */
int yaml_parse_file(const char *path, size_t max_size, const json_limits *limits, json_object **ret,
                    crimage_error **err);

/* Typed getters that return NULL/default when the key is missing or has another type (or, for a string, holds a
 * NUL). */
const char *json_get_string(json_object *o, const char *key);
json_object *json_get_object(json_object *o, const char *key);
json_object *json_get_array(json_object *o, const char *key);
bool json_get_int64(json_object *o, const char *key, int64_t *ret);

#endif
