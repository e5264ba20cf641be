/* Credentials as values: base64 `auth` fields, splitting user:pass, copies and wiping. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "auth/base64.h"
#include "auth/credential.h"
#include "common/util.h"

static void check_decode(const char *in, const char *expect)
{
  char *out = NULL;
  size_t len = 0;
  assert_int_equal(base64_decode(in, strlen(in), &out, &len), 0);
  assert_int_equal(len, strlen(expect));
  assert_memory_equal(out, expect, len);
  assert_int_equal(out[len], '\0');
  free(out);
}

static void check_decode_fails(const char *in)
{
  char *out = NULL;
  size_t len = 0;
  assert_int_equal(base64_decode(in, strlen(in), &out, &len), -EINVAL);
  assert_null(out);
}

static void test_base64_padding(void **state)
{
  (void) state;
  check_decode("", "");
  check_decode("Zg==", "f");
  check_decode("Zg", "f");
  check_decode("Zm8=", "fo");
  check_decode("Zm8", "fo");
  check_decode("Zm9v", "foo");
  check_decode("Zm9vYg==", "foob");
  check_decode("Zm9vYg", "foob");
  check_decode("Zm9vYmE=", "fooba");
  check_decode("Zm9vYmE", "fooba");
  check_decode("Zm9vYmFy", "foobar");
  check_decode("  Zm9vYmFy\n", "foobar");
  check_decode("Zm9v\nYmFy", "foobar"); /* line breaks inside are ignored, as Go does */
  check_decode("Zm9v\r\nYg", "foob");
  /* '+' and '/' of the standard alphabet. */
  check_decode("+/+/", "\xfb\xff\xbf");
}

static void test_base64_invalid(void **state)
{
  (void) state;
  check_decode_fails("Z");     /* one character cannot encode a byte */
  check_decode_fails("Zm9vY"); /* 5 characters, same */
  check_decode_fails("Zg=");   /* padding that does not fit */
  check_decode_fails("Zm8=="); /* too much padding */
  check_decode_fails("Zm9v!"); /* not in the alphabet */
  check_decode_fails("Zm-_");  /* URL-safe alphabet is not docker's */
  check_decode_fails("Zm 9v"); /* whitespace inside */
  check_decode_fails("Z===");
}

static void test_set_auth(void **state)
{
  (void) state;
  cleanup_credential credential *c = credential_new();
  /* "user:pass" padded and unpadded */
  assert_int_equal(credential_set_auth(c, "dXNlcjpwYXNz"), 0);
  assert_string_equal(c->username, "user");
  assert_string_equal(c->password, "pass");
  /* base64("alice:s3cr:et") = YWxpY2U6czNjcjpldA== : split on the first ':' only */
  assert_int_equal(credential_set_auth(c, "YWxpY2U6czNjcjpldA=="), 0);
  assert_string_equal(c->username, "alice");
  assert_string_equal(c->password, "s3cr:et");
  assert_int_equal(credential_set_auth(c, "YWxpY2U6czNjcjpldA"), 0);
  assert_string_equal(c->password, "s3cr:et");
  /* "bob:" -> empty password; ":pw" -> empty user */
  assert_int_equal(credential_set_auth(c, "Ym9iOg=="), 0);
  assert_string_equal(c->username, "bob");
  assert_string_equal(c->password, "");
  assert_int_equal(credential_set_auth(c, "OnB3"), 0);
  assert_string_equal(c->username, "");
  assert_string_equal(c->password, "pw");
  /* no ':' at all ("userpass") */
  assert_int_equal(credential_set_auth(c, "dXNlcnBhc3M="), -EINVAL);
  /* a NUL byte inside ("a\0:b" = YQA6Yg==) */
  assert_int_equal(credential_set_auth(c, "YQA6Yg=="), -EINVAL);
  assert_int_equal(credential_set_auth(c, "not base64!"), -EINVAL);
  assert_int_equal(credential_set_auth(c, NULL), -EINVAL);
  /* failures leave the last good value */
  assert_string_equal(c->username, "");
  assert_string_equal(c->password, "pw");
}

static void test_dup_empty_same(void **state)
{
  (void) state;
  cleanup_credential credential *c = credential_new();
  assert_true(credential_is_empty(c));
  c->username = xstrdup("");
  assert_true(credential_is_empty(c));
  c->identity_token = xstrdup("refresh");
  assert_false(credential_is_empty(c));
  c->source = xstrdup("config.json /x");
  c->server_address = xstrdup("r.io");
  cleanup_credential credential *d = credential_dup(c);
  assert_ptr_not_equal(d->identity_token, c->identity_token);
  assert_string_equal(d->identity_token, "refresh");
  assert_string_equal(d->source, "config.json /x");
  assert_string_equal(d->server_address, "r.io");
  assert_null(d->password);
  assert_true(credential_same_secret(c, d));
  free(d->source);
  d->source = xstrdup("secret a/b"); /* the source does not make it another credential */
  assert_true(credential_same_secret(c, d));
  d->password = xstrdup("x");
  assert_false(credential_same_secret(c, d));

  cleanup_credential credential *t = credential_new();
  t->registry_token = xstrdup("bearer");
  assert_false(credential_is_empty(t));
}

static void test_describe(void **state)
{
  (void) state;
  cleanup_credential credential *c = credential_new();
  c->username = xstrdup("alice");
  c->password = xstrdup("hunter2");
  c->source = xstrdup("secret ns/regcred");
  cleanup_free char *d1 = credential_describe(c);
  assert_string_equal(d1, "user alice (password) from secret ns/regcred");
  secret_free(c->username);
  c->username = NULL;
  c->identity_token = xstrdup("tok");
  cleanup_free char *d2 = credential_describe(c);
  assert_string_equal(d2, "identity token from secret ns/regcred");
  assert_null(strstr(d2, "tok "));
  free(c->source);
  c->source = NULL;
  c->registry_token = xstrdup("bearer");
  cleanup_free char *d3 = credential_describe(c);
  assert_string_equal(d3, "registry token from unknown source");
}

static void test_list(void **state)
{
  (void) state;
  credential_list l = {0};
  for (int i = 0; i < 5; i++) {
    credential *c = credential_new();
    c->username = xasprintf("u%d", i);
    credential_list_add(&l, c);
  }
  assert_int_equal(l.n, 5);
  assert_string_equal(l.items[4]->username, "u4");
  credential_list_clear(&l);
  assert_int_equal(l.n, 0);
  assert_null(l.items);
  credential_list_clear(&l);
}

int main(void)
{
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_base64_padding), cmocka_unit_test(test_base64_invalid), cmocka_unit_test(test_set_auth),
      cmocka_unit_test(test_dup_empty_same), cmocka_unit_test(test_describe), cmocka_unit_test(test_list),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
