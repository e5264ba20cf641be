/* crimage: the command-line client of a CRI v1 ImageService (crimaged, or any other), verbs modelled on crictl.
 *
 * Adding a verb: write a `verb_<name>(ctx, verb, argc, argv)` that parses its options with getopt_long (handing
 * unknown ones to common_option()), then add a row to the `verbs` table. Verbs with many options keep them in an
 * options struct filled by a parse function and consumed by a run function (see pull), so new options are one
 * struct field, one table entry and one switch case. */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdarg.h>

#include "cli_format.h"
#include "cli_options.h"
#include "common/error.h"
#include "common/json.h"
#include "common/util.h"
#include "crimage.h"

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
      {},
  };
  /* Secrets are copied and wiped from argv as soon as getopt hands them over, even when parsing fails later. */
  int opt;
  while ((opt = getopt_long(argc, argv, COMMON_SHORT_OPTIONS, options, NULL)) != -1) {
    switch (opt) {
    case OPT_RUNTIME_HANDLER:
      o->runtime_handler = optarg;
      break;
    case OPT_CREDS:
      take_secret(&o->creds, optarg);
      break;
    case OPT_USERNAME:
      take_string(&o->username, optarg);
      break;
    case OPT_PASSWORD:
      take_secret(&o->password, optarg);
      break;
    case OPT_PASSWORD_STDIN:
      o->password_stdin = true;
      break;
    case OPT_AUTH:
      take_secret(&o->auth, optarg);
      break;
    case OPT_SERVER_ADDRESS:
      take_string(&o->server_address, optarg);
      break;
    case OPT_IDENTITY_TOKEN:
      take_secret(&o->identity_token, optarg);
      break;
    case OPT_REGISTRY_TOKEN:
      take_secret(&o->registry_token, optarg);
      break;
    case OPT_POD_UID:
      o->pod_uid = optarg;
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
  if (o->password && !o->username)
    return usage_error(verb, "--password needs --username");
  if (o->username && !o->password)
    return usage_error(verb, "--username needs --password or --password-stdin");
  return CLI_CONTINUE;
}

static int pull_run(cli_ctx *ctx, const pull_opts *o)
{
  crimage_error *err = NULL;
  cleanup_free char *what = xasprintf("pull %s", o->image);
  crimage_client *client = NULL;
  if (ctx_client(ctx, &client, &err) < 0)
    return fail(what, err);
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
  int r = crimage_client_pull(client, o->image, o->runtime_handler, have_auth ? &auth : NULL, o->pod_uid, &ref, &err);
  crimage_client_set_timeout(client, ctx->timeout_ms);
  if (r < 0)
    return fail(what, err);

  if (ctx_output(ctx, CLI_OUTPUT_TABLE) == CLI_OUTPUT_JSON) {
    cleanup_json json_object *obj = json_object_new_object();
    json_object_object_add(obj, "imageRef", json_object_new_string(ref));
    cli_json_print(obj, stdout);
  } else {
    cleanup_free char *p = cli_printable(ref);
    printf("Image is up to date for %s\n", p);
  }
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
  if (!str_empty(img->image_source)) {
    cleanup_free char *p = cli_printable(img->image_source);
    printf("Source:   %s\n", p);
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
  if (info_json && json_parse(info_json, strlen(info_json), "info", &info, &err) == 0) {
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
  static const struct option options[] = {COMMON_LONG_OPTIONS, {}};
  cleanup_free char *name = NULL;
  verb_getopt_begin(verb, argv, &name);
  int opt;
  while ((opt = getopt_long(argc, argv, COMMON_SHORT_OPTIONS, options, NULL)) != -1) {
    int r = common_option(ctx, verb, opt, optarg);
    if (r != CLI_CONTINUE)
      return r;
  }
  if (optind < argc)
    return usage_error(verb, "takes no arguments");

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

/* ---- version, help ---- */

static int verb_version(cli_ctx *ctx, const cli_verb *verb, int argc, char **argv)
{
  static const struct option options[] = {COMMON_LONG_OPTIONS, {}};
  cleanup_free char *name = NULL;
  verb_getopt_begin(verb, argv, &name);
  int opt;
  while ((opt = getopt_long(argc, argv, COMMON_SHORT_OPTIONS, options, NULL)) != -1) {
    int r = common_option(ctx, verb, opt, optarg);
    if (r != CLI_CONTINUE)
      return r;
  }
  if (optind < argc)
    return usage_error(verb, "takes no arguments");
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
     "      --pod-uid=UID       UID of the pod the pull is for\n",
     verb_pull},
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
