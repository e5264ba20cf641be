/* The peak memory one call adds, measured in a child process: the child resets its resident high-water mark
 * (/proc/self/clear_refs "5", Linux 4.0) after fork, runs the call, and reports VmHWM less the VmRSS it started
 * from, so what the test process already holds does not count. Under AddressSanitizer or valgrind every
 * allocation costs more than it does in production: tests_accurate_rss() says whether a figure means anything
 * beyond "small". */
#ifndef CRIMAGE_TESTS_PEAK_RSS_H
#define CRIMAGE_TESTS_PEAK_RSS_H

#include <fcntl.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
#if __has_include(<valgrind/valgrind.h>)
#include <valgrind/valgrind.h>
#endif

static __attribute__((unused)) long test_status_kib(const char *field)
{
  FILE *f = fopen("/proc/self/status", "re");
  if (!f)
    return -1;
  char line[256];
  long v = -1;
  size_t n = strlen(field);
  while (fgets(line, sizeof(line), f))
    if (strncmp(line, field, n) == 0 && line[n] == ':')
      v = strtol(line + n + 1, NULL, 10);
  fclose(f);
  return v;
}

static __attribute__((unused)) bool tests_accurate_rss(void)
{
#if defined(__SANITIZE_ADDRESS__)
  return false;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
  return false;
#endif
#endif
#ifdef RUNNING_ON_VALGRIND
  if (RUNNING_ON_VALGRIND)
    return false;
#endif
  return true;
}

/* Runs fn(arg) in a child; returns the KiB its peak added (or -1), and fn's result in *ret (fn must not use cmocka
 * assertions: it runs in the child). */
static __attribute__((unused)) long test_peak_rss_kib(int (*fn)(void *), void *arg, int *ret)
{
#ifdef RUNNING_ON_VALGRIND
  /* valgrind checks a forked child's leaks too (it inherits every buffer of the test) and fails it: there the call
   * runs in this process, and no figure is claimed. */
  if (RUNNING_ON_VALGRIND) {
    int r = fn(arg);
    if (ret)
      *ret = r;
    return 0;
  }
#endif
  int p[2];
  if (pipe(p) < 0)
    return -1;
  pid_t pid = fork();
  if (pid < 0)
    return -1;
  if (pid == 0) {
    close(p[0]);
    long out[2] = {-1, -1};
    int fd = open("/proc/self/clear_refs", O_WRONLY | O_CLOEXEC);
    if (fd >= 0 && write(fd, "5", 1) == 1) {
      long base = test_status_kib("VmRSS");
      out[1] = fn(arg);
      long peak = test_status_kib("VmHWM");
      out[0] = peak >= base ? peak - base : 0;
    }
    if (write(p[1], out, sizeof(out)) != sizeof(out))
      _exit(2);
    _exit(0);
  }
  close(p[1]);
  long out[2] = {-1, -1};
  ssize_t n = read(p[0], out, sizeof(out));
  close(p[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  if (n != sizeof(out) || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
    return -1;
  if (ret)
    *ret = (int) out[1];
  return out[0];
}

#endif
