// AVX-512 kernel: 12 rows × 32 cols (24 zmm accumulators). Compiled for avx512f via function
// attributes only, and called only when the CPU has it (see topk.cpp).
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>

#include "engine.h"

namespace attnrules {
namespace avx512 {

#define ATTNRULES_TARGET __attribute__((target("avx512f,fma")))

struct V {
    using reg = __m512;
    static constexpr int W = 16;
    ATTNRULES_TARGET ATTNRULES_INLINE static reg load(const float* p) { return _mm512_loadu_ps(p); }
    ATTNRULES_TARGET ATTNRULES_INLINE static void store(float* p, reg a) { _mm512_storeu_ps(p, a); }
    ATTNRULES_TARGET ATTNRULES_INLINE static reg bcast(float x) { return _mm512_set1_ps(x); }
    ATTNRULES_TARGET ATTNRULES_INLINE static reg zero() { return _mm512_setzero_ps(); }
    ATTNRULES_TARGET ATTNRULES_INLINE static reg fma(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
    ATTNRULES_TARGET ATTNRULES_INLINE static reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
    ATTNRULES_TARGET ATTNRULES_INLINE static reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
    ATTNRULES_TARGET ATTNRULES_INLINE static reg vmin(reg a, reg b) { return _mm512_min_ps(a, b); }
    ATTNRULES_TARGET ATTNRULES_INLINE static reg vmax(reg a, reg b) { return _mm512_max_ps(a, b); }
    ATTNRULES_TARGET ATTNRULES_INLINE static reg abs(reg a) { return _mm512_abs_ps(a); }
    ATTNRULES_TARGET ATTNRULES_INLINE static reg round(reg a) {
        return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    }
    ATTNRULES_TARGET ATTNRULES_INLINE static reg scale2(reg a, reg n) { return _mm512_scalef_ps(a, n); }
    ATTNRULES_TARGET ATTNRULES_INLINE static uint32_t ge_bits(reg a, reg t) { return _mm512_cmp_ps_mask(a, t, _CMP_GE_OQ); }
    // Compress in registers, then plain full-width stores (memory-destination compress is slow on some CPUs).
    ATTNRULES_TARGET ATTNRULES_INLINE static void compress(float* s, uint32_t* c, reg a, uint32_t m, uint32_t col) {
        const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        const __m512i cols = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(col)), iota);
        _mm512_storeu_ps(s, _mm512_maskz_compress_ps(static_cast<__mmask16>(m), a));
        _mm512_storeu_si512(c, _mm512_maskz_compress_epi32(static_cast<__mmask16>(m), cols));
    }
};
constexpr int MR = 12, NV = 2;

#include "tile_kernel.inc"
#undef ATTNRULES_TARGET

}  // namespace avx512

const Kernel& kernel_avx512() {
    static const Kernel k{"avx512", avx512::MR, avx512::NR, &avx512::run, &avx512::run_rows};
    return k;
}

}  // namespace attnrules
#endif
