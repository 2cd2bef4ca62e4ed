// Driver of the fused score + top-k engine: packing, blocking, threads, selection, output.
#pragma once

#include <cstdint>
#include <string>

#include "engine.h"

namespace attnrules {

// One call, phrased as rows × cols (see engine.h). Outputs are written in place:
// global (per_row = false): out_scores/out_rows/out_cols hold k entries;
// per row: out_scores/out_cols hold n_rows × k entries and out_rows is unused (may be null).
struct TopKCall {
    const float* rows = nullptr;
    const float* cols = nullptr;
    int64_t n_rows = 0, n_cols = 0;
    int d = 0;
    const float* row_acts = nullptr;
    const float* col_acts = nullptr;
    int n_acts = 0;
    const float* row_weight = nullptr;
    const float* col_weight = nullptr;
    Score score = Score::Signed;
    int64_t k = 1;
    bool per_row = false;
    int threads = 0;           // <= 0: all
    std::string isa = "auto";  // "auto" | "avx512" | "avx2" | "generic"
    int64_t block_rows = 0;    // <= 0: automatic
    int64_t block_cols = 0;    // <= 0: automatic
    int64_t sample_cols = -1;  // per row: cols sampled to guess the threshold; < 0: automatic, 0: never
    bool share_threshold = true;  // global: threads prune with one threshold (see SharedThreshold in topk.cpp)
    // Test hook: "bad_alloc" or "runtime_error" makes the thread that runs the last work item of the
    // parallel sweep throw that (as a failed per-thread allocation would); "" (the default): never.
    std::string test_throw;
    float* out_scores = nullptr;
    int64_t* out_rows = nullptr;
    int64_t* out_cols = nullptr;
    // Per row, two-sided (signed scores, no weights or acts): also each row's k best cols by -score
    // (its k lowest scores, negated: -score descending, ties by the lower col), in n_rows × k entries.
    // One sweep computes both sides.
    float* out_scores_low = nullptr;
    int64_t* out_cols_low = nullptr;
    // Per row: only each row's best `sorted` entries come sorted (best first); the others follow in no
    // order, all ranking below them (<= 0: all sorted). Sorting is most of a deep per-row call's
    // selection cost, and multi_topk reads past a short sorted prefix only for a few rows.
    int64_t sorted = 0;
};

// What a global call did: candidates pushed into the threads' collectors, and the selections that
// cut a full collector back to its k best (both 0 per row).
struct TopKStats {
    int64_t pushed = 0, selections = 0;  // global mode: candidates collected, cut-backs to k
    int64_t redone = 0;                  // per-row mode: rows scored again because their sampled guess was too high
};

// Runs the call (throws std::invalid_argument on bad options, std::runtime_error when scores are
// NaN so that fewer than k candidates exist). An exception thrown on a worker thread (std::bad_alloc
// for a buffer, say) stops the remaining work and is rethrown here, on the caller's thread.
TopKStats run_topk(const TopKCall& call);

// The kernel "auto" picks on this CPU, and whether each ISA can run here.
const Kernel& select_kernel(const std::string& isa);
bool isa_supported(const std::string& isa);

}  // namespace attnrules
