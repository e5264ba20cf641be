#include <errno.h>
#include <fcntl.h>
#include <yaml.h>

#include "dynbuf.h"
#include "fsutil.h"
#include "json.h"

static int parse(const char *data, size_t len, const char *what, bool utf8, json_object **ret, crimage_error **err)
{
  /* The whole text, strictly: json-c's own JSON_TOKENER_VALIDATE_UTF8 lets overlong forms and surrogates through.
   * Escapes decode to valid UTF-8 (json-c makes a lone surrogate U+FFFD). */
  if (utf8 && !utf8_valid(data, len))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "%s: invalid JSON: not UTF-8", what);
  json_tokener *tok = json_tokener_new_ex(JSON_MAX_DEPTH);
  if (!tok)
    abort();
  if (len > INT32_MAX) {
    json_tokener_free(tok);
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, EFBIG, "%s: too large", what);
  }
  json_object *o = json_tokener_parse_ex(tok, data, (int) len);
  enum json_tokener_error jerr = json_tokener_get_error(tok);
  size_t consumed = json_tokener_get_parse_end(tok);
  json_tokener_free(tok);
  if (!o && jerr == json_tokener_success)
    jerr = json_tokener_error_parse_eof; /* the literal null is not a document we accept either */
  if (jerr != json_tokener_success) {
    if (o)
      json_object_put(o);
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "%s: invalid JSON: %s", what,
                             jerr == json_tokener_continue ? "unexpected end of input" : json_tokener_error_desc(jerr));
  }
  for (size_t i = consumed; i < len; i++) {
    if (data[i] != ' ' && data[i] != '\n' && data[i] != '\r' && data[i] != '\t' && data[i] != '\0') {
      json_object_put(o);
      return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "%s: invalid JSON: trailing data at offset %zu",
                               what, i);
    }
  }
  *ret = o;
  return 0;
}

int json_parse(const char *data, size_t len, const char *what, json_object **ret, crimage_error **err)
{
  return parse(data, len, what, true, ret, err);
}

int json_parse_any_bytes(const char *data, size_t len, const char *what, json_object **ret, crimage_error **err)
{
  return parse(data, len, what, false, ret, err);
}

static json_object *yaml_scalar(const yaml_event_t *ev)
{
  const char *v = (const char *) ev->data.scalar.value;
  size_t len = ev->data.scalar.length;
  if (ev->data.scalar.style == YAML_PLAIN_SCALAR_STYLE && !ev->data.scalar.tag) {
    if (len == 0 || streq(v, "~") || streq(v, "null") || streq(v, "Null") || streq(v, "NULL"))
      return NULL;
    if (streq(v, "true") || streq(v, "True") || streq(v, "TRUE"))
      return json_object_new_boolean(1);
    if (streq(v, "false") || streq(v, "False") || streq(v, "FALSE"))
      return json_object_new_boolean(0);
    char *end = NULL;
    errno = 0;
    long long n = strtoll(v, &end, 10);
    if (!errno && end && *end == '\0' && end != v)
      return json_object_new_int64(n);
    errno = 0;
    double d = strtod(v, &end);
    if (!errno && end && *end == '\0' && end != v && strspn(v, "0123456789.eE+-") == len)
      return json_object_new_double(d);
  }
  return json_object_new_string_len(v, (int) len);
}

/* Adds value to the container on top of the stack; for a mapping, alternates key and value. */
static int yaml_add(json_object *container, char **pending_key, json_object *value)
{
  if (json_object_is_type(container, json_type_array)) {
    json_object_array_add(container, value);
    return 0;
  }
  if (!*pending_key) {
    /* A mapping key: only scalars are accepted as keys. */
    if (value && !json_object_is_type(value, json_type_string) && !json_object_is_type(value, json_type_int) &&
        !json_object_is_type(value, json_type_boolean) && !json_object_is_type(value, json_type_double)) {
      json_object_put(value);
      return -EINVAL;
    }
    *pending_key = xstrdup(value ? json_object_get_string(value) : "");
    json_object_put(value);
    return 0;
  }
  json_object_object_add(container, *pending_key, value);
  free(*pending_key);
  *pending_key = NULL;
  return 0;
}

/* Reads the events of one document (or the end of the stream) from parser. *ret gets the document's root, NULL for
 * an empty document; *ret_stream_end is set when the stream ended before a document started. */
static int yaml_parse_document(yaml_parser_t *parser, const char *what, json_object **ret, bool *ret_stream_end,
                               crimage_error **err)
{
  json_object *stack[JSON_MAX_DEPTH + 1];
  char *keys[JSON_MAX_DEPTH + 1];
  int depth = 0;
  json_object *root = NULL;
  bool done = false, in_document = false;
  int result = 0;

  memset(keys, 0, sizeof(keys));
  *ret_stream_end = false;

  while (!done) {
    yaml_event_t ev;
    if (!yaml_parser_parse(parser, &ev)) {
      result = crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "%s: invalid YAML at line %zu: %s", what,
                                 parser->problem_mark.line + 1, parser->problem ? parser->problem : "syntax error");
      break;
    }
    json_object *value = NULL;
    bool is_value = false;
    switch (ev.type) {
    case YAML_STREAM_END_EVENT:
      if (!in_document)
        *ret_stream_end = true;
      done = true;
      break;
    case YAML_DOCUMENT_START_EVENT:
      in_document = true;
      break;
    case YAML_DOCUMENT_END_EVENT:
      done = true;
      break;
    case YAML_ALIAS_EVENT:
      result = crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "%s: YAML aliases are not supported", what);
      break;
    case YAML_SCALAR_EVENT:
      value = yaml_scalar(&ev);
      is_value = true;
      break;
    case YAML_SEQUENCE_START_EVENT:
    case YAML_MAPPING_START_EVENT:
      if (depth >= JSON_MAX_DEPTH) {
        result = crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "%s: nested deeper than %d levels", what,
                                   JSON_MAX_DEPTH);
        break;
      }
      stack[depth] = ev.type == YAML_SEQUENCE_START_EVENT ? json_object_new_array() : json_object_new_object();
      keys[depth] = NULL;
      depth++;
      break;
    case YAML_SEQUENCE_END_EVENT:
    case YAML_MAPPING_END_EVENT:
      depth--;
      value = stack[depth];
      free(keys[depth]);
      keys[depth] = NULL;
      is_value = true;
      break;
    default:
      break;
    }
    yaml_event_delete(&ev);
    if (result < 0)
      break;
    if (is_value) {
      if (depth == 0) {
        json_object_put(root);
        root = value;
      } else if (yaml_add(stack[depth - 1], &keys[depth - 1], value) < 0) {
        result = crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "%s: a mapping key must be a scalar", what);
        break;
      }
    }
  }
  while (depth > 0) {
    depth--;
    free(keys[depth]);
    json_object_put(stack[depth]);
  }
  if (result < 0) {
    json_object_put(root);
    return result;
  }
  *ret = root;
  return 0;
}

int yaml_parse(const char *data, size_t len, const char *what, json_object **ret, crimage_error **err)
{
  yaml_parser_t parser;
  json_object *root = NULL;
  bool stream_end = false;

  if (!yaml_parser_initialize(&parser))
    abort();
  yaml_parser_set_input_string(&parser, (const unsigned char *) data, len);
  /* Only the first document counts. */
  int r = yaml_parse_document(&parser, what, &root, &stream_end, err);
  yaml_parser_delete(&parser);
  if (r < 0)
    return r;
  if (!root)
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "%s: empty document", what);
  *ret = root;
  return 0;
}

int yaml_parse_all(const char *data, size_t len, const char *what, size_t max_documents, json_object **ret,
                   crimage_error **err)
{
  yaml_parser_t parser;
  json_object *docs = json_object_new_array();
  int r = 0;

  if (!yaml_parser_initialize(&parser))
    abort();
  yaml_parser_set_input_string(&parser, (const unsigned char *) data, len);
  for (size_t index = 1;; index++) {
    json_object *doc = NULL;
    bool stream_end = false;
    cleanup_free char *doc_what = xasprintf("%s (document %zu)", what, index);
    r = yaml_parse_document(&parser, doc_what, &doc, &stream_end, err);
    if (r < 0 || stream_end)
      break;
    if (!doc)
      continue; /* an empty document, e.g. a leading or trailing "---" */
    if (json_object_array_length(docs) >= max_documents) {
      json_object_put(doc);
      r = crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "%s: more than %zu documents", what, max_documents);
      break;
    }
    json_object_array_add(docs, doc);
  }
  yaml_parser_delete(&parser);
  if (r < 0) {
    json_object_put(docs);
    return r;
  }
  *ret = docs;
  return 0;
}

int yaml_parse_file(const char *path, size_t max_size, json_object **ret, crimage_error **err)
{
  cleanup_free char *data = NULL;
  size_t len = 0;
  int r = read_file(path, max_size, &data, &len, err);
  if (r < 0)
    return r;
  return yaml_parse(data, len, path, ret, err);
}

const char *json_get_string(json_object *o, const char *key)
{
  json_object *v;
  if (!o || !json_object_object_get_ex(o, key, &v) || !json_object_is_type(v, json_type_string))
    return NULL;
  const char *s = json_object_get_string(v);
  /* "\u0000" inside a string: as a C string it would silently end there ("root\u0000junk" read as "root"). */
  if (strlen(s) != (size_t) json_object_get_string_len(v))
    return NULL;
  return s;
}

json_object *json_get_object(json_object *o, const char *key)
{
  json_object *v;
  if (!o || !json_object_object_get_ex(o, key, &v) || !json_object_is_type(v, json_type_object))
    return NULL;
  return v;
}

json_object *json_get_array(json_object *o, const char *key)
{
  json_object *v;
  if (!o || !json_object_object_get_ex(o, key, &v) || !json_object_is_type(v, json_type_array))
    return NULL;
  return v;
}

bool json_get_int64(json_object *o, const char *key, int64_t *ret)
{
  json_object *v;
  if (!o || !json_object_object_get_ex(o, key, &v) || !json_object_is_type(v, json_type_int))
    return false;
  *ret = json_object_get_int64(v);
  return true;
}
