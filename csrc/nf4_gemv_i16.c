/* NF4-weight GEMV, approximate "int16" mode: opt-in, never the default, never a replacement for the exact
 * mode of nf4_matmul.c (spec/kernels.md, "int16 table mode").
 *
 *   y[n] ~= sum_k x[k] * NF4[code(n*K + k)] * absmax[(n*K + k) / bs]        x (K,) float32, y (N,) float32
 *
 * computed as llama.cpp computes its quantised dot products:
 *   - x is quantised once per call, per group g of 64 consecutive k (the last group may hold 32):
 *         q_k = round(x_k * 8191 / max_g |x|) in [-8191, 8191],  d_g = float32(max_g |x| / 8191 * 2^-14)
 *     (in double, so no intermediate overflows; q = 0 and d = 0 for an all-zero group; a group whose
 *     max |x| < 2^-99 gets a subnormal d_g and loses relative precision, not absolute);
 *   - the NF4 table is held as int16 N_c = round(NF4[c] * 2^14), |N_c| <= 2^14 (NF4[c] * 2^14 is exact in
 *     float32, so only the final rounding to an integer moves it, by at most 2^-15 of NF4's scale);
 *   - each group's sum of q_k * N_c is exact in int32 (vpmaddwd: an int32 lane sums 8 products,
 *     |lane| <= 8 * 2^14 * 8191 < 2^30);
 *   - y[n] = sum_g float32(isum_g) * d_g * absmax_b(g) in float32 (FMA in the AVX2 variant; per block as
 *     the exact kernel: block sum of float(isum) * d_g, then one FMA with absmax).
 * Error: x_k becomes q_k * max_g / 8191 (|err| <= max_g / 16382 + rounding) and NF4[c] becomes N_c 2^-14
 * (|err| <= 2^-15), so |y - y_exact| <= sum_k absmax * (max_g / 16382 * |NF4| + 2^-15 * |x_k| + ...) plus float32 steps:
 * the bound is written out and tested in tests/test_native.py; typically ~1e-4 relative to sum |x| |w|.
 * A non-finite x has no int16 code: the call then runs the exact GEMV of the same variant instead (the
 * dispatcher minilora_gemv_nf4_i16: minilora_matmul_nf4's, so AVX-512F where the CPU has it; same scratch).
 *
 * Why: the exact decode needs 12 byte shuffles per 32 weights (4 vpshufb + 8 unpacks to rebuild float32)
 * and is bound by the two shuffle ports; int16 values need 2 vpshufb + 2 unpacks, and the products move to
 * vpmaddwd, which runs on other ports.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include "minilora.h"
#include "minilora_tables.h"
#include "nf4_simd.h"

enum { XQ_MAX = 8191, GROUP = 64 };
static const double ROUND_MAGIC = 6755399441055744.0;   /* 1.5 * 2^52: (v + M) - M rounds |v| < 2^51 to even */

struct i16_args {
    const int16_t *xq;      /* x quantised; natural order (_ref) or GEMV order (_avx2), ceil(K/64)*64 */
    const float *d;         /* d_g per group (_ref: 1 float per group; _avx2: 8 copies per group) */
    const uint8_t *packed;
    const float *absmax;
    int64_t N, K, bs;
    float *y;
};

static int64_t n_groups(int64_t K)
{
    return (K + GROUP - 1) / GROUP;
}

static int16_t nf4_i16(int c)
{
    return (int16_t)lrintf(MINILORA_NF4[c] * 16384.0f);  /* exact product, then round to nearest even */
}

/* Returns 0 when some x is NaN / inf (nothing written that matters), else 1; fills d[g] (d_copies times)
 * and xq[g*64 + pos[e]] = q(x[g*64 + e]) (0 past K). */
static int quantize_x(const float *x, int64_t K, int16_t *xq, float *d, int d_copies, const int pos[GROUP])
{
    for (int64_t g = 0; g < n_groups(K); g++) {
        int64_t k0 = g * GROUP, len = K - k0 < GROUP ? K - k0 : GROUP;
        float m = 0.0f;
        for (int64_t e = 0; e < len; e++) {
            if (!isfinite(x[k0 + e])) return 0;
            float a = fabsf(x[k0 + e]);
            m = a > m ? a : m;
        }
        double inv = m > 0.0f ? XQ_MAX / (double)m : 0.0;   /* double: finite for every float m > 0 */
        for (int e = 0; e < GROUP; e++) {                      /* |x * inv| <= 8191 (1 + 2^-52): |q| <= 8191 */
            double v = e < len ? (double)x[k0 + e] * inv : 0.0;
            xq[k0 + pos[e]] = (int16_t)((v + ROUND_MAGIC) - ROUND_MAGIC);   /* round half to even */
        }
        float dg = (float)((double)m / XQ_MAX / 16384.0);     /* d_g 2^-14, one rounding (NF4's int16 scale) */
        for (int c = 0; c < d_copies; c++) d[g * d_copies + c] = dg;
    }
    return 1;
}

static int i16_valid(const float *x, const uint8_t *packed, const float *absmax,
                     int64_t N, int64_t K, int64_t bs, const float *y, const void *scratch, int64_t scratch_bytes)
{
    if (!x || !packed || !absmax || !y || !scratch || N < 1 || K < 1) return 0;
    if (!(bs >= 32 && bs <= 4096 && (bs & (bs - 1)) == 0 && K % bs == 0)) return 0;
    return scratch_bytes >= minilora_matmul_nf4_scratch_bytes(1, N, K, 1);
}

/* ------------------------------------------------------------------ scalar reference */
static void i16_range_ref(void *ctx, int tid, int64_t n0, int64_t n1)
{
    const struct i16_args *a = ctx;
    (void)tid;
    int16_t table[16];
    for (int c = 0; c < 16; c++) table[c] = nf4_i16(c);
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *w_n = a->packed + n * a->K / 2;
        const float *absmax_n = a->absmax + n * a->K / a->bs;
        float acc = 0.0f;
        for (int64_t g = 0; g < n_groups(a->K); g++) {
            int64_t k0 = g * GROUP, len = a->K - k0 < GROUP ? a->K - k0 : GROUP;
            for (int64_t h = 0; h < len; h += 32) {                 /* a block holds >= 32 weights */
                int32_t isum = 0;
                for (int64_t k = k0 + h; k < k0 + h + 32; k++) {
                    uint8_t code = (k & 1) ? (w_n[k / 2] & 0x0F) : (w_n[k / 2] >> 4);
                    isum += (int32_t)a->xq[k] * table[code];
                }
                float f = (float)isum * a->d[g];
                acc += f * absmax_n[(k0 + h) / a->bs];              /* two roundings: -ffp-contract=off */
            }
        }
        a->y[n] = acc;
    }
}

/* ------------------------------------------------------------------ AVX2 */
/* Where element e (0..63) of a group lands in the GEMV order of i16_dot64: half h = e & 1 (high / low
 * nibbles), packed byte b = e >> 1 in 128-bit lane L = b >> 4 at j = b & 15; unpacklo / unpackhi of the
 * two int16 byte planes give vector 2h + (j >> 3), word 8L + (j & 7). */
static int i16_position(int e)
{
    int h = e & 1, b = e >> 1, L = b >> 4, j = b & 15;
    return 32 * h + 16 * (j >> 3) + 8 * L + (j & 7);
}

struct i16_planes {
    __m256i lo, hi;   /* byte c = low / high byte of the int16 N_c, in both 128-bit lanes */
};

/* Replaces isum[lane] = sum of q_k * N[code_k] over the group's k in that int32 lane (8 products each);
 * lanes 0-3 cover elements 0..31 of the group, lanes 4-7 elements 32..63. */
static inline NF4_AVX2 __m256i i16_dot64(__m256i v, const int16_t *xq, const struct i16_planes *t)
{
    __m256i codes[2];
    nf4_split64(v, codes);
    __m256i s[2];
    for (int h = 0; h < 2; h++) {
        __m256i lo = _mm256_shuffle_epi8(t->lo, codes[h]), hi = _mm256_shuffle_epi8(t->hi, codes[h]);
        __m256i w0 = _mm256_unpacklo_epi8(lo, hi), w1 = _mm256_unpackhi_epi8(lo, hi);   /* int16 N[code] */
        s[h] = _mm256_add_epi32(_mm256_madd_epi16(w0, _mm256_loadu_si256((const __m256i *)(xq + 32 * h))),
                                _mm256_madd_epi16(w1, _mm256_loadu_si256((const __m256i *)(xq + 32 * h + 16))));
    }
    return _mm256_add_epi32(s[0], s[1]);
}

static inline NF4_AVX2 struct i16_planes i16_planes_load(void)
{
    uint8_t lo[16], hi[16];
    for (int c = 0; c < 16; c++) {
        uint16_t bits = (uint16_t)nf4_i16(c);
        lo[c] = (uint8_t)bits;
        hi[c] = (uint8_t)(bits >> 8);
    }
    struct i16_planes t = {_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)lo)),
                           _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)hi))};
    return t;
}

/* blocksize >= 64: whole groups per block; per group one FMA adds float(isum) * d_g 2^-14 to the block's
 * sum, per block one FMA scales it by absmax (as the exact kernel does) */
NF4_AVX2
static void i16_range_avx2(void *ctx, int tid, int64_t n0, int64_t n1)
{
    const struct i16_args *a = ctx;
    (void)tid;
    const struct i16_planes t = i16_planes_load();
    const int64_t K = a->K, bs = a->bs;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *w_n = a->packed + n * K / 2;
        const float *absmax_n = a->absmax + n * K / bs;
        __m256 acc = _mm256_setzero_ps();
        for (int64_t kb = 0, b = 0; kb < K; kb += bs, b++) {   /* b = kb / bs: no division per block */
            __m256 block = _mm256_setzero_ps();
            for (int64_t k = kb; k < kb + bs; k += GROUP) {
                _mm_prefetch((const char *)(w_n + k / 2 + GEMV_PREFETCH_BYTES), _MM_HINT_T0);
                __m256i isum = i16_dot64(_mm256_loadu_si256((const __m256i *)(w_n + k / 2)), a->xq + k, &t);
                block = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_loadu_ps(a->d + k / GROUP * 8), block);
            }
            acc = _mm256_fmadd_ps(_mm256_broadcast_ss(absmax_n + b), block, acc);
        }
        a->y[n] = hsum_ps(acc);
    }
}

/* blocksize 32: 128-bit lane L of the group at k is block k/32 + L (its int32 lanes 4L..4L+3); a last half
 * group (K % 64 == 32) reads 16 bytes, and its empty lane meets zeros in xq and a zero scale */
NF4_AVX2
static void i16_range32_avx2(void *ctx, int tid, int64_t n0, int64_t n1)
{
    const struct i16_args *a = ctx;
    (void)tid;
    const struct i16_planes t = i16_planes_load();
    const int64_t K = a->K;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *w_n = a->packed + n * K / 2;
        const float *absmax_n = a->absmax + n * K / 32;
        __m256 acc = _mm256_setzero_ps();
        for (int64_t k = 0; k < K; k += GROUP) {
            _mm_prefetch((const char *)(w_n + k / 2 + GEMV_PREFETCH_BYTES), _MM_HINT_T0);
            __m256i isum = i16_dot64(gemv32_group(w_n, k, K), a->xq + k, &t);
            __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(isum), _mm256_loadu_ps(a->d + k / GROUP * 8));
            acc = _mm256_fmadd_ps(gemv32_scale(absmax_n, k, K), f, acc);
        }
        a->y[n] = hsum_ps(acc);
    }
}

/* ------------------------------------------------------------------ entry points */
static int gemv_i16(const float *x, const uint8_t *packed, const float *absmax, int64_t N, int64_t K,
                    int64_t bs, float *y, void *scratch, int64_t scratch_bytes, int nthreads, int simd,
                    int dispatch)
{
    if (!i16_valid(x, packed, absmax, N, K, bs, y, scratch, scratch_bytes)) return MINILORA_EINVAL;
    int64_t G = n_groups(K);
    int16_t *xq = scratch;                                 /* G*64 int16, then the d_g floats */
    float *d = (float *)((char *)scratch + G * GROUP * (int64_t)sizeof(int16_t));
    int pos[GROUP];                                        /* where element e of a group goes in xq */
    for (int e = 0; e < GROUP; e++) pos[e] = simd ? i16_position(e) : e;
    if (!quantize_x(x, K, xq, d, simd ? 8 : 1, pos)) {     /* NaN / inf: the exact kernel of the same variant */
        if (dispatch) return minilora_matmul_nf4(x, packed, absmax, 1, N, K, bs, y, scratch, scratch_bytes, nthreads);
        if (simd) return minilora_gemv_nf4_avx2(x, packed, absmax, N, K, bs, y, scratch, scratch_bytes, nthreads);
        return minilora_matmul_nf4_ref(x, packed, absmax, 1, N, K, bs, y, scratch, scratch_bytes, nthreads);
    }
    struct i16_args a = {xq, d, packed, absmax, N, K, bs, y};
    int threads = minilora_resolve_threads(nthreads, N * K / 2);
    return minilora_parallel_for(threads, N, 16, !simd ? i16_range_ref : bs == 32 ? i16_range32_avx2 : i16_range_avx2,
                                 &a);
}

int minilora_gemv_nf4_i16_ref(const float *x, const uint8_t *packed, const float *absmax,
                              int64_t N, int64_t K, int64_t blocksize, float *y,
                              void *scratch, int64_t scratch_bytes, int nthreads)
{
    return gemv_i16(x, packed, absmax, N, K, blocksize, y, scratch, scratch_bytes, nthreads, 0, 0);
}

int minilora_gemv_nf4_i16_avx2(const float *x, const uint8_t *packed, const float *absmax,
                               int64_t N, int64_t K, int64_t blocksize, float *y,
                               void *scratch, int64_t scratch_bytes, int nthreads)
{
    if (!minilora_cpu_has_avx2()) return MINILORA_ENOCPU;
    return gemv_i16(x, packed, absmax, N, K, blocksize, y, scratch, scratch_bytes, nthreads, 1, 0);
}

int minilora_gemv_nf4_i16(const float *x, const uint8_t *packed, const float *absmax,
                          int64_t N, int64_t K, int64_t blocksize, float *y,
                          void *scratch, int64_t scratch_bytes, int nthreads)
{
    return gemv_i16(x, packed, absmax, N, K, blocksize, y, scratch, scratch_bytes, nthreads,
                    minilora_cpu_has_avx2(), 1);
}
