/* One registry credential as a value. It comes from a CRI AuthConfig, a docker config.json entry, a Kubernetes
 * Secret, a credential-provider plugin or a docker credential helper. Secrets are wiped when freed. */
#ifndef CRIMAGE_AUTH_CREDENTIAL_H
#define CRIMAGE_AUTH_CREDENTIAL_H

#include <stdbool.h>
#include <stddef.h>

typedef struct credential {
  char *username;
  char *password;
  char *identity_token; /* OAuth2 refresh token */
  char *registry_token; /* a bearer token sent as is */
  char *server_address; /* when set, creds are only sent to this registry host[:port] */
  char *source;         /* where it came from, for messages: "request", "config.json /root/.docker/config.json", ...;
                           never a secret */
} credential;

credential *credential_new(void);
/* Copies every field. */
credential *credential_dup(const credential *c);
/* Wipes the secret fields, then frees. */
void credential_free(credential *c);
static inline void credential_freep(credential **c) { credential_free(*c); }
#define cleanup_credential __attribute__((cleanup(credential_freep)))
/* Sets username/password from base64("user:pass") (padded or not), splitting on the first ':'. Returns 0 or
 * -EINVAL. */
int credential_set_auth(credential *c, const char *auth_b64);
/* True when the credential carries nothing (anonymous). */
int credential_is_empty(const credential *c);
/* A one-line description without any secret, for `crimage auth` and logs: "user alice (password) from secret
 * ns/regcred", "identity token from credential helper docker-credential-pass". */
char *credential_describe(const credential *c);
/* What kind of secret c carries: "registry token", "identity token", "password", or NULL for none. */
const char *credential_secret_kind(const credential *c);
/* True when both carry the same username, password and tokens (source and server_address are not compared). */
bool credential_same_secret(const credential *a, const credential *b);

typedef struct credential_list {
  credential **items;
  size_t n;
} credential_list;

void credential_list_add(credential_list *l, credential *c); /* takes ownership */
void credential_list_clear(credential_list *l);
static inline void credential_list_clearp(credential_list *l) { credential_list_clear(l); }
#define cleanup_credential_list __attribute__((cleanup(credential_list_clearp)))

#endif
