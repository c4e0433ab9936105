/* minilora C API. Shape legend: M tokens, K in_features, N out_features, R rank.
 * Every function returns an int status (MINILORA_OK = 0); kernels never allocate, print or exit.
 * This header is read verbatim into cffi's cdef: plain C, no #include, no attributes.
 *
 * Variants: every kernel exists as NAME_ref (plain scalar loops, the C reference), NAME_avx2 (AVX2 + FMA
 * + F16C intrinsics; returns MINILORA_ENOCPU on a CPU without them) and NAME (the dispatcher: avx2 when
 * the CPU has it, else ref). Kernels with no SIMD variant say so. The exact GEMV also has an AVX-512F
 * variant (minilora_matmul_nf4_avx512), which the matmul dispatcher prefers when the CPU has it. All variants give identical bits
 * except the matmuls, which are reductions (summation order differs; see nf4_matmul.c).
 *
 * nthreads: 0 = automatic (1 for small inputs, else min(2, online CPUs)); n >= 1 = exactly n threads
 * (capped at MINILORA_MAX_THREADS), the caller being one of them. No result bit depends on it.
 *
 * Packed NF4 (bitsandbytes layout): byte k holds flat element 2k in its HIGH nibble and 2k+1 in its low
 * nibble; an odd count pads the last low nibble with code 7 (0.0). absmax: one float32 per block of
 * `blocksize` consecutive flat elements (a block may span rows). */
#ifndef MINILORA_H
#define MINILORA_H

/* Status codes (an enum, not #defines, so that cffi sees them too). */
enum minilora_status {
    MINILORA_OK = 0,
    MINILORA_EINVAL = 1,   /* bad size, blocksize, null pointer or scratch too small */
    MINILORA_ENOCPU = 2    /* an _avx2 / _avx512 variant called on a CPU without its instructions */
};

/* Output element types of the dequantisers (round to nearest even, spec nf4.md section 4). */
enum minilora_dtype {
    MINILORA_FLOAT32 = 0,
    MINILORA_BFLOAT16 = 1,
    MINILORA_FLOAT16 = 2
};

enum { MINILORA_MAX_THREADS = 16 };

/* 1 when this CPU supports the AVX2 + FMA + F16C paths, else 0. */
int minilora_cpu_has_avx2(void);

/* Smoke kernel: y[i] = a * x[i] + y[i] for i < n (float32). */
int minilora_saxpy(int64_t n, float a, const float *x, float *y);

/* ---- threads.c: a small pthread pool in which the caller also works ---- */
/* The thread count a kernel uses for `nthreads` (0 = automatic) and `work` bytes touched. */
int minilora_resolve_threads(int nthreads, int64_t work);
/* Cut [0, n) into chunks of whole `grain`s (about 16 per thread); the caller and nthreads - 1 workers
 * claim them and run fn(ctx, tid, begin, end), tid in [0, nthreads) (0 = the caller). Returns when every
 * chunk is done. The chunks depend only on (n, grain, nthreads), never on scheduling. */
int minilora_parallel_for(int nthreads, int64_t n, int64_t grain,
                          void (*fn)(void *ctx, int tid, int64_t begin, int64_t end), void *ctx);
/* For tests: the generation of the pool's last job (0: none since the start or since a fork) and how
 * many pool threads exist in this process. */
int minilora_pool_state(uint32_t *generation, int *workers);

/* ---- nf4.c: quantise / dequantise ---- */
/* x (n,) float32 -> packed ((n+1)/2,) uint8, absmax (ceil(n/blocksize),) float32. blocksize in
 * {32, 64, ..., 4096}. Full blocks scale by the float32 reciprocal of max(absmax, 1e-38); the last
 * partial block divides by its clamped absmax (which it stores); ties go to the lower code; NaN -> 15. */
int minilora_quantize_nf4(const float *x, int64_t n, int64_t blocksize,
                          uint8_t *packed, float *absmax, int nthreads);
int minilora_quantize_nf4_ref(const float *x, int64_t n, int64_t blocksize,
                              uint8_t *packed, float *absmax, int nthreads);
int minilora_quantize_nf4_avx2(const float *x, int64_t n, int64_t blocksize,
                               uint8_t *packed, float *absmax, int nthreads);

/* out (n,) = cast(dtype, float32(NF4[code[j]] * absmax[j / blocksize])); `out` points to n elements
 * of `dtype` (float32, or uint16 bit patterns of bfloat16 / float16). */
int minilora_dequantize_nf4(const uint8_t *packed, const float *absmax, int64_t n, int64_t blocksize,
                            void *out, int dtype, int nthreads);
int minilora_dequantize_nf4_ref(const uint8_t *packed, const float *absmax, int64_t n, int64_t blocksize,
                                void *out, int dtype, int nthreads);
int minilora_dequantize_nf4_avx2(const uint8_t *packed, const float *absmax, int64_t n, int64_t blocksize,
                                 void *out, int dtype, int nthreads);

/* ---- nf4_dq.c: double quantisation of the absmax values (scalar only: 1/64 of the data) ---- */
/* *mean = the float32 nearest (ties to even) to the exact mean of x[0..n); NaN / inf propagate. */
int minilora_exact_mean_f32(const float *x, int64_t n, float *mean);
/* absmax (nblocks,) -> codes (nblocks,) uint8, nested_absmax (ceil(nblocks/256),) float32. */
int minilora_double_quantize(const float *absmax, int64_t nblocks, float offset,
                             uint8_t *codes, float *nested_absmax);
/* absmax[b] = float32(float32(DYN[codes[b]] * nested_absmax[b / 256]) + offset), no FMA. */
int minilora_dequantize_absmax(const uint8_t *codes, const float *nested_absmax, int64_t nblocks,
                               float offset, float *absmax);

/* ---- nf4_matmul.c (M = 1) and nf4_gemm.c (M >= 2) ---- */
/* y (M, N) float32 = x (M, K) float32 . dequant(W (N, K))^T, accumulated in float32. W is packed NF4,
 * row-major flat; requires K % blocksize == 0 (so no block spans two rows). `scratch` must hold
 * minilora_matmul_nf4_scratch_bytes(M, N, K, nthreads) bytes, 64-byte aligned not required. */
int64_t minilora_matmul_nf4_scratch_bytes(int64_t M, int64_t N, int64_t K, int nthreads);
int minilora_matmul_nf4(const float *x, const uint8_t *packed, const float *absmax,
                        int64_t M, int64_t N, int64_t K, int64_t blocksize, float *y,
                        void *scratch, int64_t scratch_bytes, int nthreads);
int minilora_matmul_nf4_ref(const float *x, const uint8_t *packed, const float *absmax,
                            int64_t M, int64_t N, int64_t K, int64_t blocksize, float *y,
                            void *scratch, int64_t scratch_bytes, int nthreads);
int minilora_matmul_nf4_avx2(const float *x, const uint8_t *packed, const float *absmax,
                             int64_t M, int64_t N, int64_t K, int64_t blocksize, float *y,
                             void *scratch, int64_t scratch_bytes, int nthreads);
/* The GEMV (M = 1) with AVX-512F, the GEMM with AVX2 (MINILORA_ENOCPU without both). The dispatcher above
 * takes this one when the CPU has AVX-512F, else the AVX2 one, else the reference. */
int minilora_matmul_nf4_avx512(const float *x, const uint8_t *packed, const float *absmax,
                               int64_t M, int64_t N, int64_t K, int64_t blocksize, float *y,
                               void *scratch, int64_t scratch_bytes, int nthreads);
/* The AVX2 pieces, exported for tests and benchmarks: GEMV (M = 1) and GEMM (any M); both take the
 * scratch of minilora_matmul_nf4_scratch_bytes(M, ...) (the GEMV: x reordered, ceil(K/128)*128 floats). */
int minilora_gemv_nf4_avx2(const float *x, const uint8_t *packed, const float *absmax,
                           int64_t N, int64_t K, int64_t blocksize, float *y,
                           void *scratch, int64_t scratch_bytes, int nthreads);
int minilora_gemm_nf4_avx2(const float *x, const uint8_t *packed, const float *absmax,
                           int64_t M, int64_t N, int64_t K, int64_t blocksize, float *y,
                           void *scratch, int64_t scratch_bytes, int nthreads);

/* ---- nf4_gemv_avx512.c: the exact GEMV with AVX-512F (one vpermps decodes 16 weights) ---- */
/* 1 when this CPU (and OS) supports AVX-512F, else 0. */
int minilora_cpu_has_avx512(void);
/* Same contract, scratch and bound as minilora_gemv_nf4_avx2 (its own summation order); MINILORA_ENOCPU
 * without AVX-512F. minilora_matmul_nf4 (the dispatcher) takes it for M = 1 when the CPU has it. */
int minilora_gemv_nf4_avx512(const float *x, const uint8_t *packed, const float *absmax,
                             int64_t N, int64_t K, int64_t blocksize, float *y,
                             void *scratch, int64_t scratch_bytes, int nthreads);

/* ---- nf4_gemv_i16.c: the approximate GEMV (opt-in; the exact kernels above are the default) ---- */
/* y (N,) ~= x (K,) . dequant(W (N, K))^T with x quantised per group of 64 to int16 in [-8191, 8191] and the
 * NF4 table as int16 round(NF4 * 2^14): exact int32 dot products per group, then float32 scaling by
 * d_g * absmax (see nf4_gemv_i16.c for the error). A NaN / inf in x runs the exact GEMV instead. Same
 * requirements and scratch as the exact GEMV: minilora_matmul_nf4_scratch_bytes(1, N, K, nthreads). */
int minilora_gemv_nf4_i16(const float *x, const uint8_t *packed, const float *absmax,
                          int64_t N, int64_t K, int64_t blocksize, float *y,
                          void *scratch, int64_t scratch_bytes, int nthreads);
int minilora_gemv_nf4_i16_ref(const float *x, const uint8_t *packed, const float *absmax,
                              int64_t N, int64_t K, int64_t blocksize, float *y,
                              void *scratch, int64_t scratch_bytes, int nthreads);
int minilora_gemv_nf4_i16_avx2(const float *x, const uint8_t *packed, const float *absmax,
                               int64_t N, int64_t K, int64_t blocksize, float *y,
                               void *scratch, int64_t scratch_bytes, int nthreads);

/* ---- stream.c: roofline probe for bench/ (not a kernel) ---- */
/* Read p (n,) uint8 once with AVX2 loads on `nthreads` threads; n % 32 == 0. *out = an XOR fold. */
int minilora_stream_read(const uint8_t *p, int64_t n, int nthreads, uint64_t *out);

/* ---- lora_merge.c: the LoRA merge, bit-exact with minilora.lora.merge_weight ---- */
/* out (N, K) = round_to_dtype(float32(W) + float32(s) * sum_r B[n,r] A[r,k]), the sum a float32 FMA chain
 * in r order; W / out elements of `dtype` (float32, or uint16 bits of bfloat16 / float16), A (R, K),
 * B (N, R) float32. Unmerge: pass -s. Reports max |out - W| over finite pairs, the number of elements
 * that became NaN / inf and the first of them (-1 if none). `scratch` holds
 * minilora_lora_merge_scratch_floats(K, R) floats (A packed into panels by the AVX2 variant). */
int64_t minilora_lora_merge_scratch_floats(int64_t K, int64_t R);
int minilora_lora_merge(const void *W, int dtype, const float *A, const float *B, int64_t N, int64_t K,
                        int64_t R, float s, void *out, float *max_abs_delta, int64_t *nonfinite,
                        int64_t *first_nonfinite, int nthreads, float *scratch, int64_t scratch_floats);
int minilora_lora_merge_ref(const void *W, int dtype, const float *A, const float *B, int64_t N, int64_t K,
                            int64_t R, float s, void *out, float *max_abs_delta, int64_t *nonfinite,
                            int64_t *first_nonfinite, int nthreads, float *scratch, int64_t scratch_floats);
int minilora_lora_merge_avx2(const void *W, int dtype, const float *A, const float *B, int64_t N, int64_t K,
                             int64_t R, float s, void *out, float *max_abs_delta, int64_t *nonfinite,
                             int64_t *first_nonfinite, int nthreads, float *scratch, int64_t scratch_floats);

#endif
