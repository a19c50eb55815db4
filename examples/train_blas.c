/*
 * train_blas.c - see train_blas.h.
 */
#include "train_blas.h"

#include <cblas.h>
#include <errno.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "train_util.h"

// Set by the process that re-executes, read (and removed) by the new image:
// "pin", "auto:<core OpenBLAS had chosen>" or "simulate" (see SIMULATE below).
#define MARKER "SYNCBN_BLAS_REEXEC"
// Testing hook: behave as if OpenBLAS had not recognised the CPU and chosen this
// core by itself, so that the automatic upgrade can be tested on any machine.
#define SIMULATE "SYNCBN_BLAS_SIMULATE_FALLBACK"

static char pin[64];        // the pinned core name, or ""
static char how[160];       // why this core runs: shown in the header
static char pin_error[256]; // set when a pin did not take effect

// Instruction-set level of an OpenBLAS core's kernels: 4 AVX-512, 3 AVX2+FMA, 2 AVX,
// 1 anything older. Names are those of openblas_get_corename() (0.3.21 and later).
static int core_level(const char *core) {
    static const char *const avx512[] = {"SkylakeX", "Cooperlake", "SapphireRapids"};
    static const char *const avx2[] = {"Haswell", "Zen", "Excavator"};
    static const char *const avx[] = {"Sandybridge", "Bulldozer", "Piledriver", "Steamroller"};
    for (size_t i = 0; i < sizeof avx512 / sizeof *avx512; i++) if (strcasecmp(core, avx512[i]) == 0) return 4;
    for (size_t i = 0; i < sizeof avx2 / sizeof *avx2; i++) if (strcasecmp(core, avx2[i]) == 0) return 3;
    for (size_t i = 0; i < sizeof avx / sizeof *avx; i++) if (strcasecmp(core, avx[i]) == 0) return 2;
    return 1;
}

// The widest level this CPU and OS support (GCC's checks include the OS's XSAVE
// state for AVX and AVX-512), and the OpenBLAS core that uses it.
static int cpu_level(void) {
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
        return 4;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 3;
    if (__builtin_cpu_supports("avx")) return 2;
#endif
    return 1;
}
static const char *const level_core[] = {"", "Prescott", "Sandybridge", "Haswell", "SkylakeX"};

static void reexec(char **argv, const char *coretype, const char *marker) {
    if (setenv("OPENBLAS_CORETYPE", coretype, 1) != 0 || setenv(MARKER, marker, 1) != 0)
        train_die("setenv: %s", strerror(errno));
    fflush(NULL);
    execv("/proc/self/exe", argv);
    execvp(argv[0], argv); // no /proc: try the name we were started with
    train_die("cannot re-execute %s to set OPENBLAS_CORETYPE=%s: %s (set it yourself, or use --blas-core)", argv[0],
              coretype, strerror(errno));
}

void train_blas_select(int argc, char **argv) {
    const char *opt = NULL;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--blas-core") == 0 && i + 1 < argc) opt = argv[i + 1];
        else if (strncmp(argv[i], "--blas-core=", 12) == 0) opt = argv[i] + 12;
    }
    const char *source = "--blas-core";
    if (!opt) {
        opt = getenv("SYNCBN_BLAS_CORE");
        source = "SYNCBN_BLAS_CORE";
    }
    if (opt && *opt) snprintf(pin, sizeof pin, "%s", opt);

    char marker[64] = "";
    if (getenv(MARKER)) snprintf(marker, sizeof marker, "%s", getenv(MARKER));
    unsetenv(MARKER); // not inherited by anything this process starts
    const char *core = openblas_get_corename();

    if (*pin) {
        if (strcasecmp(core, pin) == 0) {
            snprintf(how, sizeof how, "pinned by %s", source);
            return;
        }
        if (strcmp(marker, "pin") != 0) reexec(argv, pin, "pin");
        snprintf(pin_error, sizeof pin_error,
                 "the pinned OpenBLAS core '%s' did not take effect: OpenBLAS runs '%s' (an unknown name, or kernels "
                 "this CPU cannot run; names: Prescott, Sandybridge, Haswell, Zen, SkylakeX, Cooperlake)", pin, core);
        return;
    }
    const char *simulate = getenv(SIMULATE);
    if (simulate && *simulate && !*marker) reexec(argv, simulate, "simulate");
    unsetenv(SIMULATE);
    if (getenv("OPENBLAS_CORETYPE") && strcmp(marker, "simulate") != 0) {
        if (strncmp(marker, "auto:", 5) == 0)
            snprintf(how, sizeof how, "auto: OpenBLAS chose %s, the CPU runs %s", marker + 5, core);
        else
            snprintf(how, sizeof how, "OPENBLAS_CORETYPE=%s", getenv("OPENBLAS_CORETYPE"));
        return;
    }
    int want = cpu_level();
    if (core_level(core) < want) {
        char m[64];
        snprintf(m, sizeof m, "auto:%s", core);
        reexec(argv, level_core[want], m);
    }
    snprintf(how, sizeof how, "OpenBLAS's choice");
}

void train_blas_check(void) {
    if (*pin_error) train_die("%s", pin_error);
    char mine[64] = {0}, *all = train_malloc(sizeof mine * (size_t)train_nranks);
    snprintf(mine, sizeof mine, "%s", openblas_get_corename());
    MPI_Allgather(mine, sizeof mine, MPI_CHAR, all, sizeof mine, MPI_CHAR, MPI_COMM_WORLD);
    int same = 1;
    for (int r = 1; r < train_nranks; r++) same &= strcmp(all, all + sizeof mine * r) == 0;
    if (!same) {
        if (train_rank == 0) {
            char list[1024] = "";
            size_t len = 0;
            for (int r = 0; r < train_nranks && len + 1 < sizeof list; r++)
                len += (size_t)snprintf(list + len, sizeof list - len, "%srank %d %s", r ? ", " : "", r,
                                        all + sizeof mine * r);
            train_die("the ranks run different OpenBLAS cores (%s), so the result would depend on which rank "
                      "computes what; pin one core on all ranks, e.g. --blas-core Haswell (any AVX2 or AVX-512 "
                      "CPU runs it) or SYNCBN_BLAS_CORE=Haswell", list);
        }
        MPI_Barrier(MPI_COMM_WORLD); // rank 0 aborts the job
    }
    free(all);
}

const char *train_blas_core(void) {
    static char s[128];
    // "OpenBLAS 0.3.21 NO_LAPACKE DYNAMIC_ARCH ...": the first two words
    char name[16] = "OpenBLAS", version[32] = "?";
    sscanf(openblas_get_config(), "%15s %31s", name, version);
    snprintf(s, sizeof s, "%s %s, core %s", name, version, openblas_get_corename());
    return s;
}

const char *train_blas_describe(void) {
    static char s[320];
    snprintf(s, sizeof s, "%s (%s)", train_blas_core(), how);
    return s;
}
