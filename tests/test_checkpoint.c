/*
 * test_checkpoint.c - syncbn_save / syncbn_load: bitwise round trips, and every way a
 * file can be wrong (truncated at every length, any single bit flipped, another
 * version or shape with a valid CRC, unreadable, unwritable) answered with the right
 * code and the layer left exactly as it was. Also: a failed save leaves the previous
 * file intact. Format version 2 records dtype and activation: round trips for
 * f32/bf16 x none/relu, files of another dtype or activation rejected, and version-1
 * files (built here byte by byte from the documented layout) still loading into
 * layers of every dtype and activation.
 *
 * Checkpoints are not collective; under mpirun every rank works in its own temporary
 * directory, while the training forwards in between are collective as usual.
 */
#define _POSIX_C_SOURCE 200809L

#include <dirent.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include "syncbn.h"
#include "testutil.h"

#define EXPECT_CODE(call, code)                                                                     \
    do {                                                                                            \
        int rc_ = (call);                                                                           \
        TU_EXPECT(rc_ == (code), "%s returned %s, expected %s", #call, syncbn_strerror(rc_),      \
                  syncbn_strerror(code));                                                          \
    } while (0)

/* ---- helpers ---- */

static char tmpdir[64];

static void make_tmpdir(void)
{
    strcpy(tmpdir, "/tmp/syncbn_ckpt_XXXXXX");
    TU_EXPECT(mkdtemp(tmpdir) != NULL, "mkdtemp failed");
}

/* Removes every file in tmpdir and tmpdir itself. */
static void remove_tmpdir(void)
{
    DIR *d = opendir(tmpdir);
    if (d) {
        struct dirent *e;
        char p[512];
        while ((e = readdir(d)) != NULL) {
            if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
                continue;
            snprintf(p, sizeof p, "%s/%s", tmpdir, e->d_name);
            chmod(p, 0700);
            if (unlink(p) != 0)
                rmdir(p);
        }
        closedir(d);
    }
    rmdir(tmpdir);
}

/* Number of entries in tmpdir whose name contains `part`. */
static int count_entries(const char *part)
{
    int k = 0;
    DIR *d = opendir(tmpdir);
    if (!d)
        return -1;
    struct dirent *e;
    while ((e = readdir(d)) != NULL)
        k += strstr(e->d_name, part) != NULL;
    closedir(d);
    return k;
}

static char *in_tmp(char *buf, size_t len, const char *name)
{
    snprintf(buf, len, "%s/%s", tmpdir, name);
    return buf;
}

static unsigned char *read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    *len = 0;
    if (!f)
        return NULL;
    unsigned char *buf = malloc(1 << 20);
    *len = fread(buf, 1, 1 << 20, f);
    fclose(f);
    return buf;
}

static void write_file(const char *path, const unsigned char *buf, size_t len)
{
    FILE *f = fopen(path, "wb");
    TU_EXPECT(f != NULL, "cannot write %s", path);
    if (f) {
        TU_EXPECT(fwrite(buf, 1, len, f) == len, "short write");
        fclose(f);
    }
}

static void put_u32(unsigned char *p, uint32_t v)
{
    for (int k = 0; k < 4; k++)
        p[k] = (unsigned char)(v >> (8 * k));
}

/* Recomputes the trailing CRC after a deliberate edit, so only the edit is wrong. */
static void fix_crc(unsigned char *buf, size_t len)
{
    put_u32(buf + len - 4, (uint32_t)crc32(0L, buf, (uInt)(len - 4)));
}

static void put_u64(unsigned char *p, uint64_t v)
{
    for (int k = 0; k < 8; k++)
        p[k] = (unsigned char)(v >> (8 * k));
}

static uint32_t get_u32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* Header sizes of the two versions (checkpoint.c: H). */
#define V1_HEADER 72
#define V2_HEADER 80


/* Rank-dependent input of n samples for a layer with C channels and S positions. */
static float *make_x(int64_t n, int64_t C, int64_t S, uint64_t salt)
{
    float *x = malloc((size_t)(n * C * S + 1) * sizeof *x);
    for (int64_t e = 0; e < n * C * S; e++)
        x[e] = (float)(3 + 2 * tu_normal(salt * 1000003u + (uint64_t)tu_rank * 7919u + (uint64_t)e));
    return x;
}

/* make_x in the layer's element type: float, or bfloat16 bit patterns (the float's
 * upper half, rounded to nearest-even; the data are finite). Free the result. */
static void *make_x_as(syncbn_dtype dtype, int64_t n, int64_t C, int64_t S, uint64_t salt)
{
    float *x = make_x(n, C, S, salt);
    if (dtype != SYNCBN_BF16)
        return x;
    uint16_t *h = malloc((size_t)(n * C * S + 1) * sizeof *h);
    for (int64_t e = 0; e < n * C * S; e++) {
        uint32_t u;
        memcpy(&u, &x[e], 4);
        h[e] = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
    free(x);
    return h;
}

/* A layer with non-trivial state: `steps` training forwards (collective), then
 * weight and bias set to values that differ per channel. Any dtype and activation
 * (the forwards go through syncbn_forward_ex). */
static syncbn_layer *trained_layer(syncbn_config cfg, int steps)
{
    syncbn_layer *l = NULL;
    EXPECT_CODE(syncbn_create(&cfg, MPI_COMM_WORLD, &l), SYNCBN_OK);
    if (!l)
        return NULL;
    const int64_t n = 3, S = 5, C = cfg.channels;
    float *y = malloc((size_t)(n * C * S) * sizeof *y);
    for (int s = 0; s < steps; s++) {
        void *x = make_x_as(cfg.dtype, n, C, S, (uint64_t)s + 1);
        EXPECT_CODE(syncbn_forward_ex(l, x, NULL, n, S, 1, y), SYNCBN_OK);
        free(x);
    }
    if (syncbn_weight(l))
        for (int64_t c = 0; c < C; c++)
            syncbn_weight(l)[c] = 0.5f + 0.25f * (float)c, syncbn_bias(l)[c] = -0.125f * (float)c;
    free(y);
    return l;
}

/* ---- round trips ---- */

static void roundtrip(syncbn_config cfg)
{
    char path[256];
    in_tmp(path, sizeof path, "rt.ckpt");
    syncbn_layer *a = trained_layer(cfg, 3), *b = NULL;
    EXPECT_CODE(syncbn_create(&cfg, MPI_COMM_WORLD, &b), SYNCBN_OK);
    EXPECT_CODE(syncbn_save(a, path), SYNCBN_OK);
    EXPECT_CODE(syncbn_load(b, path), SYNCBN_OK);
    tu_image ia = tu_take_image(a), ib = tu_take_image(b);
    TU_EXPECT(tu_same_image(ia, ib), "state after load differs from the saved layer");
    TU_EXPECT(syncbn_num_batches_tracked(b) == 3, "num_batches_tracked %lld",
              (long long)syncbn_num_batches_tracked(b));
    TU_EXPECT(count_entries(".tmp.") == 0, "temporary file left behind");

    /* Same input through both: identical output and identical state afterwards. */
    const int64_t n = 2, S = 5, C = cfg.channels;
    float *x = make_x(n, C, S, 99), *ya = malloc((size_t)(n * C * S) * 4), *yb = malloc((size_t)(n * C * S) * 4);
    EXPECT_CODE(syncbn_forward(a, x, n, S, 0, ya), SYNCBN_OK);
    EXPECT_CODE(syncbn_forward(b, x, n, S, 0, yb), SYNCBN_OK);
    TU_EXPECT(memcmp(ya, yb, (size_t)(n * C * S) * 4) == 0, "eval forward after load differs");
    EXPECT_CODE(syncbn_forward(a, x, n, S, 1, ya), SYNCBN_OK);
    EXPECT_CODE(syncbn_forward(b, x, n, S, 1, yb), SYNCBN_OK);
    TU_EXPECT(memcmp(ya, yb, (size_t)(n * C * S) * 4) == 0, "training forward after load differs");
    free(ia.bytes), free(ib.bytes);
    ia = tu_take_image(a), ib = tu_take_image(b);
    TU_EXPECT(tu_same_image(ia, ib), "state after a training step differs");

    /* A load invalidates the statistics saved for backward, even from the same layer. */
    EXPECT_CODE(syncbn_load(b, path), SYNCBN_OK);
    EXPECT_CODE(syncbn_backward(b, x, x, n, S, ya, NULL, NULL), SYNCBN_ESTATE);
    free(ia.bytes), free(ib.bytes), free(x), free(ya), free(yb);
    syncbn_destroy(b);
    syncbn_destroy(a);
    unlink(path);
}

START_TEST(roundtrip_configs)
{
    make_tmpdir();
    syncbn_config cfg = syncbn_config_default(5);
    roundtrip(cfg);
    cfg.momentum = NAN; /* cumulative average: num_batches_tracked matters after load */
    roundtrip(cfg);
    cfg = syncbn_config_default(7);
    cfg.affine = 0;
    cfg.layout = SYNCBN_NHWC;
    roundtrip(cfg);
    cfg = syncbn_config_default(3);
    cfg.track_running_stats = 0;
    roundtrip(cfg);
    cfg.affine = 0; /* nothing but the header and num_batches_tracked */
    roundtrip(cfg);
    cfg = syncbn_config_default(4);
    cfg.reduction = SYNCBN_REPRODUCIBLE;
    roundtrip(cfg);
    remove_tmpdir();
    tu_verdict();
}
END_TEST

/* Overwriting an existing checkpoint, and NaN payloads kept bit for bit. */
START_TEST(overwrite_and_nan)
{
    make_tmpdir();
    char path[256];
    in_tmp(path, sizeof path, "ow.ckpt");
    syncbn_config cfg = syncbn_config_default(2);
    syncbn_layer *a = trained_layer(cfg, 1), *b = NULL;
    EXPECT_CODE(syncbn_create(&cfg, MPI_COMM_WORLD, &b), SYNCBN_OK);
    EXPECT_CODE(syncbn_save(b, path), SYNCBN_OK); /* fresh state first */
    union { uint32_t u; float f; } odd = {0x7fc01234u};
    syncbn_weight(a)[1] = odd.f;
    EXPECT_CODE(syncbn_save(a, path), SYNCBN_OK); /* replaces it */
    EXPECT_CODE(syncbn_load(b, path), SYNCBN_OK);
    tu_image ia = tu_take_image(a), ib = tu_take_image(b);
    TU_EXPECT(tu_same_image(ia, ib), "overwritten checkpoint does not hold the new state");
    free(ia.bytes), free(ib.bytes);
    syncbn_destroy(a), syncbn_destroy(b);
    remove_tmpdir();
    tu_verdict();
}
END_TEST

/* eps, momentum, layout and reduction are hyperparameters: they need not match. */
START_TEST(hyperparameters_need_not_match)
{
    make_tmpdir();
    char path[256];
    in_tmp(path, sizeof path, "hp.ckpt");
    syncbn_config cfg = syncbn_config_default(4), other = cfg;
    other.eps = 1e-3, other.momentum = 0.5, other.layout = SYNCBN_NHWC, other.reduction = SYNCBN_REPRODUCIBLE;
    syncbn_layer *a = trained_layer(cfg, 2), *b = NULL;
    EXPECT_CODE(syncbn_create(&other, MPI_COMM_WORLD, &b), SYNCBN_OK);
    EXPECT_CODE(syncbn_save(a, path), SYNCBN_OK);
    EXPECT_CODE(syncbn_load(b, path), SYNCBN_OK);
    tu_image ia = tu_take_image(a), ib = tu_take_image(b);
    TU_EXPECT(tu_same_image(ia, ib), "state not loaded across hyperparameters");
    syncbn_config got;
    syncbn_get_config(b, &got);
    TU_EXPECT(got.eps == 1e-3 && got.momentum == 0.5 && got.layout == SYNCBN_NHWC &&
                  got.reduction == SYNCBN_REPRODUCIBLE,
              "load changed the layer's own configuration");
    free(ia.bytes), free(ib.bytes);
    syncbn_destroy(a), syncbn_destroy(b);
    remove_tmpdir();
    tu_verdict();
}
END_TEST

/* ---- rejected files: code, and the layer unchanged ---- */

/* Loads `path` into l expecting `code`; checks nothing changed and that the saved
 * training statistics still serve a backward (one is pending, see callers). */
static void expect_rejected(syncbn_layer *l, tu_image before, const char *path, int code, const char *what, long at)
{
    int rc = syncbn_load(l, path);
    TU_EXPECT(rc == code, "%s (%ld): load returned %s, expected %s", what, at, syncbn_strerror(rc),
              syncbn_strerror(code));
    tu_image now = tu_take_image(l);
    TU_EXPECT(tu_same_image(before, now), "%s (%ld): failed load changed the layer", what, at);
    free(now.bytes);
}

START_TEST(corrupt_files)
{
    make_tmpdir();
    char good[256], bad[256];
    in_tmp(good, sizeof good, "good.ckpt");
    in_tmp(bad, sizeof bad, "bad.ckpt");
    syncbn_config cfg = syncbn_config_default(3);
    syncbn_layer *src = trained_layer(cfg, 2);
    syncbn_layer *l = trained_layer(cfg, 1);
    syncbn_weight(l)[0] = 42.0f; /* differs from src, so a partial load would show */
    EXPECT_CODE(syncbn_save(src, good), SYNCBN_OK);
    size_t len;
    unsigned char *ok = read_file(good, &len);
    TU_EXPECT(ok && len == V2_HEADER + 4 * 12 + 4, "unexpected file size %zu", len);
    unsigned char *buf = malloc(len + 16);

    /* A training forward whose statistics must survive every failed load. */
    const int64_t n = 2, S = 5;
    float *x = make_x(n, 3, S, 7), *y = malloc(sizeof(float) * 30), *dx = malloc(sizeof(float) * 30);
    EXPECT_CODE(syncbn_forward(l, x, n, S, 1, y), SYNCBN_OK);
    tu_image before = tu_take_image(l);

    /* truncated at every length, 0 .. len-1 */
    for (size_t t = 0; t < len; t++) {
        write_file(bad, ok, t);
        expect_rejected(l, before, bad, SYNCBN_EFORMAT, "truncated", (long)t);
    }
    /* one byte too many */
    memcpy(buf, ok, len);
    buf[len] = 0;
    write_file(bad, buf, len + 1);
    expect_rejected(l, before, bad, SYNCBN_EFORMAT, "extended", (long)len + 1);
    /* every single-bit flip, every byte including the CRC */
    for (size_t i = 0; i < len; i++)
        for (int bit = 0; bit < 8; bit++) {
            memcpy(buf, ok, len);
            buf[i] ^= (unsigned char)(1u << bit);
            write_file(bad, buf, len);
            expect_rejected(l, before, bad, SYNCBN_EFORMAT, "bit flip", (long)(i * 8 + (size_t)bit));
        }

    /* Well-formed files (valid CRC) that are still wrong. Offsets as in checkpoint.c. */
    struct { size_t off; uint32_t val; const char *what; } edits[] = {
        {8, 1, "version 1 (a version-2 body)"}, {8, 3, "version 3"}, {8, 0, "version 0"},
        {0, 0x4e4e5953u, "magic"}, {72, 1, "dtype bf16"}, {72, 2, "dtype 2"},
        {76, 1, "activation relu"}, {76, 2, "activation 2"}, {72, 0x100u, "dtype high bits"},
        {12, 2, "affine flag 2"}, {16, 7, "track flag 7"}, {20, 2, "layout 2"},
        {24, 9, "reduction 9"},  {28, 1, "reserved"},    {32, 4, "channels 4"},
        {36, 1, "channels high"}, {44, 0xfff80000u, "eps NaN"}, {44, 0xbff00000u, "eps -1"},
        {44, 0x7ff00000u, "eps +Inf"}, {52, 0x40000000u, "momentum 2"}, {52, 0xbff00000u, "momentum -1"},
        {60, 0x80000000u, "num_batches_tracked < 0"}, {64, 11, "float count"},
    };
    for (size_t k = 0; k < sizeof edits / sizeof edits[0]; k++) {
        memcpy(buf, ok, len);
        put_u32(buf + edits[k].off, edits[k].val);
        if (edits[k].off == 44) /* low half of the double too, for exact NaN/Inf/-1 */
            put_u32(buf + 40, 0);
        if (edits[k].off == 52)
            put_u32(buf + 48, 0);
        fix_crc(buf, len);
        write_file(bad, buf, len);
        expect_rejected(l, before, bad, SYNCBN_EFORMAT, edits[k].what, (long)k);
    }
    /* momentum NaN is valid (cumulative average) and need not match: accepted */
    memcpy(buf, ok, len);
    put_u32(buf + 48, 0), put_u32(buf + 52, 0x7ff80000u);
    fix_crc(buf, len);
    write_file(bad, buf, len);
    EXPECT_CODE(syncbn_load(src, bad), SYNCBN_OK);

    /* Nothing above consumed the pending training statistics. */
    EXPECT_CODE(syncbn_backward(l, x, x, n, S, dx, NULL, NULL), SYNCBN_OK);
    free(before.bytes), free(ok), free(buf), free(x), free(y), free(dx);
    syncbn_destroy(l), syncbn_destroy(src);
    remove_tmpdir();
    tu_verdict();
}
END_TEST

/* Files of another shape: channels, affine, track; including one of the same size. */
START_TEST(wrong_shape)
{
    make_tmpdir();
    char path[256];
    in_tmp(path, sizeof path, "shape.ckpt");
    syncbn_config base = syncbn_config_default(4);
    syncbn_layer *l = trained_layer(base, 1);
    tu_image before = tu_take_image(l);
    syncbn_config others[5];
    for (int k = 0; k < 5; k++)
        others[k] = base;
    others[0].channels = 3;
    others[1].channels = 5;
    others[2].affine = 0;
    others[3].track_running_stats = 0;
    others[4].channels = 8, others[4].affine = 0, others[4].track_running_stats = 1; /* 16 floats, like base */
    for (int k = 0; k < 5; k++) {
        syncbn_layer *o = trained_layer(others[k], 1);
        EXPECT_CODE(syncbn_save(o, path), SYNCBN_OK);
        expect_rejected(l, before, path, SYNCBN_EFORMAT, "other shape", k);
        syncbn_destroy(o);
    }
    free(before.bytes);
    syncbn_destroy(l);
    remove_tmpdir();
    tu_verdict();
}
END_TEST

/* ---- version 2: dtype and activation ---- */

static const syncbn_dtype dtypes[2] = {SYNCBN_F32, SYNCBN_BF16};
static const syncbn_activation acts[2] = {SYNCBN_ACT_NONE, SYNCBN_ACT_RELU};

/* Save + load for every dtype x activation: the file says version 2 with the layer's
 * dtype and activation at offsets 72 and 76, the state comes back bit for bit, and the
 * loaded layer computes the same eval and training outputs as the saved one. */
START_TEST(v2_roundtrip_dtype_activation)
{
    make_tmpdir();
    char path[256];
    in_tmp(path, sizeof path, "v2.ckpt");
    for (int d = 0; d < 2; d++)
        for (int a = 0; a < 2; a++) {
            syncbn_config cfg = syncbn_config_default(5);
            cfg.dtype = dtypes[d], cfg.activation = acts[a];
            cfg.reduction = a ? SYNCBN_REPRODUCIBLE : SYNCBN_FAST;
            syncbn_layer *src = trained_layer(cfg, 3), *dst = NULL;
            EXPECT_CODE(syncbn_create(&cfg, MPI_COMM_WORLD, &dst), SYNCBN_OK);
            EXPECT_CODE(syncbn_save(src, path), SYNCBN_OK);
            size_t len;
            unsigned char *bytes = read_file(path, &len);
            TU_EXPECT(bytes && len == V2_HEADER + 4 * 20 + 4, "dtype %d act %d: file size %zu", d, a, len);
            if (bytes && len >= V2_HEADER)
                TU_EXPECT(get_u32(bytes + 8) == 2 && get_u32(bytes + 72) == (uint32_t)dtypes[d] &&
                              get_u32(bytes + 76) == (uint32_t)acts[a],
                          "dtype %d act %d: header says version %u dtype %u activation %u", d, a,
                          get_u32(bytes + 8), get_u32(bytes + 72), get_u32(bytes + 76));
            free(bytes);
            EXPECT_CODE(syncbn_load(dst, path), SYNCBN_OK);
            tu_image is = tu_take_image(src), id = tu_take_image(dst);
            TU_EXPECT(tu_same_image(is, id), "dtype %d act %d: state after load differs", d, a);
            free(is.bytes), free(id.bytes);

            const int64_t n = 2, S = 5, C = cfg.channels, bytes_y = n * C * S * (d ? 2 : 4);
            void *x = make_x_as(cfg.dtype, n, C, S, 77);
            unsigned char *ys = malloc((size_t)bytes_y), *yd = malloc((size_t)bytes_y);
            for (int training = 0; training < 2; training++) {
                EXPECT_CODE(syncbn_forward_ex(src, x, NULL, n, S, training, ys), SYNCBN_OK);
                EXPECT_CODE(syncbn_forward_ex(dst, x, NULL, n, S, training, yd), SYNCBN_OK);
                TU_EXPECT(memcmp(ys, yd, (size_t)bytes_y) == 0, "dtype %d act %d: %s forward after load differs", d,
                          a, training ? "training" : "eval");
            }
            free(x), free(ys), free(yd);
            syncbn_destroy(src), syncbn_destroy(dst);
        }
    unlink(path);
    remove_tmpdir();
    tu_verdict();
}
END_TEST

/* A version-2 file of another dtype or activation (same shape, same size): EFORMAT,
 * the layer unchanged, and a pending backward still served. */
START_TEST(v2_dtype_activation_mismatch)
{
    make_tmpdir();
    char path[256];
    in_tmp(path, sizeof path, "mm.ckpt");
    for (int d = 0; d < 2; d++)
        for (int a = 0; a < 2; a++) {
            syncbn_config cfg = syncbn_config_default(4);
            cfg.dtype = dtypes[d], cfg.activation = acts[a];
            syncbn_layer *l = trained_layer(cfg, 2);
            const int64_t n = 2, S = 5, esize = d ? 2 : 4;
            void *x = make_x_as(cfg.dtype, n, 4, S, 5), *dy = make_x_as(cfg.dtype, n, 4, S, 6);
            void *y = malloc((size_t)(n * 4 * S * esize)), *dx = malloc((size_t)(n * 4 * S * esize));
            EXPECT_CODE(syncbn_forward_ex(l, x, NULL, n, S, 1, y), SYNCBN_OK);
            tu_image before = tu_take_image(l);
            for (int d2 = 0; d2 < 2; d2++)
                for (int a2 = 0; a2 < 2; a2++) {
                    if (d2 == d && a2 == a)
                        continue;
                    syncbn_config other = cfg;
                    other.dtype = dtypes[d2], other.activation = acts[a2];
                    syncbn_layer *o = trained_layer(other, 1);
                    EXPECT_CODE(syncbn_save(o, path), SYNCBN_OK);
                    expect_rejected(l, before, path, SYNCBN_EFORMAT, d2 != d ? "other dtype" : "other activation",
                                    d * 8 + a * 4 + d2 * 2 + a2);
                    syncbn_destroy(o);
                }
            float dw[4], db[4];
            EXPECT_CODE(syncbn_backward_ex(l, x, dy, n, S, dx, NULL, dw, db), SYNCBN_OK);
            free(before.bytes), free(x), free(dy), free(y), free(dx);
            syncbn_destroy(l);
        }
    unlink(path);
    remove_tmpdir();
    tu_verdict();
}
END_TEST

/* A version-1 file, written here field by field as the format of syncbn <= 0.2
 * defines it (checkpoint.c: offsets 0..71, arrays at 72, CRC-32 of all before it). */
static size_t v1_file(unsigned char *buf, size_t cap, int64_t C, int affine, int track, int64_t nbt,
                      const float *arrays)
{
    const uint64_t K = (uint64_t)C * (uint64_t)(2 * affine + 2 * track);
    if (K > (cap - V1_HEADER - 4) / 4)
        return 0;
    memcpy(buf, "SYNCBNCK", 8);
    put_u32(buf + 8, 1);                     /* version */
    put_u32(buf + 12, (uint32_t)affine);
    put_u32(buf + 16, (uint32_t)track);
    put_u32(buf + 20, SYNCBN_NHWC);          /* layout: need not match */
    put_u32(buf + 24, SYNCBN_REPRODUCIBLE);  /* reduction: need not match */
    put_u32(buf + 28, 0);                    /* reserved */
    put_u64(buf + 32, (uint64_t)C);
    put_u64(buf + 40, 0x3f50624dd2f1a9fcull); /* eps 1e-3 */
    put_u64(buf + 48, 0x3fe0000000000000ull); /* momentum 0.5 */
    put_u64(buf + 56, (uint64_t)nbt);
    put_u64(buf + 64, K);
    for (uint64_t i = 0; i < K; i++) {
        uint32_t u;
        memcpy(&u, &arrays[i], 4);
        put_u32(buf + V1_HEADER + 4 * i, u);
    }
    const size_t body = V1_HEADER + 4 * (size_t)K;
    put_u32(buf + body, (uint32_t)crc32(crc32(0L, Z_NULL, 0), buf, (uInt)body));
    return body + 4;
}

START_TEST(v1_files_still_load)
{
    make_tmpdir();
    char path[256];
    in_tmp(path, sizeof path, "v1.ckpt");
    const int64_t C = 3;
    float arrays[12];
    for (int i = 0; i < 12; i++)
        arrays[i] = 0.375f * (float)i - 1.5f; /* weight, bias, running_mean, running_var */
    arrays[9] = 0.5f, arrays[10] = 2.0f, arrays[11] = 1.25f; /* positive running_var */
    unsigned char buf[V1_HEADER + 4 * 12 + 4];
    const size_t cap = sizeof buf;
    struct { int affine, track, nf; } shapes[] = {{1, 1, 12}, {1, 0, 6}, {0, 1, 6}, {0, 0, 0}};
    for (size_t k = 0; k < sizeof shapes / sizeof shapes[0]; k++) {
        /* arrays in file order: weight bias (if affine), mean var (if track) */
        const float *src = shapes[k].affine ? arrays : arrays + 6;
        const size_t len = v1_file(buf, cap, C, shapes[k].affine, shapes[k].track, 17 + (int64_t)k, src);
        TU_EXPECT(len == V1_HEADER + 4 * (size_t)shapes[k].nf + 4, "v1 file size %zu", len);
        write_file(path, buf, len);
        for (int d = 0; d < 2; d++)
            for (int a = 0; a < 2; a++) {
                syncbn_config cfg = syncbn_config_default(C);
                cfg.affine = shapes[k].affine, cfg.track_running_stats = shapes[k].track;
                cfg.dtype = dtypes[d], cfg.activation = acts[a];
                syncbn_layer *l = NULL;
                EXPECT_CODE(syncbn_create(&cfg, MPI_COMM_WORLD, &l), SYNCBN_OK);
                if (!l)
                    continue;
                EXPECT_CODE(syncbn_load(l, path), SYNCBN_OK);
                const float *want = src;
                float *got[4] = {syncbn_weight(l), syncbn_bias(l), syncbn_running_mean(l), syncbn_running_var(l)};
                for (int g = 0; g < 4; g++)
                    if (got[g]) {
                        TU_EXPECT(memcmp(got[g], want, (size_t)C * 4) == 0, "v1 shape %zu dtype %d act %d: array %d",
                                  k, d, a, g);
                        want += C;
                    }
                TU_EXPECT(syncbn_num_batches_tracked(l) == 17 + (int64_t)k, "v1: num_batches_tracked %lld",
                          (long long)syncbn_num_batches_tracked(l));
                syncbn_config got_cfg;
                syncbn_get_config(l, &got_cfg);
                TU_EXPECT(got_cfg.dtype == dtypes[d] && got_cfg.activation == acts[a] && got_cfg.eps == 1e-5 &&
                              got_cfg.layout == SYNCBN_NCHW,
                          "v1 load changed the layer's configuration");
                /* and the layer works: a training forward */
                void *x = make_x_as(cfg.dtype, 2, C, 5, 3), *y = malloc((size_t)(2 * C * 5 * 4));
                EXPECT_CODE(syncbn_forward_ex(l, x, NULL, 2, 5, 1, y), SYNCBN_OK);
                free(x), free(y);
                /* a re-save is version 2 and loads back to the same state */
                syncbn_layer *l2 = NULL;
                EXPECT_CODE(syncbn_create(&cfg, MPI_COMM_WORLD, &l2), SYNCBN_OK);
                char p2[256];
                in_tmp(p2, sizeof p2, "v1resave.ckpt");
                EXPECT_CODE(syncbn_save(l, p2), SYNCBN_OK);
                EXPECT_CODE(syncbn_load(l2, p2), SYNCBN_OK);
                tu_image i1 = tu_take_image(l), i2 = tu_take_image(l2);
                TU_EXPECT(tu_same_image(i1, i2), "v1 -> v2 re-save does not round trip");
                free(i1.bytes), free(i2.bytes);
                unlink(p2);
                syncbn_destroy(l2), syncbn_destroy(l);
            }
    }
    /* A version-1 file of another shape is still rejected, the layer unchanged. */
    syncbn_config cfg = syncbn_config_default(4);
    cfg.activation = SYNCBN_ACT_RELU;
    syncbn_layer *l = trained_layer(cfg, 1);
    tu_image before = tu_take_image(l);
    write_file(path, buf, v1_file(buf, cap, C, 1, 1, 1, arrays));
    expect_rejected(l, before, path, SYNCBN_EFORMAT, "v1 other channels", 0);
    /* ... and so is one with a bad CRC, or a version-1 header on a version-2 body. */
    size_t len = v1_file(buf, cap, C, 1, 1, 1, arrays);
    syncbn_layer *l3 = trained_layer(syncbn_config_default(3), 1);
    tu_image before3 = tu_take_image(l3);
    buf[len - 1] ^= 1;
    write_file(path, buf, len);
    expect_rejected(l3, before3, path, SYNCBN_EFORMAT, "v1 bad CRC", 0);
    buf[len - 1] ^= 1;
    /* v1 bytes with version 2 written in: 8 bytes short of a version-2 file */
    put_u32(buf + 8, 2);
    fix_crc(buf, len);
    write_file(path, buf, len);
    expect_rejected(l3, before3, path, SYNCBN_EFORMAT, "version 2 on a version-1 body", 0);
    free(before.bytes), free(before3.bytes);
    syncbn_destroy(l), syncbn_destroy(l3);
    unlink(path);
    remove_tmpdir();
    tu_verdict();
}
END_TEST

/* ---- I/O failures ---- */

START_TEST(io_errors)
{
    make_tmpdir();
    char path[256], sub[128], file_as_dir[128];
    syncbn_config cfg = syncbn_config_default(3);
    syncbn_layer *l = trained_layer(cfg, 1);
    tu_image before = tu_take_image(l);

    EXPECT_CODE(syncbn_save(NULL, "x"), SYNCBN_EINVAL);
    EXPECT_CODE(syncbn_save(l, NULL), SYNCBN_EINVAL);
    EXPECT_CODE(syncbn_load(NULL, "x"), SYNCBN_EINVAL);
    EXPECT_CODE(syncbn_load(l, NULL), SYNCBN_EINVAL);

    /* missing file, a directory, a missing directory */
    expect_rejected(l, before, in_tmp(path, sizeof path, "missing.ckpt"), SYNCBN_EIO, "missing", 0);
    expect_rejected(l, before, tmpdir, SYNCBN_EIO, "directory", 0);
    EXPECT_CODE(syncbn_save(l, in_tmp(path, sizeof path, "no/such/dir.ckpt")), SYNCBN_EIO);
    EXPECT_CODE(syncbn_save(l, tmpdir), SYNCBN_EIO); /* target is a directory */
    /* a regular file used as a directory */
    in_tmp(file_as_dir, sizeof file_as_dir, "plain");
    write_file(file_as_dir, (const unsigned char *)"x", 1);
    snprintf(path, sizeof path, "%s/x.ckpt", file_as_dir);
    EXPECT_CODE(syncbn_save(l, path), SYNCBN_EIO);
    /* a directory nobody may write to: /proc refuses new files even to root */
    EXPECT_CODE(syncbn_save(l, "/proc/syncbn_test.ckpt"), SYNCBN_EIO);
    /* and a read-only directory of ours (permissions do not bind root, so only then) */
    in_tmp(sub, sizeof sub, "ro");
    mkdir(sub, 0500);
    snprintf(path, sizeof path, "%s/x.ckpt", sub);
    if (geteuid() != 0)
        EXPECT_CODE(syncbn_save(l, path), SYNCBN_EIO);
    rmdir(sub);
    /* unreadable file (again not binding root) */
    in_tmp(path, sizeof path, "noread.ckpt");
    EXPECT_CODE(syncbn_save(l, path), SYNCBN_OK);
    chmod(path, 0);
    if (geteuid() != 0)
        expect_rejected(l, before, path, SYNCBN_EIO, "unreadable", 0);
    TU_EXPECT(count_entries(".tmp.") == 0, "temporary file left behind");
    free(before.bytes);
    syncbn_destroy(l);
    remove_tmpdir();
    tu_verdict();
}
END_TEST

/* A save that fails half-way (the file-size limit stands in for a full disk) leaves
 * the previous checkpoint complete and loadable, and no temporary file. */
START_TEST(atomic_save)
{
    make_tmpdir();
    char path[256];
    in_tmp(path, sizeof path, "atomic.ckpt");
    syncbn_config cfg = syncbn_config_default(64);
    syncbn_layer *old = trained_layer(cfg, 1), *newer = trained_layer(cfg, 4), *check = NULL;
    EXPECT_CODE(syncbn_create(&cfg, MPI_COMM_WORLD, &check), SYNCBN_OK);
    EXPECT_CODE(syncbn_save(old, path), SYNCBN_OK);
    size_t len0;
    unsigned char *bytes0 = read_file(path, &len0);

    struct rlimit saved, small;
    getrlimit(RLIMIT_FSIZE, &saved);
    small = saved;
    small.rlim_cur = 100; /* the file needs 72 + 4*256 + 4 bytes */
    void (*prev)(int) = signal(SIGXFSZ, SIG_IGN); /* EFBIG instead of a signal */
    TU_EXPECT(setrlimit(RLIMIT_FSIZE, &small) == 0, "setrlimit");
    int rc = syncbn_save(newer, path);
    setrlimit(RLIMIT_FSIZE, &saved);
    signal(SIGXFSZ, prev);
    TU_EXPECT(rc == SYNCBN_EIO, "save past the size limit returned %s", syncbn_strerror(rc));

    size_t len1;
    unsigned char *bytes1 = read_file(path, &len1);
    TU_EXPECT(bytes0 && bytes1 && len0 == len1 && memcmp(bytes0, bytes1, len0) == 0,
              "failed save changed the previous file");
    TU_EXPECT(count_entries(".tmp.") == 0, "temporary file left behind");
    EXPECT_CODE(syncbn_load(check, path), SYNCBN_OK);
    tu_image io = tu_take_image(old), ic = tu_take_image(check);
    TU_EXPECT(tu_same_image(io, ic), "previous checkpoint no longer loads to the previous state");
    free(io.bytes), free(ic.bytes), free(bytes0), free(bytes1);
    syncbn_destroy(old), syncbn_destroy(newer), syncbn_destroy(check);
    remove_tmpdir();
    tu_verdict();
}
END_TEST

static Suite *make_suite(void)
{
    Suite *s = suite_create("checkpoint");
    TCase *tc = tcase_create("checkpoint");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, roundtrip_configs);
    tcase_add_test(tc, overwrite_and_nan);
    tcase_add_test(tc, hyperparameters_need_not_match);
    tcase_add_test(tc, corrupt_files);
    tcase_add_test(tc, wrong_shape);
    tcase_add_test(tc, v2_roundtrip_dtype_activation);
    tcase_add_test(tc, v2_dtype_activation_mismatch);
    tcase_add_test(tc, v1_files_still_load);
    tcase_add_test(tc, io_errors);
    tcase_add_test(tc, atomic_save);
    suite_add_tcase(s, tc);
    return s;
}

int main(int argc, char **argv) { return tu_main(argc, argv, make_suite); }
