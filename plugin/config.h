/* crimaged's configuration: defaults, a YAML/JSON file (camelCase keys as in KubeletConfiguration), then flags. */
#ifndef CRIMAGE_PLUGIN_CONFIG_H
#define CRIMAGE_PLUGIN_CONFIG_H

#include <stdbool.h>
#include <stdint.h>

#include "common/error.h"
#include "cri/image_service.h"
#include "pull/puller.h"

#define CONFIG_DEFAULT_ROOT "/var/lib/crimage"
#define CONFIG_DEFAULT_SOCKET "/run/crimage/crimage.sock"

typedef struct crimaged_config {
  char *root;
  char *socket;
  int log_level; /* syslog level */
  char *default_registry;
  char *certs_dir;
  registry_host *registries;
  size_t n_registries;
  int max_concurrent_downloads;
  int64_t pull_progress_timeout_ms;
  int64_t pull_min_throughput;           /* bytes/s; 0 = no floor */
  int64_t pull_min_throughput_window_ms;
  bool verify_diff_ids;
  bool serialize_image_pulls;
  int max_parallel_image_pulls; /* 0 = no limit; only with serialize_image_pulls false */
  bool pull_backoff_enabled;
  int64_t pull_backoff_initial_ms;
  int64_t pull_backoff_max_ms;
  handler_config *handlers;
  size_t n_handlers;
  bool reject_unknown_runtime_handlers;
  char **pinned_images; /* NULL-terminated */
  char **docker_config_paths; /* NULL-terminated; NULL = kubelet's search order */
  char *credential_provider_config;
  char *credential_provider_bin_dir;
  char *pull_secrets_dir;
  char *kubelet_root_dir;                 /* first place of kubelet's docker config search */
  int64_t credential_provider_timeout_ms; /* how long a credential provider plugin may run */
  int64_t shutdown_grace_period_ms;
  char *metrics_address; /* "" = no metrics listener */
  bool unpack_layers;         /* unpack every layer for overlayfs while it downloads */
  char *containerd_address;   /* containerd's socket; "" = images are not handed to containerd */
  char *containerd_namespace; /* default namespace of the images handed over */
  char *containerd_snapshotter; /* containerd's name for crimage's snapshotter; "" = containerd's own */
  char *snapshotter_socket;   /* where containerd's proxy snapshotter is served; "" = not served */
  char *containers_storage_root; /* the containers-storage tree CRI-O reads; "" = none */
  int64_t unreferenced_retention_ms; /* what failed pulls left is kept this long after its last use */
  uint64_t unreferenced_max_bytes;   /* and this much of it at most */
} crimaged_config;

void config_init(crimaged_config *cfg);
void config_clear(crimaged_config *cfg);
/* Merges a config file into cfg. Unknown keys and values of the wrong type are errors naming the key. */
int config_load_file(crimaged_config *cfg, const char *path, crimage_error **err);
/* The file, then every *.yaml, *.yml and *.json of the directory <path>.d (if there is one) in name order, each
 * merged over what came before: a package's file stays as shipped and local settings go in drop-ins. */
int config_load_with_dropins(crimaged_config *cfg, const char *path, crimage_error **err);
/* The same from a buffer (at most 1 MiB, as a file); what names it in errors. */
int config_load_buffer(crimaged_config *cfg, const char *data, size_t len, const char *what, crimage_error **err);
/* Adds (or updates) registries.<host>.insecure = true. */
void config_add_insecure_registry(crimaged_config *cfg, const char *host);
/* Checks combinations, as kubelet refuses invalid pull settings at start-up. */
int config_validate(const crimaged_config *cfg, crimage_error **err);

#endif
