/*
 * train_data.c - see train_data.h.
 */
#include "train_data.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

// Reads exactly n bytes; 0 on success, -1 on short read or zlib error.
static int read_exact(gzFile f, void *buf, int64_t n) {
    uint8_t *p = buf;
    while (n > 0) {
        unsigned chunk = n > (1 << 30) ? (1u << 30) : (unsigned)n;
        int got = gzread(f, p, chunk);
        if (got <= 0) return -1;
        p += got;
        n -= got;
    }
    return 0;
}

static uint32_t be32(const uint8_t *b) {
    return (uint32_t)b[0] << 24 | (uint32_t)b[1] << 16 | (uint32_t)b[2] << 8 | b[3];
}

// Opens dir/name, checks the magic and dims, returns the payload (owned) and the count.
static uint8_t *read_idx(const char *dir, const char *name, uint32_t magic, int ndims, const uint32_t *want_dims,
                         int64_t *count, char *err, int errlen) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    gzFile f = gzopen(path, "rb");
    if (!f) {
        snprintf(err, errlen, "cannot open %s (%s); install the Debian package %s or pass --data DIR", path,
                 errno ? strerror(errno) : "zlib error", TRAIN_DATA_PACKAGE);
        return NULL;
    }
    uint8_t hdr[16];
    int hlen = 4 + 4 * ndims;
    if (read_exact(f, hdr, hlen) != 0 || be32(hdr) != magic) {
        snprintf(err, errlen, "%s is not a gzip'ed IDX file with magic 0x%08x; reinstall the Debian package %s",
                 path, magic, TRAIN_DATA_PACKAGE);
        gzclose(f);
        return NULL;
    }
    int64_t n = be32(hdr + 4);
    int64_t per = 1;
    for (int d = 1; d < ndims; d++) {
        uint32_t v = be32(hdr + 4 + 4 * d);
        if (v != want_dims[d - 1]) {
            snprintf(err, errlen, "%s: dimension %d is %u, expected %u; reinstall the Debian package %s", path, d, v,
                     want_dims[d - 1], TRAIN_DATA_PACKAGE);
            gzclose(f);
            return NULL;
        }
        per *= v;
    }
    if (n <= 0 || n > 10000000) {
        snprintf(err, errlen, "%s: implausible item count %lld; reinstall the Debian package %s", path, (long long)n,
                 TRAIN_DATA_PACKAGE);
        gzclose(f);
        return NULL;
    }
    uint8_t *data = malloc((size_t)(n * per));
    if (!data) {
        snprintf(err, errlen, "%s: out of memory", path);
        gzclose(f);
        return NULL;
    }
    uint8_t extra;
    if (read_exact(f, data, n * per) != 0) {
        snprintf(err, errlen, "%s is truncated or corrupt (expected %lld payload bytes); reinstall the Debian package %s",
                 path, (long long)(n * per), TRAIN_DATA_PACKAGE);
        free(data);
        gzclose(f);
        return NULL;
    }
    // trailing bytes mean the header lies about the size
    if (gzread(f, &extra, 1) != 0) {
        snprintf(err, errlen, "%s has trailing bytes after %lld items or a corrupt gzip stream; reinstall the Debian package %s",
                 path, (long long)n, TRAIN_DATA_PACKAGE);
        free(data);
        gzclose(f);
        return NULL;
    }
    gzclose(f);
    *count = n;
    return data;
}

int train_dataset_load(train_dataset *ds, const char *dir, const char *split, char *err, int errlen) {
    memset(ds, 0, sizeof *ds);
    char name[256];
    const uint32_t img_dims[2] = {TRAIN_IMG_H, TRAIN_IMG_W};
    int64_t ni = 0, nl = 0;
    snprintf(name, sizeof name, "%s-images-idx3-ubyte.gz", split);
    uint8_t *images = read_idx(dir, name, 0x00000803u, 3, img_dims, &ni, err, errlen);
    if (!images) return -1;
    snprintf(name, sizeof name, "%s-labels-idx1-ubyte.gz", split);
    uint8_t *labels = read_idx(dir, name, 0x00000801u, 1, NULL, &nl, err, errlen);
    if (!labels) {
        free(images);
        return -1;
    }
    if (ni != nl) {
        snprintf(err, errlen, "%s/%s: %lld images but %lld labels; reinstall the Debian package %s", dir, split,
                 (long long)ni, (long long)nl, TRAIN_DATA_PACKAGE);
        free(images);
        free(labels);
        return -1;
    }
    for (int64_t i = 0; i < nl; i++) {
        if (labels[i] >= TRAIN_CLASSES) {
            snprintf(err, errlen, "%s/%s: label %d at index %lld is out of range; reinstall the Debian package %s", dir,
                     split, labels[i], (long long)i, TRAIN_DATA_PACKAGE);
            free(images);
            free(labels);
            return -1;
        }
    }
    ds->n = ni;
    ds->images = images;
    ds->labels = labels;
    return 0;
}

void train_dataset_free(train_dataset *ds) {
    if (!ds) return;
    free(ds->images);
    free(ds->labels);
    ds->images = ds->labels = NULL;
    ds->n = 0;
}
