/* A real registry for the pull tests: Debian's docker-registry on 127.0.0.1 with a free port and a temporary
 * storage root, and helpers that build small OCI layouts (tests/unit/data/make-oci-layout.py) and push them with
 * skopeo. The registry process dies with the test (PR_SET_PDEATHSIG) even when the test crashes. */
#ifndef CRIMAGE_TESTS_REGISTRY_FIXTURE_H
#define CRIMAGE_TESTS_REGISTRY_FIXTURE_H

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

typedef struct test_registry {
  pid_t pid;
  int port;
  char dir[256];
  char host[64]; /* "127.0.0.1:<port>" */
  char creds[128]; /* "user:pass" when the registry uses htpasswd (Basic) auth, else "" */
  pid_t token_pid;  /* the token server of a registry with token auth */
  char token_log[300]; /* one JSON line per token request */
} test_registry;

static __attribute__((unused)) int test_free_port(void)
{
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0)
    return -1;
  struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  socklen_t len = sizeof(sa);
  if (bind(fd, (struct sockaddr *) &sa, sizeof(sa)) < 0 || getsockname(fd, (struct sockaddr *) &sa, &len) < 0) {
    close(fd);
    return -1;
  }
  close(fd);
  return ntohs(sa.sin_port);
}

static __attribute__((unused)) int test_port_open(int port)
{
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0)
    return 0;
  struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t) port),
                           .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  int ok = connect(fd, (struct sockaddr *) &sa, sizeof(sa)) == 0;
  close(fd);
  return ok;
}

static __attribute__((unused)) int test_run(const char *cmd)
{
  int r = system(cmd);
  if (r != 0)
    fprintf(stderr, "command failed (%d): %s\n", r, cmd);
  return r == 0 ? 0 : -1;
}

static __attribute__((unused)) pid_t test_spawn(char *const argv[], const char *logpath)
{
  pid_t pid = fork();
  if (pid < 0)
    return -1;
  if (pid == 0) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    int fd = open(logpath, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (fd >= 0) {
      dup2(fd, 1);
      dup2(fd, 2);
    }
    execv(argv[0], argv);
    _exit(127);
  }
  return pid;
}

/* Waits (up to 30 s) for a helper to write the port it listens on. */
static __attribute__((unused)) int test_wait_portfile(const char *portfile)
{
  int port = 0;
  for (int i = 0; i < 600 && port <= 0; i++) {
    FILE *pf = fopen(portfile, "r");
    if (pf) {
      if (fscanf(pf, "%d", &port) != 1)
        port = 0;
      fclose(pf);
    }
    if (port <= 0) {
      struct timespec ts = {0, 50 * 1000 * 1000};
      nanosleep(&ts, NULL);
    }
  }
  return port;
}

/* Starts the token server of tests/unit/data/token-server.py with a fresh RSA key and certificate; fills the
 * registry config's auth section into f. Basic credentials user/pass (may be NULL) are the only ones it accepts. */
static __attribute__((unused)) int test_token_server_start(test_registry *r, FILE *f, const char *user, const char *pass)
{
  char cmd[1024];
  snprintf(cmd, sizeof(cmd),
           "openssl req -x509 -newkey rsa:2048 -nodes -keyout '%s/token.key' -out '%s/token.crt' -days 2 "
           "-subj /CN=crimage-test-token 2>/dev/null",
           r->dir, r->dir);
  if (test_run(cmd) < 0)
    return -1;
  char script[512], portfile[300], key[300], crt[300], logpath[300];
  snprintf(script, sizeof(script), "%s/data/token-server.py", TEST_SRCDIR);
  snprintf(portfile, sizeof(portfile), "%s/token.port", r->dir);
  snprintf(key, sizeof(key), "%s/token.key", r->dir);
  snprintf(crt, sizeof(crt), "%s/token.crt", r->dir);
  snprintf(logpath, sizeof(logpath), "%s/token-server.log", r->dir);
  snprintf(r->token_log, sizeof(r->token_log), "%s/token-requests.log", r->dir);
  if (user) {
    setenv("TOKEN_USER", user, 1);
    setenv("TOKEN_PASS", pass, 1);
  }
  char *argv[] = {"/usr/bin/python3", script, portfile, key, crt, "crimage-test-issuer", "crimage-test-registry",
                  r->token_log, NULL};
  r->token_pid = test_spawn(argv, logpath);
  unsetenv("TOKEN_USER");
  unsetenv("TOKEN_PASS");
  if (r->token_pid < 0)
    return -1;
  int port = test_wait_portfile(portfile);
  if (port <= 0)
    return -1;
  fprintf(f,
          "auth:\n  token:\n    realm: http://127.0.0.1:%d/token\n    service: crimage-test-registry\n"
          "    issuer: crimage-test-issuer\n    rootcertbundle: %s\n",
          port, crt);
  return 0;
}

/* mode "htpasswd": the registry requires HTTP Basic auth for user/pass; "token": Bearer tokens from a token server
 * that accepts user/pass (or anonymous requests); NULL: no auth. */
static __attribute__((unused)) int test_registry_start_mode(test_registry *r, const char *mode, const char *user, const char *pass)
{
  memset(r, 0, sizeof(*r));
  snprintf(r->dir, sizeof(r->dir), "/tmp/crimage-test-registry-XXXXXX");
  if (!mkdtemp(r->dir))
    return -1;
  r->port = test_free_port();
  if (r->port <= 0)
    return -1;
  snprintf(r->host, sizeof(r->host), "127.0.0.1:%d", r->port);
  char path[512];
  snprintf(path, sizeof(path), "%s/config.yml", r->dir);
  FILE *f = fopen(path, "w");
  if (!f)
    return -1;
  fprintf(f,
          "version: 0.1\n"
          "log:\n  level: warn\n"
          "storage:\n  filesystem:\n    rootdirectory: %s/storage\n  delete:\n    enabled: true\n"
          "http:\n  addr: 127.0.0.1:%d\n",
          r->dir, r->port);
  if (mode && strcmp(mode, "token") == 0) {
    if (test_token_server_start(r, f, user, pass) < 0) {
      fclose(f);
      return -1;
    }
  } else if (user) {
    fprintf(f, "auth:\n  htpasswd:\n    realm: crimage-test\n    path: %s/htpasswd\n", r->dir);
    snprintf(r->creds, sizeof(r->creds), "%s:%s", user, pass);
    char cmd[768];
    snprintf(cmd, sizeof(cmd), "htpasswd -Bbc '%s/htpasswd' '%s' '%s' 2>/dev/null", r->dir, user, pass);
    if (test_run(cmd) < 0) {
      fclose(f);
      return -1;
    }
  }
  fclose(f);
  char logpath[512];
  snprintf(logpath, sizeof(logpath), "%s/registry.log", r->dir);
  pid_t pid = fork();
  if (pid < 0)
    return -1;
  if (pid == 0) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    int fd = open(logpath, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd >= 0) {
      dup2(fd, 1);
      dup2(fd, 2);
    }
    execl("/usr/bin/docker-registry", "docker-registry", "serve", path, (char *) NULL);
    _exit(127);
  }
  r->pid = pid;
  /* Wait until it accepts connections (or exits). */
  for (int i = 0; i < 600; i++) {
    if (test_port_open(r->port))
      return 0;
    int status;
    if (waitpid(pid, &status, WNOHANG) == pid) {
      r->pid = 0;
      fprintf(stderr, "docker-registry exited; see %s\n", logpath);
      return -1;
    }
    struct timespec ts = {0, 50 * 1000 * 1000};
    nanosleep(&ts, NULL);
  }
  return -1;
}

static __attribute__((unused)) int test_registry_start(test_registry *r) { return test_registry_start_mode(r, NULL, NULL, NULL); }
static __attribute__((unused)) int test_registry_start_auth(test_registry *r, const char *user, const char *pass)
{
  return test_registry_start_mode(r, "htpasswd", user, pass);
}

static __attribute__((unused)) void test_registry_stop(test_registry *r)
{
  if (r->pid > 0) {
    kill(r->pid, SIGKILL);
    waitpid(r->pid, NULL, 0);
    r->pid = 0;
  }
  if (r->token_pid > 0) {
    kill(r->token_pid, SIGKILL);
    waitpid(r->token_pid, NULL, 0);
    r->token_pid = 0;
  }
  if (r->dir[0]) {
    char cmd[512];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", r->dir);
    (void) test_run(cmd);
    r->dir[0] = 0;
  }
}

/* A fault-injecting front (tests/unit/data/fault-proxy.py) for registry up, requiring Basic auth user/pass. */
typedef struct test_fault_proxy {
  pid_t pid;
  char host[64];
  char log[300];
} test_fault_proxy;

static __attribute__((unused)) int test_fault_proxy_start(test_registry *up, const char *user, const char *pass, test_fault_proxy *fp)
{
  memset(fp, 0, sizeof(*fp));
  char script[512], portfile[300], upstream[128], logpath[300];
  snprintf(script, sizeof(script), "%s/data/fault-proxy.py", TEST_SRCDIR);
  snprintf(portfile, sizeof(portfile), "%s/fault.port", up->dir);
  snprintf(upstream, sizeof(upstream), "http://%s", up->host);
  snprintf(fp->log, sizeof(fp->log), "%s/fault-requests.log", up->dir);
  snprintf(logpath, sizeof(logpath), "%s/fault-proxy.log", up->dir);
  setenv("FAULT_USER", user, 1);
  setenv("FAULT_PASS", pass, 1);
  char *argv[] = {"/usr/bin/python3", script, portfile, upstream, fp->log, NULL};
  fp->pid = test_spawn(argv, logpath);
  unsetenv("FAULT_USER");
  unsetenv("FAULT_PASS");
  if (fp->pid < 0)
    return -1;
  int port = test_wait_portfile(portfile);
  if (port <= 0)
    return -1;
  snprintf(fp->host, sizeof(fp->host), "127.0.0.1:%d", port);
  return 0;
}

static __attribute__((unused)) void test_fault_proxy_stop(test_fault_proxy *fp)
{
  if (fp->pid > 0) {
    kill(fp->pid, SIGKILL);
    waitpid(fp->pid, NULL, 0);
    fp->pid = 0;
  }
}

/* Builds a layout with make-oci-layout.py (gen_args: "--layers 3 --user 1002 --arch amd64 ...") and pushes
 * name:tag with skopeo (push_args: "", "--format v2s2" or "--all"). */
static __attribute__((unused)) int test_push_image(test_registry *r, const char *name, const char *tag, const char *gen_args,
                           const char *push_args)
{
  char cmd[2048];
  snprintf(cmd, sizeof(cmd),
           "set -e; d='%s/layout-%s-%s'; rm -rf \"$d\"; /usr/bin/python3 '%s/data/make-oci-layout.py' \"$d\" '%s' --seed '%s' %s; "
           "skopeo --insecure-policy copy -q --dest-tls-verify=false %s%s%s %s \"oci:$d:%s\" 'docker://%s/%s:%s' "
           ">/dev/null",
           r->dir, name, tag, TEST_SRCDIR, tag, name, gen_args, r->creds[0] ? "--dest-creds '" : "", r->creds,
           r->creds[0] ? "'" : "", push_args, tag, r->host, name, tag);
  return test_run(cmd);
}

/* The first line of a command's output (trailing newline removed), or -1. */
static __attribute__((unused)) int test_capture(const char *cmd, char *out, size_t size)
{
  FILE *f = popen(cmd, "r");
  if (!f)
    return -1;
  out[0] = 0;
  char *ok = fgets(out, (int) size, f);
  int r = pclose(f);
  if (!ok || r != 0) {
    fprintf(stderr, "command failed (%d): %s\n", r, cmd);
    return -1;
  }
  out[strcspn(out, "\n")] = 0;
  return 0;
}

/* "sha256:<hex>" of what `skopeo inspect` prints with extra ("--raw": the manifest or index the tag names;
 * "--config --raw --override-arch arm64": the image config of that platform). */
static __attribute__((unused)) int test_remote_digest(test_registry *r, const char *name, const char *tag, const char *extra, char *out,
                              size_t size)
{
  char cmd[1024], hex[128];
  snprintf(cmd, sizeof(cmd),
           "skopeo inspect --tls-verify=false %s%s%s %s 'docker://%s/%s:%s' | sha256sum | cut -d' ' -f1",
           r->creds[0] ? "--creds '" : "", r->creds, r->creds[0] ? "'" : "", extra, r->host, name, tag);
  /* sh has no pipefail: a failed skopeo shows up as the digest of nothing. */
  if (test_capture(cmd, hex, sizeof(hex)) < 0 || strlen(hex) != 64 ||
      strcmp(hex, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855") == 0)
    return -1;
  snprintf(out, size, "sha256:%s", hex);
  return 0;
}

#endif
