/* containerd's filter syntax as the snapshotter's List reads it: selectors, quoting, escapes, operators, AND within
 * an expression and OR across expressions, and the errors for what containerd's parser refuses. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "common/util.h"
#include "cri/snapshotter/filter.h"
#include "cri/snapshotter/snapshotter.h"

/* An object with a few fields and labels, as the snapshot adaptor sees one. */
typedef struct object {
  const char *name;
  const char *parent;
  const char *kind;
  const char *const *labels; /* key, value, key, value, ..., NULL */
} object;

static const char *object_field(void *userdata, char *const *path, size_t n)
{
  const object *o = userdata;
  if (n == 0)
    return NULL;
  if (streq(path[0], "name"))
    return o->name;
  if (streq(path[0], "parent"))
    return o->parent;
  if (streq(path[0], "kind"))
    return o->kind;
  if (streq(path[0], "labels") && n >= 2 && o->labels) {
    char key[256] = "";
    for (size_t i = 1; i < n; i++) {
      if (i > 1)
        strcat(key, ".");
      strcat(key, path[i]);
    }
    for (size_t i = 0; o->labels[i]; i += 2)
      if (streq(o->labels[i], key))
        return o->labels[i + 1];
  }
  return NULL;
}

static const char *const base_labels[] = {"containerd.io/snapshot.ref", "sha256:abc", "a.b", "dotted", "team",
                                          "x y", NULL};
static const object base = {"k8s.io/4/extract-1 sha256:abc", "k8s.io/3/sha256:parent", "committed", base_labels};
static const object root = {"sha256:root", "", "active", NULL};

/* Whether the expressions match o (they must parse). */
static bool matches(const object *o, size_t n, ...)
{
  char *exprs[8];
  va_list ap;
  va_start(ap, n);
  for (size_t i = 0; i < n; i++)
    exprs[i] = va_arg(ap, char *);
  va_end(ap);
  crimage_error *err = NULL;
  snap_filter *f = NULL;
  int r = snap_filter_parse(exprs, n, &f, &err);
  if (r < 0)
    fail_msg("parsing `%s`: %s", n > 0 ? exprs[0] : "", err->message);
  bool m = snap_filter_match(f, object_field, (void *) o);
  snap_filter_free(f);
  return m;
}

static bool match1(const object *o, const char *expr) { return matches(o, 1, expr); }

/* Parses expr and expects INVALID_ARGUMENT; returns the message. */
static void assert_refused(const char *expr)
{
  char *exprs[] = {(char *) expr};
  crimage_error *err = NULL;
  snap_filter *f = NULL;
  int r = snap_filter_parse(exprs, 1, &f, &err);
  if (r >= 0)
    fail_msg("`%s` parsed", expr);
  assert_null(f);
  assert_int_equal(err->status, CRIMAGE_INVALID_ARGUMENT);
  assert_non_null(strstr(err->message, "filter"));
  crimage_error_free(err);
}

static void test_equality_and_presence(void **state)
{
  assert_true(match1(&base, "name==\"k8s.io/4/extract-1 sha256:abc\""));
  assert_true(match1(&base, "kind==committed"));
  assert_false(match1(&base, "kind==active"));
  assert_true(match1(&root, "kind==active"));
  assert_true(match1(&base, "parent==k8s.io/3/sha256:parent"));
  /* The empty parent of a base layer, as containerd's metadata store quotes it with %q. */
  assert_true(match1(&root, "parent==\"\""));
  assert_false(match1(&base, "parent==\"\""));
  /* Presence. */
  assert_true(match1(&base, "labels.\"containerd.io/snapshot.ref\""));
  assert_false(match1(&root, "labels.\"containerd.io/snapshot.ref\""));
  assert_true(match1(&base, "labels"  ".team"));
  assert_false(match1(&base, "labels.nothere"));
  assert_true(match1(&base, "name"));
  assert_false(match1(&base, "unknownfield"));
  /* Unquoted dotted label keys are several fields, joined again with dots. */
  assert_true(match1(&base, "labels.a.b==dotted"));
  assert_true(match1(&base, "labels.\"a.b\"==dotted"));
  /* A quoted value may hold spaces and commas. */
  assert_true(match1(&base, "labels.team==\"x y\""));
  assert_true(match1(&base, "labels.team!=\"x,y\""));
}

static void test_not_equal_and_regex(void **state)
{
  assert_true(match1(&base, "kind!=active"));
  assert_false(match1(&base, "kind!=committed"));
  /* An absent field is "" for != and ~=, as in containerd. */
  assert_true(match1(&root, "labels.team!=x"));
  assert_true(match1(&root, "labels.team~=^$"));
  assert_true(match1(&base, "name~=extract"));
  assert_true(match1(&base, "name~=^k8s\\.io/[0-9]+/"));
  assert_false(match1(&base, "name~=^sha256"));
  assert_true(match1(&base, "name~=/sha256:[a-f]+$/"));
  assert_true(match1(&base, "name~=|extract-[0-9]|"));
  assert_true(match1(&base, "name~=\"abc$\""));
}

static void test_and_or(void **state)
{
  /* What containerd's metadata store asks a remote snapshotter. */
  const char *remote = "labels.\"containerd.io/snapshot.ref\"==sha256:abc,parent==\"k8s.io/3/sha256:parent\"";
  assert_true(match1(&base, remote));
  assert_false(match1(&base, "labels.\"containerd.io/snapshot.ref\"==sha256:abc,parent==\"\""));
  /* Comma: AND. */
  assert_true(match1(&base, "kind==committed,labels.team"));
  assert_false(match1(&base, "kind==committed,labels.nothere"));
  /* Several expressions: OR. */
  assert_true(matches(&base, 2, "kind==active", "kind==committed"));
  assert_false(matches(&base, 2, "kind==active", "kind==view"));
  /* None, or an empty one: everything. */
  assert_true(matches(&base, 0));
  assert_true(match1(&base, ""));
  assert_true(matches(&base, 2, "kind==view", ""));
  /* Spaces before a token are skipped, as by containerd's scanner. */
  assert_true(match1(&base, "kind == committed"));
  assert_true(match1(&base, "  kind==committed"));
}

static void test_escapes(void **state)
{
  static const char *const labels[] = {"q", "a\"b", "tab", "a\tb", "uni", "\xc3\xa9t\xc3\xa9", "k\xc3\xa9y", "v",
                                       NULL};
  const object o = {"n", "", "view", labels};
  assert_true(match1(&o, "labels.q==\"a\\\"b\""));
  assert_true(match1(&o, "labels.tab==\"a\\tb\""));
  assert_true(match1(&o, "labels.tab==\"a\\x09b\""));
  assert_true(match1(&o, "labels.tab==\"a\\011b\""));
  assert_true(match1(&o, "labels.uni==\"\\u00e9t\\U000000e9\""));
  assert_true(match1(&o, "labels.uni==\xc3\xa9t\xc3\xa9"));
  assert_true(match1(&o, "labels.\"k\\u00e9y\"==v"));
  /* In a regular expression between slashes, an escaped slash is a slash. */
  static const char *const path_labels[] = {"p", "a/b", NULL};
  const object p = {"n", "", "view", path_labels};
  assert_true(match1(&p, "labels.p~=/^a\\/b$/"));
}

static void test_refused(void **state)
{
  assert_refused("name==");         /* no value */
  assert_refused("==x");            /* no field */
  assert_refused("name=x");         /* no such operator */
  assert_refused("name===x");
  assert_refused("name<>x");
  assert_refused("name==a b");      /* input after the value */
  assert_refused("name==a ,kind==b");
  assert_refused("name==a,");       /* nothing after the comma */
  assert_refused(",name==a");
  assert_refused("labels.\"open");  /* unterminated quote */
  assert_refused("labels.\"a\\qb\""); /* unknown escape */
  assert_refused("labels.\"a\\x4\"");  /* short hex escape */
  assert_refused("name==\"\\400\"");  /* octal past 255 */
  assert_refused("name==\"\\x00\"");  /* NUL cannot be matched */
  assert_refused("name==/x/");      /* slashes quote only a regular expression */
  assert_refused("labels./x/==y");  /* and never a field */
  assert_refused("name~=/[/");      /* a regular expression that does not compile */
  assert_refused("name.");          /* a dot with no field after it */
  assert_refused("na-me==x");
  assert_refused("name==\xff");     /* not UTF-8 */

  /* Bounds: length of one expression, number of expressions. */
  char *big = xmalloc(SNAP_MAX_FILTER + 16);
  strcpy(big, "name==");
  memset(big + 6, 'a', SNAP_MAX_FILTER);
  big[SNAP_MAX_FILTER + 6] = '\0';
  assert_refused(big);
  big[SNAP_MAX_FILTER] = '\0'; /* exactly the maximum: fine */
  assert_true(match1(&root, "name!=x") && !match1(&root, big));
  free(big);

  char *many[SNAP_MAX_FILTERS + 1];
  for (size_t i = 0; i <= SNAP_MAX_FILTERS; i++)
    many[i] = (char *) "kind==view";
  crimage_error *err = NULL;
  snap_filter *f = NULL;
  assert_true(snap_filter_parse(many, SNAP_MAX_FILTERS + 1, &f, &err) < 0);
  assert_int_equal(err->status, CRIMAGE_INVALID_ARGUMENT);
  crimage_error_free(err);
  err = NULL;
  assert_int_equal(snap_filter_parse(many, SNAP_MAX_FILTERS, &f, &err), 0);
  snap_filter_free(f);
}

int main(void)
{
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_equality_and_presence),
      cmocka_unit_test(test_not_equal_and_regex),
      cmocka_unit_test(test_and_or),
      cmocka_unit_test(test_escapes),
      cmocka_unit_test(test_refused),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
