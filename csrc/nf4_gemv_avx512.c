/* The exact GEMV (M = 1) with AVX-512F: y[n] = sum_k x[k] * NF4[code(n, k)] * absmax(n, k), float32.
 *
 * Same contract and bound as the AVX2 GEMV of nf4_matmul.c ("exact mode": every weight is decoded to its
 * exact float32 NF4 value; no activation quantisation), a cheaper decode: a zmm register holds the whole
 * 16-entry float32 NF4 table, so one vpermps decodes 16 weights (the AVX2 byte-plane decode needs 12
 * shuffles per 32). vpermps reads only the low 4 bits of each 32-bit index, so
 *     idx  = zero-extended bytes 16c .. 16c+15 of a row  (vpmovzxbd: one byte per lane)
 *     odd  = NF4[idx & 15]  = the low nibbles  = elements 32c + 2i + 1
 *     even = NF4[idx >> 4]  = the high nibbles = elements 32c + 2i
 * for lane i of chunk c (32 elements, 16 bytes). x is first copied once per call into that order:
 *     xg[32c + i] = x[32c + 2i],  xg[32c + 16 + i] = x[32c + 2i + 1]      (K floats of scratch)
 * Per block: partial sums in 4 x 16 lanes (FMA), folded, then scaled once by the block's absmax into a
 * 16-lane row accumulator (FMA); y[n] = the sum of its lanes. Blocks are whole chunks (K % 32 == 0), so
 * blocksize 32 needs no special case. Threads split N; an output is computed by the same statements
 * whichever thread computes it. Exported as minilora_gemv_nf4_avx512 (MINILORA_ENOCPU without AVX-512F).
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include "minilora.h"
#include "minilora_tables.h"

#define NF4_AVX512 __attribute__((target("avx512f")))

/* the AVX2 GEMV's prefetch distance (nf4_simd.h): one 4096-wide row ahead */
enum { PREFETCH_BYTES = 2048 };

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

/* Replaces s_even += x[32c + 2i] * NF4[byte_i >> 4], s_odd += x[32c + 2i + 1] * NF4[byte_i & 15], i < 16. */
static inline NF4_AVX512 void dot32(const uint8_t *bytes, const float *xg, __m512 table,
                                    __m512 *s_even, __m512 *s_odd)
{
    __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)bytes));
    __m512 even = _mm512_permutexvar_ps(_mm512_srli_epi32(idx, 4), table);
    __m512 odd = _mm512_permutexvar_ps(idx, table);
    *s_even = _mm512_fmadd_ps(even, _mm512_loadu_ps(xg), *s_even);
    *s_odd = _mm512_fmadd_ps(odd, _mm512_loadu_ps(xg + 16), *s_odd);
}

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
            __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
            int64_t k = kb;
            for (; k + 64 <= kb + bs; k += 64) {
                _mm_prefetch((const char *)(w_n + k / 2 + PREFETCH_BYTES), _MM_HINT_T0);
                dot32(w_n + k / 2, a->xg + k, table, &s0, &s1);
                dot32(w_n + k / 2 + 16, a->xg + k + 32, table, &s2, &s3);
            }
            if (k < kb + bs) dot32(w_n + k / 2, a->xg + k, table, &s0, &s1);   /* blocksize 32 */
            __m512 block = _mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3));
            acc = _mm512_fmadd_ps(_mm512_set1_ps(absmax_n[b]), block, acc);
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
    if (!scratch || scratch_bytes < K * (int64_t)sizeof(float)) return MINILORA_EINVAL;
    float *xg = scratch;
    for (int64_t c = 0; c < K; c += 32)
        for (int i = 0; i < 16; i++) {
            xg[c + i] = x[c + 2 * i];
            xg[c + 16 + i] = x[c + 2 * i + 1];
        }
    struct gemv_args a = {xg, packed, absmax, K, blocksize, y};
    int threads = minilora_resolve_threads(nthreads, N * K / 2);
    return minilora_parallel_for(threads, N, 16, gemv_range_avx512, &a);
}
