/* CPU feature detection and the smoke kernel.
 *
 * minilora_cpu_has_avx2: 1 when __builtin_cpu_supports reports avx2, fma and f16c.
 * minilora_saxpy: y[i] = a * x[i] + y[i], float32, n >= 0; proves the extension builds and links.
 */
#include <stdint.h>
#include "minilora.h"

int minilora_cpu_has_avx2(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")
        && __builtin_cpu_supports("f16c");
#else
    return 0;
#endif
}

int minilora_saxpy(int64_t n, float a, const float *restrict x, float *restrict y)
{
    if (n < 0) return MINILORA_EINVAL;
    for (int64_t i = 0; i < n; i++) y[i] = a * x[i] + y[i];
    return MINILORA_OK;
}
