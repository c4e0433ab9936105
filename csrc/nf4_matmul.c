/* NF4-weight matmul: the scalar reference, the AVX2 GEMV (M = 1) and the dispatchers (the AVX-512F GEMV
 * is in nf4_gemv_avx512.c, the GEMM in nf4_gemm.c).
 *
 *   y[m, n] = sum_k x[m, k] * w[n, k],   w[n, k] = float32(NF4[code(n*K + k)] * absmax[(n*K + k) / bs])
 *
 * x (M, K) float32 row-major; y (M, N) float32 row-major; W (N, K) packed as bitsandbytes stores it:
 * row-major flat, byte i = code[2i] << 4 | code[2i+1] (element 2i in the HIGH nibble), one float32
 * absmax per `bs` consecutive flat elements. K % bs == 0 is required, so row n holds blocks
 * [n*K/bs, (n+1)*K/bs) and starts on byte n*K/2.
 *
 * Accumulation is float32; each variant sums in its own order, so results agree within the derived
 * bound |y - y_exact| <= gamma_K * (|x| @ |w|^T), gamma_K = K*u/(1 - K*u), u = 2^-24 (spec: STYLE.md):
 *   _ref:  one running sum per output, k ascending (depth K).
 *   GEMV:  per block, 4 x 8 lane partial sums of NF4[code] * x (FMA), folded, then scaled once by the
 *          block's absmax into an 8-lane row accumulator (FMA); "exact mode": every weight is decoded to its
 *          exact float32 NF4 value, no activation quantisation. The GEMV decoder of nf4_simd.h (one shuffle
 *          per 32 weights fewer than nf4_decode32) yields a group of 64 weights in a permuted order, so x is
 *          first copied once per call into that order:
 *              xg[64g + pos(e)] = x[64g + e]  (0 for 64g + e >= K),  ceil(K/64) * 64 floats of the scratch
 *          With blocksize 32 a group holds two blocks, one per 128-bit lane, each scaled by its own absmax.
 *   GEMM:  see nf4_gemm.c (dequantised float32 weights, FMA, sums over k-slices of 256).
 * Threads split N; an output is computed by the same statements whichever thread computes it.
 */
#include <immintrin.h>
#include <stdint.h>
#include "minilora.h"
#include "minilora_tables.h"
#include "nf4_simd.h"

int minilora_gemm_scratch_floats(int64_t M, int64_t K, int nthreads, int64_t *floats);  /* nf4_gemm.c */

struct mm_args {
    const float *x;
    const uint8_t *packed;
    const float *absmax;
    int64_t M, N, K, bs;
    float *y;
};

static int mm_valid(const float *x, const uint8_t *packed, const float *absmax,
                    int64_t M, int64_t N, int64_t K, int64_t bs, const float *y)
{
    if (!x || !packed || !absmax || !y || M < 1 || N < 1 || K < 1) return 0;
    return bs >= 32 && bs <= 4096 && (bs & (bs - 1)) == 0 && K % bs == 0;
}

/* ------------------------------------------------------------------ scalar reference */
static void matmul_range_ref(void *ctx, int tid, int64_t n0, int64_t n1)
{
    const struct mm_args *a = ctx;
    (void)tid;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *w_n = a->packed + n * a->K / 2;
        const float *absmax_n = a->absmax + n * a->K / a->bs;
        for (int64_t m = 0; m < a->M; m++) {
            const float *x_m = a->x + m * a->K;
            float acc = 0.0f;
            for (int64_t k = 0; k < a->K; k++) {
                uint8_t code = (k & 1) ? (w_n[k / 2] & 0x0F) : (w_n[k / 2] >> 4);
                float w = MINILORA_NF4[code] * absmax_n[k / a->bs];
                acc += x_m[k] * w;                       /* two roundings: -ffp-contract=off */
            }
            a->y[m * a->N + n] = acc;
        }
    }
}

int minilora_matmul_nf4_ref(const float *x, const uint8_t *packed, const float *absmax,
                            int64_t M, int64_t N, int64_t K, int64_t blocksize, float *y,
                            void *scratch, int64_t scratch_bytes, int nthreads)
{
    (void)scratch;
    (void)scratch_bytes;
    if (!mm_valid(x, packed, absmax, M, N, K, blocksize, y)) return MINILORA_EINVAL;
    struct mm_args a = {x, packed, absmax, M, N, K, blocksize, y};
    int threads = minilora_resolve_threads(nthreads, N * K / 2 * M);
    return minilora_parallel_for(threads, N, 8, matmul_range_ref, &a);
}

/* ------------------------------------------------------------------ AVX2 GEMV */
static int64_t gemv_scratch_floats(int64_t K)
{
    return (K + 127) / 128 * 128;   /* the AVX2 GEMV uses ceil(K/64)*64 of it, the AVX-512F one all */
}

/* xg[64g + pos(e)] = x[64g + e], zero-padded to a whole group: the order nf4_decode32_gemv yields. */
static void gemv_order_x(const float *x, int64_t K, float *xg)
{
    for (int64_t g = 0; g < K; g += 64)
        for (int e = 0; e < 64; e++) xg[g + nf4_gemv_position(e)] = g + e < K ? x[g + e] : 0.0f;
}

/* Replaces s += x[k] * NF4[code[k]] for the 64 k of a group (v: its 32 packed bytes, xg: x in GEMV order),
 * into 4 x 8 lanes; each half is multiplied as soon as it is decoded (fewer live registers). */
static inline NF4_AVX2 void gemv_dot64(__m256i v, const float *xg, const struct nf4_planes *planes,
                                       __m256 *s0, __m256 *s1, __m256 *s2, __m256 *s3)
{
    __m256i codes[2];
    nf4_split64(v, codes);
    for (int h = 0; h < 2; h++) {
        __m256 f[4];
        nf4_decode32_gemv(codes[h], planes, f);
        *s0 = _mm256_fmadd_ps(f[0], _mm256_loadu_ps(xg + 32 * h), *s0);
        *s1 = _mm256_fmadd_ps(f[1], _mm256_loadu_ps(xg + 32 * h + 8), *s1);
        *s2 = _mm256_fmadd_ps(f[2], _mm256_loadu_ps(xg + 32 * h + 16), *s2);
        *s3 = _mm256_fmadd_ps(f[3], _mm256_loadu_ps(xg + 32 * h + 24), *s3);
    }
}

/* blocksize >= 64: whole groups per block */
NF4_AVX2
static void gemv_range_avx2(void *ctx, int tid, int64_t n0, int64_t n1)
{
    const struct mm_args *a = ctx;                       /* a->x is xg, x in GEMV order */
    (void)tid;
    const struct nf4_planes planes = nf4_planes_load();
    const int64_t K = a->K, bs = a->bs;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *w_n = a->packed + n * K / 2;
        const float *absmax_n = a->absmax + n * K / bs;
        __m256 acc = _mm256_setzero_ps();
        for (int64_t kb = 0, b = 0; kb < K; kb += bs, b++) {   /* b = kb / bs: no division per block */
            /* replaces acc += x[k] * NF4[code[k]] for the block's k, 64 at a time */
            __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
            for (int64_t k = kb; k < kb + bs; k += 64) {
                _mm_prefetch((const char *)(w_n + k / 2 + GEMV_PREFETCH_BYTES), _MM_HINT_T0);
                gemv_dot64(_mm256_loadu_si256((const __m256i *)(w_n + k / 2)), a->x + k, &planes,
                           &s0, &s1, &s2, &s3);
            }
            __m256 block = _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3));
            acc = _mm256_fmadd_ps(_mm256_set1_ps(absmax_n[b]), block, acc);
        }
        a->y[n] = hsum_ps(acc);
    }
}

/* blocksize 32: lane L of the group at k is block k/32 + L; a last half group (K % 64 == 32) reads only its
 * 16 bytes, and its empty lane meets zeros in xg and a zero scale */
NF4_AVX2
static void gemv_range32_avx2(void *ctx, int tid, int64_t n0, int64_t n1)
{
    const struct mm_args *a = ctx;
    (void)tid;
    const struct nf4_planes planes = nf4_planes_load();
    const int64_t K = a->K;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *w_n = a->packed + n * K / 2;
        const float *absmax_n = a->absmax + n * K / 32;
        __m256 acc = _mm256_setzero_ps();
        for (int64_t k = 0; k < K; k += 64) {
            _mm_prefetch((const char *)(w_n + k / 2 + GEMV_PREFETCH_BYTES), _MM_HINT_T0);
            __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
            gemv_dot64(gemv32_group(w_n, k, K), a->x + k, &planes, &s0, &s1, &s2, &s3);
            __m256 block = _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3));
            acc = _mm256_fmadd_ps(gemv32_scale(absmax_n, k, K), block, acc);
        }
        a->y[n] = hsum_ps(acc);
    }
}

int minilora_gemv_nf4_avx2(const float *x, const uint8_t *packed, const float *absmax,
                           int64_t N, int64_t K, int64_t blocksize, float *y,
                           void *scratch, int64_t scratch_bytes, int nthreads)
{
    if (!minilora_cpu_has_avx2()) return MINILORA_ENOCPU;
    if (!mm_valid(x, packed, absmax, 1, N, K, blocksize, y)) return MINILORA_EINVAL;
    if (!scratch || scratch_bytes < (K + 63) / 64 * 64 * (int64_t)sizeof(float)) return MINILORA_EINVAL;
    float *xg = scratch;
    gemv_order_x(x, K, xg);
    struct mm_args a = {xg, packed, absmax, 1, N, K, blocksize, y};
    int threads = minilora_resolve_threads(nthreads, N * K / 2);
    return minilora_parallel_for(threads, N, 16, blocksize == 32 ? gemv_range32_avx2 : gemv_range_avx2, &a);
}

/* ------------------------------------------------------------------ scratch and dispatch */
int64_t minilora_matmul_nf4_scratch_bytes(int64_t M, int64_t N, int64_t K, int nthreads)
{
    if (M < 1 || N < 1 || K < 1) return -1;
    if (M == 1) return gemv_scratch_floats(K) * (int64_t)sizeof(float);   /* x in GEMV order */
    int64_t floats = 0;
    minilora_gemm_scratch_floats(M, K, minilora_resolve_threads(nthreads, N * K / 2 * M), &floats);
    return floats * (int64_t)sizeof(float);
}

int minilora_matmul_nf4_avx2(const float *x, const uint8_t *packed, const float *absmax,
                             int64_t M, int64_t N, int64_t K, int64_t blocksize, float *y,
                             void *scratch, int64_t scratch_bytes, int nthreads)
{
    if (M == 1) return minilora_gemv_nf4_avx2(x, packed, absmax, N, K, blocksize, y, scratch, scratch_bytes, nthreads);
    return minilora_gemm_nf4_avx2(x, packed, absmax, M, N, K, blocksize, y, scratch, scratch_bytes, nthreads);
}

/* M = 1: the AVX-512F GEMV of nf4_gemv_avx512.c; M >= 2: the AVX2 GEMM (there is no AVX-512 GEMM). */
int minilora_matmul_nf4_avx512(const float *x, const uint8_t *packed, const float *absmax,
                               int64_t M, int64_t N, int64_t K, int64_t blocksize, float *y,
                               void *scratch, int64_t scratch_bytes, int nthreads)
{
    if (!minilora_cpu_has_avx512() || !minilora_cpu_has_avx2()) return MINILORA_ENOCPU;
    if (M == 1) return minilora_gemv_nf4_avx512(x, packed, absmax, N, K, blocksize, y, scratch, scratch_bytes, nthreads);
    return minilora_gemm_nf4_avx2(x, packed, absmax, M, N, K, blocksize, y, scratch, scratch_bytes, nthreads);
}

int minilora_matmul_nf4(const float *x, const uint8_t *packed, const float *absmax,
                        int64_t M, int64_t N, int64_t K, int64_t blocksize, float *y,
                        void *scratch, int64_t scratch_bytes, int nthreads)
{
    if (minilora_cpu_has_avx512() && minilora_cpu_has_avx2())
        return minilora_matmul_nf4_avx512(x, packed, absmax, M, N, K, blocksize, y, scratch, scratch_bytes, nthreads);
    if (minilora_cpu_has_avx2())
        return minilora_matmul_nf4_avx2(x, packed, absmax, M, N, K, blocksize, y, scratch, scratch_bytes, nthreads);
    return minilora_matmul_nf4_ref(x, packed, absmax, M, N, K, blocksize, y, scratch, scratch_bytes, nthreads);
}
