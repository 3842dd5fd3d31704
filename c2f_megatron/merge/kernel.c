/* Single-pass merge kernel of c2f_megatron.merge (compiled and loaded by native.py).
 *
 * Evaluates, per element and in fp32, exactly the formulas documented in math.py:
 *   weighted: w0*x0 + w1*x1 + ... + wn*xn, left to right, every product and sum rounded to fp32;
 *   task:     b + g*(a - base).
 * It must be built with -ffp-contract=off (no fused multiply-add) and without -ffast-math, so that each
 * operation rounds once, as torch's separate mul/add kernels do. Inputs are F32/BF16/F16, outputs the
 * same. One call evaluates every recipe of a sweep over the same chunk (which the caller has just read,
 * so it is in cache): the 2-way and task-vector merges in one fused loop per output, the N-way merge
 * through blocks of inputs converted to fp32 once.
 *
 * Conversions: BF16 -> F32 is a 16-bit shift and F16 -> F32 is exact (c10's fp16_ieee_to_fp32_value);
 * F32 -> BF16 rounds to nearest even as c10's round_to_nearest_even, F32 -> F16 as c10's
 * fp16_ieee_from_fp32_value. A NaN result is written as the positive quiet NaN of the output dtype
 * (0x7FC00000, 0x7FC0, 0x7E00): its sign and payload would otherwise depend on the CPU's vector unit.
 */
#include <float.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* Every float operation must round to fp32 (not to x87 extended precision): otherwise refuse to build, and
 * the merge falls back to torch. */
#if !defined(FLT_EVAL_METHOD) || FLT_EVAL_METHOD != 0
#error "c2f merge kernel needs FLT_EVAL_METHOD == 0 (fp32 arithmetic rounded per operation)"
#endif

#define C2F_DT_F32 0
#define C2F_DT_BF16 1
#define C2F_DT_F16 2
#define C2F_KIND_WEIGHTED 0
#define C2F_KIND_TASK 1
#define C2F_MAX_INPUTS 16
#define C2F_BLOCK 512

/* Runtime dispatch to the widest vector unit on x86-64 (GCC ifunc clones: AVX-512, AVX2, SSE2), so the
 * cached library is portable across the CPUs of a cluster that shares a home directory. The tests build
 * with -DC2F_NO_CLONES and one -march each to check every variant bitwise on any machine. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && \
    !defined(C2F_NO_CLONES)
#define C2F_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define C2F_CLONES
#endif
/* Conversions are inlined into each clone, so they are vectorised for its unit too. */
#if defined(__GNUC__)
#define C2F_INLINE static inline __attribute__((always_inline))
#else
#define C2F_INLINE static inline
#endif

int c2f_abi_version(void) { return 1; }
int c2f_max_inputs(void) { return C2F_MAX_INPUTS; }

C2F_INLINE uint32_t bits_of(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

C2F_INLINE float float_of(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

C2F_INLINE float half_to_float(uint16_t h) {
    const uint32_t w = (uint32_t)h << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const float normalized = float_of((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float denormalized = float_of((two_w >> 17) | (126u << 23)) - 0.5f;
    const uint32_t mag = two_w < (1u << 27) ? bits_of(denormalized) : bits_of(normalized);
    return float_of(sign | mag);
}

C2F_INLINE uint16_t float_to_half(float f) {
    float base = (__builtin_fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
    const uint32_t w = bits_of(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    base = float_of((bias >> 1) + 0x07800000u) + base;
    const uint32_t b = bits_of(base);
    const uint32_t nonsign = ((b >> 13) & 0x00007C00u) + (b & 0x00000FFFu);
    return shl1_w > 0xFF000000u ? (uint16_t)0x7E00u : (uint16_t)((sign >> 16) | nonsign);
}

C2F_INLINE float load1(int dtype, const void *restrict src, int64_t i) {
    if (dtype == C2F_DT_F32) return ((const float *)src)[i];
    if (dtype == C2F_DT_BF16) return float_of((uint32_t)((const uint16_t *)src)[i] << 16);
    return half_to_float(((const uint16_t *)src)[i]);
}

C2F_INLINE void store1(int dtype, void *restrict dst, int64_t i, float f) {
    const uint32_t u = bits_of(f);
    const int nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
    if (dtype == C2F_DT_F32) {
        ((uint32_t *)dst)[i] = nan ? 0x7FC00000u : u;
    } else if (dtype == C2F_DT_BF16) {
        const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
        ((uint16_t *)dst)[i] = (uint16_t)(nan ? 0x7FC0u : rounded);
    } else {
        ((uint16_t *)dst)[i] = float_to_half(f);
    }
}

/* The common cases in one pass over registers: a 2-way weighted merge or a task vector, one output. */
C2F_INLINE void fused(int kind, int in_dtype, int out_dtype, const void *restrict p0, const void *restrict p1,
                      const void *restrict p2, void *restrict out, int64_t n, float w0, float w1) {
    for (int64_t i = 0; i < n; i++) {
        const float a = load1(in_dtype, p0, i);
        const float b = load1(in_dtype, p1, i);
        float r;
        if (kind == C2F_KIND_TASK) {
            const float base = load1(in_dtype, p2, i);
            r = b + w0 * (a - base);
        } else {
            r = w0 * a + w1 * b;
        }
        store1(out_dtype, out, i, r);
    }
}

/* The general case (N-way): each block of every input converted to fp32 once, then every recipe. */
C2F_INLINE int blocked(int n_inputs, int in_dtype, const void *const *inputs, int64_t n, int n_recipes,
                       const float *weights, int out_dtype, void *const *outputs) {
    float x[C2F_MAX_INPUTS][C2F_BLOCK];
    float acc[C2F_BLOCK];
    for (int64_t start = 0; start < n; start += C2F_BLOCK) {
        const int m = (int)(n - start < C2F_BLOCK ? n - start : C2F_BLOCK);
        for (int i = 0; i < n_inputs; i++)
            for (int j = 0; j < m; j++) x[i][j] = load1(in_dtype, inputs[i], start + j);
        for (int r = 0; r < n_recipes; r++) {
            const float *w = weights + (size_t)r * n_inputs;
            const float w0 = w[0];
            for (int j = 0; j < m; j++) acc[j] = w0 * x[0][j];
            for (int i = 1; i < n_inputs; i++) {
                const float wi = w[i];
                for (int j = 0; j < m; j++) acc[j] = acc[j] + wi * x[i][j];
            }
            for (int j = 0; j < m; j++) store1(out_dtype, outputs[r], start + j, acc[j]);
        }
    }
    return 0;
}

#define C2F_FUSED(K, I, O) fused(K, I, O, inputs[0], inputs[1], p2, outputs[r], n, w0, w1)
#define C2F_FUSED_OUT(K, I)                                                    \
    (out_dtype == C2F_DT_F32    ? C2F_FUSED(K, I, C2F_DT_F32)                  \
     : out_dtype == C2F_DT_BF16 ? C2F_FUSED(K, I, C2F_DT_BF16)                 \
                                : C2F_FUSED(K, I, C2F_DT_F16))
#define C2F_FUSED_IN(K)                                                        \
    (in_dtype == C2F_DT_F32    ? C2F_FUSED_OUT(K, C2F_DT_F32)                  \
     : in_dtype == C2F_DT_BF16 ? C2F_FUSED_OUT(K, C2F_DT_BF16)                 \
                               : C2F_FUSED_OUT(K, C2F_DT_F16))

/* outputs[r][i] = recipe r evaluated on inputs[.][i] for i < n; outputs must not overlap the inputs.
 * weights: n_recipes rows of n_inputs floats (weighted) or one float, gamma (task, inputs a, b, base).
 * Returns 0, or -1 for arguments outside what this kernel covers (the caller then uses torch). */
C2F_CLONES
int c2f_merge(int kind, int n_inputs, int in_dtype, const void *const *inputs, int64_t n, int n_recipes,
              const float *weights, int out_dtype, void *const *outputs) {
    if (n_inputs < 1 || n_inputs > C2F_MAX_INPUTS || n_recipes < 1 || n < 0) return -1;
    if (kind == C2F_KIND_TASK && n_inputs != 3) return -1;
    if (kind != C2F_KIND_TASK && kind != C2F_KIND_WEIGHTED) return -1;
    if (in_dtype < C2F_DT_F32 || in_dtype > C2F_DT_F16 || out_dtype < C2F_DT_F32 || out_dtype > C2F_DT_F16)
        return -1;
    if (kind == C2F_KIND_WEIGHTED && n_inputs != 2)
        return blocked(n_inputs, in_dtype, inputs, n, n_recipes, weights, out_dtype, outputs);
    const void *p2 = kind == C2F_KIND_TASK ? inputs[2] : inputs[0];
    for (int r = 0; r < n_recipes; r++) {
        const float w0 = weights[kind == C2F_KIND_TASK ? r : 2 * r];
        const float w1 = kind == C2F_KIND_TASK ? 0.0f : weights[2 * r + 1];
        if (kind == C2F_KIND_TASK)
            C2F_FUSED_IN(C2F_KIND_TASK);
        else
            C2F_FUSED_IN(C2F_KIND_WEIGHTED);
    }
    return 0;
}
