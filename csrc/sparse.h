// Sparse rows (sparse.cpp): the entries of dense float32 rows whose bits are not +0.0, and sparse
// float64 rows times a dense float64 matrix, each output element one fused multiply-add chain over
// the row's entries in index order — the rounding of the dense product by BLAS (MKL's dgemm), whose
// zero terms leave a chain unchanged.
#pragma once

#include <cstdint>

namespace attnrules {

// counts[r] = entries of row r (x is [rows, n], C order) whose bits are not +0.0.
void count_nonzero_rows(const float* x, int64_t rows, int64_t n, int64_t* counts, int threads);

// Row r's entries, in index order, at index/values[starts[r] ...] (starts: the counts' exclusive prefix sum).
void gather_nonzero_rows(const float* x, int64_t rows, int64_t n, const int64_t* starts, int64_t* index,
                         float* values, int threads);

// out[r] = Σ_e values[e] · dense[index[e]] over e in [row_start[r], row_start[r + 1]), fused
// multiply-adds in that order from +0.0; dense is [n, d], out [rows, d] (C order).
void sparse_rows_matmul(const int64_t* row_start, int64_t rows, const int64_t* index, const double* values,
                        const double* dense, int64_t d, double* out, int threads);

}  // namespace attnrules
