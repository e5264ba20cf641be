#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>

#include "auth/exec.h"
#include "common/dynbuf.h"
#include "common/util.h"

extern char **environ;

void auth_exec_result_clear(auth_exec_result *r)
{
  if (r->out) {
    explicit_bzero(r->out, r->out_len);
    free(r->out);
  }
  free(r->err);
  *r = (auth_exec_result){0};
}

/* A buffer for stdout, which holds secrets: every copy left behind when it grows is wiped, and so is the buffer
 * when it is dropped. */
typedef struct secret_buf {
  char *data;
  size_t len, cap;
} secret_buf;

static void secret_buf_wipe(secret_buf *b)
{
  if (b->data) {
    explicit_bzero(b->data, b->cap);
    free(b->data);
  }
  *b = (secret_buf){0};
}

static void secret_buf_append(secret_buf *b, const char *d, size_t n)
{
  if (b->len + n + 1 > b->cap) {
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + n + 1)
      cap *= 2;
    char *nd = xmalloc(cap);
    if (b->data)
      memcpy(nd, b->data, b->len);
    size_t len = b->len;
    secret_buf_wipe(b);
    b->data = nd;
    b->len = len;
    b->cap = cap;
  }
  memcpy(b->data + b->len, d, n);
  b->len += n;
  b->data[b->len] = '\0';
}

/* The host environment with the configured entries replacing or adding variables. */
static char **build_env(char *const *extra)
{
  size_t n_host = strv_length(environ), n_extra = strv_length(extra);
  char **env = xcalloc(n_host + n_extra + 1, sizeof(char *));
  size_t n = 0;
  for (size_t i = 0; i < n_host; i++) {
    size_t name_len = strcspn(environ[i], "=");
    bool overridden = false;
    for (size_t j = 0; j < n_extra && !overridden; j++)
      overridden = strncmp(extra[j], environ[i], name_len) == 0 && extra[j][name_len] == '=';
    if (!overridden)
      env[n++] = xstrdup(environ[i]);
  }
  for (size_t j = 0; j < n_extra; j++)
    env[n++] = xstrdup(extra[j]);
  return env;
}

/* One line for messages: newlines become spaces, other control characters '?', trailing blanks go. */
static void sanitize(char *s)
{
  char *end = s;
  for (char *p = s; *p; p++) {
    if (*p == '\n' || *p == '\r' || *p == '\t')
      *p = ' ';
    else if ((unsigned char) *p < ' ' || *p == 0x7f)
      *p = '?';
    if (*p != ' ')
      end = p + 1;
  }
  *end = '\0';
}

static void kill_and_reap(pid_t pid)
{
  kill(-pid, SIGKILL);
  kill(pid, SIGKILL);
  while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
    ;
}

int auth_exec(const auth_exec_options *o, auth_exec_result *ret, crimage_error **err)
{
  int64_t timeout_ms = o->timeout_ms > 0 ? o->timeout_ms : 60000;
  /* Checked first: some posix_spawn implementations report a failed exec only as exit status 127. */
  if (access(o->path, X_OK) < 0)
    return crimage_error_set(err, errno == ENOENT ? CRIMAGE_NOT_FOUND : CRIMAGE_PERMISSION_DENIED, errno,
                             "executing `%s`", o->path);
  /* stdin is a socket so that writing to a program that exited early gives EPIPE (MSG_NOSIGNAL) instead of a
   * SIGPIPE that would kill the whole daemon. All our ends are close-on-exec, so concurrent spawns in other
   * threads do not inherit them and EOF arrives when it should. */
  int in_fds[2] = {-1, -1}, out_fds[2] = {-1, -1}, err_fds[2] = {-1, -1};
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, in_fds) < 0)
    return crimage_error_set(err, CRIMAGE_INTERNAL, errno, "socketpair");
  if (pipe2(out_fds, O_CLOEXEC) < 0 || pipe2(err_fds, O_CLOEXEC) < 0) {
    int e = errno;
    int *all[] = {in_fds, out_fds, err_fds};
    for (size_t i = 0; i < 3; i++)
      for (size_t j = 0; j < 2; j++)
        if (all[i][j] >= 0)
          close(all[i][j]);
    return crimage_error_set(err, CRIMAGE_INTERNAL, e, "pipe");
  }

  posix_spawn_file_actions_t fa;
  posix_spawnattr_t attr;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_adddup2(&fa, in_fds[1], 0);
  posix_spawn_file_actions_adddup2(&fa, out_fds[1], 1);
  posix_spawn_file_actions_adddup2(&fa, err_fds[1], 2);
  posix_spawnattr_init(&attr);
  sigset_t none, all_sigs;
  sigemptyset(&none);
  sigfillset(&all_sigs);
  sigdelset(&all_sigs, SIGKILL);
  sigdelset(&all_sigs, SIGSTOP);
  /* Its own process group, so that a timeout kills what a plugin script started too; default signal handling and
   * an empty mask whatever the daemon's threads block or ignore. */
  posix_spawnattr_setpgroup(&attr, 0);
  posix_spawnattr_setsigmask(&attr, &none);
  posix_spawnattr_setsigdefault(&attr, &all_sigs);
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETPGROUP | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);

  char *default_argv[] = {(char *) o->path, NULL};
  cleanup_strv char **env = build_env(o->env);
  pid_t pid;
  int r = posix_spawn(&pid, o->path, &fa, &attr, o->argv ? o->argv : default_argv, env);
  posix_spawn_file_actions_destroy(&fa);
  posix_spawnattr_destroy(&attr);
  close(in_fds[1]);
  close(out_fds[1]);
  close(err_fds[1]);
  cleanup_close int in_fd = in_fds[0], out_fd = out_fds[0], err_fd = err_fds[0];
  if (r != 0)
    return crimage_error_set(err, r == ENOENT ? CRIMAGE_NOT_FOUND : CRIMAGE_INTERNAL, r, "executing `%s`", o->path);

  fcntl(in_fd, F_SETFL, O_NONBLOCK);
  size_t in_off = 0;
  if (o->input_len == 0)
    shutdown(in_fd, SHUT_WR);
  _cleanup_(secret_buf_wipe) secret_buf out = {0};
  cleanup_dynbuf dynbuf errbuf;
  dynbuf_init(&errbuf, o->max_stderr + 1);
  bool out_open = true, err_open = true, in_open = o->input_len > 0, too_big = false;
  int64_t deadline = now_monotonic_ms() + timeout_ms;
  char buf[16384];

  while (out_open || err_open) {
    int64_t left = deadline - now_monotonic_ms();
    if (left <= 0) {
      kill_and_reap(pid);
      explicit_bzero(buf, sizeof(buf));
      return crimage_error_set(err, CRIMAGE_DEADLINE_EXCEEDED, 0, "`%s` did not finish within %lld ms", o->path,
                               (long long) timeout_ms);
    }
    struct pollfd p[3];
    nfds_t np = 0;
    int idx_out = -1, idx_err = -1, idx_in = -1;
    if (out_open) {
      idx_out = (int) np;
      p[np++] = (struct pollfd){.fd = out_fd, .events = POLLIN};
    }
    if (err_open) {
      idx_err = (int) np;
      p[np++] = (struct pollfd){.fd = err_fd, .events = POLLIN};
    }
    if (in_open) {
      idx_in = (int) np;
      p[np++] = (struct pollfd){.fd = in_fd, .events = POLLOUT};
    }
    int n = poll(p, np, left > 1000 ? 1000 : (int) left);
    if (n < 0 && errno == EINTR)
      continue;
    if (n < 0) {
      int e = errno;
      kill_and_reap(pid);
      return crimage_error_set(err, CRIMAGE_INTERNAL, e, "poll");
    }
    if (idx_in >= 0 && p[idx_in].revents) {
      ssize_t w = send(in_fd, o->input + in_off, o->input_len - in_off, MSG_NOSIGNAL | MSG_DONTWAIT);
      if (w > 0)
        in_off += (size_t) w;
      if ((w < 0 && errno != EAGAIN && errno != EINTR) || in_off == o->input_len) {
        /* Done, or the program closed its stdin: it may still answer. */
        shutdown(in_fd, SHUT_WR);
        in_open = false;
      }
    }
    if (idx_out >= 0 && p[idx_out].revents) {
      ssize_t k = read(out_fd, buf, sizeof(buf));
      if (k > 0) {
        if (out.len + (size_t) k > o->max_stdout) {
          too_big = true;
          break;
        }
        secret_buf_append(&out, buf, (size_t) k);
      } else if (k == 0 || (errno != EINTR && errno != EAGAIN)) {
        out_open = false;
      }
    }
    if (idx_err >= 0 && p[idx_err].revents) {
      ssize_t k = read(err_fd, buf, sizeof(buf));
      if (k > 0) {
        size_t room = o->max_stderr > errbuf.len ? o->max_stderr - errbuf.len : 0;
        if (room > 0)
          (void) dynbuf_append(&errbuf, buf, (size_t) k < room ? (size_t) k : room);
      } else if (k == 0 || (errno != EINTR && errno != EAGAIN)) {
        err_open = false;
      }
    }
  }
  explicit_bzero(buf, sizeof(buf));
  if (too_big) {
    kill_and_reap(pid);
    return crimage_error_set(err, CRIMAGE_RESOURCE_EXHAUSTED, 0, "`%s` wrote more than %zu bytes", o->path,
                             o->max_stdout);
  }

  /* Output is closed; the program should be exiting. Wait for it within what is left of the deadline. */
  int status = 0;
  for (;;) {
    pid_t w = waitpid(pid, &status, WNOHANG);
    if (w == pid)
      break;
    if (w < 0 && errno != EINTR) {
      status = 0;
      break; /* reaped elsewhere (SIGCHLD ignored): nothing more to learn */
    }
    if (now_monotonic_ms() >= deadline) {
      kill_and_reap(pid);
      return crimage_error_set(err, CRIMAGE_DEADLINE_EXCEEDED, 0, "`%s` did not finish within %lld ms", o->path,
                               (long long) timeout_ms);
    }
    usleep(5000);
  }
  if (!out.data)
    secret_buf_append(&out, "", 0);
  ret->out_len = out.len;
  ret->out = TAKE_PTR(out.data);
  out = (secret_buf){0};
  ret->err = dynbuf_take(&errbuf, NULL);
  sanitize(ret->err);
  ret->exit_status = WIFEXITED(status) ? WEXITSTATUS(status) : WIFSIGNALED(status) ? 128 + WTERMSIG(status) : 0;
  return 0;
}
