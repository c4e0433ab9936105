/* NF4-weight GEMM, AVX2: y (M, N) = x (M, K) . dequant(W (N, K))^T for any M (used for M >= 2).
 *
 * Formula and layouts as in nf4_matmul.c (K % bs == 0; W packed row-major, element 2i in the HIGH nibble).
 * Method (spec/kernels.md): the activations are copied once into k-major panels of 16 rows,
 *     xp[p][k][i] = x[16p + i][k]  (zero for 16p + i >= M),      scratch: ceil(M/16) * 16 * K floats
 * then each thread takes its strips of 6 weight rows in chunks of 16 strips; per k-slice of 512 it
 * dequantises the chunk to float32 in its own buffer (bit-identical to minilora_dequantize_nf4),
 *     ws[r][k] = float32(NF4[code((n0 + r)*K + k)] * absmax[...])   scratch: 16*6*512 floats per thread
 * and runs a 6 x 16 FMA microkernel for every (panel, strip) pair of the slice:
 *     acc[r][i] = sum_{k in slice} xp[p][k][i] * ws[r][k]  (FMA, k ascending);  y[16p+i, n0+r] += acc
 * so every output is a float32 sum of K/512 slice sums of <= 512 FMA terms (depth <= K, bound gamma_K).
 * (Slices of 512 rather than 256: half the read-modify-writes of the y tiles; measured 1-12 % faster.)
 * The 12 accumulators are named variables: GCC 12 spills an accumulator array to the stack (kernels.md).
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include "minilora.h"
#include "nf4_simd.h"

/* strip rows, panel rows, k-slice, strips per chunk, activation rows per pass (x slices of a pass: 256 KB) */
enum { MR = 6, NR = 16, KC = 512, CHUNK = 16, MC = 128 };

int minilora_gemm_scratch_floats(int64_t M, int64_t K, int nthreads, int64_t *floats)
{
    int64_t panels = (M + NR - 1) / NR;
    *floats = panels * NR * K + (int64_t)nthreads * CHUNK * MR * KC;
    return MINILORA_OK;
}

struct gemm_args {
    const float *xp;
    const uint8_t *packed;
    const float *absmax;
    int64_t M, N, K, bs;
    float *y;
    float *chunks;        /* nthreads * CHUNK * MR * KC floats */
};

/* Replaces, for rows n0 <= n < n1 and k0 <= k < k0 + kc:  ws[(n - n0)*KC + k - k0] = NF4[code] * absmax
 * (the dequantize_nf4 statement); rows n >= N of the last strip are zero. */
NF4_AVX2
static void dequantize_chunk(const struct gemm_args *a, const struct nf4_planes *planes,
                             int64_t n0, int64_t n1, int64_t k0, int64_t kc, float *ws)
{
    for (int64_t n = n0; n < n1; n++) {
        float *ws_r = ws + (n - n0) * KC;
        if (n >= a->N) { memset(ws_r, 0, (size_t)kc * sizeof(float)); continue; }
        const uint8_t *w_n = a->packed + n * a->K / 2;
        const float *absmax_n = a->absmax + n * a->K / a->bs;
        const int bs_shift = __builtin_ctzll((unsigned long long)a->bs);   /* k / bs, bs a power of two */
        for (int64_t k = k0; k < k0 + kc; k += 32) {
            __m256 f[4];
            const __m256 am = _mm256_set1_ps(absmax_n[k >> bs_shift]);
            nf4_decode32(w_n + k / 2, planes, f);
            for (int q = 0; q < 4; q++) _mm256_storeu_ps(ws_r + k - k0 + 8 * q, _mm256_mul_ps(f[q], am));
        }
    }
}

/* One 6 x 16 (or 6 x 8 when mcount <= 8) tile over one k-slice: y tile = (first ? 0 : y) + acc.
 * xp_k: the panel at the slice start (k-major, NR floats per k); ws: the strip at the slice start (stride KC). */
#define FMA_ROW16(r) w = _mm256_broadcast_ss(ws + (r) * KC + k); \
    c##r##a = _mm256_fmadd_ps(xa, w, c##r##a); c##r##b = _mm256_fmadd_ps(xb, w, c##r##b)
#define FMA_ROW8(r) w = _mm256_broadcast_ss(ws + (r) * KC + k); c##r##a = _mm256_fmadd_ps(xa, w, c##r##a)

NF4_AVX2
static void microkernel(const float *xp_k, const float *ws, int64_t kc, int first,
                        float *y, int64_t N, int64_t m0, int64_t mcount, int64_t n0, int64_t rows)
{
    __m256 c0a = _mm256_setzero_ps(), c1a = c0a, c2a = c0a, c3a = c0a, c4a = c0a, c5a = c0a;
    __m256 c0b = c0a, c1b = c0a, c2b = c0a, c3b = c0a, c4b = c0a, c5b = c0a;
    __m256 w;
    for (int64_t i = 0; i < mcount; i++)   /* the y tile is read after the loop: fetch it meanwhile */
        _mm_prefetch((const char *)(y + (m0 + i) * N + n0), _MM_HINT_T0);
    if (mcount > 8) {
        for (int64_t k = 0; k < kc; k++) {
            const __m256 xa = _mm256_loadu_ps(xp_k + k * NR), xb = _mm256_loadu_ps(xp_k + k * NR + 8);
            FMA_ROW16(0); FMA_ROW16(1); FMA_ROW16(2); FMA_ROW16(3); FMA_ROW16(4); FMA_ROW16(5);
        }
    } else {
        for (int64_t k = 0; k < kc; k++) {
            const __m256 xa = _mm256_loadu_ps(xp_k + k * NR);
            FMA_ROW8(0); FMA_ROW8(1); FMA_ROW8(2); FMA_ROW8(3); FMA_ROW8(4); FMA_ROW8(5);
        }
    }
    float tile[MR][NR];   /* the transposed write goes through this small tile */
    _mm256_storeu_ps(tile[0], c0a); _mm256_storeu_ps(tile[0] + 8, c0b);
    _mm256_storeu_ps(tile[1], c1a); _mm256_storeu_ps(tile[1] + 8, c1b);
    _mm256_storeu_ps(tile[2], c2a); _mm256_storeu_ps(tile[2] + 8, c2b);
    _mm256_storeu_ps(tile[3], c3a); _mm256_storeu_ps(tile[3] + 8, c3b);
    _mm256_storeu_ps(tile[4], c4a); _mm256_storeu_ps(tile[4] + 8, c4b);
    _mm256_storeu_ps(tile[5], c5a); _mm256_storeu_ps(tile[5] + 8, c5b);
    for (int64_t i = 0; i < mcount; i++) {
        float *y_m = y + (m0 + i) * N + n0;
        for (int64_t r = 0; r < rows; r++) y_m[r] = first ? tile[r][i] : y_m[r] + tile[r][i];
    }
}

/* Strips [s0, s1) of this thread, CHUNK strips at a time: per k-slice, dequantise the chunk (CHUNK*MR x KC
 * floats, L2-resident), then each activation panel's slice (32 KB, L1 / L2) meets every strip. */
NF4_AVX2
static void gemm_range_avx2(void *ctx, int tid, int64_t s0, int64_t s1)
{
    const struct gemm_args *a = ctx;
    const struct nf4_planes planes = nf4_planes_load();
    float *ws = a->chunks + (int64_t)tid * CHUNK * MR * KC;
    for (int64_t mc0 = 0; mc0 < a->M; mc0 += MC) {     /* bigger M re-dequantises: x, y stay in L2 */
    int64_t mc1 = mc0 + MC < a->M ? mc0 + MC : a->M;
    for (int64_t c0 = s0; c0 < s1; c0 += CHUNK) {
        int64_t c1 = c0 + CHUNK < s1 ? c0 + CHUNK : s1;
        for (int64_t k0 = 0; k0 < a->K; k0 += KC) {
            int64_t kc = a->K - k0 < KC ? a->K - k0 : KC;
            dequantize_chunk(a, &planes, c0 * MR, c1 * MR, k0, kc, ws);
            for (int64_t m0 = mc0; m0 < mc1; m0 += NR) {
                int64_t mcount = a->M - m0 < NR ? a->M - m0 : NR;
                for (int64_t s = c0; s < c1; s++) {
                    int64_t n0 = s * MR, rows = a->N - n0 < MR ? a->N - n0 : MR;
                    microkernel(a->xp + m0 * a->K + k0 * NR, ws + (s - c0) * MR * KC, kc, k0 == 0,
                                a->y, a->N, m0, mcount, n0, rows);
                }
            }
        }
    }
    }
}
/* xp[p][k][i] = x[16p + i][k], zero-padded rows. */
static void pack_panels(const float *x, int64_t M, int64_t K, float *xp)
{
    for (int64_t m0 = 0; m0 < M; m0 += NR) {
        float *xp_p = xp + m0 * K;
        for (int64_t k = 0; k < K; k++)
            for (int64_t i = 0; i < NR; i++) xp_p[k * NR + i] = m0 + i < M ? x[(m0 + i) * K + k] : 0.0f;
    }
}

int minilora_gemm_nf4_avx2(const float *x, const uint8_t *packed, const float *absmax,
                           int64_t M, int64_t N, int64_t K, int64_t blocksize, float *y,
                           void *scratch, int64_t scratch_bytes, int nthreads)
{
    if (!minilora_cpu_has_avx2()) return MINILORA_ENOCPU;
    if (!x || !packed || !absmax || !y || !scratch || M < 1 || N < 1 || K < 1) return MINILORA_EINVAL;
    if (blocksize < 32 || blocksize > 4096 || (blocksize & (blocksize - 1)) || K % blocksize) return MINILORA_EINVAL;
    int threads = minilora_resolve_threads(nthreads, N * K / 2 * M);
    int64_t floats;
    minilora_gemm_scratch_floats(M, K, threads, &floats);
    if (scratch_bytes < floats * (int64_t)sizeof(float)) return MINILORA_EINVAL;
    float *xp = scratch;
    struct gemm_args a = {xp, packed, absmax, M, N, K, blocksize, y, xp + (M + NR - 1) / NR * NR * K};
    pack_panels(x, M, K, xp);
    return minilora_parallel_for(threads, (N + MR - 1) / MR, 1, gemm_range_avx2, &a);
}
