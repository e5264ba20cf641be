#include <errno.h>
#include <string.h>

#include "auth/base64.h"
#include "auth/credential.h"
#include "common/util.h"

credential *credential_new(void) { return xcalloc(1, sizeof(credential)); }

static char *dup_or_null(const char *s) { return s ? xstrdup(s) : NULL; }

credential *credential_dup(const credential *c)
{
  credential *d = credential_new();
  d->username = dup_or_null(c->username);
  d->password = dup_or_null(c->password);
  d->identity_token = dup_or_null(c->identity_token);
  d->registry_token = dup_or_null(c->registry_token);
  d->server_address = dup_or_null(c->server_address);
  d->source = dup_or_null(c->source);
  return d;
}

void credential_free(credential *c)
{
  if (!c)
    return;
  secret_free(c->username);
  secret_free(c->password);
  secret_free(c->identity_token);
  secret_free(c->registry_token);
  free(c->server_address);
  free(c->source);
  free(c);
}

int credential_set_auth(credential *c, const char *auth_b64)
{
  cleanup_secret char *decoded = NULL;
  size_t len = 0;
  if (!auth_b64 || base64_decode(auth_b64, strlen(auth_b64), &decoded, &len) < 0)
    return -EINVAL;
  /* A NUL inside would silently cut the password short. */
  if (strlen(decoded) != len)
    return -EINVAL;
  char *colon = strchr(decoded, ':');
  if (!colon)
    return -EINVAL;
  secret_free(c->username);
  secret_free(c->password);
  c->username = xstrndup(decoded, (size_t) (colon - decoded));
  c->password = xstrdup(colon + 1);
  return 0;
}

int credential_is_empty(const credential *c)
{
  return str_empty(c->username) && str_empty(c->password) && str_empty(c->identity_token) &&
         str_empty(c->registry_token);
}

const char *credential_secret_kind(const credential *c)
{
  return !str_empty(c->registry_token)   ? "registry token"
         : !str_empty(c->identity_token) ? "identity token"
         : !str_empty(c->password)       ? "password"
                                         : NULL;
}

char *credential_describe(const credential *c)
{
  const char *kind = credential_secret_kind(c);
  if (!kind)
    kind = "no secret";
  const char *from = c->source ? c->source : "unknown source";
  if (!str_empty(c->username))
    return xasprintf("user %s (%s) from %s", c->username, kind, from);
  return xasprintf("%s from %s", kind, from);
}

bool credential_same_secret(const credential *a, const credential *b)
{
  return streq_ptr(a->username, b->username) && streq_ptr(a->password, b->password) &&
         streq_ptr(a->identity_token, b->identity_token) && streq_ptr(a->registry_token, b->registry_token);
}

void credential_list_add(credential_list *l, credential *c)
{
  l->items = xrealloc(l->items, (l->n + 1) * sizeof(*l->items));
  l->items[l->n++] = c;
}

void credential_list_clear(credential_list *l)
{
  for (size_t i = 0; i < l->n; i++)
    credential_free(l->items[i]);
  free(l->items);
  l->items = NULL;
  l->n = 0;
}
