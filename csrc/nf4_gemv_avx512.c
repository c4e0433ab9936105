/* The exact GEMV (M = 1) with AVX-512F: y[n] = sum_k x[k] * NF4[code(n, k)] * absmax(n, k), float32.
 *
 * Same contract and bound as the AVX2 GEMV of nf4_matmul.c ("exact mode": every weight is decoded to its
 * exact float32 NF4 value; no activation quantisation), a cheaper decode: a zmm register holds the whole
 * 16-entry float32 NF4 table, so one vpermps decodes 16 weights, and vpermps reads only the low 4 bits of
 * each 32-bit index. A row is taken in chunks of 128 elements = 64 packed bytes = one zmm of 16 dwords;
 * dword d holds bytes 4d..4d+3, i.e. elements 8d..8d+7 of the chunk, nibble j (bits 4j..4j+3) being
 *     element 8d + 2 * (j / 2) + (j even ? 1 : 0)        (the low nibble of a byte is the odd element)
 * so vector j = NF4[(dword >> 4j) & 15] needs 7 shifts and 8 vpermps per chunk and no other shuffle (the
 * AVX2 byte-plane decode needs 12 shuffles per 32 weights). x is copied once per call into that order:
 *     xg[128c + 16j + d] = x[128c + 8d + 2 * (j / 2) + (j even)]   (0 past K; ceil(K/128) * 128 floats)
 * Per block (blocksize >= 128): partial sums in 2 x 16 lanes (FMA), folded, then scaled once by the block's
 * absmax into a 16-lane row accumulator (FMA). Blocksize 64 / 32: a chunk spans 2 / 4 blocks, lane d
 * belonging to block 8d / blocksize of the chunk, so the chunk's sums are scaled by a vector of those absmax.
 * A row's last chunk may be short (K % 128 = 32, 64, 96 with blocksize <= 64): masked loads read only its
 * bytes, its missing lanes meet zeros in xg and a zero scale. y[n] = the sum of the accumulator's lanes.
 * Threads split N; an output is computed by the same statements whichever thread computes it.
 */
#include <immintrin.h>
#include <stdint.h>
#include "minilora.h"
#include "minilora_tables.h"

#define NF4_AVX512 __attribute__((target("avx512f")))

enum { CHUNK = 128, PREFETCH_BYTES = 2048 };   /* prefetch as the AVX2 GEMV (nf4_simd.h): a 4096-row ahead */

struct gemv_args {
    const float *xg;              /* x in the order above */
    const uint8_t *packed;
    const float *absmax;
    int64_t K, bs;
    float *y;
};

int minilora_cpu_has_avx512(void)
{
#if defined(__x86_64__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f");   /* libgcc also checks that the OS saves the zmm state */
#else
    return 0;
#endif
}

static int64_t xg_floats(int64_t K)
{
    return (K + CHUNK - 1) / CHUNK * CHUNK;
}

/* Replaces, for the 128 elements e of a chunk (v: its 64 packed bytes), s += x[e] * NF4[code(e)] (2 x 16 lanes). */
static inline NF4_AVX512 void dot128(__m512i v, const float *xg, __m512 table, __m512 *s0, __m512 *s1)
{
    for (int j = 0; j < 8; j += 2) {
        *s0 = _mm512_fmadd_ps(_mm512_permutexvar_ps(v, table), _mm512_loadu_ps(xg + 16 * j), *s0);
        v = _mm512_srli_epi32(v, 4);
        *s1 = _mm512_fmadd_ps(_mm512_permutexvar_ps(v, table), _mm512_loadu_ps(xg + 16 * j + 16), *s1);
        v = _mm512_srli_epi32(v, 4);
    }
}

/* blocksize >= 128: whole chunks per block */
NF4_AVX512
static void gemv_range_avx512(void *ctx, int tid, int64_t n0, int64_t n1)
{
    const struct gemv_args *a = ctx;
    (void)tid;
    const __m512 table = _mm512_loadu_ps(MINILORA_NF4);
    const int64_t K = a->K, bs = a->bs;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *w_n = a->packed + n * K / 2;
        const float *absmax_n = a->absmax + n * K / bs;
        __m512 acc = _mm512_setzero_ps();
        for (int64_t kb = 0, b = 0; kb < K; kb += bs, b++) {   /* b = kb / bs: no division per block */
            __m512 s0 = _mm512_setzero_ps(), s1 = s0;
            for (int64_t k = kb; k < kb + bs; k += CHUNK) {
                _mm_prefetch((const char *)(w_n + k / 2 + PREFETCH_BYTES), _MM_HINT_T0);
                dot128(_mm512_loadu_si512((const void *)(w_n + k / 2)), a->xg + k, table, &s0, &s1);
            }
            acc = _mm512_fmadd_ps(_mm512_set1_ps(absmax_n[b]), _mm512_add_ps(s0, s1), acc);
        }
        a->y[n] = _mm512_reduce_add_ps(acc);
    }
}

/* blocksize 64 or 32: 2 or 4 blocks per chunk, the last chunk of a row possibly short */
NF4_AVX512
static void gemv_range_small_avx512(void *ctx, int tid, int64_t n0, int64_t n1)
{
    const struct gemv_args *a = ctx;
    (void)tid;
    const __m512 table = _mm512_loadu_ps(MINILORA_NF4);
    const int64_t K = a->K, bs = a->bs, per_chunk = CHUNK / bs;
    const __m512i lane_block = _mm512_srli_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                                 bs == 64 ? 3 : 2);   /* 8d / bs */
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *w_n = a->packed + n * K / 2;
        const float *absmax_n = a->absmax + n * K / bs;
        __m512 acc = _mm512_setzero_ps();
        for (int64_t k = 0, b = 0; k < K; k += CHUNK, b += per_chunk) {
            int64_t left = K - k < CHUNK ? K - k : CHUNK;                  /* elements of this chunk */
            __mmask16 lanes = (__mmask16)((1u << (left / 8)) - 1);           /* 8 elements per dword */
            __mmask16 blocks = (__mmask16)((1u << (left / bs)) - 1);
            _mm_prefetch((const char *)(w_n + k / 2 + PREFETCH_BYTES), _MM_HINT_T0);
            __m512 s0 = _mm512_setzero_ps(), s1 = s0;
            dot128(_mm512_maskz_loadu_epi32(lanes, w_n + k / 2), a->xg + k, table, &s0, &s1);
            __m512 scale = _mm512_permutexvar_ps(lane_block, _mm512_maskz_loadu_ps(blocks, absmax_n + b));
            acc = _mm512_fmadd_ps(scale, _mm512_add_ps(s0, s1), acc);
        }
        a->y[n] = _mm512_reduce_add_ps(acc);
    }
}

int minilora_gemv_nf4_avx512(const float *x, const uint8_t *packed, const float *absmax,
                             int64_t N, int64_t K, int64_t blocksize, float *y,
                             void *scratch, int64_t scratch_bytes, int nthreads)
{
    if (!minilora_cpu_has_avx512()) return MINILORA_ENOCPU;
    if (!x || !packed || !absmax || !y || N < 1 || K < 1) return MINILORA_EINVAL;
    if (blocksize < 32 || blocksize > 4096 || (blocksize & (blocksize - 1)) || K % blocksize) return MINILORA_EINVAL;
    if (!scratch || scratch_bytes < xg_floats(K) * (int64_t)sizeof(float)) return MINILORA_EINVAL;
    float *xg = scratch;
    for (int64_t c = 0; c < K; c += CHUNK)
        for (int j = 0; j < 8; j++)
            for (int d = 0; d < 16; d++) {
                int64_t e = c + 8 * d + 2 * (j / 2) + (j % 2 == 0);
                xg[c + 16 * j + d] = e < K ? x[e] : 0.0f;
            }
    struct gemv_args a = {xg, packed, absmax, K, blocksize, y};
    int threads = minilora_resolve_threads(nthreads, N * K / 2);
    return minilora_parallel_for(threads, N, 16, blocksize >= CHUNK ? gemv_range_avx512 : gemv_range_small_avx512, &a);
}
