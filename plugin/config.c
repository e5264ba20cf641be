#include <dirent.h>
#include <errno.h>

#include "common/json.h"
#include "common/log.h"
#include "common/util.h"
#include "plugin/config.h"
#include "pull/scheduler.h"
#include "pull/store.h"

#define CONFIG_MAX_SIZE (1024 * 1024)
/* Files in <config>.d/ at most: a directory an operator fills by hand, not a database. */
#define CONFIG_MAX_DROPINS 64
/* What parsing the config may build (json_limits): lists and maps of up to 4096 entries (pinnedImages,
 * registries), 8 MiB of tree. */
#define CONFIG_JSON_LIMITS JSON_LIMITS(8u << 20, 4096)

void config_init(crimaged_config *cfg)
{
  *cfg = (crimaged_config){
      .root = xstrdup(CONFIG_DEFAULT_ROOT),
      .socket = xstrdup(CONFIG_DEFAULT_SOCKET),
      .log_level = LOG_INFO,
      .default_registry = xstrdup("docker.io"),
      .certs_dir = xstrdup("/etc/crimage/certs.d"),
      .max_concurrent_downloads = 3,
      .pull_progress_timeout_ms = 5 * 60 * 1000,
      .pull_min_throughput = 1024,
      .pull_min_throughput_window_ms = 30 * 1000,
      .verify_diff_ids = true,
      .serialize_image_pulls = false,
      .max_parallel_image_pulls = 0,
      .pull_backoff_enabled = true,
      .pull_backoff_initial_ms = 10 * 1000,
      .pull_backoff_max_ms = 300 * 1000,
      .shutdown_grace_period_ms = 10 * 1000,
      .metrics_address = xstrdup(""),
      .kubelet_root_dir = xstrdup("/var/lib/kubelet"),
      .credential_provider_timeout_ms = 60 * 1000,
      .containerd_address = xstrdup(""),
      .containerd_namespace = xstrdup("k8s.io"),
      .containerd_snapshotter = xstrdup(""),
      .snapshotter_socket = xstrdup(""),
      .containers_storage_root = xstrdup(""),
      .unreferenced_retention_ms = STORE_DEFAULT_RETENTION_MS,
      .unreferenced_max_bytes = STORE_DEFAULT_UNREFERENCED_MAX_BYTES,
  };
}

static void registry_host_clear(registry_host *h)
{
  free(h->host);
  for (size_t i = 0; i < h->n_mirrors; i++)
    free(h->mirrors[i].endpoint);
  free(h->mirrors);
}

void config_clear(crimaged_config *cfg)
{
  free(cfg->root);
  free(cfg->socket);
  free(cfg->default_registry);
  free(cfg->certs_dir);
  for (size_t i = 0; i < cfg->n_registries; i++)
    registry_host_clear(&cfg->registries[i]);
  free(cfg->registries);
  for (size_t i = 0; i < cfg->n_handlers; i++) {
    free(cfg->handlers[i].name);
    free(cfg->handlers[i].root);
    free(cfg->handlers[i].containerd_namespace);
    free(cfg->handlers[i].snapshotter);
    free(cfg->handlers[i].containers_storage_root);
  }
  free(cfg->handlers);
  strv_free(cfg->docker_config_paths);
  strv_free(cfg->pinned_images);
  free(cfg->credential_provider_config);
  free(cfg->credential_provider_bin_dir);
  free(cfg->pull_secrets_dir);
  free(cfg->kubelet_root_dir);
  free(cfg->metrics_address);
  free(cfg->containerd_address);
  free(cfg->containerd_namespace);
  free(cfg->containerd_snapshotter);
  free(cfg->snapshotter_socket);
  free(cfg->containers_storage_root);
  *cfg = (crimaged_config){0};
}

static registry_host *get_registry(crimaged_config *cfg, const char *host)
{
  for (size_t i = 0; i < cfg->n_registries; i++)
    if (streq(cfg->registries[i].host, host))
      return &cfg->registries[i];
  cfg->registries = xrealloc(cfg->registries, (cfg->n_registries + 1) * sizeof(*cfg->registries));
  registry_host *h = &cfg->registries[cfg->n_registries++];
  *h = (registry_host){.host = xstrdup(host)};
  return h;
}

void config_add_insecure_registry(crimaged_config *cfg, const char *host) { get_registry(cfg, host)->insecure = true; }

/* ---- typed accessors: each names the key in its error ---- */

static int get_string(json_object *v, const char *key, char **dst, crimage_error **err)
{
  if (!json_object_is_type(v, json_type_string))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "config key %s: expected a string", key);
  free(*dst);
  *dst = xstrdup(json_object_get_string(v));
  return 0;
}

static int get_bool(json_object *v, const char *key, bool *dst, crimage_error **err)
{
  if (!json_object_is_type(v, json_type_boolean))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "config key %s: expected true or false", key);
  *dst = json_object_get_boolean(v);
  return 0;
}

static int get_int(json_object *v, const char *key, int *dst, crimage_error **err)
{
  if (!json_object_is_type(v, json_type_int))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "config key %s: expected an integer", key);
  int64_t n = json_object_get_int64(v);
  if (n < INT32_MIN || n > INT32_MAX)
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "config key %s: out of range", key);
  *dst = (int) n;
  return 0;
}

static int get_duration(json_object *v, const char *key, int64_t *dst, crimage_error **err)
{
  if (!json_object_is_type(v, json_type_string) || parse_duration_ms(json_object_get_string(v), dst) < 0)
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0,
                             "config key %s: expected a duration such as \"10s\" or \"5m\"", key);
  return 0;
}

/* A number of bytes: an integer, or a string as Kubernetes writes quantities ("500Mi", "4Gi", "2G", "1000"). */
static int get_bytes(json_object *v, const char *key, uint64_t *dst, crimage_error **err)
{
  if (json_object_is_type(v, json_type_int) && json_object_get_int64(v) >= 0) {
    *dst = (uint64_t) json_object_get_int64(v);
    return 0;
  }
  static const struct {
    const char *suffix;
    uint64_t factor;
  } units[] = {{"Ki", 1ull << 10}, {"Mi", 1ull << 20}, {"Gi", 1ull << 30}, {"Ti", 1ull << 40}, {"k", 1000ull},
               {"M", 1000ull * 1000}, {"G", 1000ull * 1000 * 1000}, {"T", 1000ull * 1000 * 1000 * 1000}, {"", 1}};
  const char *s = json_object_is_type(v, json_type_string) ? json_object_get_string(v) : NULL;
  size_t digits = s ? strspn(s, "0123456789") : 0;
  for (size_t i = 0; digits > 0 && digits <= 19 && i < ARRAY_SIZE(units); i++) {
    if (!streq(s + digits, units[i].suffix))
      continue;
    cleanup_free char *num = xstrndup(s, digits);
    uint64_t n = 0;
    if (parse_u64_decimal(num, &n) < 0 || n > UINT64_MAX / units[i].factor)
      break;
    *dst = n * units[i].factor;
    return 0;
  }
  return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0,
                           "config key %s: expected a number of bytes such as 1073741824 or \"4Gi\"", key);
}

static int get_strv(json_object *v, const char *key, char ***dst, crimage_error **err)
{
  if (!json_object_is_type(v, json_type_array))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "config key %s: expected a list of strings", key);
  char **out = xcalloc(json_object_array_length(v) + 1, sizeof(char *));
  for (size_t i = 0; i < json_object_array_length(v); i++) {
    json_object *e = json_object_array_get_idx(v, i);
    if (!json_object_is_type(e, json_type_string)) {
      strv_free(out);
      return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "config key %s[%zu]: expected a string", key, i);
    }
    out[i] = xstrdup(json_object_get_string(e));
  }
  strv_free(*dst);
  *dst = out;
  return 0;
}

static int load_mirrors(registry_host *h, json_object *v, const char *key, crimage_error **err)
{
  if (!json_object_is_type(v, json_type_array))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "config key %s: expected a list", key);
  for (size_t i = 0; i < json_object_array_length(v); i++) {
    json_object *m = json_object_array_get_idx(v, i);
    registry_mirror mirror = {0};
    if (json_object_is_type(m, json_type_string)) {
      mirror.endpoint = xstrdup(json_object_get_string(m));
    } else if (json_object_is_type(m, json_type_object)) {
      json_object_object_foreach(m, mk, mv)
      {
        int r = 0;
        if (streq(mk, "endpoint"))
          r = get_string(mv, "mirrors[].endpoint", &mirror.endpoint, err);
        else if (streq(mk, "overridePath"))
          r = get_bool(mv, "mirrors[].overridePath", &mirror.override_path, err);
        else
          r = crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "config key %s[%zu]: unknown key %s", key, i, mk);
        if (r < 0) {
          free(mirror.endpoint);
          return r;
        }
      }
    }
    if (str_empty(mirror.endpoint)) {
      free(mirror.endpoint);
      return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "config key %s[%zu]: a mirror needs an endpoint",
                               key, i);
    }
    h->mirrors = xrealloc(h->mirrors, (h->n_mirrors + 1) * sizeof(*h->mirrors));
    h->mirrors[h->n_mirrors++] = mirror;
  }
  return 0;
}

static int load_registries(crimaged_config *cfg, json_object *v, crimage_error **err)
{
  if (!json_object_is_type(v, json_type_object))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "config key registries: expected a map of hosts");
  json_object_object_foreach(v, host, settings)
  {
    if (!*host || strchr(host, '/'))
      return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0,
                               "config key registries: \"%s\" is not a host[:port]", host);
    registry_host *h = get_registry(cfg, host);
    if (!settings)
      continue;
    if (!json_object_is_type(settings, json_type_object))
      return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "config key registries.%s: expected a map", host);
    json_object_object_foreach(settings, k, val)
    {
      cleanup_free char *path = xasprintf("registries.%s.%s", host, k);
      int r;
      bool upstream = true;
      if (streq(k, "insecure"))
        r = get_bool(val, path, &h->insecure, err);
      else if (streq(k, "mirrors"))
        r = load_mirrors(h, val, path, err);
      else if (streq(k, "upstream")) {
        r = get_bool(val, path, &upstream, err);
        h->mirrors_only = !upstream;
      }
      else
        r = crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "unknown config key %s", path);
      if (r < 0)
        return r;
    }
  }
  return 0;
}

/* containersStorage: {root: DIR}, at the top and per handler; root "" means none. */
static int load_containers_storage(json_object *v, const char *path, char **root, crimage_error **err)
{
  if (!json_object_is_type(v, json_type_object))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "config key %s: expected a map", path);
  json_object_object_foreach(v, k, val)
  {
    if (!streq(k, "root"))
      return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "unknown config key %s.%s", path, k);
    cleanup_free char *key = xasprintf("%s.root", path);
    int r = get_string(val, key, root, err);
    if (r < 0)
      return r;
    if (**root && **root != '/')
      return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "config key %s: must be an absolute path", key);
  }
  return 0;
}

static int load_handlers(crimaged_config *cfg, json_object *v, crimage_error **err)
{
  if (!json_object_is_type(v, json_type_object))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "config key runtimeHandlers: expected a map");
  json_object_object_foreach(v, name, settings)
  {
    if (!*name)
      return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "config key runtimeHandlers: empty handler name");
    /* A drop-in that names a handler again changes the settings it names. */
    handler_config *h = NULL;
    for (size_t i = 0; i < cfg->n_handlers && !h; i++)
      if (streq(cfg->handlers[i].name, name))
        h = &cfg->handlers[i];
    if (!h) {
      cfg->handlers = xrealloc(cfg->handlers, (cfg->n_handlers + 1) * sizeof(*cfg->handlers));
      h = &cfg->handlers[cfg->n_handlers++];
      *h = (handler_config){.name = xstrdup(name), .unpack_layers = -1};
    }
    if (!settings)
      continue;
    if (!json_object_is_type(settings, json_type_object))
      return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "config key runtimeHandlers.%s: expected a map",
                               name);
    json_object_object_foreach(settings, k, val)
    {
      if (streq(k, "platform")) {
        if (!json_object_is_type(val, json_type_string))
          return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0,
                                   "config key runtimeHandlers.%s.platform: expected \"os/arch[/variant]\"", name);
        int r = platform_parse(json_object_get_string(val), &h->platform, err);
        if (r < 0)
          return crimage_error_wrap(err, "config key runtimeHandlers.%s.platform", name);
        h->has_platform = true;
      } else if (streq(k, "root")) {
        cleanup_free char *path = xasprintf("runtimeHandlers.%s.root", name);
        int r = get_string(val, path, &h->root, err);
        if (r < 0)
          return r;
        if (h->root[0] != '/')
          return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0,
                                   "config key runtimeHandlers.%s.root: must be an absolute path", name);
      } else if (streq(k, "unpackLayers")) {
        cleanup_free char *path = xasprintf("runtimeHandlers.%s.unpackLayers", name);
        bool on = false;
        int r = get_bool(val, path, &on, err);
        if (r < 0)
          return r;
        h->unpack_layers = on;
      } else if (streq(k, "snapshotter")) {
        cleanup_free char *path = xasprintf("runtimeHandlers.%s.snapshotter", name);
        int r = get_string(val, path, &h->snapshotter, err);
        if (r < 0)
          return r;
      } else if (streq(k, "containersStorage")) {
        cleanup_free char *path = xasprintf("runtimeHandlers.%s.containersStorage", name);
        int r = load_containers_storage(val, path, &h->containers_storage_root, err);
        if (r < 0)
          return r;
      } else if (streq(k, "containerdNamespace")) {
        cleanup_free char *path = xasprintf("runtimeHandlers.%s.containerdNamespace", name);
        int r = get_string(val, path, &h->containerd_namespace, err);
        if (r < 0)
          return r;
      } else {
        return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "unknown config key runtimeHandlers.%s.%s", name,
                                 k);
      }
    }
  }
  return 0;
}

static int load_backoff(crimaged_config *cfg, json_object *v, crimage_error **err)
{
  if (!json_object_is_type(v, json_type_object))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "config key pullBackoff: expected a map");
  json_object_object_foreach(v, k, val)
  {
    int r;
    if (streq(k, "initial"))
      r = get_duration(val, "pullBackoff.initial", &cfg->pull_backoff_initial_ms, err);
    else if (streq(k, "max"))
      r = get_duration(val, "pullBackoff.max", &cfg->pull_backoff_max_ms, err);
    else if (streq(k, "enabled"))
      r = get_bool(val, "pullBackoff.enabled", &cfg->pull_backoff_enabled, err);
    else
      r = crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "unknown config key pullBackoff.%s", k);
    if (r < 0)
      return r;
  }
  return 0;
}

static int load_containerd(crimaged_config *cfg, json_object *v, crimage_error **err)
{
  if (!json_object_is_type(v, json_type_object))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "config key containerd: expected a map");
  json_object_object_foreach(v, k, val)
  {
    int r;
    if (!val)
      continue;
    if (streq(k, "address"))
      r = get_string(val, "containerd.address", &cfg->containerd_address, err);
    else if (streq(k, "namespace"))
      r = get_string(val, "containerd.namespace", &cfg->containerd_namespace, err);
    else if (streq(k, "snapshotter"))
      r = get_string(val, "containerd.snapshotter", &cfg->containerd_snapshotter, err);
    else
      r = crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "unknown config key containerd.%s", k);
    if (r < 0)
      return r;
  }
  return 0;
}

static int load_root(crimaged_config *cfg, json_object *root, const char *path, crimage_error **err);

int config_load_file(crimaged_config *cfg, const char *path, crimage_error **err)
{
  cleanup_json json_object *root = NULL;
  int r = yaml_parse_file(path, CONFIG_MAX_SIZE, CONFIG_JSON_LIMITS, &root, err);
  if (r < 0)
    return r;
  return load_root(cfg, root, path, err);
}

int config_load_buffer(crimaged_config *cfg, const char *data, size_t len, const char *what, crimage_error **err)
{
  if (len > CONFIG_MAX_SIZE)
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, EFBIG, "%s: larger than %d bytes", what, CONFIG_MAX_SIZE);
  cleanup_json json_object *root = NULL;
  int r = yaml_parse(data, len, what, CONFIG_JSON_LIMITS, &root, err);
  if (r < 0)
    return r;
  return load_root(cfg, root, what, err);
}

static int load_root(crimaged_config *cfg, json_object *root, const char *path, crimage_error **err)
{
  int r = 0;
  if (!json_object_is_type(root, json_type_object))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "%s: expected a map of settings", path);

  json_object_object_foreach(root, key, v)
  {
    if (!v)
      continue; /* `key:` with no value keeps the default */
    if (streq(key, "root"))
      r = get_string(v, key, &cfg->root, err);
    else if (streq(key, "socket"))
      r = get_string(v, key, &cfg->socket, err);
    else if (streq(key, "logLevel")) {
      cleanup_free char *level = NULL;
      r = get_string(v, key, &level, err);
      if (r == 0) {
        cfg->log_level = log_level_from_string(level);
        if (cfg->log_level < 0)
          r = crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0,
                                "config key logLevel: \"%s\" is not one of error, warn, info, debug", level);
      }
    } else if (streq(key, "defaultRegistry"))
      r = get_string(v, key, &cfg->default_registry, err);
    else if (streq(key, "certsDir"))
      r = get_string(v, key, &cfg->certs_dir, err);
    else if (streq(key, "registries"))
      r = load_registries(cfg, v, err);
    else if (streq(key, "maxConcurrentDownloads"))
      r = get_int(v, key, &cfg->max_concurrent_downloads, err);
    else if (streq(key, "pullProgressTimeout"))
      r = get_duration(v, key, &cfg->pull_progress_timeout_ms, err);
    else if (streq(key, "pullMinThroughput")) {
      int n = 0;
      r = get_int(v, key, &n, err);
      cfg->pull_min_throughput = n;
      if (r == 0 && n < 0)
        r = crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "config key pullMinThroughput: must not be negative");
    } else if (streq(key, "pullMinThroughputWindow"))
      r = get_duration(v, key, &cfg->pull_min_throughput_window_ms, err);
    else if (streq(key, "verifyDiffIDs"))
      r = get_bool(v, key, &cfg->verify_diff_ids, err);
    else if (streq(key, "serializeImagePulls"))
      r = get_bool(v, key, &cfg->serialize_image_pulls, err);
    else if (streq(key, "maxParallelImagePulls"))
      r = get_int(v, key, &cfg->max_parallel_image_pulls, err);
    else if (streq(key, "pullBackoff"))
      r = load_backoff(cfg, v, err);
    else if (streq(key, "runtimeHandlers"))
      r = load_handlers(cfg, v, err);
    else if (streq(key, "pinnedImages"))
      r = get_strv(v, key, &cfg->pinned_images, err);
    else if (streq(key, "rejectUnknownRuntimeHandlers"))
      r = get_bool(v, key, &cfg->reject_unknown_runtime_handlers, err);
    else if (streq(key, "dockerConfigPaths"))
      r = get_strv(v, key, &cfg->docker_config_paths, err);
    else if (streq(key, "credentialProviderConfig"))
      r = get_string(v, key, &cfg->credential_provider_config, err);
    else if (streq(key, "credentialProviderBinDir"))
      r = get_string(v, key, &cfg->credential_provider_bin_dir, err);
    else if (streq(key, "pullSecretsDir"))
      r = get_string(v, key, &cfg->pull_secrets_dir, err);
    else if (streq(key, "kubeletRootDir"))
      r = get_string(v, key, &cfg->kubelet_root_dir, err);
    else if (streq(key, "credentialProviderTimeout"))
      r = get_duration(v, key, &cfg->credential_provider_timeout_ms, err);
    else if (streq(key, "shutdownGracePeriod"))
      r = get_duration(v, key, &cfg->shutdown_grace_period_ms, err);
    else if (streq(key, "metricsAddress"))
      r = get_string(v, key, &cfg->metrics_address, err);
    else if (streq(key, "containerd"))
      r = load_containerd(cfg, v, err);
    else if (streq(key, "containersStorage"))
      r = load_containers_storage(v, key, &cfg->containers_storage_root, err);
    else if (streq(key, "unpackLayers"))
      r = get_bool(v, key, &cfg->unpack_layers, err);
    else if (streq(key, "snapshotterSocket"))
      r = get_string(v, key, &cfg->snapshotter_socket, err);
    else if (streq(key, "unreferencedBlobRetention"))
      r = get_duration(v, key, &cfg->unreferenced_retention_ms, err);
    else if (streq(key, "unreferencedBlobMaxBytes"))
      r = get_bytes(v, key, &cfg->unreferenced_max_bytes, err);
    else
      r = crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "unknown config key %s", key);
    if (r < 0)
      return crimage_error_wrap(err, "%s", path);
  }
  return 0;
}

/* containerd's rule for identifiers (pkg/identifiers): runs of [A-Za-z0-9] joined by single '.', '_' or '-', at
 * most 76 characters. */
static bool namespace_valid(const char *ns)
{
  size_t len = ns ? strlen(ns) : 0;
  if (len == 0 || len > 76)
    return false;
  bool after_separator = true; /* the name starts as if after one: no separator first */
  for (size_t i = 0; i < len; i++) {
    char ch = ns[i];
    bool alnum = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9');
    if (!alnum && (after_separator || (ch != '.' && ch != '_' && ch != '-')))
      return false;
    after_separator = !alnum;
  }
  return !after_separator;
}

int config_validate(const crimaged_config *cfg, crimage_error **err)
{
  if (str_empty(cfg->root) || cfg->root[0] != '/')
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "root must be an absolute path");
  if (str_empty(cfg->socket))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "socket must not be empty");
  if (streq(cfg->snapshotter_socket, cfg->socket))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "snapshotterSocket must not be the CRI socket");
  if (cfg->max_concurrent_downloads < 1 || cfg->max_concurrent_downloads > 64)
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "maxConcurrentDownloads must be between 1 and 64");
  /* kubelet refuses the same combinations. */
  scheduler_options so = {.serialize = cfg->serialize_image_pulls, .max_parallel = cfg->max_parallel_image_pulls};
  int r = scheduler_options_validate(&so, err);
  if (r < 0)
    return r;
  if (cfg->pull_backoff_initial_ms <= 0 || cfg->pull_backoff_max_ms < cfg->pull_backoff_initial_ms)
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0,
                             "pullBackoff: initial must be positive and not larger than max");
  if (cfg->pull_min_throughput_window_ms < 1000)
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "pullMinThroughputWindow must be at least 1s");
  if (cfg->pull_progress_timeout_ms < 1000)
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "pullProgressTimeout must be at least 1s");
  /* Images go through crimage's snapshotter only when crimaged serves one and hands images to containerd. */
  bool wants_snapshotter = !str_empty(cfg->containerd_snapshotter);
  for (size_t i = 0; i < cfg->n_handlers; i++)
    wants_snapshotter |= !str_empty(cfg->handlers[i].snapshotter);
  if (wants_snapshotter && (str_empty(cfg->snapshotter_socket) || str_empty(cfg->containerd_address)))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0,
                             "a containerd snapshotter is named (containerd.snapshotter or a handler's snapshotter): "
                             "snapshotterSocket and containerd.address must be set too");
  /* containerd names namespaces like DNS labels (its namespaces.Validate); a wrong one would fail every publish. */
  if (!namespace_valid(cfg->containerd_namespace))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0,
                             "containerd.namespace \"%s\" is not a valid containerd namespace", cfg->containerd_namespace);
  for (size_t i = 0; i < cfg->n_handlers; i++)
    if (cfg->handlers[i].containerd_namespace && !namespace_valid(cfg->handlers[i].containerd_namespace))
      return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0,
                               "runtimeHandlers.%s.containerdNamespace \"%s\" is not a valid containerd namespace",
                               cfg->handlers[i].name, cfg->handlers[i].containerd_namespace);
  for (size_t i = 0; i < cfg->n_registries; i++)
    if (cfg->registries[i].mirrors_only && cfg->registries[i].n_mirrors == 0)
      return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0,
                               "registries.%s: upstream: false needs at least one mirror to pull from",
                               cfg->registries[i].host);
  for (size_t i = 0; i < cfg->n_registries; i++)
    for (size_t j = 0; j < cfg->registries[i].n_mirrors; j++) {
      const char *e = cfg->registries[i].mirrors[j].endpoint;
      if (!str_has_prefix(e, "https://") && !str_has_prefix(e, "http://"))
        return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0,
                                 "registries.%s.mirrors: endpoint \"%s\" must start with https:// or http://",
                                 cfg->registries[i].host, e);
      /* user:password@ would reach log lines and pull errors with the URL (and the certs.d directory name);
       * the message does not repeat the endpoint for the same reason. */
      const char *authority = strstr(e, "://") + 3;
      if (memchr(authority, '@', strcspn(authority, "/")))
        return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0,
                                 "registries.%s.mirrors[%zu]: endpoint must not hold credentials (user@); give them "
                                 "with the pull request or a credential provider",
                                 cfg->registries[i].host, j);
    }
  return 0;
}

static int dropin_cmp(const void *a, const void *b) { return strcmp(*(char *const *) a, *(char *const *) b); }

int config_load_with_dropins(crimaged_config *cfg, const char *path, crimage_error **err)
{
  int r = config_load_file(cfg, path, err);
  if (r < 0)
    return r;
  cleanup_free char *dir = xasprintf("%s.d", path);
  DIR *d = opendir(dir);
  if (!d)
    return errno == ENOENT ? 0 : crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, errno, "opening `%s`", dir);
  cleanup_strv char **names = xcalloc(1, sizeof(char *));
  size_t n = 0;
  struct dirent *de;
  while ((de = readdir(d))) {
    if (de->d_name[0] == '.' ||
        !(str_has_suffix(de->d_name, ".yaml") || str_has_suffix(de->d_name, ".yml") || str_has_suffix(de->d_name, ".json")))
      continue;
    if (n == CONFIG_MAX_DROPINS) {
      closedir(d);
      return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, E2BIG, "`%s` holds more than %d drop-in files", dir,
                               CONFIG_MAX_DROPINS);
    }
    names = xrealloc(names, (n + 2) * sizeof(char *));
    names[n++] = xstrdup(de->d_name);
    names[n] = NULL;
  }
  closedir(d);
  qsort(names, n, sizeof(char *), dropin_cmp);
  for (size_t i = 0; i < n; i++) {
    cleanup_free char *file = xasprintf("%s/%s", dir, names[i]);
    r = config_load_file(cfg, file, err);
    if (r < 0)
      return r;
  }
  return 0;
}
