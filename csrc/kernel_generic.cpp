// Portable kernel: plain C++ over 8-float vectors that the compiler may vectorise for the baseline
// ISA. Used where neither AVX2 nor AVX-512 is available (or when asked for, e.g. in tests).
#include <cmath>

#include "engine.h"

namespace attnrules {
namespace generic {

#define ATTNRULES_TARGET

struct V {
    static constexpr int W = 8;
    struct reg {
        float x[W];
    };
    template <class F>
    static reg map(F f) {
        reg r;
        for (int j = 0; j < W; ++j) r.x[j] = f(j);
        return r;
    }
    static reg load(const float* p) { return map([&](int j) { return p[j]; }); }
    static void store(float* p, reg a) { for (int j = 0; j < W; ++j) p[j] = a.x[j]; }
    static reg bcast(float v) { return map([&](int) { return v; }); }
    static reg zero() { return bcast(0.0f); }
    static reg fma(reg a, reg b, reg c) { return map([&](int j) { return a.x[j] * b.x[j] + c.x[j]; }); }
    static reg mul(reg a, reg b) { return map([&](int j) { return a.x[j] * b.x[j]; }); }
    static reg add(reg a, reg b) { return map([&](int j) { return a.x[j] + b.x[j]; }); }
    static reg vmin(reg a, reg b) { return map([&](int j) { return std::fmin(a.x[j], b.x[j]); }); }
    static reg vmax(reg a, reg b) { return map([&](int j) { return std::fmax(a.x[j], b.x[j]); }); }
    static reg abs(reg a) { return map([&](int j) { return std::fabs(a.x[j]); }); }
    static reg round(reg a) { return map([&](int j) { return std::nearbyint(a.x[j]); }); }
    static reg scale2(reg a, reg n) { return map([&](int j) { return std::ldexp(a.x[j], static_cast<int>(n.x[j])); }); }
    static uint32_t ge_bits(reg a, reg t) {
        uint32_t m = 0;
        for (int j = 0; j < W; ++j) m |= static_cast<uint32_t>(a.x[j] >= t.x[j]) << j;
        return m;
    }
};
constexpr int MR = 4, NV = 2;

#include "tile_kernel.inc"
#undef ATTNRULES_TARGET

}  // namespace generic

const Kernel& kernel_generic() {
    static const Kernel k{"generic", generic::MR, generic::NR, &generic::run, &generic::run_rows};
    return k;
}

}  // namespace attnrules
