/* LoRA merge: out = round_to_dtype(float32(W) + float32(s) * sum_r B[n,r] * A[r,k])   (minilora.lora).
 *
 * Delta:   acc = 0; for r = 0 .. R-1: acc = fmaf(B[n*R + r], A[r*K + k], acc);  d = acc * s   (float32)
 *          - the float32 FMA chain in r order that torch's CPU matmul runs for PEFT (lora.delta_weight).
 *          Unmerge passes -s: acc * (-s) == -(acc * s) exactly, so out = round(W - delta).
 * Merge:   o = float32(W[n,k]) + d (one float32 rounding), then ONE rounding to the output dtype:
 *          float32 as is; bfloat16 (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16; float16 IEEE RNE.
 * Layout:  W, out (N, K) row-major, elements of `dtype` (float32, or uint16 bit patterns of bfloat16 /
 *          float16); A (R, K) and B (N, R) float32 row-major. Conv1D / Embedding layouts (W stored (K, N))
 *          call this with the roles swapped: W (K, N), A' = B^T (R, N), B' = A^T (K, R) - the same products
 *          summed in the same order, so the same bits.
 * Stats:   *max_abs_delta = max |float32(out) - float32(W)| over elements where both are finite;
 *          *nonfinite = #elements where out is NaN / inf and W was finite; *first_nonfinite = the smallest
 *          flat index of one (-1 if none). NaN inputs stay NaN (payload bits are not specified).
 * Scratch: the AVX2 variant packs A once into 8-column panels, panel[(g*R + r)*8 + l] = A[r, 8g + l], so
 *          that a row reads A contiguously (A's rows a power-of-two apart would share one L1 set); the
 *          caller passes R * (K - K % 8) floats (minilora_lora_merge_scratch_floats).
 * Threads: rows are split between threads; every element is computed by the same statements.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#include "bf16.h"
#include "minilora.h"

static inline float f32_from_bits(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t bits_from_f32(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

static inline float half_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, mant = h & 0x3FF;
    if (exp == 0x1F) return f32_from_bits(sign | 0x7F800000 | (mant << 13));
    if (exp == 0) {                                    /* zero or subnormal: mant * 2^-24, exact */
        float v = (float)mant * 5.9604644775390625e-08f;
        return sign ? -v : v;
    }
    return f32_from_bits(sign | ((exp + 112) << 23) | (mant << 13));
}

static inline uint16_t f32_to_half(float f)
{
    uint32_t x = bits_from_f32(f), sign = (x >> 16) & 0x8000, ax = x & 0x7FFFFFFF;
    if (ax > 0x7F800000) return (uint16_t)(sign | 0x7E00 | ((ax >> 13) & 0x3FF));   /* NaN stays NaN */
    if (ax >= 0x477FF000) return (uint16_t)(sign | 0x7C00);            /* >= 65520 rounds to inf */
    if (ax < 0x38800000) {                                             /* below 2^-14: subnormal half */
        float scaled = f32_from_bits(ax) * 16777216.0f;                /* * 2^24, exact */
        return (uint16_t)(sign | (uint32_t)nearbyintf(scaled));       /* round to nearest even */
    }
    uint32_t h = ((((ax >> 23) - 112) << 10) | ((ax & 0x7FFFFF) >> 13)), rest = ax & 0x1FFF;
    if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) h++;             /* a carry into the exponent is right */
    return (uint16_t)(sign | h);
}

static inline float load_w(const void *W, int dtype, int64_t i)
{
    if (dtype == MINILORA_FLOAT32) return ((const float *)W)[i];
    uint16_t h = ((const uint16_t *)W)[i];
    return dtype == MINILORA_BFLOAT16 ? f32_from_bits((uint32_t)h << 16) : half_to_f32(h);
}

/* Store o rounded to dtype; return the stored value as float32. */
static inline float store_out(void *out, int dtype, int64_t i, float o)
{
    if (dtype == MINILORA_FLOAT32) { ((float *)out)[i] = o; return o; }
    if (dtype == MINILORA_BFLOAT16) {
        uint16_t b = minilora_f32_to_bf16(o);
        ((uint16_t *)out)[i] = b;
        return f32_from_bits((uint32_t)b << 16);
    }
    uint16_t h = f32_to_half(o);
    ((uint16_t *)out)[i] = h;
    return half_to_f32(h);
}

typedef struct {
    const void *W; void *out; const float *A, *B; int64_t N, K, R; float s; int dtype; const float *panel;
    float max_delta[MINILORA_MAX_THREADS];
    int64_t nonfinite[MINILORA_MAX_THREADS], first[MINILORA_MAX_THREADS];
} merge_args;

/* One element: the scalar statement of the reference, also the tail of the AVX2 rows. */
static inline void merge_one(merge_args *a, int tid, int64_t n, int64_t k)
{
    const float *B_n = a->B + n * a->R;
    float acc = 0.0f;
    for (int64_t r = 0; r < a->R; r++) acc = fmaf(B_n[r], a->A[r * a->K + k], acc);
    int64_t i = n * a->K + k;
    float w = load_w(a->W, a->dtype, i);
    float o = store_out(a->out, a->dtype, i, w + acc * a->s);
    if (isfinite(w) && !isfinite(o)) {
        if (a->nonfinite[tid]++ == 0 || i < a->first[tid]) a->first[tid] = i;
    } else if (isfinite(w) && fabsf(o - w) > a->max_delta[tid]) {
        a->max_delta[tid] = fabsf(o - w);
    }
}

static void rows_ref(void *ctx, int tid, int64_t begin, int64_t end)
{
    merge_args *a = ctx;
    for (int64_t n = begin; n < end; n++)
        for (int64_t k = 0; k < a->K; k++) merge_one(a, tid, n, k);
}

/* The last four lines of merge_one for 8 elements whose FMA sums are acc[0..8) and whose base weights,
 * as float32, are w_in[0..8) (read before finish8 stored anything: W may be the output): the rare path. */
static void finish8_scalar(merge_args *a, int tid, int64_t i, const float acc[8], const float w_in[8])
{
    for (int l = 0; l < 8; l++) {
        float w = w_in[l];
        float o = store_out(a->out, a->dtype, i + l, w + acc[l] * a->s);
        if (isfinite(w) && !isfinite(o)) {
            if (a->nonfinite[tid]++ == 0 || i + l < a->first[tid]) a->first[tid] = i + l;
        } else if (isfinite(w) && fabsf(o - w) > a->max_delta[tid]) {
            a->max_delta[tid] = fabsf(o - w);
        }
    }
}

/* Finish 8 elements W[i .. i+8) from their 8 FMA sums: o = w + acc * s, store_out, and the statistics.
 * The vector form of the last four lines of merge_one, for the common case where w, o and the stored
 * value are all finite (then |stored - w| is finite too, and is the statistic). Any other lane (NaN, inf,
 * overflow on rounding) sends the 8 elements through finish8_scalar, which overwrites them with the
 * reference statements - so the vector bf16 rounding need not get NaN right. */
__attribute__((target("avx2,fma,f16c")))
static inline void finish8(merge_args *a, int tid, int64_t i, __m256 acc, __m256 *maxd)
{
    const __m256 sign_mask = _mm256_set1_ps(-0.0f), inf8 = _mm256_set1_ps(INFINITY);
    __m256 w, ob;
    if (a->dtype == MINILORA_FLOAT32) {                      /* w = load_w(W, dtype, i) */
        w = _mm256_loadu_ps((const float *)a->W + i);
    } else if (a->dtype == MINILORA_BFLOAT16) {
        __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)a->W + i));
        w = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    } else {
        w = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)a->W + i)));
    }
    __m256 o = _mm256_add_ps(w, _mm256_mul_ps(acc, _mm256_set1_ps(a->s)));   /* o = w + acc * s */
    if (a->dtype == MINILORA_FLOAT32) {
        _mm256_storeu_ps((float *)a->out + i, o);
        ob = o;
    } else if (a->dtype == MINILORA_BFLOAT16) {
        /* minilora_f32_to_bf16 (bf16.h) for non-NaN o: (u + 0x7FFF + ((u >> 16) & 1)) >> 16 */
        __m256i u = _mm256_castps_si256(o);
        __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
        __m256i rnd = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
        __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(rnd), _mm256_extracti128_si256(rnd, 1));
        _mm_storeu_si128((__m128i *)((uint16_t *)a->out + i), packed);
        ob = _mm256_castsi256_ps(_mm256_slli_epi32(rnd, 16));
    } else {
        __m128i h = _mm256_cvtps_ph(o, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm_storeu_si128((__m128i *)((uint16_t *)a->out + i), h);
        ob = _mm256_cvtph_ps(h);
    }
    /* d = |ob - w| is finite iff w and ob are (finite values cannot differ by more than FLT_MAX here:
     * that would need |acc * s| > FLT_MAX, i.e. an infinite o); a NaN o is tested on its own. */
    __m256 d = _mm256_andnot_ps(sign_mask, _mm256_sub_ps(ob, w));
    __m256 ok = _mm256_and_ps(_mm256_cmp_ps(d, inf8, _CMP_LT_OQ), _mm256_cmp_ps(o, o, _CMP_ORD_Q));
    if (_mm256_movemask_ps(ok) != 0xFF) {
        float acc_lanes[8], w_lanes[8];
        _mm256_storeu_ps(acc_lanes, acc);
        _mm256_storeu_ps(w_lanes, w);
        finish8_scalar(a, tid, i, acc_lanes, w_lanes);
        return;
    }
    *maxd = _mm256_max_ps(*maxd, d);
}

/* acc = fmaf(B[n,r], A[r,k], acc) for r = 0..R-1, eight columns per vector. Two rows x four vectors
 * (32 columns) per pass: eight independent FMA chains keep both FMA pipes busy (four chains would wait on
 * the FMA latency), and each panel load serves two rows. Named accumulators (an accumulator array would be
 * spilled by GCC 12). The panel keeps the R rows of A for one 8-column group contiguous. */
__attribute__((target("avx2,fma,f16c")))
static inline void two_rows32(merge_args *a, int tid, int64_t n, int64_t g, __m256 *maxd)
{
    const int64_t R = a->R;
    const float *B0 = a->B + n * R, *B1 = B0 + R;
    const float *p0 = a->panel + g * R * 8, *p1 = p0 + R * 8, *p2 = p1 + R * 8, *p3 = p2 + R * 8;
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c02 = c00, c03 = c00;    /* row n,   columns 8g .. 8g+31 */
    __m256 c10 = c00, c11 = c00, c12 = c00, c13 = c00;                    /* row n+1 */
    for (int64_t r = 0; r < R; r++) {
        const __m256 b0 = _mm256_set1_ps(B0[r]), b1 = _mm256_set1_ps(B1[r]);
        __m256 q0 = _mm256_loadu_ps(p0 + r * 8), q1 = _mm256_loadu_ps(p1 + r * 8);
        __m256 q2 = _mm256_loadu_ps(p2 + r * 8), q3 = _mm256_loadu_ps(p3 + r * 8);
        /* keep the four panel vectors in registers: folded into both rows' FMAs they would be loaded twice */
        __asm__("" : "+x"(q0), "+x"(q1), "+x"(q2), "+x"(q3));
        c00 = _mm256_fmadd_ps(b0, q0, c00); c01 = _mm256_fmadd_ps(b0, q1, c01);
        c02 = _mm256_fmadd_ps(b0, q2, c02); c03 = _mm256_fmadd_ps(b0, q3, c03);
        c10 = _mm256_fmadd_ps(b1, q0, c10); c11 = _mm256_fmadd_ps(b1, q1, c11);
        c12 = _mm256_fmadd_ps(b1, q2, c12); c13 = _mm256_fmadd_ps(b1, q3, c13);
    }
    const int64_t i = n * a->K + g * 8, j = i + a->K;
    finish8(a, tid, i, c00, maxd); finish8(a, tid, i + 8, c01, maxd);
    finish8(a, tid, i + 16, c02, maxd); finish8(a, tid, i + 24, c03, maxd);
    finish8(a, tid, j, c10, maxd); finish8(a, tid, j + 8, c11, maxd);
    finish8(a, tid, j + 16, c12, maxd); finish8(a, tid, j + 24, c13, maxd);
}

/* One row, four vectors (32 columns) per pass: the odd row of a thread's range. */
__attribute__((target("avx2,fma,f16c")))
static inline void one_row32(merge_args *a, int tid, int64_t n, int64_t g, __m256 *maxd)
{
    const int64_t R = a->R;
    const float *B_n = a->B + n * R;
    const float *p0 = a->panel + g * R * 8, *p1 = p0 + R * 8, *p2 = p1 + R * 8, *p3 = p2 + R * 8;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
    for (int64_t r = 0; r < R; r++) {
        const __m256 b = _mm256_set1_ps(B_n[r]);
        acc0 = _mm256_fmadd_ps(b, _mm256_loadu_ps(p0 + r * 8), acc0);
        acc1 = _mm256_fmadd_ps(b, _mm256_loadu_ps(p1 + r * 8), acc1);
        acc2 = _mm256_fmadd_ps(b, _mm256_loadu_ps(p2 + r * 8), acc2);
        acc3 = _mm256_fmadd_ps(b, _mm256_loadu_ps(p3 + r * 8), acc3);
    }
    const int64_t i = n * a->K + g * 8;
    finish8(a, tid, i, acc0, maxd); finish8(a, tid, i + 8, acc1, maxd);
    finish8(a, tid, i + 16, acc2, maxd); finish8(a, tid, i + 24, acc3, maxd);
}

/* Columns past the last full 32: single 8-column groups, then scalar elements. */
__attribute__((target("avx2,fma,f16c")))
static inline void row_tail(merge_args *a, int tid, int64_t n, int64_t g0, __m256 *maxd)
{
    const int64_t R = a->R, G = a->K / 8;
    const float *B_n = a->B + n * R;
    for (int64_t g = g0; g < G; g++) {
        const float *p = a->panel + g * R * 8;
        __m256 acc = _mm256_setzero_ps();
        for (int64_t r = 0; r < R; r++) acc = _mm256_fmadd_ps(_mm256_set1_ps(B_n[r]), _mm256_loadu_ps(p + r * 8), acc);
        finish8(a, tid, n * a->K + g * 8, acc, maxd);
    }
    for (int64_t k = G * 8; k < a->K; k++) merge_one(a, tid, n, k);
}

__attribute__((target("avx2,fma,f16c")))
static void rows_avx2(void *ctx, int tid, int64_t begin, int64_t end)
{
    merge_args *a = ctx;
    const int64_t G32 = a->K / 32 * 4;                         /* 8-column groups in full 32-column passes */
    __m256 maxd = _mm256_setzero_ps();
    int64_t n = begin;
    for (; n + 2 <= end; n += 2) {
        for (int64_t g = 0; g < G32; g += 4) two_rows32(a, tid, n, g, &maxd);
        row_tail(a, tid, n, G32, &maxd);
        row_tail(a, tid, n + 1, G32, &maxd);
    }
    for (; n < end; n++) {
        for (int64_t g = 0; g < G32; g += 4) one_row32(a, tid, n, g, &maxd);
        row_tail(a, tid, n, G32, &maxd);
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, maxd);
    for (int l = 0; l < 8; l++)
        if (lanes[l] > a->max_delta[tid]) a->max_delta[tid] = lanes[l];
}

int64_t minilora_lora_merge_scratch_floats(int64_t K, int64_t R)
{
    return K < 0 || R < 0 ? 0 : R * (K - K % 8);
}

static int run(void (*rows)(void *, int, int64_t, int64_t), const void *W, int dtype, const float *A,
               const float *B, int64_t N, int64_t K, int64_t R, float s, void *out,
               float *max_abs_delta, int64_t *nonfinite, int64_t *first_nonfinite, int nthreads,
               float *scratch, int64_t scratch_floats)
{
    if (N < 0 || K < 0 || R < 0 || (N * K > 0 && (!W || !out || !max_abs_delta || !nonfinite || !first_nonfinite))
        || (R > 0 && K > 0 && !A) || (R > 0 && N > 0 && !B)
        || (dtype != MINILORA_FLOAT32 && dtype != MINILORA_BFLOAT16 && dtype != MINILORA_FLOAT16))
        return MINILORA_EINVAL;
    if (rows == rows_avx2 && scratch_floats < minilora_lora_merge_scratch_floats(K, R)) return MINILORA_EINVAL;
    if (rows == rows_avx2)                                     /* pack A into 8-column panels */
        for (int64_t g = 0; g < K / 8; g++)
            for (int64_t r = 0; r < R; r++)
                memcpy(scratch + (g * R + r) * 8, A + r * K + g * 8, 8 * sizeof(float));
    merge_args a = {W, out, A, B, N, K, R, s, dtype, scratch, {0}, {0}, {0}};
    int elem = dtype == MINILORA_FLOAT32 ? 4 : 2;
    int t = minilora_resolve_threads(nthreads, N * K * (2 * elem) + R * K * 4);
    int status = minilora_parallel_for(t, N, 2, rows, &a);   /* row pairs for rows_avx2 */
    if (status != MINILORA_OK) return status;
    *max_abs_delta = 0.0f; *nonfinite = 0; *first_nonfinite = -1;
    for (int i = 0; i < MINILORA_MAX_THREADS; i++) {
        if (a.max_delta[i] > *max_abs_delta) *max_abs_delta = a.max_delta[i];
        if (a.nonfinite[i] && (*first_nonfinite < 0 || a.first[i] < *first_nonfinite)) *first_nonfinite = a.first[i];
        *nonfinite += a.nonfinite[i];
    }
    return MINILORA_OK;
}

int minilora_lora_merge_ref(const void *W, int dtype, const float *A, const float *B, int64_t N, int64_t K,
                            int64_t R, float s, void *out, float *max_abs_delta, int64_t *nonfinite,
                            int64_t *first_nonfinite, int nthreads, float *scratch, int64_t scratch_floats)
{
    return run(rows_ref, W, dtype, A, B, N, K, R, s, out, max_abs_delta, nonfinite, first_nonfinite, nthreads,
               scratch, scratch_floats);
}

int minilora_lora_merge_avx2(const void *W, int dtype, const float *A, const float *B, int64_t N, int64_t K,
                             int64_t R, float s, void *out, float *max_abs_delta, int64_t *nonfinite,
                             int64_t *first_nonfinite, int nthreads, float *scratch, int64_t scratch_floats)
{
    if (!minilora_cpu_has_avx2()) return MINILORA_ENOCPU;
    return run(rows_avx2, W, dtype, A, B, N, K, R, s, out, max_abs_delta, nonfinite, first_nonfinite, nthreads,
               scratch, scratch_floats);
}

int minilora_lora_merge(const void *W, int dtype, const float *A, const float *B, int64_t N, int64_t K,
                        int64_t R, float s, void *out, float *max_abs_delta, int64_t *nonfinite,
                        int64_t *first_nonfinite, int nthreads, float *scratch, int64_t scratch_floats)
{
    return (minilora_cpu_has_avx2() ? minilora_lora_merge_avx2 : minilora_lora_merge_ref)(
        W, dtype, A, B, N, K, R, s, out, max_abs_delta, nonfinite, first_nonfinite, nthreads, scratch, scratch_floats);
}
