/* Double quantisation of NF4 absmax values (QLoRA "DQ"; bitsandbytes 0.50 CPU, shared/spec/nf4.md section 3).
 *
 * exact_mean_f32: mean = the float32 nearest (ties to even) to the exact mean of x (n,) float32.
 *                 Every float32 is an integer multiple of 2^-149, so the sum is an exact integer in those
 *                 units (a 384-bit accumulator); one long division by n and one rounding follow.
 * double_quantize: absmax (nblocks,) float32, offset float32 -> codes (nblocks,) uint8,
 *                 nested_absmax (ceil(nblocks/256),) float32. Per nested block of 256 (last may be short):
 *                   c = absmax - offset;  a2 = max|c| (NaN ignored);  a2 == 0 -> every code 0, else
 *                   t = clamp(c * (1.0f / a2), -1, 1);  u = (t + 1.0f) * 0.5f;
 *                   idx = trunc(fmaf(u, 65535.0f, 0.5f))  (one rounding; NaN -> 0);  code = LUT[idx]
 *                   LUT[i] = #{k in 0..254 : M_k < V_i},  M_k = 0.5f*(DYN[k]+DYN[k+1]),
 *                   V_i = -1.0f + (2.0f*i)/65535.0f  (computed per element by binary search: no table).
 * dequantize_absmax: absmax[b] = float32(float32(DYN[codes[b]] * nested_absmax[b/256]) + offset), two
 *                 roundings: the build uses -ffp-contract=off so a*b+c is never fused here.
 * Scalar only: the statistics are 1/64 of the weight data, and all of this is exact integer or float32 work.
 */
#include <math.h>
#include <stdint.h>
#include "minilora.h"
#include "minilora_tables.h"

/* ------------------------------------------------------------------ exact mean */
enum { LIMBS = 6 };   /* 384 bits: 24-bit mantissa << 253, times n < 2^63, times 2 (one rounding bit) */

static void big_add(uint64_t acc[LIMBS], uint64_t mant, int shift)
{
    int limb = shift / 64, bit = shift % 64;
    unsigned __int128 carry = (unsigned __int128)mant << bit;    /* < 2^88: spans two limbs */
    for (int i = limb; i < LIMBS && carry; i++) {
        carry += acc[i];
        acc[i] = (uint64_t)carry;
        carry >>= 64;
    }
}

static int big_less(const uint64_t a[LIMBS], const uint64_t b[LIMBS])
{
    for (int i = LIMBS - 1; i >= 0; i--)
        if (a[i] != b[i]) return a[i] < b[i];
    return 0;
}

static void big_sub(uint64_t a[LIMBS], const uint64_t b[LIMBS])   /* a -= b, a >= b */
{
    uint64_t borrow = 0;
    for (int i = 0; i < LIMBS; i++) {
        uint64_t d = a[i] - b[i] - borrow;
        borrow = (a[i] < b[i]) || (a[i] - b[i] < borrow);
        a[i] = d;
    }
}

static int big_bit(const uint64_t a[LIMBS], int i) { return (int)(a[i / 64] >> (i % 64)) & 1; }

int minilora_exact_mean_f32(const float *x, int64_t n, float *mean)
{
    if (n < 1 || !x || !mean) return MINILORA_EINVAL;
    uint64_t pos[LIMBS] = {0}, neg[LIMBS] = {0};
    int has_nan = 0, pos_inf = 0, neg_inf = 0;
    for (int64_t i = 0; i < n; i++) {
        if (isnan(x[i])) has_nan = 1;
        else if (isinf(x[i])) { if (x[i] > 0) pos_inf = 1; else neg_inf = 1; }
        else if (x[i] != 0.0f) {
            int e;
            float m = frexpf(fabsf(x[i]), &e);         /* |x| = m * 2^e, m in [0.5, 1) */
            /* |x| = mant * 2^(shift - 150): one extra bit below 2^-149 keeps the rounding bit exact */
            int shift = e - 24 + 150;
            uint64_t mant = (uint64_t)ldexpf(m, 24);
            if (shift < 1) { mant >>= 1 - shift; shift = 1; }  /* subnormal: exact, low bits are zero */
            big_add(x[i] > 0 ? pos : neg, mant, shift);
        }
    }
    if (has_nan || (pos_inf && neg_inf)) { *mean = NAN; return MINILORA_OK; }
    if (pos_inf || neg_inf) { *mean = pos_inf ? INFINITY : -INFINITY; return MINILORA_OK; }
    int negative = big_less(pos, neg);
    uint64_t *s = negative ? neg : pos;
    big_sub(s, negative ? pos : neg);                    /* s = |sum| in units of 2^-150 */
    unsigned __int128 rem = 0;                           /* q = s / n (long division), sticky = rem != 0 */
    for (int i = LIMBS - 1; i >= 0; i--) {
        unsigned __int128 cur = (rem << 64) | s[i];
        s[i] = (uint64_t)(cur / (uint64_t)n);
        rem = cur % (uint64_t)n;
    }
    int top = -1;
    for (int i = 64 * LIMBS - 1; i >= 0 && top < 0; i--)
        if (big_bit(s, i)) top = i;
    if (top < 0) { *mean = negative ? -0.0f : 0.0f; return MINILORA_OK; }   /* |mean| < 2^-150 */
    int sh = top - 23 > 1 ? top - 23 : 1;              /* keep 24 bits, or the 2^-149 subnormal grid */
    uint64_t keep = 0;
    for (int i = top; i >= sh; i--) keep = keep << 1 | (uint64_t)big_bit(s, i);
    int round = big_bit(s, sh - 1), sticky = rem != 0;
    for (int i = sh - 2; i >= 0 && !sticky; i--) sticky = big_bit(s, i);
    if (round && (sticky || (keep & 1))) keep++;         /* nearest, ties to even */
    float r = ldexpf((float)keep, sh - 150);             /* exact: keep <= 2^24 */
    *mean = negative ? -r : r;
    return MINILORA_OK;
}

/* ------------------------------------------------------------------ double quantisation */
/* LUT[idx] = #{k : M_k < V_idx} by binary search over the 255 ascending midpoints. */
static uint8_t nested_code(uint32_t idx)
{
    float v = -1.0f + (2.0f * (float)idx) / 65535.0f;
    int lo = 0, hi = 255;
    while (lo < hi) {
        int k = (lo + hi) / 2;
        float m_k = 0.5f * (MINILORA_DYNAMIC_MAP[k] + MINILORA_DYNAMIC_MAP[k + 1]);
        if (m_k < v) lo = k + 1;
        else hi = k;
    }
    return (uint8_t)lo;
}

int minilora_double_quantize(const float *absmax, int64_t nblocks, float offset,
                             uint8_t *codes, float *nested_absmax)
{
    if (nblocks < 1 || !absmax || !codes || !nested_absmax) return MINILORA_EINVAL;
    const int64_t nb = MINILORA_NESTED_BLOCKSIZE;
    for (int64_t g = 0; g * nb < nblocks; g++) {
        int64_t b0 = g * nb, b1 = b0 + nb < nblocks ? b0 + nb : nblocks;
        float a2 = 0.0f;
        for (int64_t b = b0; b < b1; b++) {
            float a = fabsf(absmax[b] - offset);
            if (a > a2) a2 = a;                          /* a NaN compares false: ignored */
        }
        nested_absmax[g] = a2;
        float recip = 1.0f / a2;
        for (int64_t b = b0; b < b1; b++) {
            if (a2 == 0.0f) { codes[b] = 0; continue; }
            float t = (absmax[b] - offset) * recip;
            t = t < -1.0f ? -1.0f : (t > 1.0f ? 1.0f : t);  /* NaN passes through */
            float u = (t + 1.0f) * 0.5f;
            float fused = fmaf(u, 65535.0f, 0.5f);        /* the one rounding of bitsandbytes' fmaf */
            uint32_t idx = fused != fused ? 0u : (uint32_t)fused;
            codes[b] = nested_code(idx & 0xFFFFu);
        }
    }
    return MINILORA_OK;
}

int minilora_dequantize_absmax(const uint8_t *codes, const float *nested_absmax, int64_t nblocks,
                               float offset, float *absmax)
{
    if (nblocks < 1 || !codes || !nested_absmax || !absmax) return MINILORA_EINVAL;
    for (int64_t b = 0; b < nblocks; b++) {
        float scaled = MINILORA_DYNAMIC_MAP[codes[b]] * nested_absmax[b / MINILORA_NESTED_BLOCKSIZE];
        absmax[b] = scaled + offset;                     /* two roundings (-ffp-contract=off) */
    }
    return MINILORA_OK;
}
