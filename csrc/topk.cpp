// Fused score + top-k driver. Scores are never stored beyond one micro-tile: the kernel filters
// each tile against the current thresholds and hands only passing scores to a collector.
#include "topk.h"

#include "common.h"

#include <algorithm>
#include <cmath>
#include <atomic>
#include <cstring>
#include <exception>
#include <limits>
#include <new>
#include <stdexcept>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace attnrules {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Per row: (score, col) in 64 bits.
struct RowKey {
    using type = uint64_t;
    static type make(float s, uint32_t, uint32_t col) { return (type{score_bits(s)} << 32) | col; }
    static float score(type k) { return score_of(static_cast<uint32_t>(k >> 32)); }
    static uint32_t row(type) { return 0; }
    static uint32_t col(type k) { return static_cast<uint32_t>(k); }
};

// Global: (score, row, col) in 128 bits.
struct PairKey {
    using type = unsigned __int128;
    static type make(float s, uint32_t row, uint32_t col) {
        return (type{score_bits(s)} << 64) | (type{row} << 32) | col;
    }
    static float score(type k) { return score_of(static_cast<uint32_t>(k >> 64)); }
    static uint32_t row(type k) { return static_cast<uint32_t>(k >> 32); }
    static uint32_t col(type k) { return static_cast<uint32_t>(k); }
};

// by="global": a score s such that at least k pairs are known to score >= s, from all threads. The
// threads' pairs are disjoint, so two bounds hold: the highest k-th best of one thread's collector,
// and the lowest m-th best over the T threads, m = ceil(k / T) (T × m >= k pairs score >= it). The
// first lets a thread that starts late prune at once; the second, about the k-th best of all threads
// together, is what prunes while they run side by side. Only scores strictly below s are rejected
// (the filters compare with >=), so a pair tying the final k-th score still reaches its collector
// and wins or loses by index as without sharing: the answer does not depend on the threads' timing.
class SharedThreshold {
public:
    SharedThreshold(int threads, int64_t k) : part_(static_cast<size_t>(threads)), m_((k + threads - 1) / threads) {
        for (auto& p : part_) p.store(kNegInf, std::memory_order_relaxed);
    }
    int64_t m() const { return m_; }

    float get() const {
        float low = std::numeric_limits<float>::infinity();
        for (const auto& p : part_) low = std::min(low, p.load(std::memory_order_relaxed));
        return std::max(best_.load(std::memory_order_relaxed), low);
    }

    // Thread t's collector holds k candidates scoring >= kth, m of them >= mth; both only rise.
    void publish(int t, float kth, float mth) {
        float cur = best_.load(std::memory_order_relaxed);
        while (kth > cur && !best_.compare_exchange_weak(cur, kth, std::memory_order_relaxed)) {
        }
        part_[t].store(mth, std::memory_order_relaxed);  // only thread t writes its part
    }

private:
    std::atomic<float> best_{kNegInf};
    std::vector<std::atomic<float>> part_;
    int64_t m_;
};

// The k best candidates seen so far, kept lazily: passing candidates are appended to a buffer of
// `cap` > k slots; when it fills, the k best are selected and the threshold rises to the k-th.
// A score below the threshold cannot enter the top k, so the kernel rejects it with one compare.
// With a SharedThreshold, the k-th and m-th are published there (as thread `slot`) and the threshold
// is the higher of its own and the shared one.
template <class Key>
class Collector {
public:
    using key = typename Key::type;
    // Scores below `floor` are rejected from the start (a guess of the final k-th best score).
    Collector(key* buf, int64_t k, int64_t cap, float* threshold, float floor = kNegInf,
              SharedThreshold* shared = nullptr, int slot = 0)
        : buf_(buf), k_(k), cap_(cap), threshold_(threshold), shared_(shared), slot_(slot) {
        *threshold_ = floor;
    }

    void push(float score, uint32_t row, uint32_t col) {
        if (!(score >= *threshold_)) return;  // NaN never enters
        buf_[n_++] = Key::make(score, row, col);
        ++pushed_;
        if (n_ == cap_) {
            std::nth_element(buf_, buf_ + k_ - 1, buf_ + n_);
            n_ = k_;
            ++selections_;
            const float kth = Key::score(buf_[k_ - 1]);
            if (shared_) {  // the m-th best of the k: one more partial selection, O(k)
                const int64_t m = shared_->m();
                if (m < k_) std::nth_element(buf_, buf_ + m - 1, buf_ + k_);
                shared_->publish(slot_, kth, Key::score(buf_[m - 1]));
            }
            *threshold_ = std::max(*threshold_, kth);  // may already be above it, from the shared one
            sync();
        }
    }

    // Raises the threshold to the shared one (the kernel reads only this thread's copy).
    void sync() {
        if (!shared_) return;
        const float s = shared_->get();
        if (s > *threshold_) *threshold_ = s;  // written only when it rises: neighbours' copies share a line
    }

    int64_t pushed() const { return pushed_; }
    int64_t selections() const { return selections_; }

    // Sorts the best min(n, k) first; returns how many there are.
    int64_t finish() {
        const int64_t m = std::min(n_, k_);
        if (n_ > m) std::nth_element(buf_, buf_ + m - 1, buf_ + n_);
        std::sort(buf_, buf_ + m);
        n_ = m;
        return m;
    }

    const key* data() const { return buf_; }
    int64_t size() const { return n_; }

private:
    key* buf_;
    int64_t k_, cap_, n_ = 0, pushed_ = 0, selections_ = 0;
    float* threshold_;
    SharedThreshold* shared_;
    int slot_;
};

// The test hook of TopKCall::test_throw, called by the thread that runs the last work item.
void test_throw(const TopKCall& c) {
    if (c.test_throw == "bad_alloc") throw std::bad_alloc();
    if (c.test_throw == "runtime_error") throw std::runtime_error("test hook: a worker thread failed");
}

int64_t capacity_for(int64_t k) { return k + std::max<int64_t>(k, 32); }

// by="global": hands the passing scores of every tile the thread sees to its one collector.
template <class Key>
class CollectSink final : public TileSink {
public:
    explicit CollectSink(Collector<Key>& best) : best_(best) {}
    void take(int64_t row0, int n_rows, int64_t col0, int n_cols, const float* tile, int ld,
              const uint32_t* masks) override {
        const uint32_t valid = n_cols >= 32 ? ~0u : (1u << n_cols) - 1u;
        for (int i = 0; i < n_rows; ++i)
            for (uint32_t m = masks[i] & valid; m; m &= m - 1) {
                const int j = __builtin_ctz(m);
                best_.push(tile[i * ld + j], static_cast<uint32_t>(row0 + i), static_cast<uint32_t>(col0 + j));
            }
    }

private:
    Collector<Key>& best_;
};

// Per row: entries a row's buffer holds before it is cut back to its k best. The sampled guess lets
// about 2-3k scores of a row pass, so with this limit most rows get one selection late in the sweep,
// which raises their threshold to their running k-th best and leaves a smaller final selection
// (measured a little faster than 4k + 32, which deferred it to the end).
int64_t row_limit(int64_t k) { return 2 * k + 32; }

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Cols [0, count * stride) with the given stride, packed as panels of nr: [panel][d + n_acts][nr],
// zero padded past the last col (so padded scores are 0). Col weights likewise (1 where absent).
struct Packed {
    std::vector<float> panels, weight;
};

Packed pack_cols(const TopKCall& c, int nr, int64_t stride, int64_t count, int threads) {
    const int len = c.d + c.n_acts;
    const int64_t n_panels = (count + nr - 1) / nr;
    Packed p;
    p.panels.resize(static_cast<size_t>(n_panels * nr * len));
    FirstError error;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t panel = 0; panel < n_panels; ++panel) {
        error.run([&] {
            float* out = p.panels.data() + panel * nr * len;
            for (int j = 0; j < nr; ++j) {
                const int64_t i = panel * nr + j, col = i * stride;
                for (int q = 0; q < len; ++q) {
                    float x = 0.0f;
                    if (i < count) x = q < c.d ? c.cols[col * c.d + q] : c.col_acts[col * c.n_acts + q - c.d];
                    out[q * nr + j] = x;
                }
            }
        });
    }
    error.rethrow();
    if (c.row_weight == nullptr && c.n_acts == 0) {  // the kernel then multiplies by a col weight
        p.weight.assign(static_cast<size_t>(n_panels * nr), 1.0f);
        if (c.col_weight)
            for (int64_t i = 0; i < count; ++i) p.weight[i] = c.col_weight[i * stride];
    }
    return p;
}

Operands operands(const TopKCall& c, const Packed& p, int64_t n_cols) {
    return Operands{c.rows,   c.row_acts, c.row_weight, p.panels.data(), p.weight.empty() ? nullptr : p.weight.data(),
                    c.n_rows, n_cols,     c.d,          c.n_acts,        c.score};
}

}  // namespace

bool isa_supported(const std::string& isa) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    __builtin_cpu_init();
    if (isa == "avx512") return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
    if (isa == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
    return isa == "generic";
}

const Kernel& select_kernel(const std::string& isa) {
    if (isa != "auto" && isa != "avx512" && isa != "avx2" && isa != "generic")
        throw std::invalid_argument("isa must be 'auto', 'avx512', 'avx2' or 'generic', got '" + isa + "'");
    if (isa != "auto" && !isa_supported(isa))
        throw std::invalid_argument("isa '" + isa + "' is not supported by this CPU");
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    if (isa == "avx512" || (isa == "auto" && isa_supported("avx512"))) return kernel_avx512();
    if (isa == "avx2" || (isa == "auto" && isa_supported("avx2"))) return kernel_avx2();
#endif
    return kernel_generic();
}

namespace {

// by="query" / by="key": every row's k best cols, one block of rows per work item.
//
// Streaming a row's N scores through a running top-k inserts about k(1 + ln(N/k)) of them. So a
// strided sample of S cols is scored first, and its j-th best becomes the row's starting threshold.
// The sample holds about μ = kS/N of the row's k best (binomially, standard deviation ≤ √μ), so
// j = ceil(μ + 3√μ + 1) is above the row's k-th best only rarely (~0.1% of rows on random data:
// with j = 2μ, 2.3% of the rows of a 24,576-col per-key top-100 were), while about k(1 + 3/√μ)
// scores pass it (k = 512: 1.7k). The guess is checked afterwards: a row whose k-th best ends below
// it (rare with a representative sample; possible on sorted data) is scored again without a guess,
// so the answer never depends on it.
//
// The kernel appends passing (score, col) pairs to each row's buffer itself; when a buffer passes
// its limit, its k best are selected (on integer keys) and the threshold rises to the k-th.

// Selects the best m = min(n, k) of b as keys into keys[0, m), keys[m - 1] the m-th best, the best
// `sort` of them sorted first (the others after them in no order; 0: none), and keeps only them in b.
int64_t select_row(RowBuffer& b, int64_t k, RowKey::type* keys, int64_t sort) {
    for (int64_t j = 0; j < b.n; ++j) keys[j] = RowKey::make(b.scores[j], 0, b.cols[j]);
    const int64_t m = std::min(b.n, k);
    if (m > 0) select_smallest(keys, b.n, m);
    if (sort >= m - 1) {
        sort_keys(keys, 0, m);
    } else if (sort > 0) {  // keys[m - 1], the largest, stays last
        select_smallest(keys, m - 1, sort);
        sort_keys(keys, 0, sort);
    }
    if (b.n > m) {
        for (int64_t j = 0; j < m; ++j) {
            b.scores[j] = RowKey::score(keys[j]);
            b.cols[j] = RowKey::col(keys[j]);
        }
        b.n = m;
    }
    return m;
}

// The rows of one sweep: on overflow a row keeps its k best and its threshold rises to the k-th.
class RowCollectors final : public RowSink {
public:
    RowCollectors(RowBuffer* buffers, float* thresholds, int64_t k, RowKey::type* keys, int64_t low_side = 0)
        : thr_(thresholds), k_(k), keys_(keys) {
        rows = buffers;
        low = low_side;
    }
    void full(int64_t i) override {
        select_row(rows[i], k_, keys_, 0);
        thr_[i] = RowKey::score(keys_[k_ - 1]);
    }

private:
    float* thr_;
    int64_t k_;
    RowKey::type* keys_;
};

class PerRow {
public:
    PerRow(const TopKCall& c, const Kernel& kernel, int threads, int64_t block_rows, int64_t block_cols)
        : c_(c), kernel_(kernel), block_rows_(block_rows), block_cols_(block_cols), len_(c.d + c.n_acts),
          sides_(c.out_scores_low ? 2 : 1), span_(block_rows * sides_), threads_(threads),
          redo_rows_(static_cast<size_t>(threads)) {
        int64_t s = c.sample_cols >= 0 ? c.sample_cols : (c.n_cols >= 8192 ? 1024 : 0);
        if (s > 0 && s < c.n_cols) {
            const double mu = static_cast<double>(c.k) * static_cast<double>(s) / static_cast<double>(c.n_cols);
            j_ = static_cast<int64_t>(std::ceil(mu + 3.0 * std::sqrt(mu) + 1.0));
            if (j_ > s / 2) j_ = 0;  // the guess would save nothing
        }
        if (j_ > 0) {
            sample_ = pack_cols(c, kernel.nr, c.n_cols / s, s, threads);
            sample_cols_ = s;
        }
        cols_ = pack_cols(c, kernel.nr, 1, c.n_cols, threads);
        // Past the limit, room for one more tile row (nr) and the kernel's full-vector store overhang.
        slot_ = std::max(row_limit(c.k), row_limit(j_)) + 2 * kernel.nr;
        scores_.resize(static_cast<size_t>(threads * span_ * slot_));
        cols_idx_.resize(static_cast<size_t>(threads * span_ * slot_));
        keys_.resize(static_cast<size_t>(threads * slot_));
        buffers_.resize(static_cast<size_t>(threads * span_));
        thresholds_.resize(static_cast<size_t>(threads * span_));
        guesses_.resize(static_cast<size_t>(threads * span_));
        scratch_.resize(static_cast<size_t>(threads * kernel.mr * (len_ + 1)));
        redo_.resize(static_cast<size_t>(threads * block_rows * (len_ + 1)));
    }

    // Rows [r0, r1) on thread t; returns false if some row has fewer than k finite scores. Two-sided,
    // entry i of the thread's buffers, thresholds and guesses is row r0 + i's score side and entry
    // block_rows + i its -score side.
    bool run_block(int64_t r0, int64_t r1, int t) {
        const int64_t n = r1 - r0;
        RowBuffer* rows = buffers_.data() + t * span_;
        float* thr = thresholds_.data() + t * span_;
        float* guess = guesses_.data() + t * span_;
        RowKey::type* keys = keys_.data() + t * slot_;
        std::fill(guess, guess + span_, kNegInf);
        if (j_ > 0) {
            reset(rows, thr, t, n, j_, nullptr);
            RowCollectors sink(rows, thr, j_, keys, low());
            sweep(operands(c_, sample_, sample_cols_), r0, r1, sink, thr, t);
            for (int side = 0; side < sides_; ++side)
                for (int64_t i = side * block_rows_; i < side * block_rows_ + n; ++i)
                    if (select_row(rows[i], j_, keys, 0) == j_) guess[i] = RowKey::score(keys[j_ - 1]);
        }
        const Operands op = operands(c_, cols_, c_.n_cols);
        reset(rows, thr, t, n, c_.k, guess);
        RowCollectors sink(rows, thr, c_.k, keys, low());
        sweep(op, r0, r1, sink, thr, t);

        // Rows whose guess was too high (on either side) are set aside for redo(); the others are done.
        bool complete = true;
        for (int64_t i = 0; i < n; ++i) {
            bool ok = true;
            for (int side = 0; side < sides_; ++side) {
                const int64_t e = side * block_rows_ + i;
                const int64_t m = select_row(rows[e], c_.k, keys, sorted());
                if (guess[e] > kNegInf && (m < c_.k || RowKey::score(keys[c_.k - 1]) < guess[e])) ok = false;
                else if (ok) complete = output(r0 + i, side, keys, m) && complete;
            }
            if (!ok) redo_rows_[t].push_back(r0 + i);
        }
        return complete;
    }

    // Scores the rows set aside by run_block again without a guess, block_rows at a time (gathered
    // from all blocks, so a few rows share a sweep instead of each filling a row group of its own).
    bool redo(FirstError& error) {
        std::vector<int64_t> rows;
        for (const auto& r : redo_rows_) rows.insert(rows.end(), r.begin(), r.end());
        const int64_t n = static_cast<int64_t>(rows.size()), n_blocks = (n + block_rows_ - 1) / block_rows_;
        bool complete = true;
#pragma omp parallel for num_threads(threads_) schedule(dynamic, 1) reduction(&& : complete)
        for (int64_t rb = 0; rb < n_blocks; ++rb) {
            error.run([&] {
                const int64_t f0 = rb * block_rows_;
                complete = redo_block(rows.data() + f0, std::min(block_rows_, n - f0), thread_id()) && complete;
            });
        }
        redone_ = n;
        return complete;
    }

    int64_t redone() const { return redone_; }

private:
    int64_t low() const { return sides_ == 2 ? block_rows_ : 0; }
    int64_t sorted() const { return c_.sorted > 0 ? c_.sorted : c_.k; }

    // Empties out[e] (both sides' entries), the buffers of thread t's first count rows, for a sweep
    // keeping k; thresholds start at floor[e] (or -inf).
    void reset(RowBuffer* out, float* thr, int t, int64_t count, int64_t k, const float* floor) {
        for (int side = 0; side < sides_; ++side)
            for (int64_t f = 0; f < count; ++f) {
                const int64_t e = side * block_rows_ + f, at = (t * span_ + e) * slot_;
                out[e] = RowBuffer{scores_.data() + at, cols_idx_.data() + at, 0, row_limit(k)};
                thr[e] = floor ? floor[e] : kNegInf;
            }
    }

    // Writes row's m best (sorted keys) of one side; false if it has fewer than k.
    bool output(int64_t row, int side, const RowKey::type* best, int64_t m) {
        float* scores = side ? c_.out_scores_low : c_.out_scores;
        int64_t* cols = side ? c_.out_cols_low : c_.out_cols;
        for (int64_t j = 0; j < m; ++j) {
            scores[row * c_.k + j] = RowKey::score(best[j]);
            cols[row * c_.k + j] = RowKey::col(best[j]);
        }
        return m == c_.k;
    }

    // Rows [r0, r1) of op against all its cols, in L2-sized chunks of cols.
    void sweep(const Operands& op, int64_t r0, int64_t r1, RowSink& sink, const float* thr, int t) {
        float* scratch = scratch_.data() + t * kernel_.mr * (len_ + 1);
        for (int64_t c0 = 0; c0 < op.n_cols; c0 += block_cols_)
            kernel_.run_rows(op, r0, r1, c0, std::min(op.n_cols, c0 + block_cols_), thr, scratch, sink);
    }

    // Scores the n listed rows again without a guess, on thread t, and writes them out.
    bool redo_block(const int64_t* list, int64_t n, int t) {
        float* rows = redo_.data() + t * block_rows_ * (len_ + 1);
        float* acts = rows + n * c_.d;
        float* weight = acts + n * c_.n_acts;
        Operands sub = operands(c_, cols_, c_.n_cols);
        sub.rows = rows;
        sub.n_rows = n;
        if (c_.n_acts > 0) sub.row_acts = acts;
        if (c_.row_weight) sub.row_weight = weight;
        for (int64_t f = 0; f < n; ++f) {
            const int64_t row = list[f];
            std::copy(c_.rows + row * c_.d, c_.rows + (row + 1) * c_.d, rows + f * c_.d);
            if (c_.n_acts > 0)
                std::copy(c_.row_acts + row * c_.n_acts, c_.row_acts + (row + 1) * c_.n_acts, acts + f * c_.n_acts);
            if (c_.row_weight) weight[f] = c_.row_weight[row];
        }
        RowBuffer* buffers = buffers_.data() + t * span_;
        float* thr = thresholds_.data() + t * span_;
        RowKey::type* keys = keys_.data() + t * slot_;
        reset(buffers, thr, t, n, c_.k, nullptr);
        RowCollectors sink(buffers, thr, c_.k, keys, low());
        sweep(sub, 0, n, sink, thr, t);
        bool complete = true;
        for (int side = 0; side < sides_; ++side)
            for (int64_t f = 0; f < n; ++f)
                complete = output(list[f], side, keys,
                                  select_row(buffers[side * block_rows_ + f], c_.k, keys, sorted())) && complete;
        return complete;
    }

    const TopKCall& c_;
    const Kernel& kernel_;
    int64_t block_rows_, block_cols_;
    int len_;
    int sides_;      // 2: two-sided (the -score side too)
    int64_t span_;   // entries per thread in the buffers, thresholds and guesses: block_rows × sides
    int64_t j_ = 0, sample_cols_ = 0, slot_ = 0;
    Packed sample_, cols_;
    std::vector<float> scores_;
    std::vector<uint32_t> cols_idx_;
    std::vector<RowKey::type> keys_;
    int threads_;
    std::vector<std::vector<int64_t>> redo_rows_;  // per thread: rows whose guess was too high
    int64_t redone_ = 0;
    std::vector<RowBuffer> buffers_;
    std::vector<float> thresholds_, guesses_, scratch_, redo_;
};
}  // namespace

TopKStats run_topk(const TopKCall& c) {
    const Kernel& kernel = select_kernel(c.isa);
    const int threads = resolve_threads(c.threads);
    const int len = c.d + c.n_acts;
    if (c.n_rows >= (int64_t{1} << 32) || c.n_cols >= (int64_t{1} << 32))
        throw std::invalid_argument("at most 2^32 - 1 queries and keys are supported");

    // Column chunks of ~256 KiB of packed operands stay in L2 while a row block sweeps them.
    const int64_t block_cols = round_up(
        c.block_cols > 0 ? c.block_cols : std::max<int64_t>(kernel.nr, (256 * 1024) / (4 * len)), kernel.nr);
    const int64_t cap = capacity_for(c.k);
    int64_t block_rows = c.block_rows > 0 ? c.block_rows : 192;
    if (c.out_scores_low && !(c.per_row && c.score == Score::Signed && !c.row_weight && !c.col_weight && c.n_acts == 0))
        throw std::invalid_argument("two-sided top-k is per row, for signed scores without weights or acts");
    if (c.per_row && c.block_rows <= 0) {  // bound the per-row collectors (~8 MiB) and feed every thread
        const int64_t row_bytes = (row_limit(c.k) + 2 * kernel.nr) * int64_t(sizeof(float) + sizeof(uint32_t)) *
                                  (c.out_scores_low ? 2 : 1);
        block_rows = std::min(block_rows, std::max<int64_t>(1, (8 << 20) / row_bytes));
        block_rows = std::min(block_rows, (c.n_rows + threads - 1) / threads);
    }
    block_rows = round_up(std::max<int64_t>(block_rows, 1), kernel.mr);
    const int64_t n_row_blocks = (c.n_rows + block_rows - 1) / block_rows;
    bool complete = true;
    TopKStats stats;
    FirstError error;

    if (c.per_row) {
        PerRow work(c, kernel, threads, block_rows, block_cols);
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1) reduction(&& : complete)
        for (int64_t rb = 0; rb < n_row_blocks; ++rb) {
            error.run([&] {
                if (rb == n_row_blocks - 1) test_throw(c);
                const int64_t r0 = rb * block_rows;
                complete = work.run_block(r0, std::min(c.n_rows, r0 + block_rows), thread_id()) && complete;
            });
        }
        error.rethrow();
        complete = work.redo(error) && complete;
        error.rethrow();
        stats.redone = work.redone();
    } else {
        const Packed cols = pack_cols(c, kernel.nr, 1, c.n_cols, threads);
        const Operands op = operands(c, cols, c.n_cols);
        const int64_t n_col_blocks = (c.n_cols + block_cols - 1) / block_cols;
        std::vector<PairKey::type> buffers(static_cast<size_t>(threads * cap));
        std::vector<float> thresholds(static_cast<size_t>(threads));
        std::vector<float> scratch(static_cast<size_t>(threads * kernel.mr * (len + 1)));
        std::vector<int64_t> found(static_cast<size_t>(threads), 0), pushed(found), selections(found);
        SharedThreshold shared(threads, c.k);
        const int64_t n_items = n_row_blocks * n_col_blocks;
#pragma omp parallel num_threads(threads)
        {
            const int t = thread_id();
            Collector<PairKey> best(buffers.data() + t * cap, c.k, cap, thresholds.data() + t, kNegInf,
                                    c.share_threshold ? &shared : nullptr, t);
            CollectSink<PairKey> sink(best);
#pragma omp for schedule(dynamic, 1)
            for (int64_t item = 0; item < n_items; ++item) {
                error.run([&] {
                    if (item == n_items - 1) test_throw(c);
                    const int64_t r0 = (item / n_col_blocks) * block_rows, c0 = (item % n_col_blocks) * block_cols;
                    best.sync();  // prune this block with what the other threads have found meanwhile
                    kernel.run(op, r0, std::min(c.n_rows, r0 + block_rows), c0, std::min(c.n_cols, c0 + block_cols),
                               thresholds.data() + t, 0, scratch.data() + t * kernel.mr * (len + 1), sink);
                });
            }
            found[t] = best.finish();
            pushed[t] = best.pushed();
            selections[t] = best.selections();
        }
        error.rethrow();
        for (int t = 0; t < threads; ++t) {
            stats.pushed += pushed[t];
            stats.selections += selections[t];
        }
        // Merge: each thread's k best are in its buffer's head; the k best of their union win.
        std::vector<PairKey::type> merged;
        for (int t = 0; t < threads; ++t)
            merged.insert(merged.end(), buffers.begin() + t * cap, buffers.begin() + t * cap + found[t]);
        complete = static_cast<int64_t>(merged.size()) >= c.k;
        const int64_t m = std::min<int64_t>(c.k, merged.size());
        std::partial_sort(merged.begin(), merged.begin() + m, merged.end());
        for (int64_t j = 0; j < m; ++j) {
            c.out_scores[j] = PairKey::score(merged[j]);
            c.out_rows[j] = PairKey::row(merged[j]);
            c.out_cols[j] = PairKey::col(merged[j]);
        }
    }
    if (!complete)
        throw std::runtime_error("fewer than k scores are finite numbers (NaN from overflow?): cannot rank them");
    return stats;
}

}  // namespace attnrules
