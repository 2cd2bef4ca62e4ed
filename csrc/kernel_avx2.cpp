// AVX2 + FMA kernel: 6 rows × 16 cols (12 ymm accumulators). Compiled for avx2,fma via function
// attributes only, and called only when the CPU has them (see topk.cpp).
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>

#include "engine.h"

namespace attnrules {
namespace avx2 {

#define ATTNRULES_TARGET __attribute__((target("avx2,fma")))

struct V {
    using reg = __m256;
    static constexpr int W = 8;
    ATTNRULES_TARGET ATTNRULES_INLINE static reg load(const float* p) { return _mm256_loadu_ps(p); }
    ATTNRULES_TARGET ATTNRULES_INLINE static void store(float* p, reg a) { _mm256_storeu_ps(p, a); }
    ATTNRULES_TARGET ATTNRULES_INLINE static reg bcast(float x) { return _mm256_set1_ps(x); }
    ATTNRULES_TARGET ATTNRULES_INLINE static reg zero() { return _mm256_setzero_ps(); }
    ATTNRULES_TARGET ATTNRULES_INLINE static reg fma(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
    ATTNRULES_TARGET ATTNRULES_INLINE static reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
    ATTNRULES_TARGET ATTNRULES_INLINE static reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
    ATTNRULES_TARGET ATTNRULES_INLINE static reg vmin(reg a, reg b) { return _mm256_min_ps(a, b); }
    ATTNRULES_TARGET ATTNRULES_INLINE static reg vmax(reg a, reg b) { return _mm256_max_ps(a, b); }
    ATTNRULES_TARGET ATTNRULES_INLINE static reg abs(reg a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
    ATTNRULES_TARGET ATTNRULES_INLINE static reg round(reg a) {
        return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    }
    // a × 2^n for integral n in [-145, 145]: two exact power-of-two factors, each a normal float.
    ATTNRULES_TARGET ATTNRULES_INLINE static reg scale2(reg a, reg n) {
        const reg half = _mm256_floor_ps(_mm256_mul_ps(n, _mm256_set1_ps(0.5f)));
        const __m256i bias = _mm256_set1_epi32(127);
        const reg p1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(half), bias), 23));
        const reg p2 = _mm256_castsi256_ps(
            _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(_mm256_sub_ps(n, half)), bias), 23));
        return _mm256_mul_ps(_mm256_mul_ps(a, p1), p2);
    }
    ATTNRULES_TARGET ATTNRULES_INLINE static uint32_t ge_bits(reg a, reg t) {
        return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(a, t, _CMP_GE_OQ)));
    }
};
constexpr int MR = 6, NV = 2;

#include "tile_kernel.inc"
#undef ATTNRULES_TARGET

}  // namespace avx2

const Kernel& kernel_avx2() {
    static const Kernel k{"avx2", avx2::MR, avx2::NR, &avx2::run, &avx2::run_rows};
    return k;
}

}  // namespace attnrules
#endif
