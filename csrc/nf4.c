/* NF4 block quantise / dequantise (bitsandbytes 0.50 CPU semantics, shared/spec/nf4.md sections 2 and 4).
 *
 * quantize:   x (n,) float32, flat row-major. Block b = x[b*bs, min((b+1)*bs, n)).
 *             full block:    absmax[b] = max|x| (NaN if any NaN), v = x * (1.0f / max(absmax, TINY))
 *             partial last:  absmax[b] = max(max|x|, TINY) (stored clamped),  v = x / absmax[b]
 *             code = #{ i : MID[i] < v }  (strict <: a value on a bound gets the lower code; NaN -> 15)
 *             The spec's clamp(v, -1, 1) is omitted: every MID lies in (-1, 1), so it changes no code.
 * dequantize: out[j] = cast(dtype, float32(NF4[code[j]] * absmax[j / bs])), cast = round to nearest even
 *             (bfloat16 with bitsandbytes' integer formula, float16 with IEEE conversion).
 * Layout:     packed ((n+1)/2,) uint8: byte k = code[2k] << 4 | code[2k+1] (element 2k in the HIGH nibble);
 *             odd n pads the last low nibble with code 7. absmax (ceil(n/bs),) float32. bs in 32..4096, a
 *             power of two, so a block starts on a byte and a full block is a whole number of 32-element
 *             groups (16 bytes), the unit of the AVX2 loops.
 * Threads:    parts are whole blocks; every block is computed by the same statements whichever thread runs it.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#include "bf16.h"
#include "minilora.h"
#include "minilora_tables.h"
#include "nf4_simd.h"

static int valid_blocksize(int64_t bs)
{
    return bs >= 32 && bs <= 4096 && (bs & (bs - 1)) == 0;
}

/* ------------------------------------------------------------------ scalar reference */
static inline uint8_t nf4_code(float v)
{
    /* #{i : MID[i] < v}, written as !(v <= MID[i]) so that a NaN passes every bound: NaN -> 15. */
    uint8_t code = 0;
    for (int i = 0; i < 15; i++) code += !(v <= MINILORA_NF4_MID[i]);
    return code;
}

static inline float block_absmax_ref(const float *x_b, int64_t len)
{
    float am = 0.0f;
    int has_nan = 0;
    for (int64_t j = 0; j < len; j++) {
        float a = fabsf(x_b[j]);
        if (a != a) has_nan = 1;
        else if (a > am) am = a;
    }
    return has_nan ? NAN : am;
}

/* One block of `len` elements starting at flat index b*bs (even). Also the tail of the AVX2 variant. */
static void quantize_block_ref(const float *x_b, int64_t len, int64_t bs, uint8_t *packed_b, float *absmax_b)
{
    float am = block_absmax_ref(x_b, len);
    float am_c = am < MINILORA_TINY ? MINILORA_TINY : am;        /* NaN stays NaN */
    float recip = 1.0f / am_c;
    int full = len == bs;
    *absmax_b = full ? am : am_c;
    for (int64_t j = 0; j < len; j += 2) {
        float v0 = full ? x_b[j] * recip : x_b[j] / am_c;
        uint8_t c1 = MINILORA_ZERO_CODE;
        if (j + 1 < len) c1 = nf4_code(full ? x_b[j + 1] * recip : x_b[j + 1] / am_c);
        packed_b[j / 2] = (uint8_t)(nf4_code(v0) << 4 | c1);
    }
}

static inline void store_dequant(void *out, int dtype, int64_t j, float w)
{
    if (dtype == MINILORA_FLOAT32) {
        ((float *)out)[j] = w;
    } else if (dtype == MINILORA_BFLOAT16) {
        ((uint16_t *)out)[j] = minilora_f32_to_bf16(w);   /* bitsandbytes' rounding; NaN stays NaN (bf16.h) */
    } else {
        _Float16 h = (_Float16)w;                                /* IEEE round to nearest even */
        memcpy((uint16_t *)out + j, &h, 2);
    }
}

struct nf4_args {
    const float *x;
    const uint8_t *packed_in;
    uint8_t *packed;
    float *absmax;
    const float *absmax_in;
    void *out;
    int64_t n, bs;
    int dtype;
};

static void quantize_range_ref(void *ctx, int tid, int64_t b0, int64_t b1)
{
    const struct nf4_args *a = ctx;
    (void)tid;
    for (int64_t b = b0; b < b1; b++) {
        int64_t len = a->n - b * a->bs < a->bs ? a->n - b * a->bs : a->bs;
        quantize_block_ref(a->x + b * a->bs, len, a->bs, a->packed + b * a->bs / 2, a->absmax + b);
    }
}

static void dequantize_range_ref(void *ctx, int tid, int64_t b0, int64_t b1)
{
    const struct nf4_args *a = ctx;
    (void)tid;
    for (int64_t j = b0 * a->bs; j < b1 * a->bs && j < a->n; j++) {
        uint8_t byte = a->packed_in[j / 2];
        uint8_t code = (j & 1) ? (byte & 0x0F) : (byte >> 4);
        store_dequant(a->out, a->dtype, j, MINILORA_NF4[code] * a->absmax_in[j / a->bs]);
    }
}

/* ------------------------------------------------------------------ AVX2 */
__attribute__((target("avx2,fma,f16c")))
static void quantize_range_avx2(void *ctx, int tid, int64_t b0, int64_t b1)
{
    const struct nf4_args *a = ctx;
    (void)tid;
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 mid[15];
    for (int i = 0; i < 15; i++) mid[i] = _mm256_set1_ps(MINILORA_NF4_MID[i]);
    for (int64_t b = b0; b < b1; b++) {
        const float *x_b = a->x + b * a->bs;
        uint8_t *packed_b = a->packed + b * a->bs / 2;
        if (a->n - b * a->bs < a->bs) {                            /* partial last block: scalar */
            quantize_block_ref(x_b, a->n - b * a->bs, a->bs, packed_b, a->absmax + b);
            continue;
        }
        /* replaces block_absmax_ref: running max of |x| per lane, NaNs tracked apart */
        __m256 mx = _mm256_setzero_ps(), nan = _mm256_setzero_ps();
        for (int64_t j = 0; j < a->bs; j += 8) {
            __m256 ax = _mm256_andnot_ps(sign, _mm256_loadu_ps(x_b + j));
            nan = _mm256_or_ps(nan, _mm256_cmp_ps(ax, ax, _CMP_UNORD_Q));
            mx = _mm256_max_ps(mx, ax);
        }
        float am = hmax_ps(mx);
        if (_mm256_movemask_ps(nan)) am = NAN;
        float am_c = am < MINILORA_TINY ? MINILORA_TINY : am;
        a->absmax[b] = am;
        const __m256 recip = _mm256_set1_ps(1.0f / am_c);
        for (int64_t j = 0; j < a->bs; j += 32) {
            /* replaces v = x * recip; code = nf4_code(v), for 4 x 8 elements */
            __m256i c[4];
            for (int q = 0; q < 4; q++) {
                __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x_b + j + 8 * q), recip);
                __m256i cnt = _mm256_setzero_si256();
                for (int i = 0; i < 15; i++)        /* !(v <= MID[i]) is -1 per lane: subtract it */
                    cnt = _mm256_sub_epi32(cnt, _mm256_castps_si256(_mm256_cmp_ps(v, mid[i], _CMP_NLE_UQ)));
                c[q] = cnt;
            }
            /* replaces packed_b[j/2] = code[j] << 4 | code[j+1] for 32 elements */
            _mm_storeu_si128((__m128i *)(packed_b + j / 2), pack_codes32(c[0], c[1], c[2], c[3]));
        }
    }
}

__attribute__((target("avx2,fma,f16c")))
static void dequantize_range_avx2(void *ctx, int tid, int64_t b0, int64_t b1)
{
    const struct nf4_args *a = ctx;
    (void)tid;
    struct nf4_planes planes = nf4_planes_load();
    int64_t end = b1 * a->bs < a->n ? b1 * a->bs : a->n;
    for (int64_t b = b0; b < b1; b++) {
        int64_t j = b * a->bs, block_end = j + a->bs < end ? j + a->bs : end;
        const __m256 am = _mm256_set1_ps(a->absmax_in[b]);
        for (; j + 32 <= block_end; j += 32) {
            /* replaces out[j] = NF4[code[j]] * absmax, 32 elements */
            __m256 f[4];
            nf4_decode32(a->packed_in + j / 2, &planes, f);
            for (int q = 0; q < 4; q++) store8(a->out, a->dtype, j + 8 * q, _mm256_mul_ps(f[q], am));
        }
        for (; j < block_end; j++) {                                /* tail: the _ref statement */
            uint8_t byte = a->packed_in[j / 2];
            uint8_t code = (j & 1) ? (byte & 0x0F) : (byte >> 4);
            store_dequant(a->out, a->dtype, j, MINILORA_NF4[code] * a->absmax_in[j / a->bs]);
        }
    }
}

/* ------------------------------------------------------------------ entry points and dispatch */
static int run_quantize(void (*range)(void *, int, int64_t, int64_t), const float *x, int64_t n, int64_t bs,
                        uint8_t *packed, float *absmax, int nthreads)
{
    if (n < 1 || !valid_blocksize(bs) || !x || !packed || !absmax) return MINILORA_EINVAL;
    struct nf4_args a = {.x = x, .packed = packed, .absmax = absmax, .n = n, .bs = bs};
    int64_t nblocks = (n + bs - 1) / bs;
    return minilora_parallel_for(minilora_resolve_threads(nthreads, 4 * n), nblocks, 1, range, &a);
}

static int run_dequantize(void (*range)(void *, int, int64_t, int64_t), const uint8_t *packed,
                          const float *absmax, int64_t n, int64_t bs, void *out, int dtype, int nthreads)
{
    if (n < 1 || !valid_blocksize(bs) || !packed || !absmax || !out) return MINILORA_EINVAL;
    if (dtype != MINILORA_FLOAT32 && dtype != MINILORA_BFLOAT16 && dtype != MINILORA_FLOAT16)
        return MINILORA_EINVAL;
    struct nf4_args a = {.packed_in = packed, .absmax_in = absmax, .out = out, .n = n, .bs = bs, .dtype = dtype};
    int64_t nblocks = (n + bs - 1) / bs;
    return minilora_parallel_for(minilora_resolve_threads(nthreads, 4 * n), nblocks, 1, range, &a);
}

int minilora_quantize_nf4_ref(const float *x, int64_t n, int64_t blocksize,
                              uint8_t *packed, float *absmax, int nthreads)
{
    return run_quantize(quantize_range_ref, x, n, blocksize, packed, absmax, nthreads);
}

int minilora_quantize_nf4_avx2(const float *x, int64_t n, int64_t blocksize,
                               uint8_t *packed, float *absmax, int nthreads)
{
    if (!minilora_cpu_has_avx2()) return MINILORA_ENOCPU;
    return run_quantize(quantize_range_avx2, x, n, blocksize, packed, absmax, nthreads);
}

int minilora_quantize_nf4(const float *x, int64_t n, int64_t blocksize,
                          uint8_t *packed, float *absmax, int nthreads)
{
    if (minilora_cpu_has_avx2()) return minilora_quantize_nf4_avx2(x, n, blocksize, packed, absmax, nthreads);
    return minilora_quantize_nf4_ref(x, n, blocksize, packed, absmax, nthreads);
}

int minilora_dequantize_nf4_ref(const uint8_t *packed, const float *absmax, int64_t n, int64_t blocksize,
                                void *out, int dtype, int nthreads)
{
    return run_dequantize(dequantize_range_ref, packed, absmax, n, blocksize, out, dtype, nthreads);
}

int minilora_dequantize_nf4_avx2(const uint8_t *packed, const float *absmax, int64_t n, int64_t blocksize,
                                 void *out, int dtype, int nthreads)
{
    if (!minilora_cpu_has_avx2()) return MINILORA_ENOCPU;
    return run_dequantize(dequantize_range_avx2, packed, absmax, n, blocksize, out, dtype, nthreads);
}

int minilora_dequantize_nf4(const uint8_t *packed, const float *absmax, int64_t n, int64_t blocksize,
                            void *out, int dtype, int nthreads)
{
    if (minilora_cpu_has_avx2())
        return minilora_dequantize_nf4_avx2(packed, absmax, n, blocksize, out, dtype, nthreads);
    return minilora_dequantize_nf4_ref(packed, absmax, n, blocksize, out, dtype, nthreads);
}
