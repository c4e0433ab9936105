/* Roofline probe for the benchmarks: read n bytes once, as fast as the machine streams them.
 *
 * minilora_stream_read(p, n, nthreads, out): *out = XOR of the n bytes' 32-byte words folded to 64 bits
 * (a result the compiler cannot drop; its value means nothing). p (n,) uint8, n % 32 == 0. Split over
 * the same thread pool as the kernels, so a GEMV's GB/s and this one's are directly comparable.
 */
#include <immintrin.h>
#include <stdint.h>
#include "minilora.h"

struct stream_args {
    const uint8_t *p;
    uint64_t partial[MINILORA_MAX_THREADS];
};

__attribute__((target("avx2")))
static void stream_range(void *ctx, int tid, int64_t begin, int64_t end)
{
    struct stream_args *a = ctx;
    __m256i x0 = _mm256_setzero_si256(), x1 = x0, x2 = x0, x3 = x0;
    int64_t i = begin;
    for (; i + 128 <= end; i += 128) {
        x0 = _mm256_xor_si256(x0, _mm256_loadu_si256((const __m256i *)(a->p + i)));
        x1 = _mm256_xor_si256(x1, _mm256_loadu_si256((const __m256i *)(a->p + i + 32)));
        x2 = _mm256_xor_si256(x2, _mm256_loadu_si256((const __m256i *)(a->p + i + 64)));
        x3 = _mm256_xor_si256(x3, _mm256_loadu_si256((const __m256i *)(a->p + i + 96)));
    }
    for (; i < end; i += 32) x0 = _mm256_xor_si256(x0, _mm256_loadu_si256((const __m256i *)(a->p + i)));
    __m256i x = _mm256_xor_si256(_mm256_xor_si256(x0, x1), _mm256_xor_si256(x2, x3));
    a->partial[tid] ^= (uint64_t)(_mm256_extract_epi64(x, 0) ^ _mm256_extract_epi64(x, 1)
                                  ^ _mm256_extract_epi64(x, 2) ^ _mm256_extract_epi64(x, 3));
}

int minilora_stream_read(const uint8_t *p, int64_t n, int nthreads, uint64_t *out)
{
    if (!p || !out || n < 0 || n % 32) return MINILORA_EINVAL;
    if (!minilora_cpu_has_avx2()) return MINILORA_ENOCPU;
    struct stream_args a = {p, {0}};
    int threads = minilora_resolve_threads(nthreads, n);
    int rc = minilora_parallel_for(threads, n, 4096, stream_range, &a);
    *out = 0;
    for (int t = 0; t < MINILORA_MAX_THREADS; t++) *out ^= a.partial[t];
    return rc;
}
