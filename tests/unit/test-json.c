/* JSON and YAML parsing within limits: the scanner that measures a text before json-c builds its tree (elements of
 * any one array or object, the estimated memory of the tree, depth), its estimate against what json-c really
 * allocates, strict JSON, the same limits counted on YAML events, and the peak memory of hostile documents. */
#include <malloc.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "common/dynbuf.h"
#include "common/json.h"
#include "common/util.h"
#include "peak-rss.h"

/* Limits without the bound per byte of text (tested on its own below), so each test sees one limit at work. */
#define LIM(tree, elements) (&(const json_limits){.max_tree_bytes = (tree), .max_elements = (elements)})
#define LIM_QUIET(tree, elements)                                                                                     \
  (&(const json_limits){.max_tree_bytes = (tree), .max_elements = (elements), .quiet = true})

/* n copies of unit, comma-separated, between open and close. */
static char *repeat(const char *open, const char *unit, size_t n, const char *close, size_t *ret_len)
{
  size_t ul = strlen(unit), ol = strlen(open), cl = strlen(close);
  size_t len = ol + n * (ul + 1) + cl;
  char *s = xmalloc(len + 1), *p = s;
  memcpy(p, open, ol);
  p += ol;
  for (size_t i = 0; i < n; i++) {
    if (i)
      *p++ = ',';
    memcpy(p, unit, ul);
    p += ul;
  }
  memcpy(p, close, cl);
  p += cl;
  *p = '\0';
  *ret_len = (size_t) (p - s);
  return s;
}

static crimage_error *parse_fails(const char *text, size_t len, const json_limits *lim)
{
  json_object *o = NULL;
  crimage_error *err = NULL;
  if (json_parse(text, len, "doc", lim, &o, &err) == 0) {
    json_object_put(o);
    fail_msg("parsed: %.80s", text);
  }
  return err;
}

static void parse_passes(const char *text, size_t len, const json_limits *lim)
{
  json_object *o = NULL;
  cleanup_error crimage_error *err = NULL;
  if (json_parse(text, len, "doc", lim, &o, &err) < 0)
    fail_msg("%s", err->message);
  json_object_put(o);
}

static void test_elements(void **state)
{
  size_t len;
  cleanup_free char *a1000 = repeat("{\"layers\":[", "0", 1000, "]}", &len);
  parse_passes(a1000, len, LIM(1u << 20, 1000));
  cleanup_free char *a1001 = repeat("{\"layers\":[", "0", 1001, "]}", &len);
  crimage_error *err = parse_fails(a1001, len, LIM(1u << 20, 1000));
  assert_int_equal(err->status, CRIMAGE_INVALID_ARGUMENT);
  assert_non_null(strstr(err->message, "doc: an array `layers` has more than 1000 elements (at offset"));
  crimage_error_free(err);
  /* A quiet document (one that holds secrets) names no key. */
  err = parse_fails(a1001, len, LIM_QUIET(1u << 20, 1000));
  assert_null(strstr(err->message, "layers"));
  assert_non_null(strstr(err->message, "an array has more than 1000 elements"));
  crimage_error_free(err);

  /* Members of an object count the same way; every container has its own count. */
  dynbuf b;
  dynbuf_init(&b, 1u << 20);
  dynbuf_append_str(&b, "{");
  for (int i = 0; i < 11; i++)
    dynbuf_printf(&b, "%s\"k%d\":[1,2,3,4,5,6,7,8,9,10]", i ? "," : "", i);
  dynbuf_append_str(&b, "}");
  err = parse_fails(b.data, b.len, LIM(1u << 20, 10));
  assert_non_null(strstr(err->message, "an object has more than 10 members"));
  crimage_error_free(err);
  parse_passes(b.data, b.len, LIM(1u << 20, 11));
  dynbuf_free(&b);
  /* Strings with escaped quotes and structural characters are one value each. */
  const char *tricky = "[\"a\\\"],[{\", \"\\\\\", \"}\", \"x\\u0022y\"]";
  parse_passes(tricky, strlen(tricky), LIM(1u << 20, 4));
  err = parse_fails(tricky, strlen(tricky), LIM(1u << 20, 3));
  crimage_error_free(err);
}

/* The estimate is the sum of the JSON_COST_* figures (1024 for the document itself); a budget of exactly it passes,
 * one byte less fails. */
static void test_tree_budget(void **state)
{
  size_t len;
  cleanup_free char *objs = repeat("[", "{}", 1000, "]", &len);
  size_t cost = 1024 + 160 + 1000 * (16 + 800);
  parse_passes(objs, len, LIM(cost, 1000));
  crimage_error *err = parse_fails(objs, len, LIM(cost - 1, 1000));
  assert_int_equal(err->status, CRIMAGE_INVALID_ARGUMENT);
  assert_non_null(strstr(err->message, "too many values"));
  crimage_error_free(err);
  /* A member costs 128 + its key, a string 112 + its bytes, a number 112. */
  const char *obj = "{\"abc\":\"hello\",\"n\":12345}";
  cost = 1024 + 800 + (128 + 3) + (112 + 5) + (128 + 1) + 112;
  parse_passes(obj, strlen(obj), LIM(cost, 10));
  err = parse_fails(obj, strlen(obj), LIM(cost - 1, 10));
  crimage_error_free(err);
}

/* No document costs more than JSON_TREE_BASE + 32 bytes of tree per byte of its text: 1000 empty objects (3 KB of
 * text, 800 KB of tree) are refused under a budget of megabytes, the same objects padded with a long string pass. */
static void test_tree_per_byte(void **state)
{
  size_t len;
  cleanup_free char *objs = repeat("[", "{}", 1000, "]", &len);
  crimage_error *err = parse_fails(objs, len, JSON_LIMITS(16u << 20, 1000));
  assert_non_null(strstr(err->message, "too many values for its size"));
  crimage_error_free(err);
  size_t pad = (1024 + 160 + 1000 * 816 - JSON_TREE_BASE) / (JSON_TREE_PER_BYTE - 1) + 200;
  cleanup_free char *padding = xmalloc(pad + 1);
  memset(padding, 'x', pad);
  padding[pad] = '\0';
  cleanup_free char *padded = xasprintf("[\"%s\",%s", padding, objs + 1);
  parse_passes(padded, strlen(padded), JSON_LIMITS(16u << 20, 1001));
  /* the absolute budget still holds */
  err = parse_fails(padded, strlen(padded), JSON_LIMITS(500000, 1001));
  assert_non_null(strstr(err->message, "more than 488 KiB"));
  crimage_error_free(err);
}

static void test_depth_and_scalars(void **state)
{
  cleanup_error crimage_error *err = NULL;
  char deep[2 * (JSON_MAX_DEPTH + 1) + 1];
  memset(deep, '[', JSON_MAX_DEPTH + 1);
  memset(deep + JSON_MAX_DEPTH + 1, ']', JSON_MAX_DEPTH + 1);
  deep[sizeof(deep) - 1] = '\0';
  assert_true(json_check_limits(deep, strlen(deep), "doc", LIM(1u << 20, 10), &err) < 0);
  assert_non_null(strstr(err->message, "nested deeper than"));
  crimage_error_clear(&err);
  assert_int_equal(json_check_limits(deep + 1, strlen(deep) - 2, "doc", LIM(1u << 20, 10), &err), 0);
  /* Lone scalars, empty input and what follows the document (the parser's business) cost one value at most. */
  assert_int_equal(json_check_limits("12", 2, "doc", LIM(1024 + 112, 0), &err), 0);
  assert_int_equal(json_check_limits("", 0, "doc", LIM(1024, 0), &err), 0);
  assert_int_equal(json_check_limits("{} {} {}", 8, "doc", LIM(1024 + 800, 0), &err), 0);
  assert_int_equal(json_check_limits("]]]", 3, "doc", LIM(1024, 0), &err), 0);
  assert_int_equal(json_check_limits("\"unterminated", 13, "doc", LIM(2000, 0), &err), 0);
  /* What json-c would read in ways the scan does not follow is refused outright. */
  const char *odd[] = {"['\"', {}, '\"']", "[1, /* \" */ 2]", "[1 // \"\n]", "[\x01]", "[+1]"};
  for (size_t i = 0; i < ARRAY_SIZE(odd); i++) {
    assert_true(json_check_limits(odd[i], strlen(odd[i]), "doc", LIM(1u << 20, 10), &err) < 0);
    assert_non_null(strstr(err->message, "unexpected character"));
    crimage_error_clear(&err);
  }
}

/* Strict RFC 8259: nothing json-c's lenient mode would read differently from the scanner. */
static void test_strict(void **state)
{
  const char *bad[] = {"{\"a\":1,}", "[1,2,]", "{'a':1}", "['[[[[']", "/* c */ {}", "{} // c", "[True]", "[NaN]"};
  for (size_t i = 0; i < ARRAY_SIZE(bad); i++) {
    crimage_error *err = parse_fails(bad[i], strlen(bad[i]), LIM(1u << 20, 100));
    assert_int_equal(err->status, CRIMAGE_INVALID_ARGUMENT);
    crimage_error_free(err);
  }
  const char *good = " {\"a\": [1, -2.5e3, true, false, null, \"\\u00e9\\n\"], \"b\": {}} ";
  parse_passes(good, strlen(good), LIM(1u << 20, 100));
}

/* A malformed document is measured as far as it goes: json-c builds its tree up to the syntax error. */
static void test_malformed_bounded(void **state)
{
  size_t len;
  cleanup_free char *text = repeat("[", "{}", 100000, ",", &len);
  crimage_error *err = parse_fails(text, len, LIM(1u << 20, 1000000));
  assert_non_null(strstr(err->message, "too many values"));
  crimage_error_free(err);
}

/* json-c's real allocations (glibc's mallinfo2) stay within the estimate for every shape: empty and full objects
 * around the sizes where its hash table doubles, arrays around the sizes where its list doubles, strings of every
 * length up to a few hundred bytes, numbers, nesting. */
static size_t least_budget(const char *text, size_t len)
{
  size_t lo = 0, hi = 1u << 30;
  while (lo < hi) {
    size_t mid = lo + (hi - lo) / 2;
    cleanup_error crimage_error *err = NULL;
    if (json_check_limits(text, len, "doc", LIM(mid, SIZE_MAX), &err) == 0)
      hi = mid;
    else
      lo = mid + 1;
  }
  return lo;
}

static void check_estimate(const char *text, size_t len)
{
  size_t budget = least_budget(text, len);
  json_tokener *tok = json_tokener_new_ex(JSON_MAX_DEPTH);
  json_tokener_set_flags(tok, JSON_TOKENER_STRICT);
  size_t before = mallinfo2().uordblks;
  json_object *o = json_tokener_parse_ex(tok, text, (int) len);
  size_t after = mallinfo2().uordblks;
  json_tokener_free(tok);
  assert_non_null(o);
  /* The tokener's own buffers are counted against the tree too: it holds them while the tree grows. */
  if (after - before > budget)
    fail_msg("json-c took %zu bytes for a document estimated at %zu: %.60s", after - before, budget, text);
  json_object_put(o);
}

static void test_estimate_covers_json_c(void **state)
{
  if (!tests_accurate_rss())
    skip();
  size_t len;
  const size_t counts[] = {1, 2, 10, 11, 12, 16, 21, 22, 23, 32, 33, 43, 44, 45, 64, 65, 100, 1000, 5000};
  for (size_t c = 0; c < ARRAY_SIZE(counts); c++) {
    size_t n = counts[c];
    cleanup_free char *a = repeat("[", "{}", n, "]", &len);
    check_estimate(a, len);
    cleanup_free char *b = repeat("[", "[]", n, "]", &len);
    check_estimate(b, len);
    cleanup_free char *d = repeat("[", "0", n, "]", &len);
    check_estimate(d, len);
    cleanup_free char *e = repeat("[", "\"\"", n, "]", &len);
    check_estimate(e, len);
    cleanup_free char *f = repeat("[", "true", n, "]", &len);
    check_estimate(f, len);
    cleanup_free char *g = repeat("[", "1.5", n, "]", &len);
    check_estimate(g, len);
    /* an object of n members with short and long keys */
    dynbuf o;
    dynbuf_init(&o, 1u << 24);
    dynbuf_append_str(&o, "{");
    for (size_t i = 0; i < n; i++)
      dynbuf_printf(&o, "%s\"%zu\":0", i ? "," : "", i);
    dynbuf_append_str(&o, "}");
    check_estimate(o.data, o.len);
    dynbuf_reset(&o);
    dynbuf_append_str(&o, "{");
    for (size_t i = 0; i < n; i++)
      dynbuf_printf(&o, "%s\"a-rather-long-key-of-an-annotation-%zu\":{}", i ? "," : "", i);
    dynbuf_append_str(&o, "}");
    check_estimate(o.data, o.len);
    dynbuf_free(&o);
  }
  for (size_t l = 0; l < 600; l += 7) {
    cleanup_free char *s = xmalloc(l + 1);
    memset(s, 'x', l);
    s[l] = '\0';
    cleanup_free char *unit = xasprintf("\"%s\"", s);
    cleanup_free char *a = repeat("[", unit, 50, "]", &len);
    check_estimate(a, len);
  }
  const char *nested = "{\"a\":{\"b\":{\"c\":[[[{\"d\":[1,2,{\"e\":\"f\"}]}]]]}}}";
  check_estimate(nested, strlen(nested));
}

typedef struct hostile {
  const char *text;
  size_t len;
  bool yaml;
  const json_limits *lim;
} hostile;

static int parse_hostile(void *arg)
{
  hostile *h = arg;
  json_object *o = NULL;
  crimage_error *err = NULL;
  int r = h->yaml ? yaml_parse(h->text, h->len, "doc", h->lim, &o, &err)
                  : json_parse(h->text, h->len, "doc", h->lim, &o, &err);
  json_object_put(o);
  crimage_error_free(err);
  return r;
}

/* A 3 MB array of a million empty objects took about 800 MB before json-c's tree was measured first; now it is
 * refused by the scanner, which allocates nothing. The same for YAML, counted as its events arrive. */
static void test_hostile_peak(void **state)
{
  size_t len;
  cleanup_free char *objs = repeat("[", "{}", 1000000, "]", &len);
  hostile h = {.text = objs, .len = len, .lim = JSON_LIMITS(16u << 20, 1000000)};
  int r = 0;
  long kib = test_peak_rss_kib(parse_hostile, &h, &r);
  assert_true(kib >= 0);
  assert_true(r < 0);
  if (kib > 16 * 1024)
    fail_msg("refusing a million empty objects took %ld KiB", kib);

  /* Just within the limits: 16 MiB estimated (the text padded so that it is within 32 bytes of tree per byte),
   * at most 64 MiB for real (about 16 MiB, see the estimate test). */
  cleanup_free char *within = repeat("[", "{}", 900, "]", &len);
  cleanup_free char *lists = repeat("", within, 20, "", &len);
  size_t pad = (16u << 20) / 32;
  cleanup_free char *padding = xmalloc(pad + 1);
  memset(padding, 'x', pad);
  padding[pad] = '\0';
  cleanup_free char *nested = xasprintf("[\"%s\",%s]", padding, lists);
  h = (hostile){.text = nested, .len = strlen(nested), .lim = JSON_LIMITS(16u << 20, 1000)};
  kib = test_peak_rss_kib(parse_hostile, &h, &r);
  assert_int_equal(r, 0);
  if (tests_accurate_rss() && kib > 64 * 1024)
    fail_msg("a document within the limits took %ld KiB", kib);

  len = 300000 * 5;
  cleanup_free char *yaml = xmalloc(len + 1);
  for (size_t i = 0; i < 300000; i++)
    memcpy(yaml + i * 5, "- {}\n", 5);
  yaml[len] = '\0';
  /* YAML builds as its events arrive: refusing it costs at most its budget. */
  h = (hostile){.text = yaml, .len = len, .yaml = true, .lim = JSON_LIMITS(4u << 20, 1000000)};
  kib = test_peak_rss_kib(parse_hostile, &h, &r);
  assert_true(r < 0);
  if (kib > 16 * 1024)
    fail_msg("refusing 300,000 YAML mappings took %ld KiB", kib);
}

static void test_yaml_limits(void **state)
{
  cleanup_error crimage_error *err = NULL;
  json_object *o = NULL;
  size_t len;
  cleanup_free char *seq = repeat("list: [", "1", 11, "]", &len);
  assert_true(yaml_parse(seq, len, "cfg", LIM(1u << 20, 10), &o, &err) < 0);
  assert_non_null(strstr(err->message, "cfg: a sequence `list` has more than 10 entries (at line 1)"));
  crimage_error_clear(&err);
  assert_int_equal(yaml_parse(seq, len, "cfg", LIM(1u << 20, 11), &o, &err), 0);
  json_object_put(o);
  cleanup_free char *map = repeat("{", "a: 1", 1, "}", &len);
  assert_int_equal(yaml_parse(map, len, "cfg", LIM(1u << 20, 1), &o, &err), 0);
  json_object_put(o);
  const char *keys = "a: 1\nb: 2\nc: 3\n";
  assert_true(yaml_parse(keys, strlen(keys), "cfg", LIM(1u << 20, 2), &o, &err) < 0);
  assert_non_null(strstr(err->message, "a mapping has more than 2 keys (at line 3)"));
  crimage_error_clear(&err);
  /* The budget: a mapping 800, two keys 128 + 1 each, two numbers 112 + 1 each. */
  size_t cost = 1024 + 800 + 2 * 129 + 2 * 113;
  assert_int_equal(yaml_parse(keys, 10, "cfg", LIM(cost, 10), &o, &err), 0);
  json_object_put(o);
  assert_true(yaml_parse(keys, 10, "cfg", LIM(cost - 1, 10), &o, &err) < 0);
  assert_non_null(strstr(err->message, "too many values"));
  crimage_error_clear(&err);
  /* The documents of a stream share one budget. */
  const char *docs = "a: 1\n---\nb: 2\n---\nc: 3\n";
  assert_true(yaml_parse_all(docs, strlen(docs), "s", 10, LIM(1024 + 160 + 2 * (800 + 129 + 113), 10), &o, &err) <
              0);
  crimage_error_clear(&err);
  assert_int_equal(yaml_parse_all(docs, strlen(docs), "s", 10, LIM(1024 + 160 + 3 * (800 + 129 + 113), 10), &o,
                                  &err),
                   0);
  assert_int_equal(json_object_array_length(o), 3);
  json_object_put(o);
}

int main(void)
{
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_elements),        cmocka_unit_test(test_tree_budget),
      cmocka_unit_test(test_tree_per_byte),
      cmocka_unit_test(test_depth_and_scalars), cmocka_unit_test(test_strict),
      cmocka_unit_test(test_malformed_bounded), cmocka_unit_test(test_estimate_covers_json_c),
      cmocka_unit_test(test_hostile_peak),    cmocka_unit_test(test_yaml_limits),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
