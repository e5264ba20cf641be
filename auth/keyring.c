#include <errno.h>
#include <limits.h>
#include <stdatomic.h>
#include <string.h>

#include "auth/keyring.h"
#include "auth/match.h"
#include "common/fsutil.h"
#include "common/json.h"
#include "common/log.h"
#include "common/util.h"

typedef struct keyring_entry {
  char *key; /* normalized match pattern */
  credential *cred;
  size_t seq; /* insertion order: credentials under one key keep it */
} keyring_entry;

typedef struct cred_helper {
  char *registry;
  char *helper;
} cred_helper;

struct keyring {
  atomic_int refs;
  keyring_entry *entries;
  size_t n;
  cred_helper *helpers;
  size_t n_helpers;
  char *creds_store;
  char *origin;
};

keyring *keyring_new(void)
{
  keyring *k = xcalloc(1, sizeof(*k));
  atomic_init(&k->refs, 1);
  return k;
}

keyring *keyring_ref(keyring *k)
{
  if (k)
    atomic_fetch_add(&k->refs, 1);
  return k;
}

void keyring_unref(keyring *k)
{
  if (!k || atomic_fetch_sub(&k->refs, 1) != 1)
    return;
  for (size_t i = 0; i < k->n; i++) {
    free(k->entries[i].key);
    credential_free(k->entries[i].cred);
  }
  free(k->entries);
  for (size_t i = 0; i < k->n_helpers; i++) {
    free(k->helpers[i].registry);
    free(k->helpers[i].helper);
  }
  free(k->helpers);
  free(k->creds_store);
  free(k->origin);
  free(k);
}

void keyring_array_free(keyring **v, size_t n)
{
  for (size_t i = 0; i < n; i++)
    keyring_unref(v[i]);
  free(v);
}

static void add_entry(keyring *k, char *key, credential *c)
{
  k->entries = xrealloc(k->entries, (k->n + 1) * sizeof(*k->entries));
  k->entries[k->n] = (keyring_entry){.key = key, .cred = c, .seq = k->n};
  k->n++;
}

int keyring_add(keyring *k, const char *key, const credential *c, const char *source)
{
  char *norm = auth_config_key_normalize(key);
  if (!norm)
    return -EINVAL;
  credential *d = credential_dup(c);
  if (source) {
    free(d->source);
    d->source = xstrdup(source);
  }
  add_entry(k, norm, d);
  return 0;
}

void keyring_add_keyring(keyring *k, const keyring *from)
{
  for (size_t i = 0; i < from->n; i++)
    add_entry(k, xstrdup(from->entries[i].key), credential_dup(from->entries[i].cred));
}

/* Reads one entry: `auth` (base64 user:pass) wins over `username`/`password` as in kubelet; `identitytoken` and
 * `registrytoken` are kept; `email` and unknown fields are ignored. */
static int parse_entry(json_object *v, const char *key, const char *what, credential **ret, crimage_error **err)
{
  if (!json_object_is_type(v, json_type_object))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "%s: entry `%s` is not an object", what, key);
  cleanup_credential credential *c = credential_new();
  static const char *const fields[] = {"auth", "username", "password", "identitytoken", "registrytoken"};
  for (size_t i = 0; i < ARRAY_SIZE(fields); i++) {
    json_object *f;
    if (json_object_object_get_ex(v, fields[i], &f) && f && !json_object_is_type(f, json_type_string))
      return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "%s: entry `%s`: `%s` is not a string", what, key,
                               fields[i]);
  }
  const char *s;
  if ((s = json_get_string(v, "username")))
    c->username = xstrdup(s);
  if ((s = json_get_string(v, "password")))
    c->password = xstrdup(s);
  if ((s = json_get_string(v, "identitytoken")) && *s)
    c->identity_token = xstrdup(s);
  if ((s = json_get_string(v, "registrytoken")) && *s)
    c->registry_token = xstrdup(s);
  if ((s = json_get_string(v, "auth")) && *s && credential_set_auth(c, s) < 0)
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0,
                             "%s: entry `%s`: `auth` is not base64 of \"username:password\"", what, key);
  *ret = TAKE_PTR(c);
  return 0;
}

int keyring_add_config(keyring *k, json_object *map, const char *source, const char *what, crimage_error **err)
{
  if (!json_object_is_type(map, json_type_object))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "%s: credentials are not a JSON object", what);
  if ((size_t) json_object_object_length(map) + k->n > KEYRING_MAX_ENTRIES)
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "%s: more than %d entries", what, KEYRING_MAX_ENTRIES);
  /* Parse everything first so that a bad entry leaves the keyring untouched. */
  size_t n = 0, cap = (size_t) json_object_object_length(map);
  keyring_entry *parsed = xcalloc(cap + 1, sizeof(*parsed));
  int r = 0;
  json_object_object_foreach(map, key, val)
  {
    credential *c = NULL;
    r = parse_entry(val, key, what, &c, err);
    if (r < 0)
      break;
    char *norm = auth_config_key_normalize(key);
    if (!norm || !auth_url_pattern_valid(norm)) {
      /* kubelet skips a key it cannot parse as a URL and keeps the rest of the file. */
      log_warn("%s: ignoring entry `%s`: not a registry host[:port][/path]", what, key);
      free(norm);
      credential_free(c);
      continue;
    }
    if (credential_is_empty(c)) {
      /* Nothing to send: docker keeps such entries for its credential store; kubelet would try an anonymous
       * pull, which happens anyway when nothing matches. */
      free(norm);
      credential_free(c);
      continue;
    }
    free(c->source);
    c->source = source ? xstrdup(source) : NULL;
    parsed[n++] = (keyring_entry){.key = norm, .cred = c};
  }
  if (r < 0) {
    for (size_t i = 0; i < n; i++) {
      free(parsed[i].key);
      credential_free(parsed[i].cred);
    }
    free(parsed);
    return r;
  }
  for (size_t i = 0; i < n; i++)
    add_entry(k, parsed[i].key, parsed[i].cred);
  free(parsed);
  return 0;
}

static void add_helper(keyring *k, const char *registry, const char *helper)
{
  k->helpers = xrealloc(k->helpers, (k->n_helpers + 1) * sizeof(*k->helpers));
  k->helpers[k->n_helpers++] = (cred_helper){xstrdup(registry), xstrdup(helper)};
}

/* A helper name becomes part of an executable name: keep it to a plain file name. */
static bool helper_name_valid(const char *s)
{
  return !str_empty(s) && strlen(s) < 128 && !strchr(s, '/') &&
         strspn(s, "abcdefghijklmnopqrstuvwxyz"
                   "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.") == strlen(s) &&
         !streq(s, ".") && !streq(s, "..");
}

int keyring_add_docker_config_json(keyring *k, const char *data, size_t len, const char *source, const char *what,
                                   crimage_error **err)
{
  cleanup_json json_object *root = NULL;
  int r = json_parse(data, len, what, KEYRING_JSON_LIMITS, &root, err);
  if (r < 0)
    return r;
  if (!json_object_is_type(root, json_type_object))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "%s: not a JSON object", what);
  json_object *auths = NULL;
  if (json_object_object_get_ex(root, "auths", &auths) && auths) {
    r = keyring_add_config(k, auths, source, what, err);
    if (r < 0)
      return r;
  }
  json_object *helpers = json_get_object(root, "credHelpers");
  if (helpers) {
    json_object_object_foreach(helpers, reg, val)
    {
      if (!json_object_is_type(val, json_type_string) || !helper_name_valid(json_object_get_string(val)))
        return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "%s: credHelpers entry `%s` is not a valid name",
                                 what, reg);
      if (k->n_helpers >= KEYRING_MAX_ENTRIES)
        return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "%s: too many credHelpers", what);
      add_helper(k, reg, json_object_get_string(val));
    }
  }
  const char *store = json_get_string(root, "credsStore");
  if (!str_empty(store)) {
    if (!helper_name_valid(store))
      return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "%s: credsStore is not a valid name", what);
    free(k->creds_store);
    k->creds_store = xstrdup(store);
  }
  return 0;
}

int keyring_add_dockercfg(keyring *k, const char *data, size_t len, const char *source, const char *what,
                          crimage_error **err)
{
  cleanup_json json_object *root = NULL;
  int r = json_parse(data, len, what, KEYRING_JSON_LIMITS, &root, err);
  if (r < 0)
    return r;
  return keyring_add_config(k, root, source, what, err);
}

int keyring_load_file(const char *path, keyring **ret, crimage_error **err)
{
  cleanup_secret char *data = NULL;
  size_t len = 0;
  int r = read_file(path, KEYRING_MAX_FILE_SIZE, &data, &len, err);
  if (r < 0)
    return r;
  cleanup_keyring keyring *k = keyring_new();
  bool legacy = str_has_suffix(path, ".dockercfg");
  cleanup_free char *source = xasprintf("%s %s", legacy ? ".dockercfg" : "config.json", path);
  if (legacy)
    r = keyring_add_dockercfg(k, data, len, source, path, err);
  else
    r = keyring_add_docker_config_json(k, data, len, source, path, err);
  if (r < 0)
    return r;
  k->origin = xstrdup(path);
  *ret = TAKE_PTR(k);
  return 0;
}

char **keyring_node_search_paths(const char *kubelet_root_dir)
{
  const char *root = kubelet_root_dir ? kubelet_root_dir : "/var/lib/kubelet";
  char cwd[PATH_MAX];
  bool have_cwd = getcwd(cwd, sizeof(cwd)) != NULL;
  const char *home = getenv("HOME");
  char **v = xcalloc(9, sizeof(char *));
  size_t n = 0;
  v[n++] = xasprintf("%s/config.json", root);
  if (have_cwd)
    v[n++] = xasprintf("%s/config.json", cwd);
  if (!str_empty(home))
    v[n++] = xasprintf("%s/.docker/config.json", home);
  v[n++] = xstrdup("/.docker/config.json");
  v[n++] = xasprintf("%s/.dockercfg", root);
  if (have_cwd)
    v[n++] = xasprintf("%s/.dockercfg", cwd);
  if (!str_empty(home))
    v[n++] = xasprintf("%s/.dockercfg", home);
  v[n++] = xstrdup("/.dockercfg");
  return v;
}

int keyring_load_node(char *const *paths, keyring **ret, char **ret_path)
{
  cleanup_strv char **defaults = NULL;
  if (!paths)
    paths = defaults = keyring_node_search_paths(NULL);
  for (size_t i = 0; paths[i]; i++) {
    cleanup_error crimage_error *err = NULL;
    keyring *k = NULL;
    if (keyring_load_file(paths[i], &k, &err) < 0) {
      if (err->status != CRIMAGE_NOT_FOUND)
        log_warn("ignoring docker config: %s", err->message);
      continue;
    }
    log_debug("using docker config %s (%zu credentials)", paths[i], k->n);
    *ret = k;
    if (ret_path)
      *ret_path = xstrdup(paths[i]);
    return 0;
  }
  *ret = keyring_new();
  if (ret_path)
    *ret_path = NULL;
  return 0;
}

static int entry_cmp_reverse(const void *a, const void *b)
{
  const keyring_entry *x = a, *y = b;
  int c = strcmp(y->key, x->key);
  if (c != 0)
    return c;
  return x->seq < y->seq ? -1 : x->seq > y->seq;
}

size_t keyring_lookup(const keyring *k, const char *image, credential_list *ret)
{
  if (k->n == 0)
    return 0;
  /* Sort a view, not the keyring itself: keyrings are shared read-only between threads. */
  keyring_entry *sorted = xmalloc(k->n * sizeof(*sorted));
  memcpy(sorted, k->entries, k->n * sizeof(*sorted));
  qsort(sorted, k->n, sizeof(*sorted), entry_cmp_reverse);
  size_t added = 0;
  for (size_t i = 0; i < k->n; i++) {
    if (auth_url_match(sorted[i].key, image)) {
      credential_list_add(ret, credential_dup(sorted[i].cred));
      added++;
    }
  }
  if (added == 0 && auth_image_is_docker_hub(image)) {
    for (size_t i = 0; i < k->n; i++) {
      if (streq(sorted[i].key, "index.docker.io")) {
        credential_list_add(ret, credential_dup(sorted[i].cred));
        added++;
      }
    }
  }
  free(sorted);
  return added;
}

size_t keyring_size(const keyring *k) { return k->n; }

static const char *strip_scheme(const char *s)
{
  if (str_has_prefix(s, "https://"))
    return s + strlen("https://");
  if (str_has_prefix(s, "http://"))
    return s + strlen("http://");
  return s;
}

const char *keyring_cred_helper(const keyring *k, const char *registry_host)
{
  if (!registry_host)
    return NULL;
  bool hub = streq(registry_host, "docker.io") || streq(registry_host, "index.docker.io") ||
             streq(registry_host, "registry-1.docker.io");
  for (size_t i = 0; i < k->n_helpers; i++) {
    const char *reg = strip_scheme(k->helpers[i].registry);
    size_t hl = strcspn(reg, "/");
    if ((hl == strlen(registry_host) && strncmp(reg, registry_host, hl) == 0) ||
        (hub && hl == strlen("index.docker.io") && strncmp(reg, "index.docker.io", hl) == 0) ||
        (hub && hl == strlen("docker.io") && strncmp(reg, "docker.io", hl) == 0))
      return k->helpers[i].helper;
  }
  return k->creds_store;
}

const char *keyring_origin(const keyring *k) { return k->origin; }
