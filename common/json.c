#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <fcntl.h>
#include <yaml.h>

#include "dynbuf.h"
#include "fsutil.h"
#include "json.h"

/* What json-c 0.16 allocates for each kind of node on x86-64 with glibc, measured with mallinfo2 and rounded up
 * (tests/unit/test-json.c checks that the estimate stays above the real figure): an empty object 784 bytes (its
 * hash table starts with 16 slots), each member another 40-120 bytes as the table doubles, plus a copy of its key;
 * an array 144 bytes, 8-16 more per element; a number, boolean or short string 64-112 bytes; a longer string also
 * its bytes. The literal null allocates nothing but is counted as a scalar. The tokener's own buffers grow by a few
 * hundred bytes while it parses: a base cost per document. */
#define JSON_COST_DOCUMENT 1024
#define JSON_COST_OBJECT 800
#define JSON_COST_MEMBER 128 /* + the key's length */
#define JSON_COST_ARRAY 160
#define JSON_COST_ELEMENT 16
#define JSON_COST_SCALAR 112 /* + a string's length */

/* A key that may appear in a message: a short identifier, the structure of a document ("layers", "history"), never
 * a value; documents marked quiet get none at all. */
static void describe_key(const json_limits *lim, const char *key, size_t len, char *buf, size_t size)
{
  buf[0] = '\0';
  if (lim->quiet || len == 0 || len > 40)
    return;
  for (size_t i = 0; i < len; i++) {
    char c = key[i];
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '.' ||
          c == '-'))
      return;
  }
  snprintf(buf, size, " `%.*s`", (int) len, key);
}

/* A limit crossed: INVALID_ARGUMENT, returning -E2BIG so that a caller can tell it from malformed text (the
 * message does not end in strerror's "Argument list too long"). */
static int limit_error(crimage_error **err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int limit_error(crimage_error **err, const char *fmt, ...)
{
  if (!err || *err)
    return -E2BIG;
  va_list ap;
  va_start(ap, fmt);
  char *msg = NULL;
  if (vasprintf(&msg, fmt, ap) < 0)
    abort();
  va_end(ap);
  crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "%s", msg);
  free(msg);
  (*err)->errnum = E2BIG;
  return -E2BIG;
}

static int too_many_elements(const json_limits *lim, const char *what, bool object, const char *key, size_t key_len,
                             size_t offset, crimage_error **err)
{
  char k[64];
  describe_key(lim, key, key_len, k, sizeof(k));
  return limit_error(err, "%s: %s%s has more than %zu %s (at offset %zu)", what, object ? "an object" : "an array", k,
                     lim->max_elements, object ? "members" : "elements", offset);
}

/* The tree budget of a text of len bytes. */
static uint64_t tree_budget(const json_limits *lim, size_t len)
{
  uint64_t budget = lim->max_tree_bytes;
  if (lim->tree_per_byte > 0 && len < (UINT64_MAX - JSON_TREE_BASE) / lim->tree_per_byte &&
      JSON_TREE_BASE + (uint64_t) len * lim->tree_per_byte < budget)
    budget = JSON_TREE_BASE + (uint64_t) len * lim->tree_per_byte;
  return budget;
}

static int too_costly(uint64_t budget, const char *what, const char *unit, size_t offset, crimage_error **err)
{
  return limit_error(err, "%s: too many values for its size: holding them would take more than %" PRIu64
                          " KiB (at %s %zu)",
                     what, budget / 1024, unit, offset);
}

typedef struct scan_frame {
  bool object;
  bool want_key;     /* an object's next string is a key */
  size_t n;          /* members or elements so far */
  size_t key, key_len; /* the key this container is the value of (offset into the text), for messages */
} scan_frame;

int json_check_limits(const char *data, size_t len, const char *what, const json_limits *lim, crimage_error **err)
{
  scan_frame stack[JSON_MAX_DEPTH];
  size_t depth = 0, last_key = 0, last_key_len = 0;
  uint64_t cost = JSON_COST_DOCUMENT, budget = tree_budget(lim, len);
  /* The scan follows json-c's strict tokenizer as far as valid JSON goes: strings end at an unescaped quote, and
   * everything else between the structural characters is one literal. Each value is counted when it starts. */
  for (size_t i = 0; i < len; i++) {
    char c = data[i];
    if (c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == ':')
      continue;
    if (c == ',') {
      if (depth > 0 && stack[depth - 1].object)
        stack[depth - 1].want_key = true;
      continue;
    }
    if (c == '}' || c == ']') {
      if (depth == 0 || --depth == 0)
        return 0; /* the document ends here (or is malformed: the parser says so) */
      continue;
    }
    scan_frame *top = depth > 0 ? &stack[depth - 1] : NULL;
    bool is_key = top && top->object && top->want_key && c == '"';
    if (top && (is_key || !top->object)) {
      if (++top->n > lim->max_elements)
        return too_many_elements(lim, what, top->object, data + top->key, top->key_len, i, err);
      cost += top->object ? 0 : JSON_COST_ELEMENT;
    }
    if (c == '"') {
      size_t start = i + 1;
      for (i = start; i < len && data[i] != '"'; i++)
        if (data[i] == '\\')
          i++;
      size_t slen = (i < len ? i : len) - start;
      if (is_key) {
        top->want_key = false;
        last_key = start;
        last_key_len = slen;
        cost += JSON_COST_MEMBER + slen;
      } else {
        cost += JSON_COST_SCALAR + slen;
      }
    } else if (c == '{' || c == '[') {
      if (depth >= JSON_MAX_DEPTH)
        return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "%s: nested deeper than %d levels (at offset %zu)",
                                 what, JSON_MAX_DEPTH, i);
      bool in_object = top && top->object;
      stack[depth++] = (scan_frame){.object = c == '{', .want_key = c == '{', .key = in_object ? last_key : 0,
                                    .key_len = in_object ? last_key_len : 0};
      cost += c == '{' ? JSON_COST_OBJECT : JSON_COST_ARRAY;
    } else if (c == '-' || (c >= '0' && c <= '9') || c == 't' || c == 'f' || c == 'n') {
      while (i + 1 < len && !strchr(" \t\r\n,:[]{}\"'/", data[i + 1]))
        i++;
      cost += JSON_COST_SCALAR;
    } else {
      /* Not JSON. json-c, even strict, would read some of it (single-quoted strings, comments) in ways this scan
       * does not follow, and build a tree of what the scan skipped. */
      return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "%s: invalid JSON: unexpected character at offset %zu",
                               what, i);
    }
    if (cost > budget)
      return too_costly(budget, what, "offset", i, err);
    if (depth == 0)
      return 0; /* a lone scalar */
  }
  return 0;
}

static int parse(const char *data, size_t len, const char *what, const json_limits *lim, bool utf8,
                 json_object **ret, crimage_error **err)
{
  /* The whole text, strictly: json-c's own JSON_TOKENER_VALIDATE_UTF8 lets overlong forms and surrogates through.
   * Escapes decode to valid UTF-8 (json-c makes a lone surrogate U+FFFD). */
  if (utf8 && !utf8_valid(data, len))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "%s: invalid JSON: not UTF-8", what);
  if (len > INT32_MAX)
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, EFBIG, "%s: too large", what);
  int r = json_check_limits(data, len, what, lim, err);
  if (r < 0)
    return r;
  json_tokener *tok = json_tokener_new_ex(JSON_MAX_DEPTH);
  if (!tok)
    abort();
  /* Strict: what the scanner above measured is exactly what json-c may build (no comments or single-quoted
   * strings it would read differently). */
  json_tokener_set_flags(tok, JSON_TOKENER_STRICT);
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

int json_parse(const char *data, size_t len, const char *what, const json_limits *limits, json_object **ret,
               crimage_error **err)
{
  return parse(data, len, what, limits, true, ret, err);
}

int json_parse_any_bytes(const char *data, size_t len, const char *what, const json_limits *limits,
                         json_object **ret, crimage_error **err)
{
  return parse(data, len, what, limits, false, ret, err);
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
static int yaml_parse_document(yaml_parser_t *parser, const char *what, const json_limits *lim, uint64_t budget,
                               uint64_t *cost, json_object **ret, bool *ret_stream_end, crimage_error **err)
{
  json_object *stack[JSON_MAX_DEPTH + 1];
  char *keys[JSON_MAX_DEPTH + 1];
  size_t counts[JSON_MAX_DEPTH + 1]; /* members or elements of each open container */
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
    /* The limits are counted before a node is made, as for JSON: a key or an element of the open container, and
     * the node's own cost. */
    if (ev.type == YAML_SCALAR_EVENT || ev.type == YAML_SEQUENCE_START_EVENT || ev.type == YAML_MAPPING_START_EVENT) {
      bool in_mapping = depth > 0 && json_object_is_type(stack[depth - 1], json_type_object);
      bool is_key = in_mapping && !keys[depth - 1];
      if (depth > 0 && (is_key || !in_mapping) && ++counts[depth - 1] > lim->max_elements) {
        char k[64] = "";
        if (depth > 1 && keys[depth - 2])
          describe_key(lim, keys[depth - 2], strlen(keys[depth - 2]), k, sizeof(k));
        result = limit_error(err, "%s: %s%s has more than %zu %s (at line %zu)", what,
                             in_mapping ? "a mapping" : "a sequence", k, lim->max_elements,
                             in_mapping ? "keys" : "entries", ev.start_mark.line + 1);
      }
      if (ev.type == YAML_SCALAR_EVENT)
        *cost += (is_key ? JSON_COST_MEMBER : JSON_COST_SCALAR) + ev.data.scalar.length;
      else
        *cost += ev.type == YAML_MAPPING_START_EVENT ? JSON_COST_OBJECT : JSON_COST_ARRAY;
      if (depth > 0 && !in_mapping)
        *cost += JSON_COST_ELEMENT;
      if (result == 0 && *cost > budget)
        result = too_costly(budget, what, "line", ev.start_mark.line + 1, err);
      if (result < 0) {
        yaml_event_delete(&ev);
        break;
      }
    }
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
      counts[depth] = 0;
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

int yaml_parse(const char *data, size_t len, const char *what, const json_limits *limits, json_object **ret,
               crimage_error **err)
{
  yaml_parser_t parser;
  json_object *root = NULL;
  bool stream_end = false;
  uint64_t cost = JSON_COST_DOCUMENT;

  if (!yaml_parser_initialize(&parser))
    abort();
  yaml_parser_set_input_string(&parser, (const unsigned char *) data, len);
  /* Only the first document counts. */
  int r = yaml_parse_document(&parser, what, limits, tree_budget(limits, len), &cost, &root, &stream_end, err);
  yaml_parser_delete(&parser);
  if (r < 0)
    return r;
  if (!root)
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "%s: empty document", what);
  *ret = root;
  return 0;
}

int yaml_parse_all(const char *data, size_t len, const char *what, size_t max_documents, const json_limits *limits,
                   json_object **ret, crimage_error **err)
{
  yaml_parser_t parser;
  json_object *docs = json_object_new_array();
  int r = 0;
  uint64_t cost = JSON_COST_DOCUMENT + JSON_COST_ARRAY; /* every document is kept: they share the limits */

  if (!yaml_parser_initialize(&parser))
    abort();
  yaml_parser_set_input_string(&parser, (const unsigned char *) data, len);
  for (size_t index = 1;; index++) {
    json_object *doc = NULL;
    bool stream_end = false;
    cleanup_free char *doc_what = xasprintf("%s (document %zu)", what, index);
    r = yaml_parse_document(&parser, doc_what, limits, tree_budget(limits, len), &cost, &doc, &stream_end, err);
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

int yaml_parse_file(const char *path, size_t max_size, const json_limits *limits, json_object **ret,
                    crimage_error **err)
{
  cleanup_free char *data = NULL;
  size_t len = 0;
  int r = read_file(path, max_size, &data, &len, err);
  if (r < 0)
    return r;
  return yaml_parse(data, len, path, limits, ret, err);
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
