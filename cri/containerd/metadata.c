/* The gRPC metadata containerd reads the namespace and the lease of a call from (containerd's namespaces and
 * leases packages name the headers). */
#include "cri/containerd/containerd.h"

size_t ctrd_metadata(const ctrd_ctx *c, rpc_metadata md[2])
{
  size_t n = 0;
  md[n++] = (rpc_metadata){"containerd-namespace", c->ns};
  if (c->lease)
    md[n++] = (rpc_metadata){"containerd-lease", c->lease};
  return n;
}

bool ctrd_not_found(crimage_error **e, crimage_error **err)
{
  if (*e && (*e)->status == CRIMAGE_NOT_FOUND) {
    crimage_error_clear(e);
    return true;
  }
  if (err && !*err)
    *err = *e;
  else
    crimage_error_clear(e);
  *e = NULL;
  return false;
}
