// Sparse rows: the nonzero entries of dense activation rows in one pass, and sparse rows times a
// dense float64 matrix with the dense product's own rounding.
#include "sparse.h"

#include <cmath>
#include <cstring>

#include "common.h"

namespace attnrules {

namespace {

bool kept(float x) {  // not +0.0: keeps -0.0 and NaN, so the rebuilt dense row is bit for bit the same
    uint32_t u;
    std::memcpy(&u, &x, sizeof u);
    return u != 0u;
}

// out[j] = fma(v, b[j], out[j]) for j < n: one fused multiply-add chain per output element.
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
__attribute__((target("avx512f,fma"))) void fma_row_avx512(double v, const double* b, double* out, int64_t n) {
    for (int64_t j = 0; j < n; ++j) out[j] = __builtin_fma(v, b[j], out[j]);
}
__attribute__((target("avx2,fma"))) void fma_row_avx2(double v, const double* b, double* out, int64_t n) {
    for (int64_t j = 0; j < n; ++j) out[j] = __builtin_fma(v, b[j], out[j]);
}
#endif
void fma_row_generic(double v, const double* b, double* out, int64_t n) {
    for (int64_t j = 0; j < n; ++j) out[j] = std::fma(v, b[j], out[j]);  // libm's exact fma where no FMA unit
}

using FmaRow = void (*)(double, const double*, double*, int64_t);

FmaRow pick_fma_row() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma")) return fma_row_avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return fma_row_avx2;
#endif
    return fma_row_generic;
}

}  // namespace

void count_nonzero_rows(const float* x, int64_t rows, int64_t n, int64_t* counts, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        const float* row = x + r * n;
        int64_t c = 0;
        for (int64_t i = 0; i < n; ++i) c += kept(row[i]);
        counts[r] = c;
    }
}

void gather_nonzero_rows(const float* x, int64_t rows, int64_t n, const int64_t* starts, int64_t* index,
                         float* values, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        const float* row = x + r * n;
        int64_t at = starts[r];
        for (int64_t i = 0; i < n; ++i) {
            if (kept(row[i])) {
                index[at] = i;
                values[at] = row[i];
                ++at;
            }
        }
    }
}

void sparse_rows_matmul(const int64_t* row_start, int64_t rows, const int64_t* index, const double* values,
                        const double* dense, int64_t d, double* out, int threads) {
    static const FmaRow fma_row = pick_fma_row();
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        double* o = out + r * d;
        std::fill(o, o + d, 0.0);
        for (int64_t e = row_start[r]; e < row_start[r + 1]; ++e) fma_row(values[e], dense + index[e] * d, o, d);
    }
}

}  // namespace attnrules
