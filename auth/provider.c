#include <errno.h>
#include <pthread.h>
#include <string.h>
#include <sys/stat.h>

#include "auth/exec.h"
#include "auth/match.h"
#include "auth/provider.h"
#include "common/fsutil.h"
#include "common/json.h"
#include "common/log.h"
#include "common/util.h"

#define CONFIG_API_PREFIX "kubelet.config.k8s.io/"
#define GLOBAL_CACHE_KEY "global"

static const char *const plugin_api_versions[] = {
    "credentialprovider.kubelet.k8s.io/v1",
    "credentialprovider.kubelet.k8s.io/v1beta1",
    "credentialprovider.kubelet.k8s.io/v1alpha1",
};

typedef struct cache_entry {
  char *key; /* image, registry host[:port] or GLOBAL_CACHE_KEY, with a prefix naming the kind */
  keyring *creds;
  int64_t expires_ms; /* monotonic */
  struct cache_entry *next;
} cache_entry;

/* One plugin run that other callers for the same image wait for. */
typedef struct inflight {
  char *image;
  bool done;
  keyring *result;
  crimage_error *error;
  size_t users; /* the runner and its waiters; the last one frees it */
  struct inflight *next;
} inflight;

typedef struct provider {
  char *name;
  char *path;
  char **match_images;
  char *api_version;
  int64_t default_cache_ms;
  char **args; /* argv, argv[0] = name */
  char **env;  /* NAME=value */
  char *source;

  pthread_mutex_t lock;
  pthread_cond_t cond;
  cache_entry *cache;
  size_t cache_n;
  inflight *running;
} provider;

struct provider_set {
  provider **v;
  size_t n;
  int64_t timeout_ms;
};

static void cache_entry_free(cache_entry *e)
{
  free(e->key);
  keyring_unref(e->creds);
  free(e);
}

static void provider_free(provider *p)
{
  if (!p)
    return;
  free(p->name);
  free(p->path);
  strv_free(p->match_images);
  free(p->api_version);
  strv_free(p->args);
  strv_free(p->env);
  free(p->source);
  while (p->cache) {
    cache_entry *e = p->cache;
    p->cache = e->next;
    cache_entry_free(e);
  }
  pthread_mutex_destroy(&p->lock);
  pthread_cond_destroy(&p->cond);
  free(p);
}

void provider_set_free(provider_set *ps)
{
  if (!ps)
    return;
  for (size_t i = 0; i < ps->n; i++)
    provider_free(ps->v[i]);
  free(ps->v);
  free(ps);
}

static void provider_set_freep(provider_set **ps) { provider_set_free(*ps); }

size_t provider_set_size(const provider_set *ps) { return ps->n; }

static bool api_version_supported(const char *v)
{
  for (size_t i = 0; i < ARRAY_SIZE(plugin_api_versions); i++)
    if (streq(v, plugin_api_versions[i]))
      return true;
  return false;
}

static void strv_push(char ***v, size_t *n, char *s)
{
  *v = xrealloc(*v, (*n + 2) * sizeof(char *));
  (*v)[(*n)++] = s;
  (*v)[*n] = NULL;
}

static int parse_provider(json_object *o, size_t idx, const char *what, const char *bin_dir, provider **ret,
                          crimage_error **err)
{
  if (!json_object_is_type(o, json_type_object))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "%s: providers[%zu] is not an object", what, idx);
  const char *name = json_get_string(o, "name");
  if (str_empty(name))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "%s: providers[%zu].name is required", what, idx);
  if (strchr(name, '/') || strchr(name, ' ') || streq(name, ".") || streq(name, "..") || strlen(name) > 255)
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0,
                             "%s: providers[%zu].name `%s` is invalid: no '/' or spaces, not '.' or '..'", what, idx,
                             name);
  const char *api = json_get_string(o, "apiVersion");
  if (str_empty(api))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "%s: provider %s: apiVersion is required", what, name);
  if (!api_version_supported(api))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0,
                             "%s: provider %s: apiVersion `%s` is not supported (%s, %s or %s)", what, name, api,
                             plugin_api_versions[0], plugin_api_versions[1], plugin_api_versions[2]);
  json_object *images = json_get_array(o, "matchImages");
  if (!images || json_object_array_length(images) == 0)
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0,
                             "%s: provider %s: at least 1 item in matchImages is required", what, name);
  if (json_object_array_length(images) > 1024)
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "%s: provider %s: too many matchImages", what, name);
  json_object *dur = NULL;
  if (!json_object_object_get_ex(o, "defaultCacheDuration", &dur) || !dur)
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "%s: provider %s: defaultCacheDuration is required",
                             what, name);
  int64_t default_ms = 0;
  if (!json_object_is_type(dur, json_type_string) || parse_duration_ms(json_object_get_string(dur), &default_ms) < 0)
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0,
                             "%s: provider %s: defaultCacheDuration must be a duration >= 0 such as \"5m\"", what,
                             name);

  provider *p = xcalloc(1, sizeof(*p));
  pthread_mutex_init(&p->lock, NULL);
  pthread_cond_init(&p->cond, NULL);
  p->name = xstrdup(name);
  p->api_version = xstrdup(api);
  p->default_cache_ms = default_ms;
  p->source = xasprintf("provider %s", name);
  p->path = xasprintf("%s/%s", bin_dir ? bin_dir : ".", name);
  size_t n = 0;
  p->match_images = xcalloc(1, sizeof(char *));
  int r = 0;
  for (size_t i = 0; i < json_object_array_length(images); i++) {
    json_object *m = json_object_array_get_idx(images, i);
    const char *s = json_object_is_type(m, json_type_string) ? json_object_get_string(m) : NULL;
    if (!auth_url_pattern_valid(s)) {
      r = crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "%s: provider %s: matchImages[%zu] `%s` is invalid", what,
                            name, i, s ? s : "(not a string)");
      goto fail;
    }
    strv_push(&p->match_images, &n, xstrdup(s));
  }
  n = 0;
  p->args = xcalloc(1, sizeof(char *));
  strv_push(&p->args, &n, xstrdup(name));
  json_object *args = NULL;
  if (json_object_object_get_ex(o, "args", &args) && args) {
    if (!json_object_is_type(args, json_type_array) || json_object_array_length(args) > 256) {
      r = crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "%s: provider %s: args must be a list of strings", what,
                            name);
      goto fail;
    }
    for (size_t i = 0; i < json_object_array_length(args); i++) {
      json_object *a = json_object_array_get_idx(args, i);
      if (!json_object_is_type(a, json_type_string)) {
        r = crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "%s: provider %s: args[%zu] is not a string", what,
                              name, i);
        goto fail;
      }
      strv_push(&p->args, &n, xstrdup(json_object_get_string(a)));
    }
  }
  n = 0;
  p->env = xcalloc(1, sizeof(char *));
  json_object *env = NULL;
  if (json_object_object_get_ex(o, "env", &env) && env) {
    if (!json_object_is_type(env, json_type_array) || json_object_array_length(env) > 256) {
      r = crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "%s: provider %s: env must be a list", what, name);
      goto fail;
    }
    for (size_t i = 0; i < json_object_array_length(env); i++) {
      json_object *e = json_object_array_get_idx(env, i);
      const char *ename = json_get_string(e, "name");
      const char *evalue = json_get_string(e, "value");
      if (str_empty(ename) || strchr(ename, '=')) {
        r = crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "%s: provider %s: env[%zu].name is invalid", what, name,
                              i);
        goto fail;
      }
      strv_push(&p->env, &n, xasprintf("%s=%s", ename, evalue ? evalue : ""));
    }
  }
  struct stat st;
  if (stat(p->path, &st) < 0) {
    r = crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, errno, "%s: provider %s: plugin binary `%s`", what, name,
                          p->path);
    goto fail;
  }
  *ret = p;
  return 0;
fail:
  provider_free(p);
  return r;
}

int provider_set_parse(const char *data, size_t len, const char *what, const char *bin_dir, int64_t timeout_ms,
                       provider_set **ret, crimage_error **err)
{
  cleanup_json json_object *root = NULL;
  int r = yaml_parse(data, len, what, PROVIDER_CONFIG_JSON_LIMITS, &root, err);
  if (r < 0)
    return r;
  if (!json_object_is_type(root, json_type_object))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "%s: not a CredentialProviderConfig", what);
  const char *kind = json_get_string(root, "kind");
  const char *api = json_get_string(root, "apiVersion");
  if (!streq_ptr(kind, "CredentialProviderConfig"))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "%s: kind `%s` is not CredentialProviderConfig", what,
                             kind ? kind : "(none)");
  if (!api || !(streq(api, CONFIG_API_PREFIX "v1") || streq(api, CONFIG_API_PREFIX "v1beta1") ||
                streq(api, CONFIG_API_PREFIX "v1alpha1")))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "%s: apiVersion `%s` is not " CONFIG_API_PREFIX "v1",
                             what, api ? api : "(none)");
  json_object *providers = json_get_array(root, "providers");
  if (!providers || json_object_array_length(providers) == 0)
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "%s: at least 1 item in providers is required", what);
  if (json_object_array_length(providers) > 256)
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "%s: too many providers", what);

  _cleanup_(provider_set_freep) provider_set *ps = xcalloc(1, sizeof(*ps));
  ps->timeout_ms = timeout_ms > 0 ? timeout_ms : PROVIDER_DEFAULT_TIMEOUT_MS;
  size_t count = json_object_array_length(providers);
  ps->v = xcalloc(count, sizeof(provider *));
  for (size_t i = 0; i < count; i++) {
    provider *p = NULL;
    r = parse_provider(json_object_array_get_idx(providers, i), i, what, bin_dir, &p, err);
    if (r < 0)
      return r;
    for (size_t j = 0; j < ps->n; j++) {
      if (streq(ps->v[j]->name, p->name)) {
        r = crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "%s: duplicate provider name `%s`", what, p->name);
        provider_free(p);
        return r;
      }
    }
    ps->v[ps->n++] = p;
  }
  *ret = TAKE_PTR(ps);
  return 0;
}

int provider_set_load(const char *config_path, const char *bin_dir, int64_t timeout_ms, provider_set **ret,
                      crimage_error **err)
{
  cleanup_free char *data = NULL;
  size_t len = 0;
  int r = read_file(config_path, PROVIDER_MAX_CONFIG_SIZE, &data, &len, err);
  if (r < 0)
    return r;
  return provider_set_parse(data, len, config_path, bin_dir, timeout_ms, ret, err);
}

static bool provider_matches(const provider *p, const char *image)
{
  for (size_t i = 0; p->match_images[i]; i++)
    if (auth_url_match(p->match_images[i], image))
      return true;
  return false;
}

/* Cache keys carry their kind so that an image named like a registry cannot collide with it. */
static char *cache_key(const char *kind, const char *value) { return xasprintf("%s:%s", kind, value); }

/* With p->lock held. */
static keyring *cache_lookup(provider *p, const char *image)
{
  int64_t now = now_monotonic_ms();
  for (cache_entry **pe = &p->cache; *pe;) {
    cache_entry *e = *pe;
    if (e->expires_ms <= now) {
      *pe = e->next;
      cache_entry_free(e);
      p->cache_n--;
      continue;
    }
    pe = &e->next;
  }
  cleanup_free char *registry = auth_image_registry(image);
  char *keys[3] = {cache_key("image", image), cache_key("registry", registry), cache_key("global", GLOBAL_CACHE_KEY)};
  keyring *found = NULL;
  for (size_t i = 0; i < ARRAY_SIZE(keys) && !found; i++)
    for (cache_entry *e = p->cache; e && !found; e = e->next)
      if (streq(e->key, keys[i]))
        found = keyring_ref(e->creds);
  for (size_t i = 0; i < ARRAY_SIZE(keys); i++)
    free(keys[i]);
  return found;
}

/* With p->lock held. Replaces an entry with the same key; drops the oldest entries past the limit. */
static void cache_add(provider *p, char *key, keyring *creds, int64_t expires_ms)
{
  for (cache_entry **pe = &p->cache; *pe; pe = &(*pe)->next) {
    if (streq((*pe)->key, key)) {
      cache_entry *old = *pe;
      *pe = old->next;
      cache_entry_free(old);
      p->cache_n--;
      break;
    }
  }
  cache_entry *e = xcalloc(1, sizeof(*e));
  *e = (cache_entry){.key = key, .creds = keyring_ref(creds), .expires_ms = expires_ms, .next = p->cache};
  p->cache = e;
  p->cache_n++;
  if (p->cache_n > PROVIDER_MAX_CACHE_ENTRIES) {
    cache_entry **pe = &p->cache;
    for (size_t i = 0; i < PROVIDER_MAX_CACHE_ENTRIES; i++)
      pe = &(*pe)->next;
    while (*pe) {
      cache_entry *x = *pe;
      *pe = x->next;
      cache_entry_free(x);
      p->cache_n--;
    }
  }
}

typedef enum cache_kind { CACHE_IMAGE, CACHE_REGISTRY, CACHE_GLOBAL } cache_kind;

static int parse_response(provider *p, const char *out, size_t out_len, keyring **ret, cache_kind *ret_kind,
                          int64_t *ret_cache_ms, crimage_error **err);

/* Runs the plugin and validates its response. ret_cache_ms < 0 means "do not cache". */
static int run_plugin(provider *p, int64_t timeout_ms, const char *image, keyring **ret, cache_kind *ret_kind,
                      int64_t *ret_cache_ms, crimage_error **err)
{
  cleanup_json json_object *req = json_object_new_object();
  json_object_object_add(req, "apiVersion", json_object_new_string(p->api_version));
  json_object_object_add(req, "kind", json_object_new_string("CredentialProviderRequest"));
  json_object_object_add(req, "image", json_object_new_string(image));
  const char *req_s = json_object_to_json_string_ext(req, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE);
  auth_exec_options o = {
      .path = p->path,
      .argv = p->args,
      .env = p->env,
      .input = req_s,
      .input_len = strlen(req_s),
      .timeout_ms = timeout_ms,
      .max_stdout = PROVIDER_MAX_RESPONSE_SIZE,
      .max_stderr = PROVIDER_MAX_STDERR,
  };
  _cleanup_(auth_exec_result_clear) auth_exec_result res = {0};
  int r = auth_exec(&o, &res, err);
  if (r < 0)
    return r;
  if (res.exit_status != 0)
    return crimage_error_set(err, CRIMAGE_UNAVAILABLE, 0, "plugin exited with status %d%s%s", res.exit_status,
                             *res.err ? "; stderr: " : "", res.err);
  crimage_error *perr = NULL;
  r = parse_response(p, res.out, res.out_len, ret, ret_kind, ret_cache_ms, &perr);
  if (r < 0) {
    /* What the plugin said on stderr may explain a bad answer; its stdout is never shown. */
    if (*res.err) {
      char *m = xasprintf("%s; stderr: %s", perr->message, res.err);
      free(perr->message);
      perr->message = m;
    }
    if (err && !*err)
      *err = perr;
    else
      crimage_error_free(perr);
  }
  return r;
}

static int parse_response(provider *p, const char *out, size_t out_len, keyring **ret, cache_kind *ret_kind,
                          int64_t *ret_cache_ms, crimage_error **err)
{
  int r;

  cleanup_json json_object *resp = NULL;
  /* Nothing of stdout is ever quoted in an error: it holds secrets. json_parse errors describe the position. */
  r = json_parse(out, out_len, "plugin response", PROVIDER_RESPONSE_JSON_LIMITS, &resp, err);
  if (r < 0)
    return r;
  if (!json_object_is_type(resp, json_type_object))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "plugin response is not a JSON object");
  const char *kind = json_get_string(resp, "kind");
  if (!streq_ptr(kind, "CredentialProviderResponse"))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0,
                             "plugin response has another kind than CredentialProviderResponse");
  const char *api = json_get_string(resp, "apiVersion");
  if (!streq_ptr(api, p->api_version))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "plugin response has another apiVersion than `%s`",
                             p->api_version);
  const char *key_type = json_get_string(resp, "cacheKeyType");
  if (streq_ptr(key_type, "Image"))
    *ret_kind = CACHE_IMAGE;
  else if (streq_ptr(key_type, "Registry"))
    *ret_kind = CACHE_REGISTRY;
  else if (streq_ptr(key_type, "Global"))
    *ret_kind = CACHE_GLOBAL;
  else
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0,
                             "plugin response has a cacheKeyType other than Image, Registry or Global");
  json_object *dur = NULL;
  int64_t cache_ms = p->default_cache_ms;
  if (json_object_object_get_ex(resp, "cacheDuration", &dur) && dur) {
    if (!json_object_is_type(dur, json_type_string) || parse_duration_ms(json_object_get_string(dur), &cache_ms) < 0)
      return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "plugin response has an invalid cacheDuration");
  }
  cleanup_keyring keyring *k = keyring_new();
  json_object *auth = NULL;
  if (json_object_object_get_ex(resp, "auth", &auth) && auth) {
    if (!json_object_is_type(auth, json_type_object))
      return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "plugin response: `auth` is not an object");
    if (json_object_object_length(auth) > KEYRING_MAX_ENTRIES)
      return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "plugin response: too many `auth` entries");
    json_object_object_foreach(auth, pattern, entry)
    {
      if (!json_object_is_type(entry, json_type_object))
        return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "plugin response: an auth entry is not an object");
      const char *user = json_get_string(entry, "username");
      const char *pass = json_get_string(entry, "password");
      cleanup_credential credential *c = credential_new();
      c->username = xstrdup(user ? user : "");
      c->password = xstrdup(pass ? pass : "");
      if (keyring_add(k, pattern, c, p->source) < 0)
        log_warn("provider %s: ignoring an auth entry whose key has no registry host", p->name);
    }
  }
  *ret_cache_ms = cache_ms == 0 ? -1 : cache_ms;
  *ret = TAKE_PTR(k);
  return 0;
}

int provider_set_parse_response(provider_set *ps, size_t index, const char *out, size_t len, keyring **ret,
                                crimage_error **err)
{
  if (index >= ps->n)
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, EINVAL, "no provider %zu", index);
  cache_kind kind;
  int64_t cache_ms = 0;
  return parse_response(ps->v[index], out, len, ret, &kind, &cache_ms, err);
}

static crimage_error *error_copy(const crimage_error *e)
{
  crimage_error *c = xcalloc(1, sizeof(*c));
  c->status = e->status;
  c->errnum = e->errnum;
  c->message = xstrdup(e->message);
  return c;
}

static void inflight_release(provider *p, inflight *f)
{
  /* With p->lock held. */
  if (--f->users > 0)
    return;
  free(f->image);
  keyring_unref(f->result);
  crimage_error_free(f->error);
  free(f);
}

static int provider_get(provider *p, int64_t timeout_ms, const char *image, keyring **ret, crimage_error **err)
{
  pthread_mutex_lock(&p->lock);
  keyring *cached = cache_lookup(p, image);
  if (cached) {
    pthread_mutex_unlock(&p->lock);
    log_debug("provider %s: cached credentials for %s", p->name, image);
    *ret = cached;
    return 0;
  }
  for (inflight *f = p->running; f; f = f->next) {
    if (!streq(f->image, image))
      continue;
    f->users++;
    while (!f->done)
      pthread_cond_wait(&p->cond, &p->lock);
    int r = 0;
    if (f->error) {
      crimage_error *e = error_copy(f->error);
      r = -(e->errnum > 0 ? e->errnum : EIO);
      if (err && !*err)
        *err = e;
      else
        crimage_error_free(e);
    } else {
      *ret = keyring_ref(f->result);
    }
    inflight_release(p, f);
    pthread_mutex_unlock(&p->lock);
    return r;
  }
  inflight *f = xcalloc(1, sizeof(*f));
  f->image = xstrdup(image);
  f->users = 1;
  f->next = p->running;
  p->running = f;
  pthread_mutex_unlock(&p->lock);

  log_debug("provider %s: running %s for %s", p->name, p->path, image);
  keyring *result = NULL;
  cache_kind kind = CACHE_IMAGE;
  int64_t cache_ms = -1;
  crimage_error *run_err = NULL;
  int r = run_plugin(p, timeout_ms, image, &result, &kind, &cache_ms, &run_err);

  pthread_mutex_lock(&p->lock);
  if (r >= 0 && cache_ms > 0) {
    cleanup_free char *registry = auth_image_registry(image);
    char *key = kind == CACHE_IMAGE      ? cache_key("image", image)
                : kind == CACHE_REGISTRY ? cache_key("registry", registry)
                                         : cache_key("global", GLOBAL_CACHE_KEY);
    cache_add(p, key, result, now_monotonic_ms() + cache_ms);
  }
  f->result = result ? keyring_ref(result) : NULL;
  f->error = run_err ? error_copy(run_err) : NULL;
  f->done = true;
  for (inflight **pf = &p->running; *pf; pf = &(*pf)->next) {
    if (*pf == f) {
      *pf = f->next;
      break;
    }
  }
  pthread_cond_broadcast(&p->cond);
  inflight_release(p, f);
  pthread_mutex_unlock(&p->lock);

  if (r < 0) {
    if (err && !*err)
      *err = run_err;
    else
      crimage_error_free(run_err);
    return r;
  }
  *ret = result;
  return 0;
}

int provider_set_provide(provider_set *ps, const char *image, keyring *k, crimage_error **err)
{
  int ret = 0;
  for (size_t i = 0; i < ps->n; i++) {
    provider *p = ps->v[i];
    if (!provider_matches(p, image))
      continue;
    keyring *creds = NULL;
    crimage_error *e = NULL;
    int r = provider_get(p, ps->timeout_ms, image, &creds, &e);
    if (r < 0) {
      crimage_error_wrap(&e, "credential provider %s for %s", p->name, image);
      log_warn("%s", e->message);
      if (ret == 0) {
        ret = r;
        if (err && !*err)
          *err = TAKE_PTR(e);
      }
      crimage_error_free(e);
      continue;
    }
    keyring_add_keyring(k, creds);
    keyring_unref(creds);
  }
  return ret;
}

size_t provider_set_pending(provider_set *ps, const char *image)
{
  size_t n = 0;
  for (size_t i = 0; i < ps->n; i++) {
    provider *p = ps->v[i];
    pthread_mutex_lock(&p->lock);
    for (inflight *f = p->running; f; f = f->next)
      if (streq(f->image, image))
        n += f->users;
    pthread_mutex_unlock(&p->lock);
  }
  return n;
}
