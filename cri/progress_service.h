/* crimage.v1.PullProgress: the progress of running pulls, served next to the CRI ImageService on the same socket
 * (ListPulls polls, WatchPull streams the updates of one pull until it ends). */
#ifndef CRIMAGE_CRI_PROGRESS_SERVICE_H
#define CRIMAGE_CRI_PROGRESS_SERVICE_H

#include "common/error.h"
#include "cri/server.h"
#include "pull/progress.h"

typedef struct progress_service progress_service;

/* default_registry: the registry of short names, to normalize WatchPull's image as PullImage does (NULL =
 * docker.io). The tracker must outlive the service. */
progress_service *progress_service_new(progress_tracker *tracker, const char *default_registry);
void progress_service_free(progress_service *svc);
int progress_service_register(progress_service *svc, rpc_server *server, crimage_error **err);

#endif
