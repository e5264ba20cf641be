/* Public library entry points that belong to no module. */
#include "crimage.h"

const char *crimage_version(void) { return CRIMAGE_VERSION; }
