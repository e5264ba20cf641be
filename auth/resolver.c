#include <errno.h>
#include <pthread.h>
#include <string.h>
#include <sys/stat.h>

#include "auth/credhelper.h"
#include "auth/match.h"
#include "auth/provider.h"
#include "auth/resolver.h"
#include "common/dynbuf.h"
#include "common/log.h"
#include "common/util.h"

struct auth_resolver {
  pthread_mutex_t lock;
  char **config_paths;
  provider_set *providers; /* NULL when none configured */
  char *helper_dir;
  int64_t helper_timeout_ms;

  /* The node keyring and the state of the search paths it was loaded from. */
  keyring *node;
  char *node_signature;
};

/* What the search paths look like now: a change of any file (appearing, vanishing, rewritten) changes it. */
static char *paths_signature(char *const *paths)
{
  cleanup_dynbuf dynbuf b;
  dynbuf_init(&b, SIZE_MAX / 2);
  for (size_t i = 0; paths[i]; i++) {
    struct stat st;
    if (stat(paths[i], &st) < 0)
      (void) dynbuf_printf(&b, "-\n");
    else
      (void) dynbuf_printf(&b, "%llu %lld %lld.%09ld\n", (unsigned long long) st.st_ino, (long long) st.st_size,
                           (long long) st.st_mtim.tv_sec, st.st_mtim.tv_nsec);
  }
  return dynbuf_take(&b, NULL);
}

/* With r->lock held. */
static void node_refresh(auth_resolver *r)
{
  cleanup_free char *sig = paths_signature(r->config_paths);
  if (r->node && streq(sig, r->node_signature))
    return;
  keyring *k = NULL;
  cleanup_free char *path = NULL;
  keyring_load_node(r->config_paths, &k, &path);
  keyring_unref(r->node);
  free(r->node_signature);
  r->node = k;
  r->node_signature = TAKE_PTR(sig);
  if (path)
    log_info("node credentials: %s (%zu entries)", path, keyring_size(k));
}

int auth_resolver_new(const auth_resolver_options *o, auth_resolver **ret, crimage_error **err)
{
  auth_resolver *r = xcalloc(1, sizeof(*r));
  pthread_mutex_init(&r->lock, NULL);
  r->config_paths =
      o->docker_config_paths ? strv_copy(o->docker_config_paths) : keyring_node_search_paths(o->kubelet_root_dir);
  r->helper_dir = o->helper_dir ? xstrdup(o->helper_dir) : NULL;
  r->helper_timeout_ms = o->helper_timeout_ms;
  if (o->provider_config) {
    int e = provider_set_load(o->provider_config, o->provider_bin_dir, o->provider_timeout_ms, &r->providers, err);
    if (e < 0) {
      auth_resolver_free(r);
      return crimage_error_wrap(err, "credential provider config");
    }
  }
  node_refresh(r);
  *ret = r;
  return 0;
}

void auth_resolver_free(auth_resolver *r)
{
  if (!r)
    return;
  strv_free(r->config_paths);
  provider_set_free(r->providers);
  free(r->helper_dir);
  keyring_unref(r->node);
  free(r->node_signature);
  pthread_mutex_destroy(&r->lock);
  free(r);
}

/* The node keyring currently in use, as a new reference. */
static keyring *node_keyring(auth_resolver *r)
{
  pthread_mutex_lock(&r->lock);
  node_refresh(r);
  keyring *k = keyring_ref(r->node);
  pthread_mutex_unlock(&r->lock);
  return k;
}

static void add_unique(credential_list *out, credential_list *in, const char *registry_host)
{
  for (size_t i = 0; i < in->n; i++) {
    credential *c = in->items[i];
    in->items[i] = NULL;
    bool dup = false;
    for (size_t j = 0; j < out->n && !dup; j++)
      dup = credential_same_secret(out->items[j], c);
    if (dup) {
      credential_free(c);
      continue;
    }
    if (!c->server_address)
      c->server_address = xstrdup(registry_host);
    credential_list_add(out, c);
  }
  in->n = 0;
}

int auth_resolve(auth_resolver *r, const char *image_name_normalized, const char *registry_host, keyring **secrets,
                 size_t n_secrets, credential_list *ret, crimage_error **err)
{
  const char *image = image_name_normalized;
  if (str_empty(image))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "no image name to find credentials for");
  cleanup_free char *registry_owned = registry_host ? NULL : auth_image_registry(image);
  const char *registry = registry_host ? registry_host : registry_owned;
  cleanup_credential_list credential_list out = {0};

  /* 1. The Secrets, merged into one keyring as kubelet does: the most specific key of any Secret first. */
  if (n_secrets > 0) {
    cleanup_keyring keyring *merged = keyring_new();
    for (size_t i = 0; i < n_secrets; i++)
      if (secrets[i])
        keyring_add_keyring(merged, secrets[i]);
    cleanup_credential_list credential_list found = {0};
    keyring_lookup(merged, image, &found);
    add_unique(&out, &found, registry);
  }

  /* 2. The node keyring and the providers' answers, one keyring. */
  cleanup_keyring keyring *node = node_keyring(r);
  {
    cleanup_keyring keyring *merged = keyring_new();
    keyring_add_keyring(merged, node);
    if (r->providers) {
      cleanup_error crimage_error *perr = NULL;
      /* Failures are logged by the provider set; the pull goes on with what the others gave. */
      (void) provider_set_provide(r->providers, image, merged, &perr);
    }
    cleanup_credential_list credential_list found = {0};
    keyring_lookup(merged, image, &found);
    add_unique(&out, &found, registry);
  }

  /* 3. The credential helper of the node config (credHelpers, else credsStore). */
  const char *helper = keyring_cred_helper(node, registry);
  if (helper) {
    credential *c = NULL;
    cleanup_error crimage_error *herr = NULL;
    if (credhelper_get(helper, r->helper_dir, registry, r->helper_timeout_ms, &c, &herr) < 0) {
      log_warn("%s", herr->message);
    } else if (c) {
      cleanup_credential_list credential_list found = {0};
      credential_list_add(&found, c);
      add_unique(&out, &found, registry);
    }
  }

  for (size_t i = 0; i < out.n; i++) {
    credential_list_add(ret, out.items[i]);
    out.items[i] = NULL;
  }
  log_debug("%zu candidate credentials for %s", out.n, image);
  out.n = 0;
  return 0;
}
