/* minilora C API. Shape legend: M tokens, K in_features, N out_features, R rank.
 * Every function returns an int status (MINILORA_OK = 0); kernels never allocate, print or exit.
 * This header is read verbatim into cffi's cdef: plain C, no #include, no attributes. */
#ifndef MINILORA_H
#define MINILORA_H

/* Status codes. */
#define MINILORA_OK 0
#define MINILORA_EINVAL 1

/* 1 when this CPU supports the AVX2 + FMA + F16C paths, else 0. */
int minilora_cpu_has_avx2(void);

/* Smoke kernel: y[i] = a * x[i] + y[i] for i < n (float32). */
int minilora_saxpy(int64_t n, float a, const float *x, float *y);

#endif
