/* float32 -> bfloat16 bits, shared by the dequantiser (nf4.c) and the merge (lora_merge.c); internal.
 *
 * Numbers: bitsandbytes' formula (bits + 0x7FFF + bit16) >> 16, round to nearest even (spec nf4.md §4).
 * NaN: truncated, with the quiet bit set, as minilora.nf4.cast_float32 does; the formula alone would wrap a
 * NaN with bits >= 0xFFFF8000 around to +0.0 and one >= 0x7FFF8000 to -0.0 (docs/nf4.md §5).
 * The AVX2 stores (nf4_simd.h store8, lora_merge.c finish8) vectorise the same two cases. */
#ifndef MINILORA_BF16_H
#define MINILORA_BF16_H

#include <stdint.h>
#include <string.h>

static inline uint16_t minilora_f32_to_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u >> 16) | 0x40u);   /* quiet NaN */
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

#endif
