#include <dirent.h>
#include <errno.h>
#include <pthread.h>
#include <string.h>
#include <sys/stat.h>

#include "auth/base64.h"
#include "auth/secrets.h"
#include "common/dynbuf.h"
#include "common/fsutil.h"
#include "common/json.h"
#include "common/log.h"
#include "common/util.h"

#define TYPE_DOCKERCONFIGJSON "kubernetes.io/dockerconfigjson"
#define TYPE_DOCKERCFG "kubernetes.io/dockercfg"

/* The payload of one key: stringData wins over data, as the API server merges them. */
static int secret_payload(json_object *secret, const char *key, const char *name, char **ret, size_t *ret_len,
                          crimage_error **err)
{
  json_object *string_data = json_get_object(secret, "stringData");
  const char *s = json_get_string(string_data, key);
  if (s) {
    *ret = xstrdup(s);
    *ret_len = strlen(s);
    return 0;
  }
  json_object *data = json_get_object(secret, "data");
  json_object *v = NULL;
  if (!data || !json_object_object_get_ex(data, key, &v) || !v)
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "Secret %s: no `%s` in data", name, key);
  if (!json_object_is_type(v, json_type_string))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "Secret %s: data `%s` is not a string", name, key);
  if (base64_decode(json_object_get_string(v), (size_t) json_object_get_string_len(v), ret, ret_len) < 0)
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "Secret %s: data `%s` is not valid base64", name, key);
  return 0;
}

int secret_to_keyring(json_object *secret, const char *what, keyring **ret, crimage_error **err)
{
  if (!json_object_is_type(secret, json_type_object))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "%s: a Secret must be an object", what);
  json_object *meta = json_get_object(secret, "metadata");
  const char *ns = json_get_string(meta, "namespace");
  const char *name_only = json_get_string(meta, "name");
  cleanup_free char *name =
      xasprintf("%s/%s", str_empty(ns) ? "default" : ns, str_empty(name_only) ? "(unnamed)" : name_only);
  const char *kind = json_get_string(secret, "kind");
  if (!streq_ptr(kind, "Secret"))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "%s: kind `%s` is not a Secret", what,
                             kind ? kind : "(none)");
  const char *type = json_get_string(secret, "type");
  const char *key;
  if (streq_ptr(type, TYPE_DOCKERCONFIGJSON))
    key = ".dockerconfigjson";
  else if (streq_ptr(type, TYPE_DOCKERCFG))
    key = ".dockercfg";
  else
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0,
                             "Secret %s: type `%s` is not " TYPE_DOCKERCONFIGJSON " or " TYPE_DOCKERCFG, name,
                             type ? type : "Opaque");

  cleanup_secret char *payload = NULL;
  size_t len = 0;
  int r = secret_payload(secret, key, name, &payload, &len, err);
  if (r < 0)
    return r;
  if (len > KEYRING_MAX_FILE_SIZE)
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "Secret %s: `%s` is larger than %d bytes", name, key,
                             KEYRING_MAX_FILE_SIZE);
  cleanup_free char *source = xasprintf("secret %s", name);
  cleanup_free char *payload_what = xasprintf("Secret %s: %s", name, key);
  cleanup_keyring keyring *k = keyring_new();
  if (streq(key, ".dockerconfigjson")) {
    cleanup_json json_object *root = NULL;
    r = json_parse(payload, len, payload_what, KEYRING_JSON_LIMITS, &root, err);
    if (r < 0)
      return r;
    json_object *auths = NULL;
    if (!json_object_is_type(root, json_type_object) || !json_object_object_get_ex(root, "auths", &auths))
      return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "%s: no `auths` object", payload_what);
    r = keyring_add_config(k, auths, source, payload_what, err);
  } else {
    r = keyring_add_dockercfg(k, payload, len, source, payload_what, err);
  }
  if (r < 0)
    return r;
  *ret = TAKE_PTR(k);
  return 0;
}

typedef struct keyring_vec {
  keyring **v;
  size_t n;
} keyring_vec;

static void keyring_vec_push(keyring_vec *kv, keyring *k)
{
  kv->v = xrealloc(kv->v, (kv->n + 1) * sizeof(*kv->v));
  kv->v[kv->n++] = k;
}

static void keyring_vec_clear(keyring_vec *kv)
{
  keyring_array_free(kv->v, kv->n);
  kv->v = NULL;
  kv->n = 0;
}

static int add_secret(keyring_vec *kv, json_object *o, const char *what, crimage_error **err)
{
  if (kv->n >= SECRETS_MAX_COUNT)
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "%s: more than %d Secrets", what, SECRETS_MAX_COUNT);
  keyring *k = NULL;
  int r = secret_to_keyring(o, what, &k, err);
  if (r < 0)
    return r;
  keyring_vec_push(kv, k);
  return 0;
}

static int parse_into(keyring_vec *kv, const char *data, size_t len, const char *what, crimage_error **err)
{
  cleanup_json json_object *docs = NULL;
  int r = yaml_parse_all(data, len, what, SECRETS_MAX_COUNT, SECRETS_JSON_LIMITS, &docs, err);
  if (r < 0)
    return r;
  for (size_t i = 0; i < json_object_array_length(docs); i++) {
    json_object *doc = json_object_array_get_idx(docs, i);
    const char *kind = json_object_is_type(doc, json_type_object) ? json_get_string(doc, "kind") : NULL;
    if (kind && (streq(kind, "List") || streq(kind, "SecretList"))) {
      json_object *items = json_get_array(doc, "items");
      if (!items)
        return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "%s: a %s without `items`", what, kind);
      for (size_t j = 0; j < json_object_array_length(items); j++) {
        json_object *item = json_object_array_get_idx(items, j);
        /* Items of a SecretList carry no kind of their own. */
        if (streq(kind, "SecretList") && json_object_is_type(item, json_type_object) && !json_get_string(item, "kind"))
          json_object_object_add(item, "kind", json_object_new_string("Secret"));
        r = add_secret(kv, item, what, err);
        if (r < 0)
          return r;
      }
      continue;
    }
    r = add_secret(kv, doc, what, err);
    if (r < 0)
      return r;
  }
  return 0;
}

int secrets_parse(const char *data, size_t len, const char *what, keyring ***ret, size_t *ret_n, crimage_error **err)
{
  _cleanup_(keyring_vec_clear) keyring_vec kv = {0};
  int r = parse_into(&kv, data, len, what, err);
  if (r < 0)
    return r;
  *ret = TAKE_PTR(kv.v);
  *ret_n = kv.n;
  kv.n = 0;
  return 0;
}

static int load_file_into(keyring_vec *kv, const char *path, crimage_error **err)
{
  cleanup_secret char *data = NULL;
  size_t len = 0;
  int r = read_file(path, SECRETS_MAX_FILE_SIZE, &data, &len, err);
  if (r < 0)
    return r;
  return parse_into(kv, data, len, path, err);
}

int secrets_load_file(const char *path, keyring ***ret, size_t *ret_n, crimage_error **err)
{
  _cleanup_(keyring_vec_clear) keyring_vec kv = {0};
  int r = load_file_into(&kv, path, err);
  if (r < 0)
    return r;
  *ret = TAKE_PTR(kv.v);
  *ret_n = kv.n;
  kv.n = 0;
  return 0;
}

static bool manifest_name(const char *name)
{
  return name[0] != '.' &&
         (str_has_suffix(name, ".yaml") || str_has_suffix(name, ".yml") || str_has_suffix(name, ".json"));
}

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *) a, *(char *const *) b); }

/* The sorted manifest names of dir and a signature of what they are now (name, size, mtime of each). */
static int scan_dir(const char *dir, char ***ret_names, char **ret_signature, crimage_error **err)
{
  DIR *d = opendir(dir);
  if (!d)
    return crimage_error_set(err, errno == ENOENT ? CRIMAGE_NOT_FOUND : CRIMAGE_INTERNAL, errno,
                             "opening Secret directory `%s`", dir);
  cleanup_strv char **names = xcalloc(1, sizeof(char *));
  size_t n = 0;
  struct dirent *de;
  while ((de = readdir(d))) {
    if (!manifest_name(de->d_name))
      continue;
    if (n >= SECRETS_MAX_COUNT) {
      closedir(d);
      return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "Secret directory `%s`: more than %d files", dir,
                               SECRETS_MAX_COUNT);
    }
    names = xrealloc(names, (n + 2) * sizeof(char *));
    names[n++] = xstrdup(de->d_name);
    names[n] = NULL;
  }
  closedir(d);
  qsort(names, n, sizeof(char *), cmp_str);

  cleanup_dynbuf dynbuf sig;
  dynbuf_init(&sig, SIZE_MAX / 2);
  size_t kept = 0;
  for (size_t i = 0; i < n; i++) {
    cleanup_free char *path = xasprintf("%s/%s", dir, names[i]);
    struct stat st;
    /* stat follows symlinks: Kubernetes volume mounts are symlinks into a timestamped dir. */
    if (stat(path, &st) < 0 || !S_ISREG(st.st_mode)) {
      free(names[i]);
      continue;
    }
    (void) dynbuf_printf(&sig, "%s\n%lld\n%lld.%09ld\n%llu\n", names[i], (long long) st.st_size,
                         (long long) st.st_mtim.tv_sec, st.st_mtim.tv_nsec, (unsigned long long) st.st_ino);
    names[kept++] = names[i];
  }
  names[kept] = NULL;
  if (ret_signature)
    *ret_signature = dynbuf_take(&sig, NULL);
  *ret_names = TAKE_PTR(names);
  return 0;
}

static int load_dir(const char *dir, char **ret_signature, keyring ***ret, size_t *ret_n, crimage_error **err)
{
  cleanup_strv char **names = NULL;
  int r = scan_dir(dir, &names, ret_signature, err);
  if (r < 0)
    return r;
  _cleanup_(keyring_vec_clear) keyring_vec kv = {0};
  for (size_t i = 0; names[i]; i++) {
    cleanup_free char *path = xasprintf("%s/%s", dir, names[i]);
    r = load_file_into(&kv, path, err);
    if (r < 0) {
      if (ret_signature) {
        free(*ret_signature);
        *ret_signature = NULL;
      }
      return r;
    }
  }
  *ret = TAKE_PTR(kv.v);
  *ret_n = kv.n;
  kv.n = 0;
  return 0;
}

int secrets_load_dir(const char *dir, keyring ***ret, size_t *ret_n, crimage_error **err)
{
  return load_dir(dir, NULL, ret, ret_n, err);
}

struct secret_dir {
  pthread_mutex_t lock;
  char *path;
  char *signature;        /* of the loaded state; NULL before the first successful load */
  char *failed_signature; /* of a state that failed to load: not retried until something changes */
  keyring **keyrings;
  size_t n;
};

secret_dir *secret_dir_new(const char *path)
{
  secret_dir *d = xcalloc(1, sizeof(*d));
  pthread_mutex_init(&d->lock, NULL);
  d->path = xstrdup(path);
  return d;
}

void secret_dir_free(secret_dir *d)
{
  if (!d)
    return;
  keyring_array_free(d->keyrings, d->n);
  free(d->signature);
  free(d->failed_signature);
  free(d->path);
  pthread_mutex_destroy(&d->lock);
  free(d);
}

int secret_dir_get(secret_dir *d, keyring ***ret, size_t *ret_n, crimage_error **err)
{
  pthread_mutex_lock(&d->lock);
  cleanup_strv char **names = NULL;
  cleanup_free char *sig = NULL;
  cleanup_error crimage_error *load_err = NULL;
  int r = scan_dir(d->path, &names, &sig, &load_err);
  if (r < 0 && load_err->status == CRIMAGE_NOT_FOUND) {
    /* No directory (yet): no Secrets. */
    crimage_error_clear(&load_err);
    free(sig);
    sig = xstrdup("");
    r = 0;
  }
  if (r >= 0 && !streq_ptr(sig, d->signature) && !streq_ptr(sig, d->failed_signature)) {
    keyring **v = NULL;
    size_t n = 0;
    if (streq(sig, "") || (r = load_dir(d->path, NULL, &v, &n, &load_err)) >= 0) {
      log_info("loaded %zu Secrets from %s", n, d->path);
      keyring_array_free(d->keyrings, d->n);
      d->keyrings = v;
      d->n = n;
      free(d->signature);
      /* The signature taken before loading: a change during the load triggers another load next time. */
      d->signature = TAKE_PTR(sig);
      free(d->failed_signature);
      d->failed_signature = NULL;
    } else {
      free(d->failed_signature);
      d->failed_signature = TAKE_PTR(sig);
    }
  }
  if (r < 0) {
    /* Keep serving what was loaded before; report the problem once per change. */
    log_warn("Secret directory %s: keeping the %zu Secrets loaded before: %s", d->path, d->n, load_err->message);
    if (err && !*err) {
      *err = TAKE_PTR(load_err);
    }
  }
  keyring **out = xcalloc(d->n + 1, sizeof(*out));
  for (size_t i = 0; i < d->n; i++)
    out[i] = keyring_ref(d->keyrings[i]);
  *ret = out;
  *ret_n = d->n;
  pthread_mutex_unlock(&d->lock);
  return 0;
}
