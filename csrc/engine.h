// The fused score + top-k engine: shared types of the driver (topk.cpp) and the SIMD kernels
// (kernel_*.cpp). A problem is phrased as rows × cols: for by="global" and by="query" the rows are
// the queries and the cols the keys; for by="key" the roles swap. The dot products are symmetric,
// so a pair gets bit-identical scores whatever the role of its operands.
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>

#if defined(__GNUC__)
#define ATTNRULES_INLINE inline __attribute__((always_inline))
#else
#define ATTNRULES_INLINE inline
#endif

namespace attnrules {

enum class Score : int { Signed = 0, Absolute = 1, Exp = 2 };

// Read-only operands of one call, as the kernels see them.
struct Operands {
    const float* rows;        // [n_rows, d] row-major, read in place
    const float* row_acts;    // [n_rows, n_acts] or null (dual only)
    const float* row_weight;  // [n_rows] or null
    const float* packed;      // cols packed in panels of nr: [panel][d + n_acts][nr], zero padded
    const float* col_weight;  // [n_panels * nr] padded, or null
    int64_t n_rows, n_cols;
    int d, n_acts;            // n_acts > 0 means dual: score = (row·col) × (row_acts·col_acts)
    Score score;
};

// Receives the tiles that hold at least one score passing its row's threshold.
class TileSink {
public:
    // tile: scores [n_tile_rows][ld]; masks[i] bit j set when tile[i][j] passed the SIMD filter
    // (bits of padding columns/rows may be set: the sink bounds-checks with n_tile_rows/n_tile_cols).
    virtual void take(int64_t row0, int n_tile_rows, int64_t col0, int n_tile_cols, const float* tile,
                      int ld, const uint32_t* masks) = 0;

protected:
    ~TileSink() = default;
};

// Per row (by="query"/"key"): the kernel appends each passing (score, col) of a row straight to
// that row's buffer (SIMD compress, no per-score call) and calls full() once n > limit. Buffers hold
// limit + 2 * nr slots: room for one more tile row plus a vector of store overhang, so appends never
// bound-check.
struct RowBuffer {
    float* scores;
    uint32_t* cols;
    int64_t n, limit;
};

class RowSink {
public:
    RowBuffer* rows;  // rows[row - r0] for the kernel's r0, like its thresholds
    // Two-sided (signed scores, no weights, not dual): when > 0, -score is kept too, for row i in
    // rows[low + i] against thresholds[low + i] (row i's best queries by -score: its lowest scores).
    int64_t low = 0;
    // Called when rows[i].n > rows[i].limit: shrink the buffer (and usually raise the threshold).
    virtual void full(int64_t i) = 0;

protected:
    ~RowSink() = default;
};

// One SIMD implementation of the blocked score kernel.
struct Kernel {
    const char* isa;
    int mr, nr;  // micro-tile: mr rows × nr cols (nr ≤ 32 so a row's mask fits in 32 bits)
    // Scores rows [r0, r1) × cols [c0, c1) (c0 a multiple of nr) and hands passing tiles to sink.
    // threshold(row) = thresholds[(row - r0) * thr_stride]; scratch holds mr * (d + n_acts + 1) floats.
    void (*run)(const Operands& op, int64_t r0, int64_t r1, int64_t c0, int64_t c1,
                const float* thresholds, std::ptrdiff_t thr_stride, float* scratch, TileSink& sink);
    // The same for per-row buffers (thresholds are per row: stride 1).
    void (*run_rows)(const Operands& op, int64_t r0, int64_t r1, int64_t c0, int64_t c1, const float* thresholds,
                     float* scratch, RowSink& sink);
};

const Kernel& kernel_avx512();
const Kernel& kernel_avx2();
const Kernel& kernel_generic();

}  // namespace attnrules
