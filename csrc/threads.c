/* A small pthread pool in which the caller also works (no OpenMP).
 *
 * minilora_parallel_for(nthreads, n, grain, fn, ctx): [0, n) is cut into chunks, each a whole number of
 * `grain`s (the last may be short), about 16 per thread; the caller and nthreads - 1 pool workers claim
 * chunks one at a time and run fn(ctx, tid, begin, end), tid in [0, nthreads) naming the thread (0 = the
 * caller) so that a kernel can give each thread its own scratch. The chunks are fixed by (n, grain,
 * nthreads) and a chunk computes the same thing whichever thread claims it: no result bit depends on
 * scheduling. Claiming (rather than a fixed split) keeps a 2-vCPU machine that is busy with other work
 * from stalling on a descheduled worker: the caller simply runs the chunks that nobody has taken.
 *
 * Why not OpenMP: its default spin-waiting next to OpenBLAS's threads on 2 vCPUs turned a 0.35 ms GEMV
 * into 4-7.5 ms (spec/kernels.md). Workers here spin briefly (~160 microseconds: longer than the Python
 * between two calls of a decode loop, measured 10-15 % faster GEMV bursts than ~60 us) for the next job,
 * then sleep on a condition variable.
 *
 * Safety: a job's chunk counter carries the job's generation, so a worker that wakes late can never
 * claim a chunk of a later job with the earlier job's ctx; the caller returns only when every chunk has
 * finished, so ctx outlives every claimed chunk. Pool threads are created once, on first use, and live
 * until exit (the only allocation in csrc/); after fork() the child starts with an empty pool. One job
 * runs at a time: a call that finds the pool busy (another Python thread) runs all chunks itself.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <string.h>
#include <stdint.h>
#include <unistd.h>
#include "minilora.h"

enum { SPIN_ITERATIONS = 6000 };            /* ~160 us of PAUSE (~26 ns each here), then sleep */
static const int64_t SMALL_WORK = 1 << 18;  /* bytes below which one thread is faster */

struct job {
    void (*fn)(void *ctx, int tid, int64_t begin, int64_t end);
    void *ctx;
    int64_t n, chunk, nchunks;
    int nthreads;
    uint32_t generation;
    unsigned int mxcsr;      /* the caller's floating-point mode (flush-to-zero, denormals-are-zero, ...) */
};

static pthread_mutex_t pool_mu = PTHREAD_MUTEX_INITIALIZER;   /* guards `current` and the condvars */
static pthread_cond_t work_cv = PTHREAD_COND_INITIALIZER;
static pthread_cond_t done_cv = PTHREAD_COND_INITIALIZER;
static pthread_mutex_t call_mu = PTHREAD_MUTEX_INITIALIZER;   /* one job at a time */
static int n_workers;                                        /* pool threads started */
static struct job current;
static atomic_uint generation;                               /* bumped once per job */
static atomic_uint_fast64_t claim;                           /* generation << 32 | next chunk */
static atomic_int_fast64_t finished;                         /* chunks of the current job done */

/* Workers take the caller's SSE/AVX floating-point mode for each job, so that a caller that set
 * flush-to-zero (torch.set_flush_denormal) gets the same bits whatever the thread count. */
static unsigned int fp_mode_get(void)
{
#if defined(__x86_64__)
    return __builtin_ia32_stmxcsr();
#else
    return 0;
#endif
}

static void fp_mode_set(unsigned int mode)
{
#if defined(__x86_64__)
    if (__builtin_ia32_stmxcsr() != mode) __builtin_ia32_ldmxcsr(mode);
#else
    (void)mode;
#endif
}

static void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* Claim and run chunks of job j until none is left; returns after the last one it ran. */
static void run_chunks(const struct job *j, int tid)
{
    for (;;) {
        uint_fast64_t c = atomic_load(&claim);
        if ((uint32_t)(c >> 32) != j->generation || (int64_t)(c & 0xFFFFFFFFu) >= j->nchunks) return;
        if (!atomic_compare_exchange_weak(&claim, &c, c + 1)) continue;
        int64_t i = (int64_t)(c & 0xFFFFFFFFu);
        int64_t begin = i * j->chunk, end = begin + j->chunk < j->n ? begin + j->chunk : j->n;
        j->fn(j->ctx, tid, begin, end);
        if (atomic_fetch_add(&finished, 1) + 1 == j->nchunks) {
            pthread_mutex_lock(&pool_mu);
            pthread_cond_signal(&done_cv);
            pthread_mutex_unlock(&pool_mu);
        }
    }
}

static void *worker_main(void *arg)
{
    int tid = (int)(intptr_t)arg;            /* worker i is thread i + 1 */
    unsigned seen = 0;
    for (;;) {
        for (int spins = 0; atomic_load(&generation) == seen && spins < SPIN_ITERATIONS; spins++) cpu_relax();
        pthread_mutex_lock(&pool_mu);
        while (atomic_load(&generation) == seen) pthread_cond_wait(&work_cv, &pool_mu);
        struct job j = current;
        pthread_mutex_unlock(&pool_mu);
        seen = j.generation;
        if (tid < j.nthreads) {
            fp_mode_set(j.mxcsr);
            run_chunks(&j, tid);
        }
    }
    return NULL;
}

static void reset_after_fork(void)
{
    /* The child has only the forking thread: forget the workers, re-create the locks, and forget a job
     * that another thread of the parent was running at the fork (its chunks and counters are the parent's;
     * a worker started in the child must not pick it up, nor count its chunks into the child's jobs). */
    n_workers = 0;
    memset(&current, 0, sizeof current);
    atomic_store(&generation, 0);
    atomic_store(&claim, 0);
    atomic_store(&finished, 0);
    pthread_mutex_init(&pool_mu, NULL);
    pthread_mutex_init(&call_mu, NULL);
    pthread_cond_init(&work_cv, NULL);
    pthread_cond_init(&done_cv, NULL);
}

/* Start workers until there are `want`; returns how many exist. Called with call_mu held. */
static int ensure_workers(int want)
{
    static int atfork_done;
    if (!atfork_done) {
        pthread_atfork(NULL, NULL, reset_after_fork);
        atfork_done = 1;
    }
    while (n_workers < want) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int rc = pthread_create(&t, &attr, worker_main, (void *)(intptr_t)(n_workers + 1));
        pthread_attr_destroy(&attr);
        if (rc != 0) break;
        n_workers++;
    }
    return n_workers;
}

int minilora_pool_state(uint32_t *gen, int *workers)
{
    if (!gen || !workers) return MINILORA_EINVAL;
    *gen = atomic_load(&generation);
    *workers = n_workers;
    return MINILORA_OK;
}

int minilora_resolve_threads(int nthreads, int64_t work)
{
    if (nthreads > MINILORA_MAX_THREADS) return MINILORA_MAX_THREADS;
    if (nthreads >= 1) return nthreads;
    if (work < SMALL_WORK) return 1;
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    return cpus >= 2 ? 2 : 1;
}

int minilora_parallel_for(int nthreads, int64_t n, int64_t grain,
                          void (*fn)(void *ctx, int tid, int64_t begin, int64_t end), void *ctx)
{
    if (n < 0 || grain < 1 || fn == 0) return MINILORA_EINVAL;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > MINILORA_MAX_THREADS) nthreads = MINILORA_MAX_THREADS;
    int64_t grains = (n + grain - 1) / grain;
    int64_t per_chunk = (grains + 16 * nthreads - 1) / (16 * nthreads);   /* ~16 chunks per thread: a late thread leaves a short tail */
    struct job j = {fn, ctx, n, (per_chunk > 0 ? per_chunk : 1) * grain, 0, nthreads, 0, fp_mode_get()};
    j.nchunks = (n + j.chunk - 1) / j.chunk;
    if (nthreads == 1 || j.nchunks < 2 || pthread_mutex_trylock(&call_mu) != 0) {
        for (int64_t b = 0; b < n; b += j.chunk) fn(ctx, 0, b, b + j.chunk < n ? b + j.chunk : n);
        return MINILORA_OK;
    }
    if (ensure_workers(nthreads - 1) < nthreads - 1) {
        pthread_mutex_unlock(&call_mu);
        for (int64_t b = 0; b < n; b += j.chunk) fn(ctx, 0, b, b + j.chunk < n ? b + j.chunk : n);
        return MINILORA_OK;
    }
    pthread_mutex_lock(&pool_mu);
    j.generation = atomic_load(&generation) + 1;
    if (j.generation == 0) j.generation = 1;                 /* 0 is every worker's "seen nothing yet" */
    current = j;
    atomic_store(&finished, 0);
    atomic_store(&claim, (uint_fast64_t)j.generation << 32);
    atomic_store(&generation, j.generation);
    pthread_cond_broadcast(&work_cv);
    pthread_mutex_unlock(&pool_mu);

    run_chunks(&j, 0);

    for (int spins = 0; atomic_load(&finished) != j.nchunks && spins < SPIN_ITERATIONS; spins++) cpu_relax();
    if (atomic_load(&finished) != j.nchunks) {
        pthread_mutex_lock(&pool_mu);
        while (atomic_load(&finished) != j.nchunks) pthread_cond_wait(&done_cv, &pool_mu);
        pthread_mutex_unlock(&pool_mu);
    }
    pthread_mutex_unlock(&call_mu);
    return MINILORA_OK;
}
