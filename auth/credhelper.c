#include <errno.h>
#include <string.h>

#include "auth/credhelper.h"
#include "auth/exec.h"
#include "common/json.h"
#include "common/util.h"

char *credhelper_server_url(const char *registry_host)
{
  if (streq(registry_host, "docker.io") || streq(registry_host, "index.docker.io") ||
      streq(registry_host, "registry-1.docker.io"))
    return xstrdup("https://index.docker.io/v1/");
  return xstrdup(registry_host);
}

static char *find_in_path(const char *name, const char *dir)
{
  if (dir) {
    char *candidate = xasprintf("%s/%s", dir, name);
    if (access(candidate, X_OK) == 0)
      return candidate;
    free(candidate);
    return NULL;
  }
  const char *path = getenv("PATH");
  if (str_empty(path))
    path = "/usr/local/bin:/usr/bin:/bin";
  while (*path) {
    size_t l = strcspn(path, ":");
    cleanup_free char *candidate = xasprintf("%.*s/%s", (int) l, l ? path : ".", name);
    if (access(candidate, X_OK) == 0)
      return TAKE_PTR(candidate);
    path += l;
    if (*path == ':')
      path++;
  }
  return NULL;
}

int credhelper_get(const char *helper, const char *dir, const char *registry_host, int64_t timeout_ms, credential **ret,
                   crimage_error **err)
{
  cleanup_free char *name = xasprintf("docker-credential-%s", helper);
  cleanup_free char *path = find_in_path(name, dir);
  if (!path)
    return crimage_error_set(err, CRIMAGE_NOT_FOUND, ENOENT, "credential helper %s not found in %s", name,
                             dir ? dir : "$PATH");
  cleanup_free char *server = credhelper_server_url(registry_host);
  char *argv[] = {name, (char *) "get", NULL};
  auth_exec_options o = {
      .path = path,
      .argv = argv,
      .input = server,
      .input_len = strlen(server),
      .timeout_ms = timeout_ms > 0 ? timeout_ms : CREDHELPER_DEFAULT_TIMEOUT_MS,
      .max_stdout = CREDHELPER_MAX_OUTPUT,
      .max_stderr = 1024,
  };
  _cleanup_(auth_exec_result_clear) auth_exec_result res = {0};
  int r = auth_exec(&o, &res, err);
  if (r < 0)
    return crimage_error_wrap(err, "credential helper %s", name);
  if (res.exit_status != 0) {
    /* The protocol reports a missing entry on stdout with this fixed message; that is no failure. Anything else
     * printed on stdout stays out of the error: it may hold a secret. */
    if (strstr(res.out, "credentials not found in native keychain")) {
      *ret = NULL;
      return 0;
    }
    return crimage_error_set(err, CRIMAGE_UNAUTHENTICATED, 0, "credential helper %s get for %s exited with %d%s%s",
                             name, server, res.exit_status, *res.err ? ": " : "", res.err);
  }
  return credhelper_parse_output(name, registry_host, res.out, res.out_len, ret, err);
}

int credhelper_parse_output(const char *name, const char *registry_host, const char *out, size_t len,
                            credential **ret, crimage_error **err)
{
  cleanup_json json_object *resp = NULL;
  cleanup_free char *what = xasprintf("output of credential helper %s", name);
  /* json_parse messages name positions, never content. */
  int r = json_parse(out, len, what, CREDHELPER_JSON_LIMITS, &resp, err);
  if (r < 0)
    return r;
  if (!json_object_is_type(resp, json_type_object))
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "%s: not a JSON object", what);
  const char *user = json_get_string(resp, "Username");
  const char *secret = json_get_string(resp, "Secret");
  if (str_empty(secret) && str_empty(user)) {
    *ret = NULL;
    return 0;
  }
  cleanup_credential credential *c = credential_new();
  if (streq_ptr(user, "<token>")) {
    c->identity_token = xstrdup(secret ? secret : "");
  } else {
    c->username = xstrdup(user ? user : "");
    c->password = xstrdup(secret ? secret : "");
  }
  c->server_address = xstrdup(registry_host);
  c->source = xasprintf("credential helper %s", name);
  *ret = TAKE_PTR(c);
  return 0;
}
