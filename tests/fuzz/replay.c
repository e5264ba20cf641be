/* Runs a fuzz target's corpus as a unit test, without libFuzzer: every file of the directories given (its seeds in
 * tests/fuzz/<target>/, and the inputs that once crashed it, which stay there as regression tests) goes through
 * LLVMFuzzerTestOneInput once. A crash, a sanitizer report or a leak fails the test as it fails the fuzzer. */
#include <dirent.h>
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <cmocka.h>

#include "common/fsutil.h"
#include "fuzz.h"

static int n_dirs;
static char **dirs;

static int by_name(const struct dirent **a, const struct dirent **b) { return strcmp((*a)->d_name, (*b)->d_name); }

static void test_corpus(void **state)
{
  size_t n_inputs = 0;
  for (int i = 0; i < n_dirs; i++) {
    struct dirent **names = NULL;
    int n = scandir(dirs[i], &names, NULL, by_name);
    if (n < 0)
      fail_msg("%s: %s", dirs[i], strerror(errno));
    for (int j = 0; j < n; j++) {
      if (names[j]->d_name[0] != '.') {
        cleanup_free char *path = xasprintf("%s/%s", dirs[i], names[j]->d_name);
        cleanup_free char *data = NULL;
        size_t len = 0;
        cleanup_error crimage_error *err = NULL;
        if (read_file(path, 16u << 20, &data, &len, &err) < 0)
          fail_msg("%s", err->message);
        /* A copy of exactly len bytes, so that ASan sees any read past the input. */
        cleanup_free uint8_t *input = xmalloc(len ? len : 1);
        memcpy(input, data, len);
        LLVMFuzzerTestOneInput(input, len);
        n_inputs++;
      }
      free(names[j]);
    }
    free(names);
  }
  assert_true(n_inputs > 0);
  print_message("%zu inputs\n", n_inputs);
}

int main(int argc, char **argv)
{
  n_dirs = argc - 1;
  dirs = argv + 1;
  const struct CMUnitTest tests[] = {cmocka_unit_test(test_corpus)};
  return cmocka_run_group_tests(tests, NULL, NULL);
}
