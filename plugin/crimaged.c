/* crimaged: the crimage daemon. Serves the CRI v1 ImageService on a unix socket. */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <grpc/grpc.h>
#include <libgen.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/stat.h>

#include "build-config.h"
#include "common/fsutil.h"
#include "common/log.h"
#include "common/util.h"
#include "cri/containers_storage/cstorage.h"
#include "cri/image_service.h"
#include "cri/progress_service.h"
#include "cri/server.h"
#include "cri/snapshotter/snapshotter.h"
#include "plugin/config.h"
#include "plugin/metrics.h"
#include "pull/puller.h"
#include "pull/store.h"

#if HAVE_SYSTEMD
#include <systemd/sd-daemon.h>
#endif

/* Everything the daemon owns, in one place. */
typedef struct daemon_ctx {
  crimaged_config cfg;
  int lock_fd;
  store_options store_opts; /* of every store: how long and how much unreferenced content is kept */
  store *store;
  puller *puller;
  scheduler *scheduler;
  backoff *backoff;
  progress_tracker *progress; /* running pulls and the counters behind the metrics */
  pull_credentials *credentials; /* for pulls that carry none */
  image_service *images;
  publisher *publisher; /* containerd.address set: images handed to containerd */
  progress_service *progress_svc;
  metrics_server *metrics;
  /* Stores of their own (runtimeHandlers.<name>.root): one entry per handler; a root shared by several handlers
   * is opened once. all_stores lists every distinct store, the main one first; lock_fds the locks of the others. */
  handler_store *handler_stores;
  size_t n_handler_stores;
  store **all_stores;
  puller **extra_pullers;
  int *lock_fds;
  size_t n_all_stores;
  rpc_server *server;
  bool socket_is_ours; /* bound here (not passed in by systemd), so removed at exit */
  /* snapshotterSocket set: containerd's proxy snapshotter, served on a server and socket of its own. */
  snapshotter *snapshotter;
  rpc_server *snapshot_server;
  bool snapshot_socket_bound;
  /* containersStorage.root and the handlers' own: each distinct tree, open. */
  cstorage **cstorages;
  size_t n_cstorages;
} daemon_ctx;

static void usage(FILE *out)
{
  fprintf(out,
          "Usage: crimaged [OPTIONS]\n"
          "Serve the Kubernetes CRI v1 ImageService on a unix socket.\n\n"
          "  -c, --config FILE             configuration file (YAML or JSON; default %s if present)\n"
          "  -r, --root DIR                image store (default " CONFIG_DEFAULT_ROOT ")\n"
          "  -s, --socket PATH             unix socket (default " CONFIG_DEFAULT_SOCKET ")\n"
          "  -l, --log-level LEVEL         error, warn, info or debug\n"
          "      --default-registry HOST   registry of short names (default docker.io)\n"
          "      --insecure-registry HOST  use plain HTTP for HOST[:PORT] (repeatable)\n"
          "      --certs-dir DIR           per-registry TLS files: DIR/<host[:port]>/{ca.crt,client.cert,client.key}\n"
          "  -V, --version                 print the version\n"
          "  -h, --help                    print this help\n",
          CRIMAGE_DEFAULT_CONFIG);
}

enum { OPT_DEFAULT_REGISTRY = 256, OPT_INSECURE_REGISTRY, OPT_CERTS_DIR };

static void replace_string(char **dst, const char *s)
{
  free(*dst);
  *dst = xstrdup(s);
}

/* Two passes: the config file first, then the flags over it. Returns 0 to go on, 1 to exit 0, -1 on usage error. */
static int parse_args(int argc, char **argv, crimaged_config *cfg, crimage_error **err)
{
  static const struct option options[] = {
      {"config", required_argument, NULL, 'c'},
      {"root", required_argument, NULL, 'r'},
      {"socket", required_argument, NULL, 's'},
      {"log-level", required_argument, NULL, 'l'},
      {"default-registry", required_argument, NULL, OPT_DEFAULT_REGISTRY},
      {"insecure-registry", required_argument, NULL, OPT_INSECURE_REGISTRY},
      {"certs-dir", required_argument, NULL, OPT_CERTS_DIR},
      {"version", no_argument, NULL, 'V'},
      {"help", no_argument, NULL, 'h'},
      {},
  };
  const char *config_path = NULL;
  int c;
  while ((c = getopt_long(argc, argv, "c:r:s:l:Vh", options, NULL)) != -1) {
    switch (c) {
    case 'c':
      config_path = optarg;
      break;
    case 'V':
      printf("crimaged %s\n", CRIMAGE_VERSION);
      return 1;
    case 'h':
      usage(stdout);
      return 1;
    case '?':
      usage(stderr);
      return -1;
    default:
      break;
    }
  }
  if (optind < argc) {
    fprintf(stderr, "crimaged: unexpected argument \"%s\"\n", argv[optind]);
    return -1;
  }
  if (config_path) {
    if (config_load_with_dropins(cfg, config_path, err) < 0)
      return -2;
  } else if (access(CRIMAGE_DEFAULT_CONFIG, F_OK) == 0) {
    if (config_load_with_dropins(cfg, CRIMAGE_DEFAULT_CONFIG, err) < 0)
      return -2;
  }

  optind = 1;
  while ((c = getopt_long(argc, argv, "c:r:s:l:Vh", options, NULL)) != -1) {
    switch (c) {
    case 'r':
      replace_string(&cfg->root, optarg);
      break;
    case 's':
      replace_string(&cfg->socket, optarg);
      break;
    case 'l':
      cfg->log_level = log_level_from_string(optarg);
      if (cfg->log_level < 0) {
        fprintf(stderr, "crimaged: unknown log level \"%s\"\n", optarg);
        return -1;
      }
      break;
    case OPT_DEFAULT_REGISTRY:
      replace_string(&cfg->default_registry, optarg);
      break;
    case OPT_INSECURE_REGISTRY:
      config_add_insecure_registry(cfg, optarg);
      break;
    case OPT_CERTS_DIR:
      replace_string(&cfg->certs_dir, optarg);
      break;
    default:
      break;
    }
  }
  /* A relative root or socket is taken from the working directory, once, so nothing depends on it later. */
  if (cfg->root[0] != '/') {
    cleanup_free char *cwd = getcwd(NULL, 0);
    if (cwd) {
      char *abs = xasprintf("%s/%s", cwd, cfg->root);
      free(cfg->root);
      cfg->root = abs;
    }
  }
  return 0;
}

/* One daemon per root: a second one would corrupt the index. */
static int lock_dir(const char *root, int *ret_fd, crimage_error **err)
{
  int r = mkdir_p(root, 0700, err);
  if (r < 0)
    return r;
  cleanup_free char *path = xasprintf("%s/crimaged.lock", root);
  cleanup_close int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (fd < 0)
    return crimage_error_set(err, CRIMAGE_INTERNAL, errno, "open lock file `%s`", path);
  if (flock(fd, LOCK_EX | LOCK_NB) < 0) {
    if (errno == EWOULDBLOCK)
      return crimage_error_set(err, CRIMAGE_FAILED_PRECONDITION, 0,
                               "another crimaged is using the store at `%s`", root);
    return crimage_error_set(err, CRIMAGE_INTERNAL, errno, "lock `%s`", path);
  }
  *ret_fd = TAKE_FD(fd);
  return 0;
}

/* Opens the stores of handlers with a root of their own, each with a puller. */
static int open_handler_stores(daemon_ctx *d, const puller_options *po, crimage_error **err)
{
  d->all_stores = xcalloc(d->cfg.n_handlers + 1, sizeof(*d->all_stores));
  d->extra_pullers = xcalloc(d->cfg.n_handlers + 1, sizeof(*d->extra_pullers));
  d->lock_fds = xcalloc(d->cfg.n_handlers + 1, sizeof(*d->lock_fds));
  d->handler_stores = xcalloc(d->cfg.n_handlers + 1, sizeof(*d->handler_stores));
  d->all_stores[0] = d->store;
  d->extra_pullers[0] = d->puller;
  d->lock_fds[0] = -1;
  d->n_all_stores = 1;
  for (size_t i = 0; i < d->cfg.n_handlers; i++) {
    const handler_config *h = &d->cfg.handlers[i];
    if (!h->root || streq(h->root, d->cfg.root))
      continue;
    size_t k = 1;
    while (k < d->n_all_stores && !streq(store_root(d->all_stores[k]), h->root))
      k++;
    if (k == d->n_all_stores) {
      int fd = -1;
      int r = lock_dir(h->root, &fd, err);
      if (r < 0)
        return crimage_error_wrap(err, "runtime handler \"%s\"", h->name);
      d->lock_fds[k] = fd;
      d->n_all_stores++;
      r = store_open_opts(h->root, &d->store_opts, &d->all_stores[k], err);
      if (r < 0)
        return crimage_error_wrap(err, "opening the store of runtime handler \"%s\"", h->name);
      r = puller_new(d->all_stores[k], po, &d->extra_pullers[k], err);
      if (r < 0)
        return r;
      log_info("runtime handler \"%s\" keeps its images in %s", h->name, h->root);
    }
    d->handler_stores[d->n_handler_stores++] =
        (handler_store){.handler = h->name, .store = d->all_stores[k], .puller = d->extra_pullers[k]};
  }
  return 0;
}

static int open_listener(daemon_ctx *d, int *ret_fd, crimage_error **err)
{
#if HAVE_SYSTEMD
  int n = sd_listen_fds(1);
  if (n > 1)
    return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "expected one socket from systemd, got %d", n);
  if (n == 1) {
    if (sd_is_socket_unix(SD_LISTEN_FDS_START, SOCK_STREAM, 1, NULL, 0) <= 0)
      return crimage_error_set(err, CRIMAGE_INVALID_ARGUMENT, 0, "the socket from systemd is not a unix stream socket");
    log_info("using the socket passed by systemd");
    *ret_fd = SD_LISTEN_FDS_START;
    return 0;
  }
#endif
  cleanup_free char *dir = xstrdup(d->cfg.socket);
  int r = mkdir_p(dirname(dir), 0755, err);
  if (r < 0)
    return r;
  r = rpc_listen_unix(d->cfg.socket, 0660, ret_fd, err);
  if (r < 0)
    return r;
  d->socket_is_ours = true;
  return 0;
}

/* An unpacked layer a snapshot of containerd's or a layer of a containers-storage tree stands on stays, also
 * after the last image listing it went. */
static bool layer_in_use(void *userdata, const char *dir)
{
  const daemon_ctx *d = userdata;
  if (d->snapshotter && snapshotter_layer_in_use(d->snapshotter, dir))
    return true;
  for (size_t i = 0; i < d->n_cstorages; i++)
    if (cstorage_layer_in_use(d->cstorages[i], dir))
      return true;
  return false;
}

/* The snapshotter keeps its snapshots under <root>/snapshots, inside the store's lock. It is served on a socket of
 * its own so access to one API is not access to the other: whoever may call the CRI socket (kubelet, crictl) cannot
 * change containerd's snapshots, and containerd's proxy plugin needs nothing but this socket. */
static int add_layer(void *userdata, const char *chain_id, const char *parent_chain, const char *dir,
                     crimage_error **err)
{
  return snapshotter_add_layer(userdata, chain_id, parent_chain, dir, err);
}

static int open_snapshotter(daemon_ctx *d, crimage_error **err)
{
  cleanup_free char *root = xasprintf("%s/snapshots", d->cfg.root);
  snapshotter_options so = {.root = root};
  int r = snapshotter_open(&so, &d->snapshotter, err);
  if (r < 0)
    return crimage_error_wrap(err, "opening the snapshotter");
  return 0;
}

/* Opens every distinct containers-storage tree the config names (the default and the handlers' own). */
static int open_containers_storage(daemon_ctx *d, crimage_error **err)
{
  const char *roots[d->cfg.n_handlers + 1];
  size_t n = 0;
  roots[n++] = d->cfg.containers_storage_root;
  for (size_t i = 0; i < d->cfg.n_handlers; i++)
    roots[n++] = d->cfg.handlers[i].containers_storage_root;
  d->cstorages = xcalloc(n, sizeof(cstorage *));
  for (size_t i = 0; i < n; i++) {
    bool seen = str_empty(roots[i]);
    for (size_t j = 0; j < d->n_cstorages && !seen; j++)
      seen = streq(cstorage_root(d->cstorages[j]), roots[i]);
    if (seen)
      continue;
    int r = cstorage_open(roots[i], &d->cstorages[d->n_cstorages], err);
    if (r < 0)
      return r;
    d->n_cstorages++;
    log_info("writing a containers-storage tree for CRI-O at %s", roots[i]);
  }
  return 0;
}

static int start_snapshotter(daemon_ctx *d, crimage_error **err)
{
  const char *root = snapshotter_root(d->snapshotter);
  int r = rpc_server_new(&d->snapshot_server, err);
  if (r < 0)
    return r;
  r = snapshotter_register(d->snapshotter, d->snapshot_server, err);
  if (r < 0)
    return r;
  cleanup_free char *dir = xstrdup(d->cfg.snapshotter_socket);
  r = mkdir_p(dirname(dir), 0755, err);
  if (r < 0)
    return r;
  int fd = -1;
  r = rpc_listen_unix(d->cfg.snapshotter_socket, 0660, &fd, err);
  if (r < 0)
    return crimage_error_wrap(err, "snapshotterSocket");
  d->snapshot_socket_bound = true;
  r = rpc_server_start(d->snapshot_server, fd, err);
  if (r < 0)
    return r;
  log_info("serving containerd's snapshotter API on %s (snapshots in %s)", d->cfg.snapshotter_socket, root);
  return 0;
}

static int daemon_start(daemon_ctx *d, crimage_error **err)
{
  int r = lock_dir(d->cfg.root, &d->lock_fd, err);
  if (r < 0)
    return r;
  d->store_opts = (store_options){.unreferenced_retention_ms = d->cfg.unreferenced_retention_ms,
                                  .unreferenced_max_bytes = d->cfg.unreferenced_max_bytes};
  r = store_open_opts(d->cfg.root, &d->store_opts, &d->store, err);
  if (r < 0)
    return crimage_error_wrap(err, "opening the store");

  puller_options po = {
      .certs_dir = d->cfg.certs_dir,
      .hosts = d->cfg.registries,
      .n_hosts = d->cfg.n_registries,
      .max_concurrent_downloads = d->cfg.max_concurrent_downloads,
      .progress_timeout_ms = d->cfg.pull_progress_timeout_ms,
      /* 0 in the config means no floor; the puller reads a negative value that way. */
      .min_speed_bytes_per_s = d->cfg.pull_min_throughput > 0 ? d->cfg.pull_min_throughput : -1,
      .min_speed_window_ms = d->cfg.pull_min_throughput_window_ms,
      .skip_diff_id_check = !d->cfg.verify_diff_ids,
      .user_agent = "crimage/" CRIMAGE_VERSION,
  };
  r = puller_new(d->store, &po, &d->puller, err);
  if (r < 0)
    return r;
  r = open_handler_stores(d, &po, err);
  if (r < 0)
    return r;
  if (!str_empty(d->cfg.snapshotter_socket)) {
    r = open_snapshotter(d, err);
    if (r < 0)
      return r;
  }
  r = open_containers_storage(d, err);
  if (r < 0)
    return r;
  if (d->snapshotter || d->n_cstorages)
    for (size_t i = 0; i < d->n_all_stores; i++)
      store_set_layer_keeper(d->all_stores[i], layer_in_use, d);
  /* Unreferenced content (a failed or interrupted pull's, unpacked layers no image lists any more) goes once its
   * retention has passed or it exceeds its limit, unless a snapshot stands on it: swept now and from now on (the
   * snapshotter, which says what its snapshots use, is open by then). */
  for (size_t i = 0; i < d->n_all_stores; i++) {
    r = store_start_sweeper(d->all_stores[i], err);
    if (r < 0)
      return r;
  }

  scheduler_options so;
  scheduler_options_init(&so);
  so.serialize = d->cfg.serialize_image_pulls;
  so.max_parallel = d->cfg.max_parallel_image_pulls;
  r = scheduler_new(&so, &d->scheduler, err);
  if (r < 0)
    return r;
  if (d->cfg.pull_backoff_enabled)
    d->backoff = backoff_new(d->cfg.pull_backoff_initial_ms, d->cfg.pull_backoff_max_ms, 0);
  d->progress = progress_tracker_new(0);
  pull_credentials_options co = {
      .docker_config_paths = d->cfg.docker_config_paths,
      .kubelet_root_dir = d->cfg.kubelet_root_dir,
      .provider_config = d->cfg.credential_provider_config,
      .provider_bin_dir = d->cfg.credential_provider_bin_dir,
      .provider_timeout_ms = d->cfg.credential_provider_timeout_ms,
      .secrets_dir = d->cfg.pull_secrets_dir,
  };
  r = pull_credentials_new(&co, &d->credentials, err);
  if (r < 0)
    return r;

  if (!str_empty(d->cfg.containerd_address)) {
    publisher_options pub = {
        .address = d->cfg.containerd_address,
        .add_layer = d->snapshotter ? add_layer : NULL,
        .add_layer_userdata = d->snapshotter,
    };
    r = publisher_new(&pub, &d->publisher, err);
    if (r < 0)
      return r;
  }
  image_service_options io = {
      .default_registry = d->cfg.default_registry,
      .handlers = d->cfg.handlers,
      .n_handlers = d->cfg.n_handlers,
      .reject_unknown_handlers = d->cfg.reject_unknown_runtime_handlers,
      .pinned_images = d->cfg.pinned_images,
      .scheduler = d->scheduler,
      .backoff = d->backoff,
      .progress = d->progress,
      .credentials = d->credentials,
      .handler_stores = d->handler_stores,
      .n_handler_stores = d->n_handler_stores,
      .publisher = d->publisher,
      .containerd_namespace = d->cfg.containerd_namespace,
      .unpack_layers = d->cfg.unpack_layers,
      .containerd_snapshotter = d->cfg.containerd_snapshotter,
      .cstorages = d->cstorages,
      .n_cstorages = d->n_cstorages,
      .containers_storage_root = d->cfg.containers_storage_root,
  };
  r = image_service_new(d->store, d->puller, &io, &d->images, err);
  if (r < 0)
    return r;
  /* Before serving: CRI-O finds what the records say, also after a crash mid-write or a wiped tree. */
  r = image_service_sync_containers_storage(d->images, err);
  if (r < 0)
    return r;

  r = rpc_server_new(&d->server, err);
  if (r < 0)
    return r;
  r = image_service_register(d->images, d->server, err);
  if (r < 0)
    return r;
  d->progress_svc = progress_service_new(d->progress, d->cfg.default_registry);
  r = progress_service_register(d->progress_svc, d->server, err);
  if (r < 0)
    return r;
  if (!str_empty(d->cfg.metrics_address)) {
    metrics_sources ms = {
        .progress = d->progress,
        .scheduler = d->scheduler,
        .stores = d->all_stores,
        .n_stores = d->n_all_stores,
    };
    r = metrics_server_start(d->cfg.metrics_address, &ms, &d->metrics, err);
    if (r < 0)
      return r;
  }
  /* Up before the CRI socket, so whoever waits for that one finds the snapshotter serving too. */
  if (d->snapshotter) {
    r = start_snapshotter(d, err);
    if (r < 0)
      return r;
  }
  int fd = -1;
  r = open_listener(d, &fd, err);
  if (r < 0)
    return r;
  r = rpc_server_start(d->server, fd, err);
  if (r < 0)
    return r;
  /* Once containerd answers (now or later), it gets every image it lacks; serving does not wait for that. */
  if (d->publisher)
    return publisher_watch(d->publisher, image_service_reconcile, d->images, err);
  return 0;
}

static void daemon_stop(daemon_ctx *d)
{
  /* Queued pulls fail at once; running ones are cancelled by the server shutdown after the grace period. */
  if (d->scheduler)
    scheduler_shutdown(d->scheduler);
  if (d->server) {
    rpc_server_shutdown(d->server, (int) d->cfg.shutdown_grace_period_ms);
    rpc_server_free(d->server);
  }
  if (d->socket_is_ours)
    unlink(d->cfg.socket);
  if (d->snapshot_server) {
    rpc_server_shutdown(d->snapshot_server, (int) d->cfg.shutdown_grace_period_ms);
    rpc_server_free(d->snapshot_server);
  }
  if (d->snapshot_socket_bound)
    unlink(d->cfg.snapshotter_socket);
  metrics_server_stop(d->metrics);
  progress_service_free(d->progress_svc);
  /* The watcher works on the image service: it goes first. */
  publisher_free(d->publisher);
  image_service_free(d->images);
  pull_credentials_free(d->credentials);
  scheduler_free(d->scheduler);
  backoff_free(d->backoff);
  progress_tracker_free(d->progress);
  /* Index 0 is the main store and puller, freed below. */
  for (size_t i = 1; i < d->n_all_stores; i++) {
    puller_free(d->extra_pullers[i]);
    store_close(d->all_stores[i]);
    if (d->lock_fds[i] >= 0)
      close(d->lock_fds[i]);
  }
  free(d->all_stores);
  free(d->extra_pullers);
  free(d->lock_fds);
  free(d->handler_stores);
  puller_free(d->puller);
  store_close(d->store);
  /* The stores' sweepers ask both whether a layer is in use: they go after the stores. */
  snapshotter_free(d->snapshotter);
  for (size_t i = 0; i < d->n_cstorages; i++)
    cstorage_free(d->cstorages[i]);
  free(d->cstorages);
  if (d->lock_fd >= 0)
    close(d->lock_fd);
  config_clear(&d->cfg);
}

int main(int argc, char **argv)
{
  daemon_ctx d = {.lock_fd = -1};
  crimage_error *err = NULL;
  config_init(&d.cfg);

  int r = parse_args(argc, argv, &d.cfg, &err);
  if (r != 0) {
    if (err)
      fprintf(stderr, "crimaged: %s\n", err->message);
    crimage_error_free(err);
    config_clear(&d.cfg);
    return r > 0 ? 0 : r == -1 ? 2 : 1;
  }
  log_set_max_level(d.cfg.log_level);
  if (config_validate(&d.cfg, &err) < 0) {
    log_error("invalid configuration: %s", err->message);
    crimage_error_free(err);
    config_clear(&d.cfg);
    return 1;
  }

  /* Signals are taken synchronously by sigwait below; block them before any thread (gRPC's included) starts so
   * every thread inherits the mask. */
  sigset_t mask;
  sigemptyset(&mask);
  sigaddset(&mask, SIGTERM);
  sigaddset(&mask, SIGINT);
  sigaddset(&mask, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &mask, NULL);
  signal(SIGPIPE, SIG_IGN);
  /* The daemon's own hold on the gRPC library, never released: the servers and clients are shut down and freed
   * in daemon_stop, but the library's final teardown would join gRPC's executor threads, and after a large
   * write that found the socket full (a List or Stat of big snapshots, a long ListImages) one of them sits in a
   * 10 s backup poll. The process ends right after; the kernel reclaims what the library holds. */
  grpc_init();

  if (daemon_start(&d, &err) < 0) {
    log_error("%s", err->message);
    crimage_error_free(err);
    daemon_stop(&d);
    return 1;
  }
  log_info("crimaged %s serving the CRI ImageService on %s (store %s)", CRIMAGE_VERSION,
           d.socket_is_ours ? d.cfg.socket : "the socket passed by systemd", d.cfg.root);
#if HAVE_SYSTEMD
  sd_notify(0, "READY=1\nSTATUS=serving");
#endif

  for (;;) {
    int sig = 0;
    if (sigwait(&mask, &sig) != 0)
      continue;
    if (sig == SIGHUP) {
      log_info("SIGHUP: nothing to reload; restart crimaged to apply a new configuration");
      continue;
    }
    log_info("received %s, shutting down", sig == SIGTERM ? "SIGTERM" : "SIGINT");
    break;
  }
#if HAVE_SYSTEMD
  sd_notify(0, "STOPPING=1");
#endif
  daemon_stop(&d);
  log_info("stopped");
  return 0;
}
