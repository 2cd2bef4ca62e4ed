// Many output features of one head at once: each feature's global top-k of A × w_g, answered from a
// table of every key's best queries on both sides (the method is described in
// attnrules/engine/features.py, which builds the table and deepens rows that run out).
#pragma once

#include <cstdint>

namespace attnrules {

// Row r < n_keys holds key r's best queries by A = queries·keys[r]; row n_keys + r by -A (descending,
// ties by the lower query, within each row's sorted prefix). Row r spans [row_start[r], row_start[r] + row_len[r]) of
// table_scores (the side score: A or -A) and table_queries. A row of n_queries entries is complete.
struct MultiCall {
    const float* table_scores = nullptr;
    const int32_t* table_queries = nullptr;
    const int64_t* row_start = nullptr;  // [2 n_keys]
    const int64_t* row_len = nullptr;    // [2 n_keys], each >= 1
    // [2 n_keys] or null (all sorted): row r's first row_sorted[r] entries are sorted; the others
    // follow in no order, all ranking below them.
    const int64_t* row_sorted = nullptr;
    const float* weights = nullptr;      // [n_keys, n_weights] row-major: feature g's weights are column g
    int64_t n_keys = 0, n_weights = 0, n_queries = 0;
    const int64_t* features = nullptr;   // the columns to answer, each in [0, n_weights)
    int64_t n_features = 0;
    int64_t k = 1;
    int64_t first_keys = 0;  // keys read first (those with the best first candidates) to raise the threshold
    int threads = 0;         // <= 0: all
    // Continuing (after rows were read deeper): out_* rows of the listed features already hold their
    // provisional top-k, and only the entries past old_len[j] of rows grown[j] (j < n_grown) are new.
    // A row's first old_len entries must be the same as before (the engine's per-key pass is exact).
    const int64_t* grown = nullptr;
    const int64_t* old_len = nullptr;
    int64_t n_grown = 0;
    bool resume = false;
    // Outputs: row features[i] of out_* [n_weights, k] (score, query, key), best first, ties by the
    // lower (query, key); deeper[row] set to 1 for each table row some feature must read further;
    // incomplete[i] set to 1 when feature i's answer depends on such a row (its outputs are then
    // provisional). Neither flag array is cleared here.
    float* out_scores = nullptr;
    int64_t* out_queries = nullptr;
    int64_t* out_keys = nullptr;
    uint8_t* deeper = nullptr;
    uint8_t* incomplete = nullptr;
};

struct MultiStats {
    int64_t read = 0;        // table entries scored (over all features)
    int64_t selections = 0;  // cut-backs of a feature's candidates to its k best
};

// Throws std::invalid_argument on inconsistent sizes, std::runtime_error if a feature finds fewer
// than k candidates (the table must hold at least k entries).
MultiStats run_multi(const MultiCall& call);

}  // namespace attnrules
