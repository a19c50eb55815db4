/* checkpoint.c - syncbn_save / syncbn_load. Not implemented yet: answers SYNCBN_EIO
 * (allowed by the core issue until the hardening work lands). */
#include "layer.h"

int syncbn_save(const syncbn_layer *layer, const char *path)
{
    if (!layer || !path)
        return SYNCBN_EINVAL;
    return SYNCBN_EIO;
}

int syncbn_load(syncbn_layer *layer, const char *path)
{
    if (!layer || !path)
        return SYNCBN_EINVAL;
    return SYNCBN_EIO;
}
