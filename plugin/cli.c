/* crimage: the command-line client of a CRI v1 ImageService (crimaged, or any other), verbs modelled on crictl.
 *
 * Adding a verb: write a `verb_<name>(ctx, verb, argc, argv)` that parses its options with getopt_long (handing
 * unknown ones to common_option()), then add a row to the `verbs` table. Verbs with many options keep them in an
 * options struct filled by a parse function and consumed by a run function (see pull), so new options are one
 * struct field, one table entry and one switch case. */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <sys/resource.h>
#include <time.h>

#include "cli_auth.h"
#include "cli_format.h"
#include "cli_options.h"
#include "common/error.h"
#include "common/json.h"
#include "common/util.h"
#include "crimage.h"
#include "rootfs.h"
#include "pull/manifest.h"

enum {
  EXIT_OK = 0,
  EXIT_FAIL = 1,
  EXIT_USAGE = 2,
};
/* common_option() returns this when parsing goes on. */
#define CLI_CONTINUE (-1)

/* Default deadline of every call but PullImage (which has none unless --timeout is given). */
#define CLI_DEFAULT_TIMEOUT_MS 10000

typedef struct cli_ctx {
  const char *socket;
  int64_t timeout_ms;
  bool timeout_set;
  cli_output output;
  crimage_client *client; /* connected on first use */
} cli_ctx;

typedef struct cli_verb cli_verb;
struct cli_verb {
  const char *name;
  const char *synopsis; /* what follows "crimage [GLOBAL OPTIONS] <name> " */
  const char *summary;
  const char *options; /* option lines of `crimage help <name>`, or NULL */
  int (*run)(cli_ctx *ctx, const cli_verb *verb, int argc, char **argv);
};

static const cli_verb *find_verb(const char *name);

static void verb_usage(const cli_verb *v, FILE *f)
{
  fprintf(f, "Usage: crimage [GLOBAL OPTIONS] %s %s\n\n%s\n", v->name, v->synopsis, v->summary);
  fprintf(f, "\nOptions:\n%s  -o, --output=FORMAT     table or json\n  -h, --help              show this help\n",
          v->options ? v->options : "");
}

static int usage_error(const cli_verb *v, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int usage_error(const cli_verb *v, const char *fmt, ...)
{
  va_list ap;
  va_start(ap, fmt);
  fprintf(stderr, "crimage%s%s: ", v ? " " : "", v ? v->name : "");
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  fprintf(stderr, "\nTry 'crimage help%s%s'.\n", v ? " " : "", v ? v->name : "");
  return EXIT_USAGE;
}

/* Prints "crimage: <what>: <STATUS>: <message>" and frees the error. */
static int fail(const char *what, crimage_error *err)
{
  if (err) {
    cleanup_free char *msg = cli_printable(err->message);
    fprintf(stderr, "crimage: %s: %s: %s\n", what, crimage_status_name(err->status), msg);
    crimage_error_free(err);
  } else {
    fprintf(stderr, "crimage: %s: failed\n", what);
  }
  return EXIT_FAIL;
}

/* Options every verb accepts. Returns CLI_CONTINUE, or the exit code the verb must return now. */
static int common_option(cli_ctx *ctx, const cli_verb *verb, int opt, const char *arg)
{
  switch (opt) {
  case 'h':
    verb_usage(verb, stdout);
    return EXIT_OK;
  case 'o':
    if (cli_parse_output(arg, &ctx->output) < 0)
      return usage_error(verb, "invalid output format '%s' (table or json)", arg);
    return CLI_CONTINUE;
  default: /* '?' or ':': getopt has printed the problem */
    fprintf(stderr, "Try 'crimage help %s'.\n", verb->name);
    return EXIT_USAGE;
  }
}

/* Verb options may follow the arguments (GNU permutation); global ones stop at the verb. */
#define COMMON_SHORT_OPTIONS "ho:"
#define COMMON_LONG_OPTIONS {"help", no_argument, NULL, 'h'}, {"output", required_argument, NULL, 'o'}

/* Long-only options get numbers above any character. */
enum {
  OPT_RUNTIME_HANDLER = 0x100,
  OPT_CREDS,
  OPT_USERNAME,
  OPT_PASSWORD,
  OPT_PASSWORD_STDIN,
  OPT_AUTH,
  OPT_SERVER_ADDRESS,
  OPT_IDENTITY_TOKEN,
  OPT_REGISTRY_TOKEN,
  OPT_POD_UID,
  OPT_DIGESTS,
  OPT_NO_TRUNC,
  OPT_POLICY,
  OPT_SECRET,
};

#define RUNTIME_HANDLER_OPTION {"runtime-handler", required_argument, NULL, OPT_RUNTIME_HANDLER}
#define RUNTIME_HANDLER_HELP "      --runtime-handler=H the runtime handler (RuntimeClass) the image is for\n"

/* Starts option parsing of a verb: argv[0] is the verb; getopt's messages then read "crimage <verb>: ...". */
static void verb_getopt_begin(const cli_verb *verb, char **argv, char **saved_name)
{
  *saved_name = xasprintf("crimage %s", verb->name);
  argv[0] = *saved_name;
  optind = 0; /* glibc: a full re-initialisation */
}

/* Parses the options of a verb that has only the common ones and takes no arguments; *saved_name as for
 * verb_getopt_begin. */
static int parse_common_only(cli_ctx *ctx, const cli_verb *verb, int argc, char **argv, char **saved_name)
{
  static const struct option options[] = {COMMON_LONG_OPTIONS, {}};
  verb_getopt_begin(verb, argv, saved_name);
  int opt;
  while ((opt = getopt_long(argc, argv, COMMON_SHORT_OPTIONS, options, NULL)) != -1) {
    int r = common_option(ctx, verb, opt, optarg);
    if (r != CLI_CONTINUE)
      return r;
  }
  if (optind < argc)
    return usage_error(verb, "takes no arguments");
  return CLI_CONTINUE;
}

static int ctx_client(cli_ctx *ctx, crimage_client **ret, crimage_error **err)
{
  if (!ctx->client) {
    int r = crimage_client_connect(ctx->socket, &ctx->client, err);
    if (r < 0)
      return r;
    crimage_client_set_timeout(ctx->client, ctx->timeout_ms);
  }
  *ret = ctx->client;
  return 0;
}

static cli_output ctx_output(const cli_ctx *ctx, cli_output verb_default)
{
  return ctx->output != CLI_OUTPUT_DEFAULT ? ctx->output : verb_default;
}

/* ---- pull ---- */

typedef struct pull_opts {
  const char *image;
  const char *runtime_handler;
  const char *pod_uid;
  char *creds; /* secret: USER:PASS, split into username and password after parsing */
  char *username;
  char *password; /* secret */
  bool password_stdin;
  char *auth; /* secret */
  char *server_address;
  char *identity_token; /* secret */
  char *registry_token; /* secret */
  const char *policy;   /* Always, IfNotPresent, Never; NULL = as Kubernetes defaults it */
  bool quiet;           /* no progress */
  char **secrets;       /* --secret: files of image pull Secrets */
} pull_opts;

static void pull_opts_done(pull_opts *o)
{
  secret_free(o->creds);
  free(o->username);
  secret_free(o->password);
  secret_free(o->auth);
  free(o->server_address);
  secret_free(o->identity_token);
  secret_free(o->registry_token);
  strv_free(o->secrets);
}

/* Replaces *dst with a copy of a secret argument, wiping the argument. */
static void take_secret(char **dst, char *arg)
{
  secret_free(*dst);
  *dst = cli_take_secret(arg);
}

static void take_string(char **dst, const char *arg)
{
  free(*dst);
  *dst = xstrdup(arg);
}

static int pull_parse(const cli_verb *verb, cli_ctx *ctx, int argc, char **argv, pull_opts *o)
{
  static const struct option options[] = {
      COMMON_LONG_OPTIONS,
      RUNTIME_HANDLER_OPTION,
      {"creds", required_argument, NULL, OPT_CREDS},
      {"username", required_argument, NULL, OPT_USERNAME},
      {"password", required_argument, NULL, OPT_PASSWORD},
      {"password-stdin", no_argument, NULL, OPT_PASSWORD_STDIN},
      {"auth", required_argument, NULL, OPT_AUTH},
      {"server-address", required_argument, NULL, OPT_SERVER_ADDRESS},
      {"identity-token", required_argument, NULL, OPT_IDENTITY_TOKEN},
      {"registry-token", required_argument, NULL, OPT_REGISTRY_TOKEN},
      {"pod-uid", required_argument, NULL, OPT_POD_UID},
      {"policy", required_argument, NULL, OPT_POLICY},
      {"secret", required_argument, NULL, OPT_SECRET},
      {"quiet", no_argument, NULL, 'q'},
      {},
  };
  /* The options that take a string of their own; secrets are copied and wiped from argv as soon as getopt hands
   * them over, even when parsing fails later. */
  const struct {
    int opt;
    char **dst;
    bool secret;
  } strings[] = {
      {OPT_CREDS, &o->creds, true},
      {OPT_USERNAME, &o->username, false},
      {OPT_PASSWORD, &o->password, true},
      {OPT_AUTH, &o->auth, true},
      {OPT_SERVER_ADDRESS, &o->server_address, false},
      {OPT_IDENTITY_TOKEN, &o->identity_token, true},
      {OPT_REGISTRY_TOKEN, &o->registry_token, true},
  };
  int opt;
  while ((opt = getopt_long(argc, argv, COMMON_SHORT_OPTIONS "q", options, NULL)) != -1) {
    size_t i = 0;
    while (i < ARRAY_SIZE(strings) && strings[i].opt != opt)
      i++;
    if (i < ARRAY_SIZE(strings)) {
      if (strings[i].secret)
        take_secret(strings[i].dst, optarg);
      else
        take_string(strings[i].dst, optarg);
      continue;
    }
    switch (opt) {
    case OPT_RUNTIME_HANDLER:
      o->runtime_handler = optarg;
      break;
    case OPT_POLICY:
      o->policy = optarg;
      break;
    case 'q':
      o->quiet = true;
      break;
    case OPT_PASSWORD_STDIN:
      o->password_stdin = true;
      break;
    case OPT_POD_UID:
      o->pod_uid = optarg;
      break;
    case OPT_SECRET:
      strv_add_unique(&o->secrets, optarg);
      break;
    default: {
      int r = common_option(ctx, verb, opt, optarg);
      if (r != CLI_CONTINUE)
        return r;
    }
    }
  }
  if (optind + 1 != argc)
    return usage_error(verb, optind == argc ? "no image given" : "one image at a time");
  o->image = argv[optind];

  crimage_pull_policy policy;
  if (o->policy && crimage_pull_policy_parse(o->policy, &policy) < 0)
    return usage_error(verb, "invalid pull policy '%s' (Always, IfNotPresent or Never)", o->policy);
  if (o->creds && (o->username || o->password || o->password_stdin))
    return usage_error(verb, "--creds excludes --username, --password and --password-stdin");
  if (o->password && o->password_stdin)
    return usage_error(verb, "--password excludes --password-stdin");
  if (o->creds && cli_parse_creds(o->creds, &o->username, &o->password) < 0)
    return usage_error(verb, "--creds takes USERNAME:PASSWORD");
  if (o->password_stdin) {
    int r = cli_read_secret(STDIN_FILENO, &o->password);
    if (r == -E2BIG)
      return usage_error(verb, "the password on standard input is longer than %d bytes", CLI_MAX_SECRET);
    if (r < 0)
      return usage_error(verb, "no password on standard input");
  }
  if (o->secrets && (o->username || o->auth || o->identity_token || o->registry_token))
    return usage_error(verb, "--secret excludes credentials given on the command line");
  if (o->password && !o->username)
    return usage_error(verb, "--password needs --username");
  if (o->username && !o->password)
    return usage_error(verb, "--username needs --password or --password-stdin");
  return CLI_CONTINUE;
}

/* ---- pull progress: PullImage runs on a thread of its own while this one follows WatchPull ---- */

#define PROGRESS_MAX_BLOB_LINES 16
#define PROGRESS_PLAIN_INTERVAL_MS 2000
#define PROGRESS_BAR_WIDTH 24

typedef struct blob_rate {
  char *digest;
  uint64_t last_done;
  int64_t last_ms;
  double rate; /* bytes/s, smoothed */
} blob_rate;

typedef struct progress_view {
  pthread_mutex_t lock;
  bool done; /* PullImage returned */
  bool tty;
  FILE *out;
  const char *image;
  size_t lines_drawn;
  int64_t last_plain_ms;
  int last_state; /* -1: nothing shown yet */
  blob_rate *rates;
  size_t n_rates;
  double total_rate;
  uint64_t total_last_done;
  int64_t total_last_ms;
  crimage_pull_status last; /* the last update shown (id 0: none) */
} progress_view;

static void pull_status_copy(crimage_pull_status *dst, const crimage_pull_status *src)
{
  *dst = *src;
  dst->reference = xstrdup(src->reference);
  dst->runtime_handler = xstrdup(src->runtime_handler);
  dst->pod_uid = xstrdup(src->pod_uid);
  dst->error = xstrdup(src->error);
  dst->blobs = xcalloc(src->n_blobs + 1, sizeof(*dst->blobs));
  for (size_t i = 0; i < src->n_blobs; i++) {
    dst->blobs[i] = src->blobs[i];
    dst->blobs[i].digest = xstrdup(src->blobs[i].digest);
  }
}

static int64_t mono_ms(void)
{
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t) ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Smooths the rate of a counter that went from *last_done at *last_ms to done at now. */
static void update_rate(double *rate, uint64_t *last_done, int64_t *last_ms, uint64_t done, int64_t now)
{
  if (*last_ms == 0) {
    *last_ms = now;
    *last_done = done;
    return;
  }
  int64_t dt = now - *last_ms;
  if (dt < 200)
    return;
  double inst = done > *last_done ? (double) (done - *last_done) * 1000.0 / (double) dt : 0;
  *rate = *rate == 0 ? inst : 0.6 * *rate + 0.4 * inst;
  *last_done = done;
  *last_ms = now;
}

static blob_rate *view_rate(progress_view *v, const char *digest)
{
  for (size_t i = 0; i < v->n_rates; i++)
    if (streq(v->rates[i].digest, digest))
      return &v->rates[i];
  v->rates = xrealloc(v->rates, (v->n_rates + 1) * sizeof(*v->rates));
  blob_rate *b = &v->rates[v->n_rates++];
  *b = (blob_rate){.digest = xstrdup(digest)};
  return b;
}

static void format_eta(double seconds, char *buf, size_t len)
{
  if (seconds <= 0 || seconds > 99 * 3600)
    snprintf(buf, len, "--");
  else if (seconds < 60)
    snprintf(buf, len, "%.0fs", seconds);
  else if (seconds < 3600)
    snprintf(buf, len, "%dm%02ds", (int) seconds / 60, (int) seconds % 60);
  else
    snprintf(buf, len, "%dh%02dm", (int) seconds / 3600, ((int) seconds % 3600) / 60);
}

static const char *pull_state_name(crimage_pull_state s)
{
  switch (s) {
  case CRIMAGE_PULL_QUEUED:
    return "queued";
  case CRIMAGE_PULL_RUNNING:
    return "running";
  case CRIMAGE_PULL_SUCCEEDED:
    return "succeeded";
  case CRIMAGE_PULL_FAILED:
    return "failed";
  }
  return "unknown";
}

static int percent(uint64_t done, uint64_t total)
{
  if (total == 0)
    return 0;
  return done >= total ? 100 : (int) (done * 100 / total);
}

/* One line per blob, redrawn in place: "  <digest>  [####----]  52%  2.1MB / 4MB  1.0MB/s  ETA 2s". */
static void draw_tty(progress_view *v, const crimage_pull_status *s, int64_t now)
{
  cleanup_free char *ref = cli_printable(s->reference);
  char done[16], total[16];
  cli_format_size(s->bytes_done, done, sizeof(done));
  cli_format_size(s->bytes_total, total, sizeof(total));
  if (v->lines_drawn)
    fprintf(v->out, "\033[%zuA", v->lines_drawn);
  size_t lines = 0;
  fprintf(v->out, "\r\033[KPulling %s: %s, %s / %s (%d%%)\n", ref, pull_state_name(s->state), done, total,
          percent(s->bytes_done, s->bytes_total));
  lines++;
  for (size_t i = 0; i < s->n_blobs && i < PROGRESS_MAX_BLOB_LINES; i++) {
    const crimage_pull_blob *b = &s->blobs[i];
    blob_rate *br = view_rate(v, b->digest);
    update_rate(&br->rate, &br->last_done, &br->last_ms, b->done, now);
    const char *hex = strchr(b->digest, ':') ? strchr(b->digest, ':') + 1 : b->digest;
    cleanup_free char *short_digest = cli_printable(hex);
    if (strlen(short_digest) > 12)
      short_digest[12] = '\0';
    int pct = b->finished ? 100 : percent(b->done, b->total);
    char bar[PROGRESS_BAR_WIDTH + 1];
    int fill = pct * PROGRESS_BAR_WIDTH / 100;
    for (int k = 0; k < PROGRESS_BAR_WIDTH; k++)
      bar[k] = k < fill ? '#' : '-';
    bar[PROGRESS_BAR_WIDTH] = '\0';
    char bdone[16], btotal[16], rate[16], eta[16];
    cli_format_size(b->done, bdone, sizeof(bdone));
    cli_format_size(b->total, btotal, sizeof(btotal));
    cli_format_size((uint64_t) br->rate, rate, sizeof(rate));
    if (b->finished)
      snprintf(eta, sizeof(eta), "done");
    else
      format_eta(br->rate > 0 ? (double) (b->total - (b->done < b->total ? b->done : b->total)) / br->rate : 0, eta,
                 sizeof(eta));
    fprintf(v->out, "\r\033[K  %-12s [%s] %3d%%  %8s / %-8s %8s/s  ETA %s\n", short_digest, bar, pct, bdone, btotal,
            rate, eta);
    lines++;
  }
  if (s->n_blobs > PROGRESS_MAX_BLOB_LINES) {
    fprintf(v->out, "\r\033[K  ... and %zu more blobs\n", s->n_blobs - PROGRESS_MAX_BLOB_LINES);
    lines++;
  }
  if (lines < v->lines_drawn)
    fprintf(v->out, "\033[J");
  v->lines_drawn = lines;
  fflush(v->out);
}

/* Plain lines for logs and pipes: on a change of state and every few seconds. */
static void draw_plain(progress_view *v, const crimage_pull_status *s, int64_t now)
{
  update_rate(&v->total_rate, &v->total_last_done, &v->total_last_ms, s->bytes_done, now);
  bool over = s->state == CRIMAGE_PULL_SUCCEEDED || s->state == CRIMAGE_PULL_FAILED;
  if ((int) s->state == v->last_state && !over && now - v->last_plain_ms < PROGRESS_PLAIN_INTERVAL_MS)
    return;
  if ((int) s->state == v->last_state && over)
    return;
  v->last_plain_ms = now;
  cleanup_free char *ref = cli_printable(s->reference);
  char done[16], total[16], rate[16];
  cli_format_size(s->bytes_done, done, sizeof(done));
  cli_format_size(s->bytes_total, total, sizeof(total));
  cli_format_size((uint64_t) v->total_rate, rate, sizeof(rate));
  size_t finished = 0;
  for (size_t i = 0; i < s->n_blobs; i++)
    finished += s->blobs[i].finished;
  fprintf(v->out, "pull %s: %s, %zu/%zu blobs, %s of %s (%d%%), %s/s\n", ref, pull_state_name(s->state), finished,
          s->n_blobs, done, total, percent(s->bytes_done, s->bytes_total), rate);
  fflush(v->out);
}

static int watch_update(void *userdata, const crimage_pull_status *s)
{
  progress_view *v = userdata;
  pthread_mutex_lock(&v->lock);
  bool done = v->done;
  if (!done) {
    int64_t now = mono_ms();
    if (v->tty)
      draw_tty(v, s, now);
    else
      draw_plain(v, s, now);
    v->last_state = (int) s->state;
    crimage_pull_status_clear(&v->last);
    pull_status_copy(&v->last, s);
  }
  pthread_mutex_unlock(&v->lock);
  return done;
}

typedef struct pull_call {
  crimage_client *client;
  const pull_opts *o;
  const crimage_auth *auth;
  progress_view *view;
  char *ref;
  crimage_error *err;
  int r;
} pull_call;

static void *pull_thread(void *arg)
{
  pull_call *pc = arg;
  pc->r = crimage_client_pull(pc->client, pc->o->image, pc->o->runtime_handler, pc->auth, pc->o->pod_uid, &pc->ref,
                              &pc->err);
  pthread_mutex_lock(&pc->view->lock);
  pc->view->done = true;
  pthread_mutex_unlock(&pc->view->lock);
  return NULL;
}

/* Runs PullImage, showing the pull's progress meanwhile when the server offers it. */
static int pull_with_progress(crimage_client *client, const pull_opts *o, const crimage_auth *auth, char **ret_ref,
                              crimage_error **err)
{
  const char *term = getenv("TERM");
  progress_view view = {
      .tty = isatty(STDERR_FILENO) && !(term && streq(term, "dumb")),
      .out = stderr,
      .image = o->image,
      .last_state = -1,
  };
  pthread_mutex_init(&view.lock, NULL);
  pull_call pc = {.client = client, .o = o, .auth = auth, .view = &view};
  pthread_t t;
  if (pthread_create(&t, NULL, pull_thread, &pc) != 0) {
    pthread_mutex_destroy(&view.lock);
    return crimage_client_pull(client, o->image, o->runtime_handler, auth, o->pod_uid, ret_ref, err);
  }
  for (;;) {
    pthread_mutex_lock(&view.lock);
    bool done = view.done;
    pthread_mutex_unlock(&view.lock);
    if (done)
      break;
    crimage_error *werr = NULL;
    int r = crimage_client_watch_pull(client, o->image, o->runtime_handler, watch_update, &view, &werr);
    crimage_status st = r < 0 && werr ? werr->status : CRIMAGE_OK;
    crimage_error_free(werr);
    if (st == CRIMAGE_UNIMPLEMENTED)
      break; /* not crimaged: no progress to show */
    if (r < 0 || st == CRIMAGE_OK)
      nanosleep(&(struct timespec){.tv_nsec = 100 * 1000 * 1000}, NULL); /* not started yet, or over */
  }
  pthread_join(t, NULL);
  /* PullImage may answer before the last update arrives: show the pull complete. */
  if (pc.r >= 0 && view.last.id != 0 && view.last_state != CRIMAGE_PULL_SUCCEEDED) {
    crimage_pull_status *s = &view.last;
    s->state = CRIMAGE_PULL_SUCCEEDED;
    if (s->bytes_done < s->bytes_total)
      s->bytes_done = s->bytes_total;
    for (size_t i = 0; i < s->n_blobs; i++) {
      s->blobs[i].done = s->blobs[i].total;
      s->blobs[i].finished = true;
    }
    if (view.tty)
      draw_tty(&view, s, mono_ms());
    else
      draw_plain(&view, s, mono_ms());
  }
  crimage_pull_status_clear(&view.last);
  for (size_t i = 0; i < view.n_rates; i++)
    free(view.rates[i].digest);
  free(view.rates);
  pthread_mutex_destroy(&view.lock);
  if (pc.r < 0) {
    *err = pc.err;
    return pc.r;
  }
  *ret_ref = pc.ref;
  return 0;
}

static void print_pulled(cli_ctx *ctx, const char *ref)
{
  if (ctx_output(ctx, CLI_OUTPUT_TABLE) == CLI_OUTPUT_JSON) {
    cleanup_json json_object *obj = json_object_new_object();
    json_object_object_add(obj, "imageRef", json_object_new_string(ref));
    cli_json_print(obj, stdout);
  } else {
    cleanup_free char *p = cli_printable(ref);
    printf("Image is up to date for %s\n", p);
  }
}

/* One PullImage for cli_auth_pull (--secret): with progress unless --quiet. */
typedef struct pull_once_ctx {
  crimage_client *client;
  const pull_opts *o;
} pull_once_ctx;

static int pull_once(void *userdata, const crimage_auth *auth, char **ret_ref, crimage_error **err)
{
  pull_once_ctx *p = userdata;
  if (p->o->quiet)
    return crimage_client_pull(p->client, p->o->image, p->o->runtime_handler, auth, p->o->pod_uid, ret_ref, err);
  return pull_with_progress(p->client, p->o, auth, ret_ref, err);
}

static int pull_run(cli_ctx *ctx, const pull_opts *o)
{
  crimage_error *err = NULL;
  cleanup_free char *what = xasprintf("pull %s", o->image);
  crimage_client *client = NULL;
  if (ctx_client(ctx, &client, &err) < 0)
    return fail(what, err);

  /* The policy as a pod spec states it, or as Kubernetes defaults it from the reference. */
  crimage_pull_policy policy;
  if (o->policy)
    crimage_pull_policy_parse(o->policy, &policy);
  else if (crimage_pull_policy_default(o->image, &policy, &err) < 0)
    return fail(what, err);
  if (policy != CRIMAGE_PULL_ALWAYS) {
    crimage_image *img = NULL;
    if (crimage_client_image_status(client, o->image, o->runtime_handler, false, &img, NULL, &err) < 0)
      return fail(what, err);
    if (img) {
      print_pulled(ctx, img->id);
      crimage_image_free(img);
      return EXIT_OK;
    }
    if (policy == CRIMAGE_PULL_NEVER) {
      crimage_error_set(&err, CRIMAGE_FAILED_PRECONDITION, 0,
                        "image \"%s\" is not present%s%s%s and the pull policy is Never", o->image,
                        str_empty(o->runtime_handler) ? "" : " for runtime handler \"",
                        str_empty(o->runtime_handler) ? "" : o->runtime_handler,
                        str_empty(o->runtime_handler) ? "" : "\"");
      return fail(what, err);
    }
  }

  /* A pull may take long: no deadline unless the user asked for one. */
  if (!ctx->timeout_set)
    crimage_client_set_timeout(client, 0);

  crimage_auth auth = {
      .username = o->username,
      .password = o->password,
      .auth = o->auth,
      .server_address = o->server_address,
      .identity_token = o->identity_token,
      .registry_token = o->registry_token,
  };
  bool have_auth = o->username || o->auth || o->identity_token || o->registry_token || o->server_address;
  cleanup_free char *ref = NULL;
  int r;
  if (o->secrets) {
    pull_once_ctx pctx = {.client = client, .o = o};
    r = cli_auth_pull(o->secrets, o->image, what, pull_once, &pctx, &ref, &err);
  } else if (o->quiet)
    r = crimage_client_pull(client, o->image, o->runtime_handler, have_auth ? &auth : NULL, o->pod_uid, &ref, &err);
  else
    r = pull_with_progress(client, o, have_auth ? &auth : NULL, &ref, &err);
  crimage_client_set_timeout(client, ctx->timeout_ms);
  if (r < 0)
    return fail(what, err);
  print_pulled(ctx, ref);
  return EXIT_OK;
}

static int verb_pull(cli_ctx *ctx, const cli_verb *verb, int argc, char **argv)
{
  cleanup_free char *name = NULL;
  verb_getopt_begin(verb, argv, &name);
  pull_opts o = {};
  int r = pull_parse(verb, ctx, argc, argv, &o);
  if (r == CLI_CONTINUE)
    r = pull_run(ctx, &o);
  pull_opts_done(&o);
  return r;
}

/* ---- images ---- */

static int image_cmp(const void *a, const void *b)
{
  const crimage_image *x = *(crimage_image *const *) a, *y = *(crimage_image *const *) b;
  const char *tx = x->repo_tags[0] ? x->repo_tags[0] : "", *ty = y->repo_tags[0] ? y->repo_tags[0] : "";
  int r = strcmp(tx, ty);
  return r ? r : strcmp(x->id, y->id);
}

/* A listing without --runtime-handler holds the images of every handler; then a HANDLER column tells them apart
 * (absent otherwise, so the table is crictl's). */
static bool any_handler(crimage_image **images, size_t n)
{
  for (size_t i = 0; i < n; i++)
    if (!str_empty(images[i]->runtime_handler))
      return true;
  return false;
}

static void images_table(crimage_image **images, size_t n, bool digests, bool no_trunc)
{
  bool handlers = any_handler(images, n);
  const char *headers[6];
  size_t ncols = 0;
  headers[ncols++] = "IMAGE";
  headers[ncols++] = "TAG";
  if (digests)
    headers[ncols++] = "DIGEST";
  headers[ncols++] = "IMAGE ID";
  headers[ncols++] = "SIZE";
  if (handlers)
    headers[ncols++] = "HANDLER";
  cli_table *t = cli_table_new(ncols, headers);
  for (size_t i = 0; i < n; i++) {
    const crimage_image *img = images[i];
    char size[32];
    cli_format_size(img->size, size, sizeof(size));
    cleanup_free char *id = no_trunc ? xstrdup(img->id) : cli_short_id(img->id);
    const char *at = img->repo_digests[0] ? strchr(img->repo_digests[0], '@') : NULL;
    cleanup_free char *digest = !at ? xstrdup(CLI_NONE) : no_trunc ? xstrdup(at + 1) : cli_short_id(at + 1);
    const char *handler = str_empty(img->runtime_handler) ? "(default)" : img->runtime_handler;

    size_t ntags = strv_length(img->repo_tags);
    for (size_t j = 0; j < (ntags ? ntags : 1); j++) {
      char *repo = NULL, *tag = NULL;
      if (ntags) {
        cli_split_repo_tag(img->repo_tags[j], &repo, &tag);
      } else {
        repo = cli_repo_from_digests(img->repo_digests);
        tag = xstrdup(CLI_NONE);
      }
      const char *row[6];
      size_t c = 0;
      row[c++] = repo;
      row[c++] = tag;
      if (digests)
        row[c++] = digest;
      row[c++] = id;
      row[c++] = size;
      if (handlers)
        row[c++] = handler;
      cli_table_add_row(t, row);
      free(repo);
      free(tag);
    }
  }
  cli_table_sort(t);
  cli_table_print(t, stdout);
  cli_table_free(t);
}

static int verb_images(cli_ctx *ctx, const cli_verb *verb, int argc, char **argv)
{
  static const struct option options[] = {
      COMMON_LONG_OPTIONS,
      RUNTIME_HANDLER_OPTION,
      {"quiet", no_argument, NULL, 'q'},
      {"digests", no_argument, NULL, OPT_DIGESTS},
      {"no-trunc", no_argument, NULL, OPT_NO_TRUNC},
      {},
  };
  cleanup_free char *name = NULL;
  verb_getopt_begin(verb, argv, &name);
  const char *handler = NULL;
  bool quiet = false, digests = false, no_trunc = false;
  int opt;
  while ((opt = getopt_long(argc, argv, COMMON_SHORT_OPTIONS "q", options, NULL)) != -1) {
    switch (opt) {
    case OPT_RUNTIME_HANDLER:
      handler = optarg;
      break;
    case 'q':
      quiet = true;
      break;
    case OPT_DIGESTS:
      digests = true;
      break;
    case OPT_NO_TRUNC:
      no_trunc = true;
      break;
    default: {
      int r = common_option(ctx, verb, opt, optarg);
      if (r != CLI_CONTINUE)
        return r;
    }
    }
  }
  if (argc - optind > 1)
    return usage_error(verb, "at most one image filter");
  const char *filter = optind < argc ? argv[optind] : NULL;

  crimage_error *err = NULL;
  crimage_client *client = NULL;
  crimage_image **images = NULL;
  size_t n = 0;
  if (ctx_client(ctx, &client, &err) < 0 || crimage_client_list_images(client, filter, handler, &images, &n, &err) < 0)
    return fail("images", err);
  qsort(images, n, sizeof(*images), image_cmp);

  if (quiet) {
    cleanup_strv char **seen = xcalloc(1, sizeof(char *));
    for (size_t i = 0; i < n; i++)
      if (strv_add_unique(&seen, images[i]->id)) {
        cleanup_free char *p = cli_printable(images[i]->id);
        printf("%s\n", p);
      }
  } else if (ctx_output(ctx, CLI_OUTPUT_TABLE) == CLI_OUTPUT_JSON) {
    cleanup_json json_object *obj = json_object_new_object();
    json_object *arr = json_object_new_array();
    for (size_t i = 0; i < n; i++)
      json_object_array_add(arr, cli_image_to_json(images[i]));
    json_object_object_add(obj, "images", arr);
    cli_json_print(obj, stdout);
  } else {
    images_table(images, n, digests, no_trunc);
  }
  crimage_image_list_free(images, n);
  return EXIT_OK;
}

/* ---- inspect ---- */

static void inspect_print_table(const crimage_image *img)
{
  char size[32];
  cli_format_size(img->size, size, sizeof(size));
  cleanup_free char *id = cli_printable(img->id);
  printf("ID:       %s\n", id);
  for (size_t i = 0; img->repo_tags[i]; i++) {
    cleanup_free char *p = cli_printable(img->repo_tags[i]);
    printf("%s %s\n", i == 0 ? "Tags:    " : "         ", p);
  }
  for (size_t i = 0; img->repo_digests[i]; i++) {
    cleanup_free char *p = cli_printable(img->repo_digests[i]);
    printf("%s %s\n", i == 0 ? "Digests: " : "         ", p);
  }
  printf("Size:     %s (%" PRIu64 " bytes)\n", size, img->size);
  if (img->has_uid) {
    printf("UID:      %" PRId64 "\n", img->uid);
  } else if (!str_empty(img->username)) {
    cleanup_free char *p = cli_printable(img->username);
    printf("Username: %s\n", p);
  }
  if (!str_empty(img->runtime_handler)) {
    cleanup_free char *p = cli_printable(img->runtime_handler);
    printf("Handler:  %s\n", p);
  }
  printf("Pinned:   %s\n", img->pinned ? "true" : "false");
}

/* {"status": <image>, <each info key>: <its value>} as crictl inspecti prints it. */
static json_object *inspect_json(const crimage_image *img, const char *info_json)
{
  json_object *obj = json_object_new_object();
  json_object_object_add(obj, "status", cli_image_to_json(img));
  json_object *info = NULL;
  crimage_error *err = NULL;
  if (info_json && json_parse(info_json, strlen(info_json), "info", IMAGE_CONFIG_JSON_LIMITS, &info, &err) == 0) {
    json_object_object_foreach(info, key, value) json_object_object_add(obj, key, json_object_get(value));
    json_object_put(info);
  }
  crimage_error_free(err);
  return obj;
}

static int verb_inspect(cli_ctx *ctx, const cli_verb *verb, int argc, char **argv)
{
  static const struct option options[] = {COMMON_LONG_OPTIONS, RUNTIME_HANDLER_OPTION, {}};
  cleanup_free char *name = NULL;
  verb_getopt_begin(verb, argv, &name);
  const char *handler = NULL;
  int opt;
  while ((opt = getopt_long(argc, argv, COMMON_SHORT_OPTIONS, options, NULL)) != -1) {
    if (opt == OPT_RUNTIME_HANDLER) {
      handler = optarg;
      continue;
    }
    int r = common_option(ctx, verb, opt, optarg);
    if (r != CLI_CONTINUE)
      return r;
  }
  if (optind == argc)
    return usage_error(verb, "no image given");

  crimage_error *err = NULL;
  crimage_client *client = NULL;
  if (ctx_client(ctx, &client, &err) < 0)
    return fail("inspect", err);
  /* crictl's default for inspecti is JSON; one image prints an object, several an array. */
  bool json = ctx_output(ctx, CLI_OUTPUT_JSON) == CLI_OUTPUT_JSON;
  bool many = argc - optind > 1;
  cleanup_json json_object *arr = json_object_new_array();
  int ret = EXIT_OK;
  for (int i = optind; i < argc; i++) {
    cleanup_free char *what = xasprintf("inspect %s", argv[i]);
    crimage_image *img = NULL;
    cleanup_free char *info = NULL;
    if (crimage_client_image_status(client, argv[i], handler, true, &img, &info, &err) < 0) {
      ret = fail(what, err);
      err = NULL;
      continue;
    }
    if (!img) {
      crimage_error_set(&err, CRIMAGE_NOT_FOUND, 0, "no such image");
      ret = fail(what, err);
      err = NULL;
      continue;
    }
    if (json) {
      json_object_array_add(arr, inspect_json(img, info));
    } else {
      if (i > optind)
        printf("\n");
      inspect_print_table(img);
    }
    crimage_image_free(img);
  }
  if (json && json_object_array_length(arr) > 0) {
    if (many)
      cli_json_print(arr, stdout);
    else if (json_object_array_length(arr) == 1)
      cli_json_print(json_object_array_get_idx(arr, 0), stdout);
  }
  return ret;
}

/* ---- rm ---- */

static int remove_one(cli_ctx *ctx, crimage_client *client, const char *image, const char *handler,
                      json_object *deleted)
{
  cleanup_free char *what = xasprintf("rm %s", image);
  crimage_error *err = NULL;
  crimage_image *img = NULL;
  /* As crictl does: resolve first, so an unknown name is an error and we can name what went. */
  if (crimage_client_image_status(client, image, handler, false, &img, NULL, &err) < 0)
    return fail(what, err);
  if (!img) {
    crimage_error_set(&err, CRIMAGE_NOT_FOUND, 0, "no such image");
    return fail(what, err);
  }
  int r = crimage_client_remove_image(client, img->id, handler, &err);
  if (r < 0) {
    crimage_image_free(img);
    return fail(what, err);
  }
  char *const *names = img->repo_tags[0] ? img->repo_tags : (char *const[]){img->id, NULL};
  for (size_t i = 0; names[i]; i++) {
    if (deleted) {
      json_object_array_add(deleted, json_object_new_string(names[i]));
    } else {
      cleanup_free char *p = cli_printable(names[i]);
      printf("Deleted: %s\n", p);
    }
  }
  crimage_image_free(img);
  return EXIT_OK;
}

static int verb_rm(cli_ctx *ctx, const cli_verb *verb, int argc, char **argv)
{
  static const struct option options[] = {
      COMMON_LONG_OPTIONS, RUNTIME_HANDLER_OPTION, {"all", no_argument, NULL, 'a'}, {}};
  cleanup_free char *name = NULL;
  verb_getopt_begin(verb, argv, &name);
  const char *handler = NULL;
  bool all = false;
  int opt;
  while ((opt = getopt_long(argc, argv, COMMON_SHORT_OPTIONS "a", options, NULL)) != -1) {
    switch (opt) {
    case OPT_RUNTIME_HANDLER:
      handler = optarg;
      break;
    case 'a':
      all = true;
      break;
    default: {
      int r = common_option(ctx, verb, opt, optarg);
      if (r != CLI_CONTINUE)
        return r;
    }
    }
  }
  if (all && optind < argc)
    return usage_error(verb, "--all takes no image");
  if (!all && optind == argc)
    return usage_error(verb, "no image given");

  crimage_error *err = NULL;
  crimage_client *client = NULL;
  if (ctx_client(ctx, &client, &err) < 0)
    return fail("rm", err);
  cleanup_strv char **targets = NULL;
  if (all) {
    crimage_image **images = NULL;
    size_t n = 0;
    if (crimage_client_list_images(client, NULL, handler, &images, &n, &err) < 0)
      return fail("rm", err);
    /* Without a handler in the filter the service lists every handler's images: keep this handler's. */
    targets = xcalloc(n + 1, sizeof(char *));
    size_t k = 0;
    for (size_t i = 0; i < n; i++)
      if (streq(images[i]->runtime_handler, handler ? handler : ""))
        targets[k++] = xstrdup(images[i]->id);
    crimage_image_list_free(images, n);
  } else {
    targets = strv_copy(argv + optind);
  }

  bool json = ctx_output(ctx, CLI_OUTPUT_TABLE) == CLI_OUTPUT_JSON;
  cleanup_json json_object *deleted = json ? json_object_new_array() : NULL;
  int ret = EXIT_OK;
  for (size_t i = 0; targets[i]; i++)
    if (remove_one(ctx, client, targets[i], handler, deleted) != EXIT_OK)
      ret = EXIT_FAIL;
  if (json) {
    cleanup_json json_object *obj = json_object_new_object();
    json_object_object_add(obj, "deleted", json_object_get(deleted));
    cli_json_print(obj, stdout);
  }
  return ret;
}

/* ---- fsinfo ---- */

static int verb_fsinfo(cli_ctx *ctx, const cli_verb *verb, int argc, char **argv)
{
  cleanup_free char *name = NULL;
  int r = parse_common_only(ctx, verb, argc, argv, &name);
  if (r != CLI_CONTINUE)
    return r;

  crimage_error *err = NULL;
  crimage_client *client = NULL;
  crimage_fs_usage *usage = NULL;
  size_t n = 0;
  if (ctx_client(ctx, &client, &err) < 0 || crimage_client_fs_info(client, &usage, &n, &err) < 0)
    return fail("fsinfo", err);
  if (ctx_output(ctx, CLI_OUTPUT_TABLE) == CLI_OUTPUT_JSON) {
    cleanup_json json_object *obj = cli_fs_usage_to_json(usage, n);
    cli_json_print(obj, stdout);
  } else {
    const char *headers[] = {"MOUNTPOINT", "USED", "INODES"};
    cli_table *t = cli_table_new(3, headers);
    for (size_t i = 0; i < n; i++) {
      char used[32], inodes[32];
      cli_format_size(usage[i].used_bytes, used, sizeof(used));
      snprintf(inodes, sizeof(inodes), "%" PRIu64, usage[i].inodes_used);
      const char *row[] = {usage[i].mountpoint, used, inodes};
      cli_table_add_row(t, row);
    }
    cli_table_print(t, stdout);
    cli_table_free(t);
  }
  crimage_fs_usage_free(usage, n);
  return EXIT_OK;
}

/* ---- pulls ---- */

static json_object *pull_status_to_json(const crimage_pull_status *s)
{
  json_object *o = json_object_new_object();
  json_object_object_add(o, "id", json_object_new_int64((int64_t) s->id));
  json_object_object_add(o, "reference", json_object_new_string(s->reference));
  json_object_object_add(o, "runtimeHandler", json_object_new_string(s->runtime_handler));
  json_object_object_add(o, "podUid", json_object_new_string(s->pod_uid));
  json_object_object_add(o, "state", json_object_new_string(pull_state_name(s->state)));
  json_object_object_add(o, "createdUnixMs", json_object_new_int64(s->created_unix_ms));
  json_object_object_add(o, "startedUnixMs", json_object_new_int64(s->started_unix_ms));
  json_object_object_add(o, "endedUnixMs", json_object_new_int64(s->ended_unix_ms));
  json_object_object_add(o, "bytesDone", json_object_new_int64((int64_t) s->bytes_done));
  json_object_object_add(o, "bytesTotal", json_object_new_int64((int64_t) s->bytes_total));
  json_object_object_add(o, "waiters", json_object_new_int64(s->waiters));
  json_object *blobs = json_object_new_array();
  for (size_t i = 0; i < s->n_blobs; i++) {
    json_object *b = json_object_new_object();
    json_object_object_add(b, "digest", json_object_new_string(s->blobs[i].digest));
    json_object_object_add(b, "done", json_object_new_int64((int64_t) s->blobs[i].done));
    json_object_object_add(b, "total", json_object_new_int64((int64_t) s->blobs[i].total));
    json_object_object_add(b, "finished", json_object_new_boolean(s->blobs[i].finished));
    json_object_array_add(blobs, b);
  }
  json_object_object_add(o, "blobs", blobs);
  if (!str_empty(s->error))
    json_object_object_add(o, "error", json_object_new_string(s->error));
  return o;
}

static int verb_pulls(cli_ctx *ctx, const cli_verb *verb, int argc, char **argv)
{
  static const struct option options[] = {COMMON_LONG_OPTIONS, {"all", no_argument, NULL, 'a'}, {}};
  cleanup_free char *name = NULL;
  verb_getopt_begin(verb, argv, &name);
  bool all = false;
  int opt;
  while ((opt = getopt_long(argc, argv, COMMON_SHORT_OPTIONS "a", options, NULL)) != -1) {
    if (opt == 'a') {
      all = true;
      continue;
    }
    int r = common_option(ctx, verb, opt, optarg);
    if (r != CLI_CONTINUE)
      return r;
  }
  if (optind < argc)
    return usage_error(verb, "takes no arguments");

  crimage_error *err = NULL;
  crimage_client *client = NULL;
  crimage_pull_status *pulls = NULL;
  size_t n = 0;
  if (ctx_client(ctx, &client, &err) < 0 || crimage_client_list_pulls(client, all, &pulls, &n, &err) < 0)
    return fail("pulls", err);
  if (ctx_output(ctx, CLI_OUTPUT_TABLE) == CLI_OUTPUT_JSON) {
    cleanup_json json_object *obj = json_object_new_object();
    json_object *arr = json_object_new_array();
    for (size_t i = 0; i < n; i++)
      json_object_array_add(arr, pull_status_to_json(&pulls[i]));
    json_object_object_add(obj, "pulls", arr);
    cli_json_print(obj, stdout);
  } else {
    const char *headers[] = {"ID", "IMAGE", "HANDLER", "POD", "STATE", "PROGRESS", "WAITERS"};
    cli_table *t = cli_table_new(ARRAY_SIZE(headers), headers);
    for (size_t i = 0; i < n; i++) {
      const crimage_pull_status *s = &pulls[i];
      char id[24], done[16], total[16], waiters[16];
      snprintf(id, sizeof(id), "%" PRIu64, s->id);
      cli_format_size(s->bytes_done, done, sizeof(done));
      cli_format_size(s->bytes_total, total, sizeof(total));
      cleanup_free char *progress = xasprintf("%s / %s (%d%%)", done, total, percent(s->bytes_done, s->bytes_total));
      snprintf(waiters, sizeof(waiters), "%u", s->waiters);
      cleanup_free char *ref = cli_printable(s->reference);
      cleanup_free char *handler = cli_printable(str_empty(s->runtime_handler) ? "(default)" : s->runtime_handler);
      cleanup_free char *pod = cli_printable(str_empty(s->pod_uid) ? CLI_NONE : s->pod_uid);
      const char *row[] = {id, ref, handler, pod, pull_state_name(s->state), progress, waiters};
      cli_table_add_row(t, row);
    }
    cli_table_print(t, stdout);
    cli_table_free(t);
  }
  crimage_pull_status_list_free(pulls, n);
  return EXIT_OK;
}

/* ---- rootfs, mount, umount ---- */

/* The unpacked layer directories of an image (lowest first) and its ID, from the "unpackedLayers" crimaged puts
 * in the verbose ImageStatus info. They are paths on the daemon's host: these verbs work on that host only. */
static int image_layers(crimage_client *client, const char *image, const char *handler, char **ret_id,
                        char ***ret_layers, crimage_error **err)
{
  crimage_image *img = NULL;
  cleanup_free char *info_json = NULL;
  int r = crimage_client_image_status(client, image, handler, true, &img, &info_json, err);
  if (r < 0)
    return r;
  if (!img)
    return crimage_error_set(err, CRIMAGE_NOT_FOUND, 0, "no such image");
  cleanup_free char *id = xstrdup(img->id);
  crimage_image_free(img);
  cleanup_json json_object *obj = NULL;
  json_object *dirs = NULL;
  if (info_json && json_parse(info_json, strlen(info_json), "image info", IMAGE_CONFIG_JSON_LIMITS, &obj, err) < 0)
    return crimage_error_wrap(err, "the service's answer");
  dirs = json_get_array(json_get_object(obj, "info"), "unpackedLayers");
  if (!dirs || json_object_array_length(dirs) == 0) {
    if (!str_empty(handler))
      return crimage_error_set(err, CRIMAGE_FAILED_PRECONDITION, 0,
                               "%s is not unpacked: set runtimeHandlers.%s.unpackLayers (or unpackLayers) in "
                               "crimaged's config and pull it again (crimage pull --policy Always)",
                               image, handler);
    return crimage_error_set(err, CRIMAGE_FAILED_PRECONDITION, 0,
                             "%s is not unpacked: set unpackLayers (or runtimeHandlers.<h>.unpackLayers) in "
                             "crimaged's config and pull it again (crimage pull --policy Always)",
                             image);
  }
  size_t n = json_object_array_length(dirs);
  cleanup_strv char **layers = xcalloc(n + 1, sizeof(char *));
  for (size_t i = 0; i < n; i++) {
    const char *d = json_object_get_string(json_object_array_get_idx(dirs, i));
    if (!json_object_is_type(json_object_array_get_idx(dirs, i), json_type_string) || !d || d[0] != '/')
      return crimage_error_set(err, CRIMAGE_INTERNAL, 0, "the service's unpackedLayers has no absolute path at %zu",
                               i);
    layers[i] = xstrdup(d);
  }
  *ret_id = TAKE_PTR(id);
  *ret_layers = TAKE_PTR(layers);
  return 0;
}

/* Parses `[--runtime-handler H] IMAGE DIR` (with_image) or `DIR`; *saved_name as for verb_getopt_begin. */
static int parse_image_dir(cli_ctx *ctx, const cli_verb *verb, int argc, char **argv, bool with_image,
                           char **saved_name, const char **handler, const char **image, const char **dir)
{
  static const struct option options[] = {COMMON_LONG_OPTIONS, RUNTIME_HANDLER_OPTION, {}};
  static const struct option dir_options[] = {COMMON_LONG_OPTIONS, {}};
  verb_getopt_begin(verb, argv, saved_name);
  int opt;
  while ((opt = getopt_long(argc, argv, COMMON_SHORT_OPTIONS, with_image ? options : dir_options, NULL)) != -1) {
    if (opt == OPT_RUNTIME_HANDLER) {
      *handler = optarg;
      continue;
    }
    int r = common_option(ctx, verb, opt, optarg);
    if (r != CLI_CONTINUE)
      return r;
  }
  int want = with_image ? 2 : 1;
  if (argc - optind != want)
    return usage_error(verb, with_image ? "takes an image and a directory" : "takes a directory");
  if (with_image)
    *image = argv[optind];
  *dir = argv[optind + want - 1];
  if (!**dir)
    return usage_error(verb, "the directory is empty");
  return CLI_CONTINUE;
}

/* Both verbs need root: owners, device nodes and the layers' trusted.overlay xattrs (without root the whiteouts
 * would be silently missed), and mounts. Checked before anything is asked of the service. */
static int need_root(const char *what)
{
  if (geteuid() == 0)
    return EXIT_OK;
  crimage_error *err = NULL;
  crimage_error_set(&err, CRIMAGE_PERMISSION_DENIED, 0,
                    "needs root (owners, device nodes and the layers' trusted.overlay xattrs, mounts)");
  return fail(what, err);
}

/* The copy holds two fds per directory level: with the soft limit at the hard one (capped) it can go as deep as a
 * layer can nest (PATH_MAX / 2 levels); the default soft limit of 1024 would stop it at about 480. */
#define ROOTFS_NOFILE 8192
static void raise_nofile_limit(void)
{
  struct rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) < 0 || rl.rlim_cur >= ROOTFS_NOFILE)
    return;
  rl.rlim_cur = rl.rlim_max < ROOTFS_NOFILE ? rl.rlim_max : ROOTFS_NOFILE;
  setrlimit(RLIMIT_NOFILE, &rl);
}

static void print_layers_result(cli_ctx *ctx, const char *verb, const char *id, const char *dir, char **layers)
{
  if (ctx_output(ctx, CLI_OUTPUT_TABLE) == CLI_OUTPUT_JSON) {
    cleanup_json json_object *obj = json_object_new_object();
    json_object_object_add(obj, "id", json_object_new_string(id));
    json_object_object_add(obj, "dir", json_object_new_string(dir));
    json_object *arr = json_object_new_array();
    for (size_t i = 0; layers[i]; i++)
      json_object_array_add(arr, json_object_new_string(layers[i]));
    json_object_object_add(obj, "layers", arr);
    cli_json_print(obj, stdout);
    return;
  }
  cleanup_free char *pid = cli_printable(id);
  cleanup_free char *pdir = cli_printable(dir);
  size_t n = strv_length(layers);
  if (streq(verb, "rootfs"))
    printf("Copied %s (%zu layer%s) to %s\n", pid, n, n == 1 ? "" : "s", pdir);
  else
    printf("Mounted %s (%zu layer%s) on %s, read-only\n", pid, n, n == 1 ? "" : "s", pdir);
}

static int verb_rootfs_or_mount(cli_ctx *ctx, const cli_verb *verb, int argc, char **argv)
{
  cleanup_free char *name = NULL;
  const char *handler = NULL, *image = NULL, *dir = NULL;
  int r = parse_image_dir(ctx, verb, argc, argv, true, &name, &handler, &image, &dir);
  if (r != CLI_CONTINUE)
    return r;
  bool mount = streq(verb->name, "mount");
  cleanup_free char *what = xasprintf("%s %s", verb->name, image);
  if ((r = need_root(what)) != EXIT_OK)
    return r;
  crimage_error *err = NULL;
  crimage_client *client = NULL;
  cleanup_free char *id = NULL;
  cleanup_strv char **layers = NULL;
  if (ctx_client(ctx, &client, &err) < 0 || image_layers(client, image, handler, &id, &layers, &err) < 0)
    return fail(what, err);
  if (!mount)
    raise_nofile_limit();
  if ((mount ? rootfs_mount(layers, dir, &err) : rootfs_flatten(layers, dir, NULL, &err)) < 0)
    return fail(what, err);
  print_layers_result(ctx, verb->name, id, dir, layers);
  return EXIT_OK;
}

static int verb_umount(cli_ctx *ctx, const cli_verb *verb, int argc, char **argv)
{
  cleanup_free char *name = NULL;
  const char *dir = NULL;
  int r = parse_image_dir(ctx, verb, argc, argv, false, &name, NULL, NULL, &dir);
  if (r != CLI_CONTINUE)
    return r;
  cleanup_free char *what = xasprintf("umount %s", dir);
  if ((r = need_root(what)) != EXIT_OK)
    return r;
  crimage_error *err = NULL;
  if (rootfs_umount(dir, &err) < 0)
    return fail(what, err);
  if (ctx_output(ctx, CLI_OUTPUT_TABLE) == CLI_OUTPUT_JSON) {
    cleanup_json json_object *obj = json_object_new_object();
    json_object_object_add(obj, "unmounted", json_object_new_string(dir));
    cli_json_print(obj, stdout);
  } else {
    cleanup_free char *p = cli_printable(dir);
    printf("Unmounted %s\n", p);
  }
  return EXIT_OK;
}

/* ---- auth ---- */

static int verb_auth(cli_ctx *ctx, const cli_verb *verb, int argc, char **argv)
{
  cleanup_free char *name = NULL;
  verb_getopt_begin(verb, argv, &name);
  int r = cli_auth_main(argc, argv, ctx_output(ctx, CLI_OUTPUT_TABLE) == CLI_OUTPUT_JSON);
  if (r < 0) {
    verb_usage(verb, stdout);
    return EXIT_OK;
  }
  return r;
}

/* ---- version, help ---- */

static int verb_version(cli_ctx *ctx, const cli_verb *verb, int argc, char **argv)
{
  cleanup_free char *name = NULL;
  int r = parse_common_only(ctx, verb, argc, argv, &name);
  if (r != CLI_CONTINUE)
    return r;
  if (ctx_output(ctx, CLI_OUTPUT_TABLE) == CLI_OUTPUT_JSON) {
    cleanup_json json_object *obj = json_object_new_object();
    json_object_object_add(obj, "version", json_object_new_string(crimage_version()));
    cli_json_print(obj, stdout);
  } else {
    printf("crimage version %s\n", crimage_version());
  }
  return EXIT_OK;
}

static void main_usage(FILE *f);

static int verb_help(cli_ctx *ctx, const cli_verb *verb, int argc, char **argv)
{
  if (argc > 2)
    return usage_error(verb, "at most one verb");
  if (argc == 2) {
    const cli_verb *v = find_verb(argv[1]);
    if (!v)
      return usage_error(NULL, "unknown verb '%s'", argv[1]);
    verb_usage(v, stdout);
    return EXIT_OK;
  }
  main_usage(stdout);
  return EXIT_OK;
}

/* ---- the verb table ---- */

static const cli_verb verbs[] = {
    {"pull", "[OPTIONS] IMAGE", "Pull an image into the store.",
     RUNTIME_HANDLER_HELP
     "      --creds=USER:PASS   registry credentials\n"
     "      --username=USER     registry user name (with --password or --password-stdin)\n"
     "      --password=PASS     registry password\n"
     "      --password-stdin    read the password from the first line of standard input\n"
     "      --auth=BASE64       base64 of USER:PASS\n"
     "      --server-address=H  the registry the credentials are for\n"
     "      --identity-token=T  OAuth2 refresh token\n"
     "      --registry-token=T  bearer token for the registry\n"
     "      --pod-uid=UID       UID of the pod the pull is for\n"
     "      --policy=POLICY     Always, IfNotPresent or Never (default as Kubernetes: IfNotPresent for a digest\n"
     "                          or a tag other than latest, else Always)\n"
     "  -q, --quiet             show no progress while pulling\n"
     "      --secret=FILE       image pull Secret manifests (repeatable): one pull per matching credential, in\n"
     "                          order, as kubelet does\n",
     verb_pull},
    {"auth", "[OPTIONS] IMAGE", "Show the credentials a pull of IMAGE would try, in order (never the secrets).",
     "      --secret=FILE       image pull Secret manifests (repeatable)\n"
     "      --docker-config=P   docker config.json or .dockercfg files (repeatable; default: kubelet's search)\n"
     "      --provider-config=F kubelet CredentialProviderConfig (with --provider-bin-dir)\n"
     "      --provider-bin-dir=D directory of the credential provider plugins\n",
     verb_auth},
    {"images", "[OPTIONS] [IMAGE]", "List images, optionally only those matching IMAGE.",
     RUNTIME_HANDLER_HELP
     "  -q, --quiet             print image IDs only\n"
     "      --digests           show digests\n"
     "      --no-trunc          do not shorten IDs and digests\n",
     verb_images},
    {"inspect", "[OPTIONS] IMAGE...", "Show the status of images, with the runtime's verbose information.",
     RUNTIME_HANDLER_HELP, verb_inspect},
    {"rm", "[OPTIONS] IMAGE...", "Remove images (every tag of each).",
     RUNTIME_HANDLER_HELP "  -a, --all               remove every image\n", verb_rm},
    {"fsinfo", "", "Show the filesystem usage of the image store.", NULL, verb_fsinfo},
    {"rootfs", "[OPTIONS] IMAGE DIR",
     "Copy the filesystem of an unpacked image into DIR (empty or absent), as root.", RUNTIME_HANDLER_HELP,
     verb_rootfs_or_mount},
    {"mount", "[OPTIONS] IMAGE DIR", "Mount the unpacked layers of an image read-only on DIR (overlay), as root.",
     RUNTIME_HANDLER_HELP, verb_rootfs_or_mount},
    {"umount", "DIR", "Unmount what crimage mount mounted on DIR.", NULL, verb_umount},
    {"pulls", "[OPTIONS]", "List the pulls queued or running in crimaged.",
     "  -a, --all               also the last pulls that ended\n", verb_pulls},
    {"version", "", "Show the version of crimage.", NULL, verb_version},
    {"help", "[VERB]", "Show help for crimage or for one verb.", NULL, verb_help},
};

static const cli_verb *find_verb(const char *name)
{
  for (size_t i = 0; i < ARRAY_SIZE(verbs); i++)
    if (streq(verbs[i].name, name))
      return &verbs[i];
  return NULL;
}

static void main_usage(FILE *f)
{
  fprintf(f, "Usage: crimage [GLOBAL OPTIONS] VERB [OPTIONS] [ARGS]\n\n"
             "Talks to a CRI image service (crimaged) on its unix socket.\n\nVerbs:\n");
  for (size_t i = 0; i < ARRAY_SIZE(verbs); i++)
    fprintf(f, "  %-9s %s\n", verbs[i].name, verbs[i].summary);
  fprintf(f, "\nGlobal options:\n"
             "  -s, --socket=PATH       the service's socket (default: $" CLI_SOCKET_ENV ", else " CLI_DEFAULT_SOCKET
             ")\n"
             "  -t, --timeout=DURATION  deadline of each call, e.g. 30s or 2m (default 10s; pulls: none)\n"
             "  -o, --output=FORMAT     table or json\n"
             "  -h, --help              show this help\n"
             "  -V, --version           show the version\n"
             "\nRun 'crimage help VERB' for the options of a verb.\n");
}

int main(int argc, char **argv)
{
  static const struct option options[] = {
      {"socket", required_argument, NULL, 's'}, {"timeout", required_argument, NULL, 't'},
      {"output", required_argument, NULL, 'o'}, {"help", no_argument, NULL, 'h'},
      {"version", no_argument, NULL, 'V'},      {},
  };
  cli_ctx ctx = {.timeout_ms = CLI_DEFAULT_TIMEOUT_MS};
  const char *socket_flag = NULL;
  int opt;
  while ((opt = getopt_long(argc, argv, "+s:t:o:hV", options, NULL)) != -1) {
    switch (opt) {
    case 's':
      socket_flag = optarg;
      break;
    case 't': {
      int64_t ms;
      if (parse_duration_ms(optarg, &ms) < 0)
        return usage_error(NULL, "invalid duration '%s' (e.g. 500ms, 30s, 5m)", optarg);
      ctx.timeout_ms = ms;
      ctx.timeout_set = true;
      break;
    }
    case 'o':
      if (cli_parse_output(optarg, &ctx.output) < 0)
        return usage_error(NULL, "invalid output format '%s' (table or json)", optarg);
      break;
    case 'h':
      main_usage(stdout);
      return EXIT_OK;
    case 'V':
      printf("crimage version %s\n", crimage_version());
      return EXIT_OK;
    default:
      fprintf(stderr, "Try 'crimage help'.\n");
      return EXIT_USAGE;
    }
  }
  if (optind == argc) {
    main_usage(stderr);
    return EXIT_USAGE;
  }
  const cli_verb *verb = find_verb(argv[optind]);
  if (!verb)
    return usage_error(NULL, "unknown verb '%s'", argv[optind]);
  ctx.socket = cli_socket_path(socket_flag, getenv(CLI_SOCKET_ENV));

  int r = verb->run(&ctx, verb, argc - optind, argv + optind);
  crimage_client_close(ctx.client);
  if (fflush(stdout) != 0 || ferror(stdout)) {
    fprintf(stderr, "crimage: writing output: %s\n", strerror(errno));
    return EXIT_FAIL;
  }
  return r;
}
