/*
 * checkpoint.c - syncbn_save / syncbn_load: one layer's state in a small, versioned,
 * CRC-checked file. Not collective: nothing here talks to MPI.
 *
 * File format, version 2 (written by syncbn_save). Every field little-endian, no
 * padding; H is the header size, 80 in version 2 and 72 in version 1:
 *
 *   offset  size  field
 *        0     8  magic "SYNCBNCK"
 *        8     4  u32 version (2; 1 for files of syncbn <= 0.2, see below)
 *       12     4  u32 affine (0/1)
 *       16     4  u32 track_running_stats (0/1)
 *       20     4  u32 layout (SYNCBN_NCHW/NHWC)
 *       24     4  u32 reduction (SYNCBN_FAST/REPRODUCIBLE)
 *       28     4  u32 reserved, 0
 *       32     8  i64 channels C
 *       40     8  f64 eps
 *       48     8  f64 momentum (NaN: cumulative average)
 *       56     8  i64 num_batches_tracked (>= 0)
 *       64     8  u64 K, floats that follow: C * (2*affine + 2*track)
 *       72     4  u32 dtype (SYNCBN_F32/BF16)            } version 2 only
 *       76     4  u32 activation (SYNCBN_ACT_NONE/RELU)  }
 *        H   4*K  f32 weight[C] bias[C] (if affine), running_mean[C] running_var[C] (if track)
 *     H+4K     4  u32 CRC-32 (zlib crc32) of bytes [0, H+4K)
 *
 * Version 1 is the same without the dtype and activation words (H = 72): offsets
 * 0..71 are identical, so one reader serves both. The version is checked first and
 * fixes the expected size; the CRC is then checked before any other field is trusted.
 *
 * Load policy: the shape must match the layer (channels, affine, track), or the file
 * is rejected with SYNCBN_EFORMAT. In version 2 dtype and activation must match the
 * layer too: like the shape they are fixed at create and agreed across ranks, and a
 * layer of another dtype or activation computes another function with the same
 * parameters, so its file belongs to another model. A version-1 file predates both
 * fields and loads into a layer of the same shape whatever its dtype and activation
 * (what it stores, float32 parameters and statistics, means the same in each).
 * eps, momentum, layout and reduction must be valid values but need NOT match: they
 * are hyperparameters, not state (as in PyTorch's load_state_dict), the stored arrays
 * do not depend on them, and the layer's own values were agreed across ranks at
 * create - a non-collective load must not be able to make ranks disagree on them.
 * They are kept in the file for inspection. Stored floats are taken bit for bit, NaN
 * included.
 *
 * Save is atomic: the bytes go to a new temporary file next to the target, are
 * flushed and fsync'ed, renamed over the target, and the directory is fsync'ed, so
 * after a crash the target is either the old file or the complete new one.
 * Load reads and checks the WHOLE file before touching the layer.
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include "layer.h"

#define CK_MAGIC "SYNCBNCK"
#define CK_VERSION 2u  /* what syncbn_save writes */
#define CK_HEADER_V1 72 /* bytes before the float arrays, version 1 */
#define CK_HEADER_V2 80 /* version 2: + dtype, activation */
#define CK_TRAILER 4    /* the CRC */

/* ---- little-endian encoding, independent of the host's byte order ---- */

static void put_u32(unsigned char *p, uint32_t v)
{
    for (int k = 0; k < 4; k++)
        p[k] = (unsigned char)(v >> (8 * k));
}

static void put_u64(unsigned char *p, uint64_t v)
{
    for (int k = 0; k < 8; k++)
        p[k] = (unsigned char)(v >> (8 * k));
}

static uint32_t get_u32(const unsigned char *p)
{
    uint32_t v = 0;
    for (int k = 0; k < 4; k++)
        v |= (uint32_t)p[k] << (8 * k);
    return v;
}

static uint64_t get_u64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int k = 0; k < 8; k++)
        v |= (uint64_t)p[k] << (8 * k);
    return v;
}

static uint64_t f64_bits(double d)
{
    uint64_t u;
    memcpy(&u, &d, sizeof u);
    return u;
}

static double bits_f64(uint64_t u)
{
    double d;
    memcpy(&d, &u, sizeof d);
    return d;
}

/* zlib's crc32 takes a uInt length: feed large buffers in pieces. */
static uint32_t crc_of(const unsigned char *p, size_t len)
{
    uLong crc = crc32(0L, Z_NULL, 0);
    while (len > 0) {
        const uInt piece = len > (1u << 30) ? (1u << 30) : (uInt)len;
        crc = crc32(crc, p, piece);
        p += piece, len -= piece;
    }
    return (uint32_t)crc;
}

/* Floats that a layer of this configuration stores. */
static uint64_t float_count(const syncbn_config *c)
{
    return (uint64_t)c->channels * (uint64_t)(2 * (c->affine != 0) + 2 * (c->track_running_stats != 0));
}

/* Header size of a file version (1 or 2). */
static size_t header_size(uint32_t version)
{
    return version == 1 ? CK_HEADER_V1 : CK_HEADER_V2;
}

/* Size of a file of this version for a layer of this configuration. */
static size_t file_size(const syncbn_config *c, uint32_t version)
{
    return header_size(version) + 4 * (size_t)float_count(c) + CK_TRAILER;
}

/* The arrays of a layer in file order: up to 4 of C floats, NULL-free. */
static int arrays_of(const syncbn_layer *l, float *arr[4])
{
    int k = 0;
    if (l->cfg.affine)
        arr[k++] = l->weight, arr[k++] = l->bias;
    if (l->cfg.track_running_stats)
        arr[k++] = l->running_mean, arr[k++] = l->running_var;
    return k;
}

/* ---- save ---- */

/* Serializes the layer into buf (file_size bytes). */
static void encode(const syncbn_layer *l, unsigned char *buf)
{
    const syncbn_config *c = &l->cfg;
    memcpy(buf, CK_MAGIC, 8);
    put_u32(buf + 8, CK_VERSION);
    put_u32(buf + 12, c->affine != 0);
    put_u32(buf + 16, c->track_running_stats != 0);
    put_u32(buf + 20, (uint32_t)c->layout);
    put_u32(buf + 24, (uint32_t)c->reduction);
    put_u32(buf + 28, 0);
    put_u64(buf + 32, (uint64_t)c->channels);
    put_u64(buf + 40, f64_bits(c->eps));
    put_u64(buf + 48, f64_bits(c->momentum));
    put_u64(buf + 56, (uint64_t)l->num_batches_tracked);
    put_u64(buf + 64, float_count(c));
    put_u32(buf + 72, (uint32_t)c->dtype);
    put_u32(buf + 76, (uint32_t)c->activation);
    float *arr[4];
    const int na = arrays_of(l, arr);
    unsigned char *p = buf + CK_HEADER_V2;
    for (int a = 0; a < na; a++)
        for (int64_t i = 0; i < c->channels; i++, p += 4) {
            uint32_t u;
            memcpy(&u, &arr[a][i], 4);
            put_u32(p, u);
        }
    put_u32(p, crc_of(buf, (size_t)(p - buf)));
}

/* The directory holding path ("." for a bare name), in a new string; NULL if out of memory. */
static char *dir_of(const char *path)
{
    const char *slash = strrchr(path, '/');
    if (!slash)
        return strdup(".");
    size_t len = slash == path ? 1 : (size_t)(slash - path);
    char *d = malloc(len + 1);
    if (d) {
        memcpy(d, path, len);
        d[len] = '\0';
    }
    return d;
}

/* Creates a fresh temporary file next to path; its name goes to tmp (tmp_len bytes).
 * O_EXCL so we never write through someone else's file or symlink; mode 0666 & ~umask
 * like any file fopen creates. Returns the descriptor, or -1. */
static int open_temp(const char *path, char *tmp, size_t tmp_len)
{
    static unsigned counter;
    for (int attempt = 0; attempt < 100; attempt++) {
        int w = snprintf(tmp, tmp_len, "%s.tmp.%ld.%u", path, (long)getpid(), counter++);
        if (w < 0 || (size_t)w >= tmp_len)
            return -1;
        int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL, 0666);
        if (fd >= 0 || errno != EEXIST)
            return fd;
    }
    return -1;
}

/* Writes all of buf to fd, retrying short writes and EINTR. */
static int write_all(int fd, const unsigned char *buf, size_t len)
{
    while (len > 0) {
        ssize_t w = write(fd, buf, len);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        buf += w, len -= (size_t)w;
    }
    return 0;
}

static int save_file(const syncbn_layer *layer, const char *path)
{
    if (!layer || !path || !*path)
        return SYNCBN_EINVAL;
    const size_t size = file_size(&layer->cfg, CK_VERSION);
    const size_t tmp_len = strlen(path) + 64;
    unsigned char *buf = malloc(size);
    char *tmp = malloc(tmp_len);
    char *dir = dir_of(path);
    if (!buf || !tmp || !dir) {
        free(buf), free(tmp), free(dir);
        return SYNCBN_ENOMEM;
    }
    encode(layer, buf);

    int rc = SYNCBN_EIO;
    int fd = open_temp(path, tmp, tmp_len);
    if (fd >= 0) {
        /* write(2) directly: no stdio buffer stands between the bytes and fsync. */
        int ok = write_all(fd, buf, size) == 0 && fsync(fd) == 0;
        ok = close(fd) == 0 && ok;
        if (ok && rename(tmp, path) == 0) {
            /* The rename itself is durable only once the directory is synced. Some
             * file systems refuse fsync on directories (EINVAL): the rename has
             * still happened, so that is not a failure of the save. */
            int dfd = open(dir, O_RDONLY);
            if (dfd >= 0) {
                if (fsync(dfd) == 0 || errno == EINVAL || errno == EROFS)
                    rc = SYNCBN_OK;
                close(dfd);
            }
        } else {
            unlink(tmp); /* the previous file at path stays untouched */
        }
    }
    free(buf), free(tmp), free(dir);
    return rc;
}

/* ---- load ---- */

/* Checks a complete file image against the layer. SYNCBN_OK or SYNCBN_EFORMAT. */
static int validate(const syncbn_layer *l, const unsigned char *buf, size_t len)
{
    const syncbn_config *c = &l->cfg;
    if (len < CK_HEADER_V1 + CK_TRAILER || memcmp(buf, CK_MAGIC, 8) != 0)
        return SYNCBN_EFORMAT;
    const uint32_t version = get_u32(buf + 8);
    if (version != 1 && version != 2)
        return SYNCBN_EFORMAT;
    if (len != file_size(c, version) || get_u32(buf + len - CK_TRAILER) != crc_of(buf, len - CK_TRAILER))
        return SYNCBN_EFORMAT;
    /* The bytes are what was written; now is it a file for THIS layer? */
    const uint32_t affine = get_u32(buf + 12), track = get_u32(buf + 16);
    const uint32_t layout = get_u32(buf + 20), reduction = get_u32(buf + 24);
    const double eps = bits_f64(get_u64(buf + 40)), momentum = bits_f64(get_u64(buf + 48));
    const int64_t channels = (int64_t)get_u64(buf + 32), nbt = (int64_t)get_u64(buf + 56);
    if (affine > 1 || track > 1 || layout > SYNCBN_NHWC || reduction > SYNCBN_REPRODUCIBLE ||
        get_u32(buf + 28) != 0 || !(eps > 0) || !isfinite(eps) ||
        !(isnan(momentum) || (momentum >= 0 && momentum <= 1)) || nbt < 0)
        return SYNCBN_EFORMAT;
    if (channels != c->channels || (int)affine != (c->affine != 0) || (int)track != (c->track_running_stats != 0) ||
        get_u64(buf + 64) != float_count(c))
        return SYNCBN_EFORMAT;
    /* Version 2: the element type and the activation are part of the model. */
    if (version >= 2 && (get_u32(buf + 72) != (uint32_t)c->dtype || get_u32(buf + 76) != (uint32_t)c->activation))
        return SYNCBN_EFORMAT;
    return SYNCBN_OK;
}

static int load_file(syncbn_layer *layer, const char *path)
{
    if (!layer || !path)
        return SYNCBN_EINVAL;
    /* The larger of the two versions' sizes, plus one byte, so that a longer file is
     * seen as such; validate() then knows the version and the size it needs. */
    const size_t want = file_size(&layer->cfg, CK_VERSION);
    unsigned char *buf = malloc(want + 1);
    if (!buf)
        return SYNCBN_ENOMEM;
    FILE *f = fopen(path, "rb");
    if (!f) {
        free(buf);
        return SYNCBN_EIO;
    }
    const size_t got = fread(buf, 1, want + 1, f);
    const int read_failed = ferror(f);
    fclose(f);
    if (read_failed) {
        free(buf);
        return SYNCBN_EIO;
    }
    int rc = validate(layer, buf, got);
    if (rc == SYNCBN_OK) {
        float *arr[4];
        const int na = arrays_of(layer, arr);
        const unsigned char *p = buf + header_size(get_u32(buf + 8));
        for (int a = 0; a < na; a++)
            for (int64_t i = 0; i < layer->cfg.channels; i++, p += 4) {
                uint32_t u = get_u32(p);
                memcpy(&arr[a][i], &u, 4);
            }
        layer->num_batches_tracked = (int64_t)get_u64(buf + 56);
        layer->saved = 0; /* the saved batch statistics belong to another state */
    }
    free(buf);
    return rc;
}

/* syncbn_last_error describes save errors too: the layer object is never const
 * itself (syncbn_create allocates it), only the caller's view of it here. */
int syncbn_save(const syncbn_layer *layer, const char *path)
{
    int rc = save_file(layer, path);
    return layer ? sbn_note_file((syncbn_layer *)layer, rc, "save", path) : rc;
}

int syncbn_load(syncbn_layer *layer, const char *path)
{
    int rc = load_file(layer, path);
    return layer ? sbn_note_file(layer, rc, "load", path) : rc;
}
