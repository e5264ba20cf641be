#include <errno.h>
#include <getopt.h>
#include <stdio.h>

#include "auth/resolver.h"
#include "auth/secrets.h"
#include "cli_auth.h"
#include "cli_format.h"
#include "common/json.h"
#include "common/util.h"
#include "cri/pull_credentials.h"
#include "pull/reference.h"

/* The Secrets of every file, in order, as one list of keyrings. */
static int load_secrets(char *const *files, keyring ***ret, size_t *ret_n, crimage_error **err)
{
  keyring **all = NULL;
  size_t n_all = 0;
  for (size_t i = 0; files && files[i]; i++) {
    keyring **v = NULL;
    size_t n = 0;
    int r = secrets_load_file(files[i], &v, &n, err);
    if (r < 0) {
      keyring_array_free(all, n_all);
      return r;
    }
    if (n_all + n > SECRETS_MAX_COUNT) {
      keyring_array_free(v, n);
      keyring_array_free(all, n_all);
      return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "more than %d Secrets", SECRETS_MAX_COUNT);
    }
    all = xrealloc(all, (n_all + n + 1) * sizeof(*all));
    for (size_t j = 0; j < n; j++)
      all[n_all++] = v[j];
    free(v);
  }
  *ret = all;
  *ret_n = n_all;
  return 0;
}

static int parse_image(const char *image, image_ref **ret, char **ret_name, crimage_error **err)
{
  image_ref *ref = NULL;
  int r = reference_parse(image, NULL, &ref, err);
  if (r < 0)
    return r;
  *ret_name = reference_name(ref);
  *ret = ref;
  return 0;
}

int cli_auth_secret_candidates(char *const *files, const char *image, credential_list *ret, crimage_error **err)
{
  cleanup_reference image_ref *ref = NULL;
  cleanup_free char *name = NULL;
  int r = parse_image(image, &ref, &name, err);
  if (r < 0)
    return r;
  keyring **secrets = NULL;
  size_t n = 0;
  r = load_secrets(files, &secrets, &n, err);
  if (r < 0)
    return r;
  /* kubelet merges the pod's Secrets into one keyring, in order, and looks the image up in it. */
  cleanup_keyring keyring *merged = keyring_new();
  for (size_t i = 0; i < n; i++)
    keyring_add_keyring(merged, secrets[i]);
  keyring_array_free(secrets, n);
  cleanup_credential_list credential_list found = {0};
  keyring_lookup(merged, name, &found);
  for (size_t i = 0; i < found.n; i++) {
    credential *c = found.items[i];
    bool dup = false;
    for (size_t j = 0; j < ret->n && !dup; j++)
      dup = credential_same_secret(ret->items[j], c);
    if (dup)
      continue;
    free(c->server_address);
    c->server_address = xstrdup(ref->domain);
    credential_list_add(ret, c);
    found.items[i] = NULL;
  }
  /* credential_list_clear frees NULL entries harmlessly. */
  return 0;
}

typedef struct cli_attempt {
  cli_pull_fn fn;
  void *userdata;
  const char *what;
  size_t n, i;
} cli_attempt;

static int cli_attempt_run(void *userdata, const credential *cred, void **ret_result, crimage_error **err)
{
  cli_attempt *a = userdata;
  crimage_auth auth = {0};
  if (cred)
    auth = (crimage_auth){
        .username = cred->username,
        .password = cred->password,
        .server_address = cred->server_address,
        .identity_token = cred->identity_token,
        .registry_token = cred->registry_token,
    };
  char *ref = NULL;
  crimage_error *e = NULL;
  int r = a->fn(a->userdata, cred ? &auth : NULL, &ref, &e);
  a->i++;
  if (r < 0) {
    if (cred) {
      cleanup_free char *desc = credential_describe(cred);
      cleanup_free char *msg = cli_printable(e ? e->message : "failed");
      fprintf(stderr, "crimage: %s: credential %zu/%zu (%s): %s: %s\n", a->what, a->i, a->n, desc,
              crimage_status_name(e ? e->status : CRIMAGE_UNKNOWN), msg);
    }
    if (err && !*err)
      *err = e;
    else
      crimage_error_free(e);
    return r;
  }
  crimage_error_free(e);
  *ret_result = ref;
  return 0;
}

int cli_auth_pull(char *const *files, const char *image, const char *what, cli_pull_fn fn, void *userdata,
                  char **ret_ref, crimage_error **err)
{
  cleanup_credential_list credential_list cands = {0};
  int r = cli_auth_secret_candidates(files, image, &cands, err);
  if (r < 0)
    return r;
  cli_attempt a = {.fn = fn, .userdata = userdata, .what = what, .n = cands.n};
  void *ref = NULL;
  r = pull_credentials_try(&cands, cli_attempt_run, &a, &ref, err);
  if (r < 0)
    return r;
  *ret_ref = ref;
  return 0;
}

/* ---- crimage auth ---- */

enum {
  OPT_SECRET = 0x100,
  OPT_DOCKER_CONFIG,
  OPT_PROVIDER_CONFIG,
  OPT_PROVIDER_BIN_DIR,
};

static const char *secret_kind(const credential *c)
{
  const char *kind = credential_secret_kind(c);
  return kind ? kind : "none";
}

static int auth_usage_error(const char *fmt, const char *arg)
{
  fprintf(stderr, "crimage auth: ");
  fprintf(stderr, fmt, arg);
  fprintf(stderr, "\nTry 'crimage help auth'.\n");
  return 2;
}

int cli_auth_main(int argc, char **argv, bool json)
{
  static const struct option options[] = {
      {"help", no_argument, NULL, 'h'},
      {"output", required_argument, NULL, 'o'},
      {"secret", required_argument, NULL, OPT_SECRET},
      {"docker-config", required_argument, NULL, OPT_DOCKER_CONFIG},
      {"provider-config", required_argument, NULL, OPT_PROVIDER_CONFIG},
      {"provider-bin-dir", required_argument, NULL, OPT_PROVIDER_BIN_DIR},
      {},
  };
  cleanup_strv char **secret_files = NULL;
  cleanup_strv char **docker_configs = NULL;
  const char *provider_config = NULL, *provider_bin_dir = NULL;
  int opt;
  while ((opt = getopt_long(argc, argv, "ho:", options, NULL)) != -1) {
    switch (opt) {
    case 'h':
      return -1; /* the caller prints the help */
    case 'o':
      if (streq(optarg, "json"))
        json = true;
      else if (streq(optarg, "table"))
        json = false;
      else
        return auth_usage_error("invalid output format '%s' (table or json)", optarg);
      break;
    case OPT_SECRET:
      strv_add_unique(&secret_files, optarg);
      break;
    case OPT_DOCKER_CONFIG:
      strv_add_unique(&docker_configs, optarg);
      break;
    case OPT_PROVIDER_CONFIG:
      provider_config = optarg;
      break;
    case OPT_PROVIDER_BIN_DIR:
      provider_bin_dir = optarg;
      break;
    default:
      fprintf(stderr, "Try 'crimage help auth'.\n");
      return 2;
    }
  }
  if (optind + 1 != argc)
    return auth_usage_error("%s", optind == argc ? "no image given" : "one image at a time");
  if (!!provider_config != !!provider_bin_dir)
    return auth_usage_error("%s", "--provider-config and --provider-bin-dir go together");
  const char *image = argv[optind];

  crimage_error *err = NULL;
  cleanup_reference image_ref *ref = NULL;
  cleanup_free char *name = NULL;
  keyring **secrets = NULL;
  size_t n_secrets = 0;
  auth_resolver *resolver = NULL;
  cleanup_credential_list credential_list cands = {0};
  auth_resolver_options ro = {
      .docker_config_paths = docker_configs,
      .provider_config = provider_config,
      .provider_bin_dir = provider_bin_dir,
  };
  int r = parse_image(image, &ref, &name, &err);
  if (r >= 0)
    r = load_secrets(secret_files, &secrets, &n_secrets, &err);
  if (r >= 0)
    r = auth_resolver_new(&ro, &resolver, &err);
  if (r >= 0)
    r = auth_resolve(resolver, name, ref->domain, secrets, n_secrets, &cands, &err);
  auth_resolver_free(resolver);
  keyring_array_free(secrets, n_secrets);
  if (r < 0) {
    cleanup_free char *msg = cli_printable(err ? err->message : "failed");
    fprintf(stderr, "crimage: auth %s: %s: %s\n", image, crimage_status_name(err ? err->status : CRIMAGE_UNKNOWN),
            msg);
    crimage_error_free(err);
    return 1;
  }

  if (json) {
    cleanup_json json_object *obj = json_object_new_object();
    json_object_object_add(obj, "image", json_object_new_string(name));
    json_object_object_add(obj, "registry", json_object_new_string(ref->domain));
    json_object *arr = json_object_new_array();
    for (size_t i = 0; i < cands.n; i++) {
      const credential *c = cands.items[i];
      json_object *o = json_object_new_object();
      json_object_object_add(o, "source", json_object_new_string(c->source ? c->source : ""));
      json_object_object_add(o, "username", json_object_new_string(c->username ? c->username : ""));
      json_object_object_add(o, "secret", json_object_new_string(secret_kind(c)));
      json_object_array_add(arr, o);
    }
    json_object_object_add(obj, "credentials", arr);
    cli_json_print(obj, stdout);
    return 0;
  }
  if (cands.n == 0) {
    cleanup_free char *p = cli_printable(name);
    printf("no credentials for %s: pulls go anonymous\n", p);
    return 0;
  }
  static const char *const headers[] = {"#", "SOURCE", "USERNAME", "SECRET"};
  cli_table *t = cli_table_new(ARRAY_SIZE(headers), headers);
  for (size_t i = 0; i < cands.n; i++) {
    const credential *c = cands.items[i];
    char num[32];
    snprintf(num, sizeof(num), "%zu", i + 1);
    cleanup_free char *src = cli_printable(c->source ? c->source : "");
    cleanup_free char *user = cli_printable(str_empty(c->username) ? "-" : c->username);
    const char *row[] = {num, src, user, secret_kind(c)};
    cli_table_add_row(t, row);
  }
  cli_table_print(t, stdout);
  cli_table_free(t);
  return 0;
}
