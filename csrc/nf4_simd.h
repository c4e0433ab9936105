/* Inline AVX2 helpers shared by nf4.c, nf4_matmul.c and nf4_gemm.c (internal; not part of the C API).
 *
 * nf4_decode32: 16 packed bytes (32 codes, element 2k in the HIGH nibble of byte k) -> 32 float32 NF4
 * values in element order, as four __m256. The "byte-plane" trick of spec/kernels.md: vpshufb looks a
 * code up in a 16-entry byte table, so each of the 4 bytes of the float32 NF4 value has its own table
 * (plane k = byte k of NF4[c]); unpacking the 4 looked-up planes re-assembles the float32 bit patterns.
 */
#ifndef MINILORA_NF4_SIMD_H
#define MINILORA_NF4_SIMD_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include "minilora.h"
#include "minilora_tables.h"

#define NF4_AVX2 __attribute__((target("avx2,fma,f16c")))

struct nf4_planes {
    __m256i plane[4];      /* plane[k] byte c = byte k of the float32 NF4[c], in both 128-bit lanes */
    __m256i select;        /* which packed byte each code position reads (see nf4_decode32) */
    __m256i hi_nibble;     /* 0x00F0 per 16-bit word: keeps the high nibble of the even byte */
    __m256i lo_nibble;     /* 0x0F00 per 16-bit word: keeps the low nibble of the odd byte */
};

static inline NF4_AVX2 struct nf4_planes nf4_planes_load(void)
{
    uint8_t bytes[4][16];
    for (int c = 0; c < 16; c++) {
        uint32_t bits;
        memcpy(&bits, &MINILORA_NF4[c], 4);
        for (int k = 0; k < 4; k++) bytes[k][c] = (uint8_t)(bits >> (8 * k));
    }
    struct nf4_planes t;
    for (int k = 0; k < 4; k++)
        t.plane[k] = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)bytes[k]));
    t.select = _mm256_setr_epi8(0, 0, 1, 1, 4, 4, 5, 5, 8, 8, 9, 9, 12, 12, 13, 13,
                                2, 2, 3, 3, 6, 6, 7, 7, 10, 10, 11, 11, 14, 14, 15, 15);
    t.hi_nibble = _mm256_set1_epi16(0x00F0);
    t.lo_nibble = _mm256_set1_epi16(0x0F00);
    return t;
}

/* Replaces, for j = 0..31:  code = (j & 1) ? byte[j/2] & 0x0F : byte[j/2] >> 4;  f[j] = NF4[code]. */
static inline NF4_AVX2 void nf4_decode32(const uint8_t *p, const struct nf4_planes *t, __m256 f[4])
{
    __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p));
    /* Each byte twice; lane 0 takes bytes {0,1,4,5,8,9,12,13}, lane 1 bytes {2,3,6,7,10,11,14,15}, so that
     * after the unpacks below float lane i of f[q] is element 8q + i. */
    __m256i s = _mm256_shuffle_epi8(v, t->select);
    __m256i c = _mm256_or_si256(_mm256_srli_epi16(_mm256_and_si256(s, t->hi_nibble), 4),
                                _mm256_and_si256(s, t->lo_nibble));   /* even byte: hi nibble, odd: lo */
    __m256i b0 = _mm256_shuffle_epi8(t->plane[0], c), b1 = _mm256_shuffle_epi8(t->plane[1], c);
    __m256i b2 = _mm256_shuffle_epi8(t->plane[2], c), b3 = _mm256_shuffle_epi8(t->plane[3], c);
    __m256i lo01 = _mm256_unpacklo_epi8(b0, b1), lo23 = _mm256_unpacklo_epi8(b2, b3);
    __m256i hi01 = _mm256_unpackhi_epi8(b0, b1), hi23 = _mm256_unpackhi_epi8(b2, b3);
    f[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(lo01, lo23));   /* elements 0..7 */
    f[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(lo01, lo23));   /* 8..15 */
    f[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(hi01, hi23));   /* 16..23 */
    f[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(hi01, hi23));   /* 24..31 */
}

/* GEMV decode: 32 packed bytes (64 codes) -> 64 float32 NF4 values in "GEMV order", as 2 x four __m256.
 * The byte planes of nf4_decode32, but without its `select` shuffle: nf4_split64 separates the nibbles of
 * all 32 bytes with ALU ops (>>4, &0x0F), so 12 instead of 13 shuffles per 32 values and 1.5 instead of 4
 * ALU ops. The price is an element order that the caller undoes on x once per call: for half h (0: the
 * high nibbles = even elements, 1: the low nibbles = odd elements),
 *     nf4_decode32_gemv(codes[h]) -> f[q], float lane 4L + p  holds element  2 * (16L + 4q + p) + h,
 * 128-bit lane L covering packed bytes 16L..16L+15 (elements 32L..32L+31: one block of 32 per lane when
 * blocksize = 32). nf4_gemv_position(e) = 32h + 8q + 4L + p is where element e of the 64 lands. */
static inline int nf4_gemv_position(int e)
{
    int h = e & 1, byte = e >> 1, L = byte >> 4, q = (byte >> 2) & 3, p = byte & 3;
    return 32 * h + 8 * q + 4 * L + p;
}

/* Software prefetch distance of the GEMVs (exact and int16) for the weights: one 4096-wide row ahead. The
 * hardware prefetchers stop at 4 KB pages; this measured 3-12 % faster for 4096 x 4096 and 11008 x 4096,
 * warm and cold. */
enum { GEMV_PREFETCH_BYTES = 2048 };

/* The GEMVs with blocksize 32 take a row's weights in groups of 64 whose 128-bit lane L is block k/32 + L.
 * gemv32_group: the group's 32 packed bytes; a last half group (K - k == 32) reads only its 16, the upper
 * lane zero. gemv32_scale: lane L = absmax of block k/32 + L, 0 for the missing half of a last group. */
static inline NF4_AVX2 __m256i gemv32_group(const uint8_t *w_n, int64_t k, int64_t K)
{
    return k + 64 <= K ? _mm256_loadu_si256((const __m256i *)(w_n + k / 2))
                       : _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *)(w_n + k / 2)));
}

static inline NF4_AVX2 __m256 gemv32_scale(const float *absmax_n, int64_t k, int64_t K)
{
    return _mm256_setr_m128(_mm_set1_ps(absmax_n[k / 32]), _mm_set1_ps(k + 64 <= K ? absmax_n[k / 32 + 1] : 0.0f));
}

/* Replaces codes[0] byte i = byte[i] >> 4 (element 2i), codes[1] byte i = byte[i] & 0x0F (element 2i + 1). */
static inline NF4_AVX2 void nf4_split64(__m256i v, __m256i codes[2])
{
    __m256i nibble = _mm256_set1_epi8(0x0F);
    codes[0] = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
    codes[1] = _mm256_and_si256(v, nibble);
}

/* Replaces f[pos(j)] = NF4[codes byte of j] for the 32 elements j of one half (order above). */
static inline NF4_AVX2 void nf4_decode32_gemv(__m256i c, const struct nf4_planes *t, __m256 f[4])
{
    __m256i b0 = _mm256_shuffle_epi8(t->plane[0], c), b1 = _mm256_shuffle_epi8(t->plane[1], c);
    __m256i b2 = _mm256_shuffle_epi8(t->plane[2], c), b3 = _mm256_shuffle_epi8(t->plane[3], c);
    __m256i lo01 = _mm256_unpacklo_epi8(b0, b1), lo23 = _mm256_unpacklo_epi8(b2, b3);
    __m256i hi01 = _mm256_unpackhi_epi8(b0, b1), hi23 = _mm256_unpackhi_epi8(b2, b3);
    f[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(lo01, lo23));   /* bytes 16L + 0..3 */
    f[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(lo01, lo23));   /* 16L + 4..7 */
    f[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(hi01, hi23));   /* 16L + 8..11 */
    f[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(hi01, hi23));   /* 16L + 12..15 */
}

/* Replaces packed[k] = code[2k] << 4 | code[2k+1] for k = 0..15; c0..c3 hold codes 0-7, ..., 24-31 (int32). */
static inline NF4_AVX2 __m128i pack_codes32(__m256i c0, __m256i c1, __m256i c2, __m256i c3)
{
    __m256i b = _mm256_packus_epi16(_mm256_packs_epi32(c0, c1), _mm256_packs_epi32(c2, c3));
    b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));   /* bytes in order */
    __m256i w = _mm256_maddubs_epi16(b, _mm256_set1_epi16(0x0110));              /* 16*even + odd */
    return _mm_packus_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
}

static inline NF4_AVX2 float hmax_ps(__m256 v)
{
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}

static inline NF4_AVX2 float hsum_ps(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Replaces store_dequant(out, dtype, j + i, w[i]) for i = 0..7 (the same roundings). */
static inline NF4_AVX2 void store8(void *out, int dtype, int64_t j, __m256 w)
{
    if (dtype == MINILORA_FLOAT32) {
        _mm256_storeu_ps((float *)out + j, w);
    } else if (dtype == MINILORA_BFLOAT16) {
        __m256i bits = _mm256_castps_si256(w);                    /* (bits + 0x7FFF + bit16) >> 16 */
        __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
        __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7FFF)), odd), 16);
        __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(0x40));   /* NaN lanes */
        r = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(quiet),
                                                 _mm256_cmp_ps(w, w, _CMP_UNORD_Q)));
        __m128i h = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
        _mm_storeu_si128((__m128i *)((uint16_t *)out + j), h);
    } else {
        _mm_storeu_si128((__m128i *)((uint16_t *)out + j), _mm256_cvtps_ph(w, _MM_FROUND_TO_NEAREST_INT));
    }
}

#endif
