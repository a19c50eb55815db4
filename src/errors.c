/* errors.c - syncbn_strerror, generated from the same table as the error enum. */
#include "syncbn.h"

const char *syncbn_strerror(int code)
{
    switch (code) {
#define SYNCBN_ERRNO_CASE(name, value, msg) \
    case SYNCBN_##name:                     \
        return msg;
        SYNCBN_ERRNO_MAP(SYNCBN_ERRNO_CASE)
#undef SYNCBN_ERRNO_CASE
    }
    return "unknown error code";
}
