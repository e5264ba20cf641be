/* The generic gRPC server's own checks, without a socket: what error messages show to clients. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "common/util.h"
#include "cri/server.h"

static void test_redact_hides_store_paths(void **state)
{
  rpc_server *s = NULL;
  cleanup_error crimage_error *err = NULL;
  assert_int_equal(rpc_server_new(&s, &err), 0);
  rpc_server_hide_path(s, "/var/lib/crimage", "<store>");
  rpc_server_hide_path(s, "/var/lib/crimage/kata", "<store of handler kata>");
  rpc_server_hide_path(s, "/", "<root>"); /* ignored: it would hide every slash */
  struct {
    const char *in, *out;
  } cases[] = {
      {"open `/var/lib/crimage/blobs/sha256/ab`: No such file", "open `<store>/blobs/sha256/ab`: No such file"},
      {"stat `/var/lib/crimage`", "stat `<store>`"},
      {"/var/lib/crimage", "<store>"},
      /* the longest path wins */
      {"read /var/lib/crimage/kata/index.json", "read <store of handler kata>/index.json"},
      /* another directory that merely starts the same is not the store */
      {"open /var/lib/crimage2/x and /var/lib/crimage.old", "open /var/lib/crimage2/x and /var/lib/crimage.old"},
      {"twice: /var/lib/crimage/a, /var/lib/crimage/b", "twice: <store>/a, <store>/b"},
      {"no path at all / here", "no path at all / here"},
      {"", ""},
  };
  for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
    cleanup_free char *got = rpc_server_redact(s, cases[i].in);
    assert_string_equal(got, cases[i].out);
  }
  rpc_server_free(s);
}

int main(void)
{
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_redact_hides_store_paths),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
