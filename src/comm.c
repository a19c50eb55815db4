/* comm.c - shared private communicators and the agreement-word encoding (see comm.h). */
#include "comm.h"

#include <stdlib.h>

#include "syncbn.h"

static int comm_keyval = MPI_KEYVAL_INVALID;
static int comm_live = 0; /* sbn_comm records alive; the keyval is freed with the last */

static void comm_unref(sbn_comm *c)
{
    if (--c->refs == 0) {
        MPI_Comm_free(&c->inner);
        free(c);
        comm_live--;
    }
}

/* Not from inside the delete callback: only once MPI is done with the attribute. */
static void keyval_release_if_unused(void)
{
    if (comm_live == 0 && comm_keyval != MPI_KEYVAL_INVALID)
        MPI_Comm_free_keyval(&comm_keyval);
}

/* Called by MPI when the user frees `outer` or we delete the attribute. */
static int comm_delete_fn(MPI_Comm outer, int keyval, void *attr, void *extra)
{
    (void)outer, (void)keyval, (void)extra;
    sbn_comm *c = attr;
    c->cached = 0;
    comm_unref(c);
    return MPI_SUCCESS;
}

sbn_comm *sbn_comm_acquire(MPI_Comm outer, int *err)
{
    *err = SYNCBN_EMPI;
    if (comm_keyval == MPI_KEYVAL_INVALID &&
        MPI_Comm_create_keyval(MPI_COMM_NULL_COPY_FN, comm_delete_fn, &comm_keyval, NULL) != MPI_SUCCESS)
        return NULL;

    sbn_comm *c = NULL;
    int found = 0;
    if (MPI_Comm_get_attr(outer, comm_keyval, &c, &found) != MPI_SUCCESS)
        return NULL;
    if (found) {
        c->refs++;
        *err = SYNCBN_OK;
        return c;
    }

    /* Duplicate before allocating: every rank must take part in MPI_Comm_dup even
     * if its own allocation is about to fail, or the others would hang. */
    MPI_Comm inner;
    if (MPI_Comm_dup(outer, &inner) != MPI_SUCCESS)
        return NULL;
    c = calloc(1, sizeof *c);
    if (!c) {
        MPI_Comm_free(&inner);
        *err = SYNCBN_ENOMEM;
        return NULL;
    }
    c->inner = inner;
    comm_live++;
    MPI_Comm_set_errhandler(c->inner, MPI_ERRORS_RETURN);
    c->outer = outer;
    c->refs = 2; /* the caller's and the attribute's */
    c->cached = 1;
    if (MPI_Comm_set_attr(outer, comm_keyval, c) != MPI_SUCCESS) {
        c->refs = 1;
        comm_unref(c);
        keyval_release_if_unused();
        return NULL;
    }
    *err = SYNCBN_OK;
    return c;
}

void sbn_comm_release(sbn_comm *c)
{
    if (!c)
        return;
    if (c->refs == 2 && c->cached) {
        /* Last layer gone: detach from the user's communicator; its delete
         * callback drops the attribute's reference. */
        c->refs--;
        MPI_Comm_delete_attr(c->outer, comm_keyval);
    } else {
        comm_unref(c);
    }
    keyval_release_if_unused();
}

/* ---- agreement words ---- */

void sbn_agree_put_f64(double *w, uint64_t v)
{
    for (int k = 0; k < 4; k++) {
        double p = (double)((v >> (16 * k)) & 0xffffu);
        w[2 * k] = p;
        w[2 * k + 1] = p * p;
    }
}

void sbn_agree_put_i64(int64_t *w, uint64_t v)
{
    for (int k = 0; k < 4; k++) {
        int64_t p = (int64_t)((v >> (16 * k)) & 0xffffu);
        w[2 * k] = p;
        w[2 * k + 1] = p * p;
    }
}

/* All P pieces equal iff P*sum(p^2) == (sum p)^2; both sides fit unsigned __int128. */
static int agree_piece(uint64_t s1, uint64_t s2, int nranks)
{
    return (unsigned __int128)s2 * (unsigned)nranks == (unsigned __int128)s1 * s1;
}

int sbn_agree_ok_f64(const double *w, int nranks)
{
    for (int k = 0; k < 4; k++)
        if (!agree_piece((uint64_t)w[2 * k], (uint64_t)w[2 * k + 1], nranks))
            return 0;
    return 1;
}

int sbn_agree_ok_i64(const int64_t *w, int nranks)
{
    for (int k = 0; k < 4; k++)
        if (!agree_piece((uint64_t)w[2 * k], (uint64_t)w[2 * k + 1], nranks))
            return 0;
    return 1;
}
