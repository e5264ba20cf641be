/* The mounts of a snapshot, exactly as containerd's overlayfs snapshotter (snapshots/overlay/overlay.go, mounts())
 * hands them out, so containerd's mount code, its differ (which finds upperdir= and lowerdir= in the options and
 * writes a layer straight into the upper directory) and runc treat both the same:
 *
 *   no parent:             bind <fs>, "rw"|"ro" (view), "rbind"   (overlay needs a lower directory)
 *   view of one parent:    bind <parent fs>, "ro", "rbind"
 *   active, with parents:  overlay, [index=off,] workdir=<work>, upperdir=<fs>, lowerdir=<p1>:<p2>:...
 *   view of parents:       overlay, [index=off,] lowerdir=<p1>:<p2>:...   (read-only: no upper directory)
 *
 * Parents are listed nearest first, as overlayfs wants its lower layers top down. index=off is added when the
 * kernel has the option (containerd tests /sys/module/overlay/parameters/index): with the index on, a lower layer
 * shared by two overlays would make the second mount fail. containerd also adds userxattr in a user namespace;
 * crimaged runs as root in the initial one, where that option is never needed. */
#include "common/util.h"
#include "cri/snapshotter/internal.h"

static void add_mount(snap_mounts *ret, const char *type, const char *source, char **options)
{
  ret->v = xrealloc(ret->v, (ret->n + 1) * sizeof(*ret->v));
  ret->v[ret->n++] = (snap_mount){xstrdup(type), xstrdup(source), options};
}

static char **bind_options(bool readonly)
{
  char **o = xcalloc(3, sizeof(*o));
  o[0] = xstrdup(readonly ? "ro" : "rw");
  o[1] = xstrdup("rbind");
  return o;
}

void snap_mounts_build(snap_kind kind, const char *fs, const char *work, char *const *parents, size_t n_parents,
                       bool index_off, snap_mounts *ret)
{
  *ret = (snap_mounts){0};
  bool view = kind == SNAP_KIND_VIEW;
  if (n_parents == 0) {
    add_mount(ret, "bind", fs, bind_options(view));
    return;
  }
  if (view && n_parents == 1) {
    add_mount(ret, "bind", parents[0], bind_options(true));
    return;
  }
  char **o = xcalloc(5, sizeof(*o));
  size_t n = 0;
  if (index_off)
    o[n++] = xstrdup("index=off");
  if (!view) {
    o[n++] = xasprintf("workdir=%s", work);
    o[n++] = xasprintf("upperdir=%s", fs);
  }
  size_t len = strlen("lowerdir=");
  for (size_t i = 0; i < n_parents; i++)
    len += strlen(parents[i]) + 1;
  char *lower = xmalloc(len + 1);
  char *p = stpcpy(lower, "lowerdir=");
  for (size_t i = 0; i < n_parents; i++) {
    if (i > 0)
      *p++ = ':';
    p = stpcpy(p, parents[i]);
  }
  o[n++] = lower;
  add_mount(ret, "overlay", "overlay", o);
}
