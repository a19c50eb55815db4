/*
 * train_main.c - syncbn-train: data-parallel training of a small CNN with
 * synchronized batch normalization on Fashion-MNIST.
 *
 * Every rank loads the whole data set and draws the same seeded shuffle; each
 * step takes the next B indices of it (the global batch) and rank r keeps the
 * contiguous slice [r*b/P, (r+1)*b/P) of them, uneven when P does not divide b.
 * With --reduction reproducible (default) the losses and the final parameters
 * are bitwise identical for any number of ranks; the last lines print a SHA-256
 * of the parameters so that runs can be compared with grep.
 *
 * Before MPI_Init it settles which OpenBLAS kernels run (train_blas.h), since the
 * hash depends on them; the header and every hash line name them.
 *
 * What it does not do: data augmentation, learning-rate schedules beyond a linear
 * warm-up, or any I/O on ranks other than 0 (except error messages and reading the
 * data).
 */
#include <cblas.h>
#include <getopt.h>
#include <math.h>
#include <mpi.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "train_blas.h"
#include "train_data.h"
#include "train_model.h"
#include "train_util.h"

typedef struct {
    const char *data_dir;
    int epochs;
    int64_t batch;
    float lr, momentum, wd;
    int64_t warmup;     /* steps of linear learning-rate warm-up */
    uint64_t seed;
    int64_t max_steps;  /* 0: no limit */
    int bn_mode, reduction;
    int fused;          /* 0 with --unfused: plain BN layers, the ReLU in the pooling */
    const char *save, *resume, *log;
    int64_t save_every;
    int64_t train_limit, test_limit; /* 0: whole split */
    int64_t print_every;
    int eval;
    double timeout;     /* --timeout: seconds a BN call waits for the other ranks */
    int64_t quit_at;    /* --quit-at: test hook, 0 = off */
} options;

static void usage(void) {
    train_log0(
        "usage: mpirun -np P syncbn-train [options]\n"
        "  --data DIR            Fashion-MNIST directory (default " TRAIN_DATA_DEFAULT_DIR ")\n"
        "  --epochs N            epochs (default 3)\n"
        "  --batch B             global batch size (default 128)\n"
        "  --lr X                learning rate (default 0.05)\n"
        "  --warmup N            raise the learning rate linearly over the first N steps (default 30)\n"
        "  --momentum X          SGD momentum (default 0.9)\n"
        "  --wd X                weight decay (default 0)\n"
        "  --seed N              seed of the initialization and the shuffle (default 42)\n"
        "  --steps N             stop after global step N (default: no limit)\n"
        "  --bn sync|local       synchronized BN, or plain per-rank BN (default sync)\n"
        "  --reduction reproducible|fast   exact sums (default) or plain float sums\n"
        "  --unfused             plain BN layers and the ReLU after them in the example's pooling,\n"
        "                        instead of the BN layers' fused ReLU (same results, for comparison)\n"
        "  --save PATH           write a checkpoint at the end (and every --save-every steps)\n"
        "  --save-every N        checkpoint period in steps (default 0: only at the end)\n"
        "  --resume PATH         continue from a checkpoint (same --seed and --batch)\n"
        "  --log PATH            CSV of per-step loss (step,epoch,loss), written by rank 0\n"
        "  --train-limit N       use only the first N training images\n"
        "  --test-limit N        evaluate on the first N test images only\n"
        "  --print-every N       progress line period in steps (default 50)\n"
        "  --no-eval             skip the test-set evaluation\n"
        "  --blas-core NAME      run these OpenBLAS kernels on every rank, e.g. Haswell (also SYNCBN_BLAS_CORE);\n"
        "                        default: OpenBLAS's choice, or the widest the CPU runs if OpenBLAS chose older\n"
        "  --timeout SECONDS     a synchronized BN call that waits longer for the other ranks\n"
        "                        ends the job with a message (default 600; 0 = wait forever)\n"
        "  --quit-at N           (for tests) the last rank leaves the training loop before\n"
        "                        step N, as a rank with a bug would\n");
}

static int64_t parse_int(const char *opt, const char *s, int64_t lo) {
    char *end;
    long long v = strtoll(s, &end, 10);
    if (*s == 0 || *end != 0 || v < lo) train_die("%s: expected an integer >= %lld, got '%s'", opt, (long long)lo, s);
    return v;
}
static float parse_float(const char *opt, const char *s) {
    char *end;
    double v = strtod(s, &end);
    if (*s == 0 || *end != 0 || !isfinite(v) || v < 0) train_die("%s: expected a number >= 0, got '%s'", opt, s);
    return (float)v;
}

static options parse_options(int argc, char **argv) {
    options o = {.data_dir = TRAIN_DATA_DEFAULT_DIR, .epochs = 3, .batch = 128, .lr = 0.05f, .momentum = 0.9f,
                 .wd = 0.0f, .warmup = 30, .seed = 42, .bn_mode = TRAIN_BN_SYNC, .reduction = TRAIN_REPRODUCIBLE,
                 .print_every = 50, .eval = 1, .timeout = 600, .fused = 1};
    static const struct option longopts[] = {
        {"data", 1, 0, 'd'},        {"epochs", 1, 0, 'e'},     {"batch", 1, 0, 'b'},       {"lr", 1, 0, 'l'},
        {"momentum", 1, 0, 'm'},    {"wd", 1, 0, 'w'},         {"seed", 1, 0, 's'},        {"steps", 1, 0, 'n'},
        {"bn", 1, 0, 'B'},          {"reduction", 1, 0, 'R'},  {"save", 1, 0, 'S'},        {"resume", 1, 0, 'r'},
        {"log", 1, 0, 'L'},         {"save-every", 1, 0, 'E'}, {"train-limit", 1, 0, 'T'}, {"test-limit", 1, 0, 't'},
        {"print-every", 1, 0, 'p'}, {"no-eval", 0, 0, 'N'},    {"help", 0, 0, 'h'},        {"warmup", 1, 0, 'W'},
        {"blas-core", 1, 0, 'C'},   {"timeout", 1, 0, 'O'},    {"quit-at", 1, 0, 'Q'},     {"unfused", 0, 0, 'U'},
        {0, 0, 0, 0}};
    int c;
    opterr = 0;
    while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (c) {
        case 'd': o.data_dir = optarg; break;
        case 'e': o.epochs = (int)parse_int("--epochs", optarg, 1); break;
        case 'b': o.batch = parse_int("--batch", optarg, 2); break;
        case 'l': o.lr = parse_float("--lr", optarg); break;
        case 'm': o.momentum = parse_float("--momentum", optarg); break;
        case 'w': o.wd = parse_float("--wd", optarg); break;
        case 's': o.seed = (uint64_t)parse_int("--seed", optarg, 0); break;
        case 'n': o.max_steps = parse_int("--steps", optarg, 1); break;
        case 'B':
            if (strcmp(optarg, "sync") == 0) o.bn_mode = TRAIN_BN_SYNC;
            else if (strcmp(optarg, "local") == 0) o.bn_mode = TRAIN_BN_LOCAL;
            else train_die("--bn: expected sync or local, got '%s'", optarg);
            break;
        case 'R':
            if (strcmp(optarg, "reproducible") == 0) o.reduction = TRAIN_REPRODUCIBLE;
            else if (strcmp(optarg, "fast") == 0) o.reduction = TRAIN_FAST;
            else train_die("--reduction: expected reproducible or fast, got '%s'", optarg);
            break;
        case 'S': o.save = optarg; break;
        case 'r': o.resume = optarg; break;
        case 'L': o.log = optarg; break;
        case 'E': o.save_every = parse_int("--save-every", optarg, 1); break;
        case 'T': o.train_limit = parse_int("--train-limit", optarg, 1); break;
        case 't': o.test_limit = parse_int("--test-limit", optarg, 1); break;
        case 'p': o.print_every = parse_int("--print-every", optarg, 1); break;
        case 'N': o.eval = 0; break;
        case 'W': o.warmup = parse_int("--warmup", optarg, 0); break;
        case 'C': break; // acted on before MPI_Init, by train_blas_select
        case 'O': o.timeout = parse_float("--timeout", optarg); break;
        case 'Q': o.quit_at = parse_int("--quit-at", optarg, 1); break;
        case 'U': o.fused = 0; break;
        case 'h': usage(); MPI_Finalize(); exit(0);
        default:
            usage();
            train_die("unknown or incomplete option '%s'", argv[optind - 1]);
        }
    }
    if (optind < argc) train_die("unexpected argument '%s'", argv[optind]);
    return o;
}

static train_dataset load_split(const char *dir, const char *split, int64_t limit) {
    train_dataset ds;
    char err[8192];
    if (train_dataset_load(&ds, dir, split, err, sizeof err) != 0) train_die("%s", err);
    if (limit > 0 && limit < ds.n) ds.n = limit;
    return ds;
}

// (p/255 - mean)/std for every byte value, so every rank normalizes identically.
static float pixel_table[256];
static void normalize(float *out, const uint8_t *img) {
    for (int i = 0; i < TRAIN_IMG_PIXELS; i++) out[i] = pixel_table[img[i]];
}

static void shuffle(int32_t *perm, int64_t n, uint64_t seed, int64_t epoch) {
    train_rng rng;
    train_rng_seed(&rng, seed, 1000 + (uint64_t)epoch); // one stream per epoch: resumable
    for (int64_t i = 0; i < n; i++) perm[i] = (int32_t)i;
    for (int64_t i = n - 1; i > 0; i--) { // Fisher-Yates
        int64_t j = (int64_t)train_rng_below(&rng, (uint64_t)i + 1);
        int32_t t = perm[i]; perm[i] = perm[j]; perm[j] = t;
    }
}

// Test accuracy: each rank evaluates its own shard, correct counts are summed.
static double evaluate(train_model *m, const train_dataset *test, float *xbuf) {
    int64_t lo = test->n * train_rank / train_nranks, hi = test->n * (train_rank + 1) / train_nranks;
    int64_t correct = 0;
    for (int64_t a = lo; a < hi; a += m->cap) {
        int64_t k = hi - a < m->cap ? hi - a : m->cap;
        for (int64_t s = 0; s < k; s++) normalize(xbuf + s * TRAIN_IMG_PIXELS, test->images + (a + s) * TRAIN_IMG_PIXELS);
        correct += train_model_correct(m, xbuf, test->labels + a, k);
    }
    int64_t total = 0;
    MPI_Allreduce(&correct, &total, 1, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD);
    return (double)total / (double)test->n;
}

int main(int argc, char **argv) {
    train_blas_select(argc, argv); // may re-execute the program: before MPI_Init
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &train_rank);
    MPI_Comm_size(MPI_COMM_WORLD, &train_nranks);
    train_blas_check();
    // Parallelism comes from ranks; one BLAS thread also keeps OpenBLAS's results
    // independent of its threading. The BN kernels get one OpenMP thread per rank too
    // unless OMP_NUM_THREADS asks otherwise: started by hand without it, every rank
    // ran one thread per core, which spun in libgomp and made training 2-3x slower.
    openblas_set_num_threads(1);
    if (!getenv("OMP_NUM_THREADS")) omp_set_num_threads(1);
    options o = parse_options(argc, argv);
    for (int i = 0; i < 256; i++) pixel_table[i] = ((float)i / 255.0f - TRAIN_PIXEL_MEAN) / TRAIN_PIXEL_STD;

    train_dataset train = load_split(o.data_dir, "train", o.train_limit);
    train_dataset test = load_split(o.data_dir, "t10k", o.test_limit);
    if (o.batch > train.n) train_die("--batch %lld exceeds the %lld training images", (long long)o.batch, (long long)train.n);
    if (o.bn_mode == TRAIN_BN_LOCAL && o.batch < train_nranks)
        train_die("--bn local needs at least one sample per rank (batch %lld, %d ranks)", (long long)o.batch,
                  train_nranks);

    // capacity: the largest slice any rank can get, and a chunk for evaluation
    int64_t cap = (o.batch + train_nranks - 1) / train_nranks;
    if (cap < 64) cap = 64;
    train_model m;
    train_bn_timeout = o.timeout;
    train_bn_fused = o.fused;
    train_model_init(&m, o.seed, o.bn_mode, o.reduction, cap, MPI_COMM_WORLD);

    int64_t steps_per_epoch = (train.n + o.batch - 1) / o.batch; // the last batch may be smaller
    int64_t total_steps = steps_per_epoch * o.epochs;
    if (o.max_steps > 0 && o.max_steps < total_steps) total_steps = o.max_steps;
    int64_t step = 0;
    char err[8192];
    if (o.resume) {
        if (train_model_load(&m, o.resume, &step, o.seed, o.batch, err, sizeof err) != 0) train_die("%s", err);
        train_log0("resumed from %s at step %lld\n", o.resume, (long long)step);
    }

    train_log0("syncbn-train: %d rank%s, batch %lld, %lld steps/epoch, %lld steps, bn %s (relu %s), reduction %s, "
               "lr %g (warm-up %lld steps) momentum %g wd %g seed %llu, %lld train / %lld test images\n"
               "syncbn-train: %s\n",
               train_nranks, train_nranks == 1 ? "" : "s", (long long)o.batch, (long long)steps_per_epoch,
               (long long)total_steps, o.bn_mode == TRAIN_BN_SYNC ? "sync" : "local",
               o.fused ? "fused into BN" : "unfused, --unfused",
               o.reduction == TRAIN_REPRODUCIBLE ? "reproducible" : "fast", o.lr, (long long)o.warmup, o.momentum,
               o.wd, (unsigned long long)o.seed, (long long)train.n, (long long)test.n, train_blas_describe());

    FILE *logf = NULL;
    if (o.log && train_rank == 0) {
        logf = fopen(o.log, o.resume ? "a" : "w");
        if (!logf) train_die("cannot open --log %s", o.log);
        if (!o.resume) fprintf(logf, "step,epoch,loss\n");
    }

    int32_t *perm = train_malloc(sizeof(int32_t) * (size_t)train.n);
    int64_t perm_epoch = -1;
    float *xbuf = train_malloc(sizeof(float) * (size_t)(cap * TRAIN_IMG_PIXELS));
    uint8_t *lbuf = train_malloc((size_t)cap);
    train_sha256 loss_hash;
    train_sha256_init(&loss_hash);

    double t_train = 0.0, t_window = train_now();
    int64_t images = 0, window_images = 0;
    double last_acc = -1.0;
    for (; step < total_steps; step++) {
        if (step + 1 == o.quit_at && train_rank == train_nranks - 1 && train_nranks > 1) {
            fprintf(stderr, "syncbn-train: rank %d leaves the training loop before step %lld (--quit-at)\n",
                    train_rank, (long long)o.quit_at);
            break; // and waits in the final MPI_Gather; the others' next BN call times out
        }
        int64_t epoch = step / steps_per_epoch, k = step % steps_per_epoch;
        if (epoch != perm_epoch) {
            shuffle(perm, train.n, o.seed, epoch);
            perm_epoch = epoch;
        }
        double t0 = train_now();
        // this step's global batch is perm[k*B, k*B + b); our slice of it is [lo, hi)
        int64_t base = k * o.batch;
        int64_t b = train.n - base < o.batch ? train.n - base : o.batch;
        int64_t lo = b * train_rank / train_nranks, hi = b * (train_rank + 1) / train_nranks;
        // per-rank BN needs a sample on every rank, in the last (smaller) batch too
        if (o.bn_mode == TRAIN_BN_LOCAL && b < train_nranks)
            train_die("--bn local: step %lld has %lld samples for %d ranks; choose --batch or --train-limit so "
                      "that every batch has at least one sample per rank", (long long)step + 1, (long long)b,
                      train_nranks);
        for (int64_t s = lo; s < hi; s++) {
            int32_t idx = perm[base + s];
            normalize(xbuf + (s - lo) * TRAIN_IMG_PIXELS, train.images + (int64_t)idx * TRAIN_IMG_PIXELS);
            lbuf[s - lo] = train.labels[idx];
        }
        double loss = train_model_step(&m, xbuf, lbuf, hi - lo, b);
        // warm-up: the first steps' large, uncalibrated gradients at the full rate
        // overshoot (the loss jumped from 2.3 to about 7 without it)
        float lr = step < o.warmup ? o.lr * (float)(step + 1) / (float)o.warmup : o.lr;
        train_model_sgd(&m, lr, o.momentum, o.wd);
        double dt = train_now() - t0;
        t_train += dt;
        images += b;
        window_images += b;
        train_sha256_update(&loss_hash, &loss, sizeof loss);
        if (!isfinite(loss)) train_die("loss is %g at step %lld", loss, (long long)step + 1);
        if (logf) fprintf(logf, "%lld,%lld,%.17g\n", (long long)step + 1, (long long)epoch + 1, loss);
        if ((step + 1) % o.print_every == 0 || step + 1 == total_steps) {
            double now = train_now();
            train_log0("epoch %lld step %lld/%lld loss %.6f %.0f images/s\n", (long long)epoch + 1,
                       (long long)k + 1, (long long)steps_per_epoch, loss, window_images / (now - t_window));
            t_window = now;
            window_images = 0;
        }
        if (o.save && o.save_every > 0 && (step + 1) % o.save_every == 0 && step + 1 < total_steps)
            if (train_model_save(&m, o.save, step + 1, o.seed, o.batch, err, sizeof err) != 0) train_die("%s", err);
        if (o.eval && k + 1 == steps_per_epoch) {
            last_acc = evaluate(&m, &test, xbuf);
            train_log0("epoch %lld test accuracy %.4f\n", (long long)epoch + 1, last_acc);
            t_window = train_now(); // evaluation is not training throughput
        }
    }
    if (logf) fclose(logf);
    if (o.eval && (last_acc < 0.0 || total_steps % steps_per_epoch != 0)) {
        last_acc = evaluate(&m, &test, xbuf);
        train_log0("final test accuracy %.4f\n", last_acc);
    }
    if (t_train > 0.0)
        train_log0("throughput %.0f images/s (%lld images in %.2f s of training steps, %d rank%s)\n", images / t_train,
                   (long long)images, t_train, train_nranks, train_nranks == 1 ? "" : "s");
    if (o.save) {
        if (train_model_save(&m, o.save, step, o.seed, o.batch, err, sizeof err) != 0) train_die("%s", err);
        train_log0("saved checkpoint %s at step %lld\n", o.save, (long long)step);
    }

    // every rank hashes its own copy; rank 0 reports whether they agree
    char hex[65];
    train_model_hash(&m, hex);
    char *all = train_rank == 0 ? train_malloc((size_t)65 * train_nranks) : NULL;
    MPI_Gather(hex, 65, MPI_CHAR, all, 65, MPI_CHAR, 0, MPI_COMM_WORLD);
    if (train_rank == 0) {
        int agree = 1;
        for (int r = 1; r < train_nranks; r++) agree &= memcmp(all, all + 65 * r, 65) == 0;
        uint8_t d[32];
        char lhex[65];
        train_sha256_final(&loss_hash, d);
        train_sha256_hex(d, lhex);
        train_log0("ranks agree on parameters: %s\n", agree ? "yes" : "NO (expected only with --bn local)");
        train_log0("losses sha256 %s  (%s)\n", lhex, train_blas_core());
        train_log0("params sha256 %s  (%s)\n", hex, train_blas_core());
        free(all);
    }
    free(perm);
    free(xbuf);
    free(lbuf);
    train_model_free(&m);
    train_dataset_free(&train);
    train_dataset_free(&test);
    MPI_Finalize();
    return 0;
}
