/*
 * train_util.h - small helpers for the syncbn-train example: rank-0 printing,
 * abort-on-error macros, allocation, a seeded RNG, wall-clock time and SHA-256.
 *
 * Examples may print and exit; the library may not. Everything that prints here
 * prints on rank 0 only (train_log0), except train_die which names the rank.
 * What it does not do: any numerics of the model (see train_layers.h).
 */
#ifndef TRAIN_UTIL_H
#define TRAIN_UTIL_H

#include <stddef.h>
#include <stdint.h>

/* Set once after MPI_Init; used by the printing helpers. */
extern int train_rank;
extern int train_nranks;

/* printf on rank 0 only, flushed (output may be a pipe under CI). */
void train_log0(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Prints "syncbn-train: error: ..." on the calling rank and aborts the MPI job. */
void train_die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));

void *train_malloc(size_t bytes);  /* zeroed; dies on failure */
double train_now(void);            /* seconds, monotonic */

/* splitmix64: tiny, seedable, identical on every rank for the same seed. */
typedef struct { uint64_t s; } train_rng;
void train_rng_seed(train_rng *r, uint64_t seed, uint64_t purpose);
uint64_t train_rng_u64(train_rng *r);
double train_rng_uniform(train_rng *r);               /* [0, 1) with 53 random bits */
uint64_t train_rng_below(train_rng *r, uint64_t n);    /* [0, n), unbiased */

/* SHA-256 (FIPS 180-4). */
typedef struct {
    uint32_t h[8];
    uint64_t len;      /* bytes hashed so far */
    uint8_t buf[64];
    size_t fill;       /* bytes in buf */
} train_sha256;
void train_sha256_init(train_sha256 *c);
void train_sha256_update(train_sha256 *c, const void *data, size_t n);
void train_sha256_final(train_sha256 *c, uint8_t out[32]);
/* hex: 65 chars incl. NUL */
void train_sha256_hex(const uint8_t digest[32], char hex[65]);

#endif /* TRAIN_UTIL_H */
