// Answers many output features of one head from the per-key table (see multi.h). Per feature:
//   1. every key's best candidate, first entry of its side's row × |w| (w > 0: the A row, w < 0: the
//      -A row; the product equals A × w bit for bit since negation is exact), bounds all its scores;
//   2. the keys with the best first candidates are read first, so that a running top-k (a buffer of
//      2k candidates cut back to its k best when full) gets a high threshold early; then every other
//      key whose bound reaches the threshold. A row is read while its scores reach the threshold:
//      scores fall along a row, so the rest cannot.
//   3. a row read to its end while its last score still reaches the final k-th score may hide pairs
//      that belong to the top-k (or tie it with a lower index): the row is flagged for a deeper read
//      and the feature as incomplete. A complete row hides nothing.
//   4. once such rows are deeper, an incomplete feature resumes from its provisional top-k (k pairs,
//      so its k-th score is a valid threshold from the start) and reads only the new entries.
// A zero weight scores 0 for every query of the key; its best are its lowest query indices, which
// are produced directly (no row is read).
#include "multi.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <vector>

#include "common.h"

namespace attnrules {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kFeatureBlock = 64;  // features a thread takes at once: one read of each key's weights serves them

// Sorts a[0, n) ascending; tmp holds n keys. An LSD radix sort on the score bits only (a byte a pass,
// skipping bytes that all keys share: the sign and exponent byte often), then each run of equal scores
// (ties: rare on float data) by its index bits. A feature's top-k is sorted once: k is large (10,000
// in the benchmark), and this is several times faster there than a comparison sort, and a third
// faster than a radix sort over the index bytes too.
void sort_top(uint64_t* a, int64_t n, uint64_t* tmp) {
    if (n < 2) return;
    int64_t count[4][256] = {};
    for (int64_t i = 0; i < n; ++i)
        for (int b = 0; b < 4; ++b) ++count[b][(a[i] >> (32 + 8 * b)) & 0xff];
    uint64_t* from = a;
    uint64_t* to = tmp;
    for (int b = 0; b < 4; ++b) {
        int64_t* c = count[b];
        const int shift = 32 + 8 * b;
        if (c[(from[0] >> shift) & 0xff] == n) continue;  // one value: the pass would not move anything
        int64_t at = 0;
        for (int v = 0; v < 256; ++v) {
            const int64_t m = c[v];
            c[v] = at;
            at += m;
        }
        for (int64_t i = 0; i < n; ++i) to[c[(from[i] >> shift) & 0xff]++] = from[i];
        std::swap(from, to);
    }
    if (from != a) std::copy(from, from + n, a);
    for (int64_t i = 0, j; i < n; i = j) {
        for (j = i + 1; j < n && (a[j] >> 32) == (a[i] >> 32); ++j) {
        }
        if (j - i > 1) sort_keys(a, i, j);
    }
}

// One feature's running top-k over flat pair indices query × n_keys + key.
class Best {
public:
    Best(std::vector<uint64_t>& buf, std::vector<uint64_t>& tmp, int64_t k)
        : buf_(buf.data()), tmp_(tmp.data()), k_(k), cap_(static_cast<int64_t>(buf.size())) {}

    float threshold() const { return thr_; }

    // Starts from k known candidates (a provisional top-k): its k-th score is already a threshold.
    void seed(const float* scores, const int64_t* queries, const int64_t* keys, int64_t n_keys) {
        for (int64_t j = 0; j < k_; ++j)
            buf_[j] = (uint64_t{score_bits(scores[j])} << 32) | static_cast<uint32_t>(queries[j] * n_keys + keys[j]);
        n_ = k_;
        thr_ = scores[k_ - 1];
        seeded_ = true;
    }

    void push(float score, uint32_t flat) {
        buf_[n_++] = (uint64_t{score_bits(score)} << 32) | flat;
        if (n_ == cap_) {
            select_smallest(buf_, n_, k_);
            n_ = k_;
            ++selections_;
            thr_ = std::max(thr_, score_of(static_cast<uint32_t>(buf_[k_ - 1] >> 32)));
        }
    }

    // Sorts the best min(n, k) first; returns how many there are.
    int64_t finish() {
        const int64_t m = std::min(n_, k_);
        if (seeded_ && selections_ == 0) {  // k sorted seeds and a few new ones: sort these, merge
            sort_top(buf_ + k_, n_ - k_, tmp_);
            std::merge(buf_, buf_ + k_, buf_ + k_, buf_ + n_, tmp_);
            std::copy(tmp_, tmp_ + k_, buf_);
            return k_;
        }
        if (n_ > m) select_smallest(buf_, n_, m);
        sort_top(buf_, m, tmp_);
        return m;
    }

    const uint64_t* data() const { return buf_; }
    int64_t selections() const { return selections_; }

private:
    uint64_t* buf_;
    uint64_t* tmp_;
    int64_t k_, cap_, n_ = 0, selections_ = 0;
    float thr_ = kNegInf;
    bool seeded_ = false;
};

struct Scratch {
    std::vector<float> weights, bound, sample;  // weights: [kFeatureBlock][n_keys]
    std::vector<uint64_t> best, tmp;
    std::vector<std::pair<float, int64_t>> early;  // (bound, key) of the keys read first
    std::vector<int64_t> rest;                      // the other keys that may reach the threshold
    std::vector<std::pair<int64_t, float>> ran_out;  // (row, its last score) of rows read to their end
};

class Answer {
public:
    explicit Answer(const MultiCall& c) : c_(c), first_(static_cast<size_t>(2 * c.n_keys)) {
        for (int64_t r = 0; r < 2 * c.n_keys; ++r) first_[r] = c.table_scores[c.row_start[r]];
    }

    // Features [i0, i1) of the call's list (at most kFeatureBlock) on one thread.
    void block(int64_t i0, int64_t i1, Scratch& s, MultiStats& stats) const {
        const int64_t nk = c_.n_keys;
        // The block's columns of weights, one row per feature (resuming, only the grown rows' keys).
        auto gather = [&](int64_t key) {
            const float* w = c_.weights + key * c_.n_weights;
            for (int64_t i = i0; i < i1; ++i) s.weights[(i - i0) * nk + key] = w[c_.features[i]];
        };
        if (c_.resume) {
            for (int64_t j = 0; j < c_.n_grown; ++j) gather(c_.grown[j] % nk);
        } else {  // in tiles of 16 keys: each feature's row gets whole cache lines
            for (int64_t k0 = 0; k0 < nk; k0 += 16) {
                const int64_t k1 = std::min(nk, k0 + 16);
                for (int64_t i = i0; i < i1; ++i) {
                    const float* w = c_.weights + c_.features[i];
                    float* out = s.weights.data() + (i - i0) * nk;
                    for (int64_t key = k0; key < k1; ++key) out[key] = w[key * c_.n_weights];
                }
            }
        }
        for (int64_t i = i0; i < i1; ++i) feature(i, s.weights.data() + (i - i0) * nk, s, stats);
    }

private:
    void feature(int64_t i, const float* w, Scratch& s, MultiStats& stats) const {
        const int64_t nk = c_.n_keys, g = c_.features[i];
        Best best(s.best, s.tmp, c_.k);
        s.ran_out.clear();
        int64_t read = 0;
        // Reads row `row` of the key from entry j0 while its scores reach the threshold: its sorted
        // prefix up to (at most) entry j1, and once that prefix is read whole, its unsorted rest, every
        // entry of it (all rank below the prefix). Returns whether entries past j1 may still reach it.
        auto read_row = [&](int64_t key, int64_t row, int64_t j0, int64_t j1 = INT64_MAX) {
            const float mag = std::fabs(w[key]);
            const float* score = c_.table_scores + c_.row_start[row];
            const int32_t* query = c_.table_queries + c_.row_start[row];
            const int64_t len = c_.row_len[row];
            const int64_t sorted = c_.row_sorted ? std::min(c_.row_sorted[row], len) : len;
            const int64_t end = std::min(sorted, j1);
            int64_t j = j0;
            for (; j < end; ++j) {
                const float x = score[j] * mag;
                if (!(x >= best.threshold())) break;
                best.push(x, static_cast<uint32_t>(query[j] * nk + key));
            }
            read += std::max<int64_t>(0, j - j0);
            if (j < end) return false;  // fell below the threshold: so do all later entries
            if (j < sorted) return true;  // stopped at j1
            float last = sorted > 0 ? score[sorted - 1] * mag : 0.0f;  // the row's lowest score
            for (j = std::max(j0, sorted); j < len; ++j) {  // the unsorted rest
                const float x = score[j] * mag;
                last = std::min(last, x);
                if (x >= best.threshold()) best.push(x, static_cast<uint32_t>(query[j] * nk + key));
            }
            read += len - std::max(j0, sorted);
            if (len < c_.n_queries) s.ran_out.emplace_back(row, last);
            return false;
        };
        auto row_of = [&](int64_t key) { return w[key] > 0.0f ? key : nk + key; };  // the row a key is read from
        if (c_.resume) {
            best.seed(c_.out_scores + g * c_.k, c_.out_queries + g * c_.k, c_.out_keys + g * c_.k, nk);
            for (int64_t j = 0; j < c_.n_grown; ++j) {
                const int64_t row = c_.grown[j], key = row % nk;
                if (w[key] != 0.0f && (row < nk) == (w[key] > 0.0f)) read_row(key, row, c_.old_len[j]);
            }
        } else {
            auto visit = [&](int64_t key) {
                if (w[key] == 0.0f) {  // every query scores 0: the lowest query indices first
                    const int64_t n = std::min(c_.n_queries, c_.k);
                    for (int64_t q = 0; q < n && 0.0f >= best.threshold(); ++q)
                        best.push(0.0f, static_cast<uint32_t>(q * nk + key));
                } else {
                    read_row(key, row_of(key), 0);
                }
            };
            float* __restrict bound = s.bound.data();
            const float* __restrict high = first_.data();
            const float* __restrict low = high + nk;
            const float* __restrict weight = w;
            for (int64_t key = 0; key < nk; ++key) {  // both loaded: a blend, so the loop vectorises
                const float h = high[key], l = low[key], x = weight[key];
                bound[key] = (x > 0.0f ? h : l) * std::fabs(x);
            }
            // The first_keys best bounds, found approximately on a strided sample of the keys (only the
            // reading order depends on it, never the answer), are read first, best bound first.
            const int64_t stride = std::max<int64_t>(1, nk / 2048);
            int64_t n_sample = 0;
            for (int64_t key = 0; key < nk; key += stride) s.sample[n_sample++] = bound[key];
            const int64_t rank = std::clamp<int64_t>(c_.first_keys / stride, 1, n_sample);
            std::nth_element(s.sample.begin(), s.sample.begin() + (rank - 1), s.sample.begin() + n_sample,
                             [](float a, float b) { return a > b; });
            const float early = s.sample[rank - 1];
            s.early.clear();
            for (int64_t key = 0; key < nk; ++key)
                if (bound[key] >= early) s.early.emplace_back(bound[key], key);
            std::sort(s.early.begin(), s.early.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
            // Their rows in stripes of growing depth, so that the buffer fills with their best entries
            // first and the threshold rises before the deep entries are read; each stripe of a row is
            // fetched from memory 4 keys ahead of its reading.
            int64_t from = 0;
            for (const int64_t to : {int64_t{8}, int64_t{32}, int64_t{128}, INT64_MAX}) {
                for (size_t e = 0; e < s.early.size(); ++e) {
                    if (e + 4 < s.early.size()) {
                        const int64_t row = row_of(s.early[e + 4].second);
                        prefetch_entries(row, std::min(from, c_.row_len[row] - 1));
                    }
                    auto& [b, key] = s.early[e];
                    if (b == kNegInf) continue;  // done: the rest of its row is below the threshold
                    if (w[key] == 0.0f) visit(key);
                    if (w[key] == 0.0f || !(b >= best.threshold()) || !read_row(key, row_of(key), from, to))
                        b = kNegInf;
                }
                from = to;
            }
            // The other keys that can reach the threshold; their rows are scattered over the table, so
            // each row's place is fetched from memory 32 keys ahead of its reading, its first entries 16.
            s.rest.clear();
            const float floor = best.threshold();
            for (int64_t key = 0; key < nk; ++key)
                if (bound[key] < early && bound[key] >= floor) s.rest.push_back(key);
            const int64_t n_rest = static_cast<int64_t>(s.rest.size()), ahead = 16;
            for (int64_t r = 0; r < n_rest; ++r) {
                if (r + 2 * ahead < n_rest) prefetch_place(row_of(s.rest[r + 2 * ahead]));
                if (r + ahead < n_rest) prefetch_entries(row_of(s.rest[r + ahead]), 0);
                if (bound[s.rest[r]] >= best.threshold()) visit(s.rest[r]);
            }
        }

        const int64_t m = best.finish();
        if (m < c_.k) throw std::runtime_error("multi_topk: the table holds fewer than k candidates of a feature");
        const uint64_t* top = best.data();
        for (int64_t j = 0; j < c_.k; ++j) {
            const uint32_t flat = static_cast<uint32_t>(top[j]);
            const uint32_t q = query_of(flat);
            c_.out_scores[g * c_.k + j] = score_of(static_cast<uint32_t>(top[j] >> 32));
            c_.out_queries[g * c_.k + j] = q;
            c_.out_keys[g * c_.k + j] = flat - q * static_cast<uint32_t>(nk);
        }
        const float kth = c_.out_scores[g * c_.k + c_.k - 1];
        for (const auto& [row, last] : s.ran_out)
            if (last >= kth) {
                __atomic_store_n(c_.deeper + row, uint8_t{1}, __ATOMIC_RELAXED);
                c_.incomplete[i] = 1;
            }
        stats.read += read;
        stats.selections += best.selections();
    }

    // Reads of scattered rows wait on memory, not on arithmetic: these start fetching a row's place
    // in the table (row_start, row_len, row_sorted), and its entries from entry j (< its length) on.
    void prefetch_place(int64_t row) const {
        __builtin_prefetch(c_.row_start + row);
        __builtin_prefetch(c_.row_len + row);
        if (c_.row_sorted) __builtin_prefetch(c_.row_sorted + row);
    }

    void prefetch_entries(int64_t row, int64_t j) const {
        __builtin_prefetch(c_.table_scores + c_.row_start[row] + j);
        __builtin_prefetch(c_.table_queries + c_.row_start[row] + j);
    }

    // flat / n_keys for a 32-bit flat index by one multiplication (Lemire, Kaser & Kurz, "Faster
    // remainder by direct computation", 2019: exact for 32-bit numerators and divisors).
    uint32_t query_of(uint32_t flat) const {
        if (c_.n_keys == 1) return flat;  // the multiplier 2^64 does not fit
        return static_cast<uint32_t>((static_cast<unsigned __int128>(inverse_) * flat) >> 64);
    }

    const MultiCall& c_;
    std::vector<float> first_;  // first entry of every row
    uint64_t inverse_ = ~uint64_t{0} / static_cast<uint64_t>(c_.n_keys) + 1;
};

}  // namespace

MultiStats run_multi(const MultiCall& c) {
    if (c.n_keys < 1 || c.n_queries < 1 || c.n_weights < 1 || c.k < 1)
        throw std::invalid_argument("multi_topk: n_keys, n_queries, n_weights and k must be positive");
    if (c.n_queries * c.n_keys >= (int64_t{1} << 32))
        throw std::invalid_argument("multi_topk: n_queries × n_keys must be below 2^32");
    for (int64_t r = 0; r < 2 * c.n_keys; ++r)
        if (c.row_len[r] < 1 || c.row_len[r] > c.n_queries || (c.row_sorted && c.row_sorted[r] < 1))
            throw std::invalid_argument("multi_topk: every table row must hold 1 to n_queries entries, at least one sorted");
    for (int64_t i = 0; i < c.n_features; ++i)
        if (c.features[i] < 0 || c.features[i] >= c.n_weights)
            throw std::invalid_argument("multi_topk: a feature index is out of range");
    for (int64_t j = 0; j < c.n_grown; ++j)
        if (c.grown[j] < 0 || c.grown[j] >= 2 * c.n_keys || c.old_len[j] < 1 || c.old_len[j] > c.row_len[c.grown[j]])
            throw std::invalid_argument("multi_topk: grown rows must be table rows, old_len within their length");
    const int threads = resolve_threads(c.threads);
    const Answer answer(c);
    const int64_t n_blocks = (c.n_features + kFeatureBlock - 1) / kFeatureBlock;
    std::vector<MultiStats> per_thread(static_cast<size_t>(threads));
    FirstError error;
#pragma omp parallel num_threads(threads)
    {
        Scratch s;
        error.run([&] {
            s.weights.resize(static_cast<size_t>(kFeatureBlock * c.n_keys));
            s.bound.resize(static_cast<size_t>(c.n_keys));
            s.sample.resize(static_cast<size_t>(c.n_keys));
            s.best.resize(static_cast<size_t>(2 * c.k + 64));
            s.tmp.resize(s.best.size());
        });
        const int t = thread_id();
#pragma omp for schedule(dynamic, 1)
        for (int64_t b = 0; b < n_blocks; ++b)
            error.run([&] {
                const int64_t i0 = b * kFeatureBlock;
                answer.block(i0, std::min(c.n_features, i0 + kFeatureBlock), s, per_thread[t]);
            });
    }
    error.rethrow();
    MultiStats stats;
    for (const MultiStats& p : per_thread) {
        stats.read += p.read;
        stats.selections += p.selections;
    }
    return stats;
}

}  // namespace attnrules
