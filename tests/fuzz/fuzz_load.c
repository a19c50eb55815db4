/*
 * fuzz_load.c - libFuzzer target for syncbn_load (built by scripts/check/fuzz.sh with
 * clang -fsanitize=fuzzer,address,undefined straight from the library sources).
 *
 * Each input is written to a file and loaded into four layers of different shapes,
 * dtypes and activations (so that valid-looking files of each size and of both format
 * versions reach the deep checks). Beyond "no crash, no sanitizer report", two
 * properties are checked and abort on violation:
 *   - a failed load leaves the layer's arrays and num_batches_tracked bitwise as they were;
 *   - a successful load followed by syncbn_save reproduces the input's state bytes
 *     (offset 56 up to the CRC: num_batches_tracked, K and the arrays) exactly; the
 *     save is always version 2, so a version-1 input's arrays move 8 bytes on, behind
 *     the layer's dtype and activation.
 * Each input is also tried with its CRC recomputed, so that the field checks behind
 * the CRC are explored too.
 *
 * MPI: syncbn_create needs MPI, so LLVMFuzzerInitialize calls MPI_Init once as a
 * singleton (no mpirun) and the layers live on MPI_COMM_SELF for the whole run.
 */
#define _POSIX_C_SOURCE 200809L

#include <math.h>
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zlib.h>

#include "syncbn.h"

#define NLAYERS 4
static syncbn_layer *layers[NLAYERS];
static char in_path[256], out_path[256];

static size_t snapshot(syncbn_layer *l, unsigned char *buf)
{
    syncbn_config c;
    syncbn_get_config(l, &c);
    size_t len = 0, arr = (size_t)c.channels * sizeof(float);
    float *a[4] = {syncbn_weight(l), syncbn_bias(l), syncbn_running_mean(l), syncbn_running_var(l)};
    for (int k = 0; k < 4; k++)
        if (a[k])
            memcpy(buf + len, a[k], arr), len += arr;
    int64_t nbt = syncbn_num_batches_tracked(l);
    memcpy(buf + len, &nbt, 8);
    return len + 8;
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    int provided;
    MPI_Init_thread(argc, argv, MPI_THREAD_SINGLE, &provided);
    const char *dir = getenv("SYNCBN_FUZZ_TMP") ? getenv("SYNCBN_FUZZ_TMP") : "/tmp";
    snprintf(in_path, sizeof in_path, "%s/syncbn_fuzz_in.%ld", dir, (long)getpid());
    snprintf(out_path, sizeof out_path, "%s/syncbn_fuzz_out.%ld", dir, (long)getpid());
    syncbn_config cfg[NLAYERS] = {syncbn_config_default(3), syncbn_config_default(2), syncbn_config_default(1),
                                  syncbn_config_default(3)};
    cfg[1].track_running_stats = 0;
    cfg[2].affine = 0, cfg[2].track_running_stats = 0, cfg[2].momentum = NAN;
    cfg[3].dtype = SYNCBN_BF16, cfg[3].activation = SYNCBN_ACT_RELU; /* shape of layer 0 */
    for (int k = 0; k < NLAYERS; k++)
        if (syncbn_create(&cfg[k], MPI_COMM_SELF, &layers[k]) != SYNCBN_OK)
            abort();
    /* Distinctive state, so that a partial write by a failed load would show. */
    for (int k = 0; k < NLAYERS; k++)
        for (int c = 0; syncbn_weight(layers[k]) && c < (k == 1 ? 2 : 3); c++)
            syncbn_weight(layers[k])[c] = 0.5f + (float)c, syncbn_bias(layers[k])[c] = -1.0f - (float)c;
    return 0;
}

/* Runs one file image through all layers. */
static void check_one(const uint8_t *data, size_t size)
{
    FILE *f = fopen(in_path, "wb");
    if (!f)
        abort();
    if (size && fwrite(data, 1, size, f) != size)
        abort();
    fclose(f);
    for (int k = 0; k < NLAYERS; k++) {
        unsigned char before[64], after[64], saved[256];
        const size_t len = snapshot(layers[k], before);
        const int rc = syncbn_load(layers[k], in_path);
        if (rc != SYNCBN_OK) {
            if (rc != SYNCBN_EFORMAT)
                abort(); /* a readable file is either good or EFORMAT */
            if (snapshot(layers[k], after) != len || memcmp(before, after, len) != 0)
                abort(); /* failed load changed the layer */
            continue;
        }
        if (syncbn_save(layers[k], out_path) != SYNCBN_OK)
            abort();
        FILE *g = fopen(out_path, "rb");
        size_t got = g ? fread(saved, 1, sizeof saved, g) : 0;
        if (g)
            fclose(g);
        /* load + save must reproduce the state bytes */
        const uint32_t version = data[8]; /* a loaded file has version 1 or 2 */
        if (version == 2) {
            if (got != size || memcmp(saved + 56, data + 56, size - 56 - 4) != 0)
                abort();
        } else {
            syncbn_config c;
            syncbn_get_config(layers[k], &c);
            const unsigned char tail[8] = {(unsigned char)c.dtype, 0, 0, 0, (unsigned char)c.activation, 0, 0, 0};
            if (version != 1 || got != size + 8 || memcmp(saved + 56, data + 56, 16) != 0 ||
                memcmp(saved + 72, tail, 8) != 0 || memcmp(saved + 80, data + 72, size - 72 - 4) != 0)
                abort();
        }
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    check_one(data, size);
    /* Random bytes almost never carry a valid CRC-32, which would keep the fuzzer
     * away from every check behind it; so also try the input with its CRC fixed. */
    if (size >= 76 && size <= 4096) {
        uint8_t *copy = malloc(size);
        memcpy(copy, data, size);
        const uint32_t crc = (uint32_t)crc32(0L, copy, (uInt)(size - 4));
        for (int k = 0; k < 4; k++)
            copy[size - 4 + k] = (uint8_t)(crc >> (8 * k));
        check_one(copy, size);
        free(copy);
    }
    return 0;
}
