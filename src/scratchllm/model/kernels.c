/* Fused dequantize + matrix-vector kernels for decoding on x86 CPUs (AVX2, FMA, F16C), see quant.py.

   y[b, n] = sum_k W[n, k] x[b, k] + bias[n]     x: fp32 (B, K), y: fp32 (B, N), K a multiple of 32

   W is never expanded in memory: each block of 32 weights of a row is turned into four 8-float
   vectors in registers and multiplied into every row of x while it is there, so the weights stream
   from memory exactly once per call. Formats (scales d and minimums m are fp16, one per group of
   gs = 32 * s weights of a row; G = K / gs groups):
     fmt 0  bf16  w: uint16 (N, K)                   W = bf16 bits << 16
     fmt 1  int8  w: int8 (N, K), d (N, G)           W = d * q
     fmt 2  int4  w: uint8 (N, K / 2), d, m (N, G)   W = d * q + m, q in 0..15; within each block of
                                                      32, byte j holds weight j (low 4 bits) and
                                                      weight j + 16 (high 4 bits): GGUF's Q4_0/Q4_1
   Rows of W are split over OpenMP threads (the same libgomp as torch's, loaded by soname).
   Accumulation is fp32. (An AVX-512 build measured no faster on the AMD EPYC dev box, whose AVX-512
   runs at AVX2's FMA rate, so there is one build.) */
#include <immintrin.h>
#include <stdint.h>

static inline float hsum(__m256 v) {
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_add_ps(a, _mm_movehl_ps(a, a));
    return _mm_cvtss_f32(_mm_add_ss(a, _mm_movehdup_ps(a)));
}

static inline float half(const uint16_t *p, int64_t i) {
    return _cvtsh_ss(p[i]);
}

/* block j (weights 32j .. 32j+31) of row n -> o[0..3], one function per format */
static inline void block_bf16(const void *w, const uint16_t *d, const uint16_t *m, int64_t n, int64_t K,
                              int64_t gs, int64_t j, __m256 *o) {
    (void)d, (void)m, (void)gs;
    const uint16_t *p = (const uint16_t *)w + n * K + j * 32;
    for (int i = 0; i < 4; i++) {
        __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p + 8 * i)));
        o[i] = _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
    }
}

static inline void block_int8(const void *w, const uint16_t *d, const uint16_t *m, int64_t n, int64_t K,
                              int64_t gs, int64_t j, __m256 *o) {
    (void)m;
    __m256 vd = _mm256_set1_ps(half(d, n * (K / gs) + (j * 32) / gs));
    const int8_t *p = (const int8_t *)w + n * K + j * 32;
    for (int i = 0; i < 4; i++) {
        __m256i q = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8 * i)));
        o[i] = _mm256_mul_ps(_mm256_cvtepi32_ps(q), vd);
    }
}

static inline void block_int4(const void *w, const uint16_t *d, const uint16_t *m, int64_t n, int64_t K,
                              int64_t gs, int64_t j, __m256 *o) {
    int64_t g = n * (K / gs) + (j * 32) / gs;
    __m256 vd = _mm256_set1_ps(half(d, g)), vm = _mm256_set1_ps(half(m, g));
    __m128i b = _mm_loadu_si128((const __m128i *)((const uint8_t *)w + n * (K / 2) + j * 16));
    __m128i low = _mm_set1_epi8(15);
    __m128i lo = _mm_and_si128(b, low), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low);
    __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
    for (int i = 0; i < 4; i++)
        o[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[i])), vd, vm);
}

/* ROWS(fmt) defines, for one format, the kernel matvec_fmt and its two inner pieces:
   row1_fmt: row n of W against one row b of x, four independent accumulator chains (one FMA's latency
             would otherwise bound batch-1 decode);
   row4_fmt: row n of W against rows b .. b+3 of x, each block dequantized once for all four: batched
             decode. (Pairs of W rows against four rows of x, to share the loads of x, measured slower.) */
#define ROWS(fmt)                                                                                             \
    static void row1_##fmt(const void *w, const uint16_t *d, const uint16_t *m, const float *x,               \
                           const float *bias, float *y, int64_t n, int64_t b, int64_t N, int64_t K,            \
                           int64_t gs) {                                                                      \
        __m256 acc[4], o[4];                                                                                  \
        const float *xr = x + b * K;                                                                          \
        for (int i = 0; i < 4; i++) acc[i] = _mm256_setzero_ps();                                             \
        for (int64_t j = 0; j < K / 32; j++) {                                                                \
            block_##fmt(w, d, m, n, K, gs, j, o);                                                             \
            for (int i = 0; i < 4; i++) acc[i] = _mm256_fmadd_ps(o[i], _mm256_loadu_ps(xr + j * 32 + 8 * i), acc[i]); \
        }                                                                                                     \
        y[b * N + n] = hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]))) +   \
                       (bias ? bias[n] : 0.0f);                                                               \
    }                                                                                                         \
    static void row4_##fmt(const void *w, const uint16_t *d, const uint16_t *m, const float *x,               \
                           const float *bias, float *y, int64_t n, int64_t b0, int64_t N, int64_t K,           \
                           int64_t gs) {                                                                      \
        __m256 acc[4][2], o[4];                                                                               \
        for (int r = 0; r < 4; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();                              \
        for (int64_t j = 0; j < K / 32; j++) {                                                                \
            block_##fmt(w, d, m, n, K, gs, j, o);                                                             \
            for (int r = 0; r < 4; r++) {                                                                     \
                const float *xr = x + (b0 + r) * K + j * 32;                                                  \
                acc[r][0] = _mm256_fmadd_ps(o[0], _mm256_loadu_ps(xr), acc[r][0]);                            \
                acc[r][1] = _mm256_fmadd_ps(o[1], _mm256_loadu_ps(xr + 8), acc[r][1]);                        \
                acc[r][0] = _mm256_fmadd_ps(o[2], _mm256_loadu_ps(xr + 16), acc[r][0]);                       \
                acc[r][1] = _mm256_fmadd_ps(o[3], _mm256_loadu_ps(xr + 24), acc[r][1]);                       \
            }                                                                                                 \
        }                                                                                                     \
        float bb = bias ? bias[n] : 0.0f;                                                                     \
        for (int r = 0; r < 4; r++) y[(b0 + r) * N + n] = hsum(_mm256_add_ps(acc[r][0], acc[r][1])) + bb;     \
    }                                                                                                         \
    static void matvec_##fmt(const void *w, const uint16_t *d, const uint16_t *m, const float *x,             \
                             const float *bias, float *y, int64_t B, int64_t N, int64_t K, int64_t gs) {      \
        _Pragma("omp parallel for schedule(static)") for (int64_t n = 0; n < N; n++) {                        \
            int64_t b = 0;                                                                                    \
            for (; b + 4 <= B; b += 4) row4_##fmt(w, d, m, x, bias, y, n, b, N, K, gs);                       \
            for (; b < B; b++) row1_##fmt(w, d, m, x, bias, y, n, b, N, K, gs);                               \
        }                                                                                                     \
    }

ROWS(bf16)
ROWS(int8)
ROWS(int4)

void qmatvec(int fmt, const void *w, const uint16_t *d, const uint16_t *m, const float *x, const float *bias,
             float *y, int64_t B, int64_t N, int64_t K, int64_t gs) {
    if (fmt == 0) matvec_bf16(w, d, m, x, bias, y, B, N, K, gs);
    else if (fmt == 1) matvec_int8(w, d, m, x, bias, y, B, N, K, gs);
    else matvec_int4(w, d, m, x, bias, y, B, N, K, gs);
}

static inline void block(int fmt, const void *w, const uint16_t *d, const uint16_t *m, int64_t n, int64_t K,
                         int64_t gs, int64_t j, __m256 *o) {
    if (fmt == 0) block_bf16(w, d, m, n, K, gs, j, o);
    else if (fmt == 1) block_int8(w, d, m, n, K, gs, j, o);
    else block_int4(w, d, m, n, K, gs, j, o);
}

#ifdef __AVX512BF16__
/* CPUs with AVX512-BF16 (quant.py builds this part with -mavx512bf16 where /proc/cpuinfo has it): bf16
   weights against x rounded to bf16, with the dot-product instruction (32 multiply-adds into 16 fp32
   sums, no conversion of the weights): batch 1 streams the weights at memory speed, and 8 rows of x
   cost about twice one row. Every row of x goes through the same code whatever B is, so a sequence
   gets the same numbers alone or in a batch. xb: scratch bf16 (B, K). */
static inline void dp_rows(int R, const uint16_t *w, const uint16_t *xb, const float *bias, float *y, int64_t n,
                           int64_t b0, int64_t N, int64_t K) {
    __m512 acc[8];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    const uint16_t *wr = w + n * K;
    for (int64_t j = 0; j < K; j += 32) {
        __m512bh wv = (__m512bh)_mm512_loadu_si512(wr + j);
        for (int r = 0; r < R; r++)
            acc[r] = _mm512_dpbf16_ps(acc[r], wv, (__m512bh)_mm512_loadu_si512(xb + (b0 + r) * K + j));
    }
    for (int r = 0; r < R; r++) y[(b0 + r) * N + n] = _mm512_reduce_add_ps(acc[r]) + (bias ? bias[n] : 0.0f);
}

static void dp_row8(const uint16_t *w, const uint16_t *xb, const float *bias, float *y, int64_t n, int64_t b0,
                    int64_t N, int64_t K) {
    dp_rows(8, w, xb, bias, y, n, b0, N, K);
}

static void dp_row1(const uint16_t *w, const uint16_t *xb, const float *bias, float *y, int64_t n, int64_t b0,
                    int64_t N, int64_t K) {
    dp_rows(1, w, xb, bias, y, n, b0, N, K);
}

void qmatvec_bf16dp(const uint16_t *w, const float *x, uint16_t *xb, const float *bias, float *y, int64_t B,
                    int64_t N, int64_t K) {
    for (int64_t i = 0; i < B * K; i += 16)
        _mm256_storeu_si256((__m256i *)(xb + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + i)));
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        int64_t b = 0;
        for (; b + 8 <= B; b += 8) dp_row8(w, xb, bias, y, n, b, N, K);
        for (; b < B; b++) dp_row1(w, xb, bias, y, n, b, N, K);
    }
}
#endif

/* out (R, K) fp32 = rows idx[0..R-1] of W dequantized (idx NULL: rows 0..R-1) */
void qdequant(int fmt, const void *w, const uint16_t *d, const uint16_t *m, const int64_t *idx, float *out,
              int64_t R, int64_t K, int64_t gs) {
#pragma omp parallel for schedule(static) if (R * K >= 65536)
    for (int64_t r = 0; r < R; r++) {
        __m256 wv[4];
        int64_t n = idx ? idx[r] : r;
        for (int64_t j = 0; j < K / 32; j++) {
            block(fmt, w, d, m, n, K, gs, j, wv);
            for (int i = 0; i < 4; i++) _mm256_storeu_ps(out + r * K + j * 32 + 8 * i, wv[i]);
        }
    }
}
