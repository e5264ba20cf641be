#include <errno.h>

#include "auth/resolver.h"
#include "auth/secrets.h"
#include "common/dynbuf.h"
#include "common/log.h"
#include "common/util.h"
#include "cri/pull_credentials.h"

struct pull_credentials {
  auth_resolver *resolver;
  secret_dir *secrets; /* NULL: no Secret directory configured */
};

int pull_credentials_new(const pull_credentials_options *o, pull_credentials **ret, crimage_error **err)
{
  auth_resolver_options ro = {
      /* An empty list in the config means "kubelet's search order", as NULL does. */
      .docker_config_paths = o->docker_config_paths && o->docker_config_paths[0] ? o->docker_config_paths : NULL,
      .kubelet_root_dir = str_empty(o->kubelet_root_dir) ? NULL : o->kubelet_root_dir,
      .provider_config = str_empty(o->provider_config) ? NULL : o->provider_config,
      .provider_bin_dir = o->provider_bin_dir,
      .provider_timeout_ms = o->provider_timeout_ms,
  };
  auth_resolver *resolver = NULL;
  int r = auth_resolver_new(&ro, &resolver, err);
  if (r < 0)
    return crimage_error_wrap(err, "credentials");
  pull_credentials *pc = xcalloc(1, sizeof(*pc));
  pc->resolver = resolver;
  if (!str_empty(o->secrets_dir)) {
    pc->secrets = secret_dir_new(o->secrets_dir);
    /* A first load now, so that a broken directory shows in the log at start-up rather than at the first pull. */
    keyring **v = NULL;
    size_t n = 0;
    if (secret_dir_get(pc->secrets, &v, &n, NULL) == 0)
      keyring_array_free(v, n);
  }
  *ret = pc;
  return 0;
}

void pull_credentials_free(pull_credentials *pc)
{
  if (!pc)
    return;
  auth_resolver_free(pc->resolver);
  secret_dir_free(pc->secrets);
  free(pc);
}

int pull_credentials_resolve(pull_credentials *pc, const image_ref *ref, credential_list *ret, crimage_error **err)
{
  keyring **secrets = NULL;
  size_t n_secrets = 0;
  /* A directory that fails to reload keeps its previous Secrets (secret_dir_get logs the problem). */
  if (pc->secrets && secret_dir_get(pc->secrets, &secrets, &n_secrets, NULL) < 0) {
    secrets = NULL;
    n_secrets = 0;
  }
  cleanup_free char *name = reference_name(ref);
  int r = auth_resolve(pc->resolver, name, ref->domain, secrets, n_secrets, ret, err);
  keyring_array_free(secrets, n_secrets);
  if (r < 0)
    return r;
  for (size_t i = 0; i < ret->n; i++) {
    cleanup_free char *d = credential_describe(ret->items[i]);
    log_debug("credential %zu/%zu for %s: %s", i + 1, ret->n, name, d);
  }
  return 0;
}

int pull_credentials_try(const credential_list *cands, pull_attempt_fn fn, void *userdata, void **ret_result,
                         crimage_error **err)
{
  if (cands->n == 0)
    return fn(userdata, NULL, ret_result, err);

  cleanup_dynbuf dynbuf msg;
  dynbuf_init(&msg, PULL_CREDENTIALS_MAX_MESSAGE);
  dynbuf_printf(&msg, "every credential failed (%zu tried):", cands->n);
  crimage_status last_status = CRIMAGE_UNKNOWN;
  int last_r = -EIO;
  for (size_t i = 0; i < cands->n; i++) {
    const credential *c = cands->items[i];
    cleanup_free char *desc = credential_describe(c);
    crimage_error *e = NULL;
    void *res = NULL;
    log_debug("trying credential %zu/%zu: %s", i + 1, cands->n, desc);
    int r = fn(userdata, c, &res, &e);
    if (r >= 0) {
      crimage_error_free(e);
      if (i > 0)
        log_info("credential %zu/%zu worked (%s) after %zu failed", i + 1, cands->n, desc, i);
      *ret_result = res;
      return r;
    }
    if (e && e->status == CRIMAGE_CANCELLED) {
      if (err && !*err)
        *err = e;
      else
        crimage_error_free(e);
      return r;
    }
    log_debug("credential %zu/%zu (%s) failed: %s", i + 1, cands->n, desc, e ? e->message : "unknown error");
    const char *m = e ? e->message : "unknown error";
    dynbuf_printf(&msg, "%s [%zu] %s: %s: %.*s", i ? ";" : "", i + 1, desc,
                  crimage_status_name(e ? e->status : CRIMAGE_UNKNOWN), PULL_CREDENTIALS_MAX_FAILURE, m);
    last_status = e ? e->status : CRIMAGE_UNKNOWN;
    last_r = r;
    crimage_error_free(e);
  }
  cleanup_free char *text = dynbuf_take(&msg, NULL);
  /* No errno in the text: it would only add "Input/output error" to a registry's answer. */
  crimage_error_set(err, last_status, 0, "%s", text);
  return last_r;
}
