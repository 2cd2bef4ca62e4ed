// Pieces shared by the engine's drivers (topk.cpp, multi.cpp): candidate keys, key selection and
// sorting, and OpenMP helpers.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <exception>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace attnrules {

// Candidates are integers, smaller = better: the score's bits, order-flipped, above the index bits.
// Integer compares make selection and sorting cheap, and break ties by lower (row, col) for free.
inline uint32_t score_bits(float s) {
    s += 0.0f;  // -0 -> +0: equal scores must get equal bits
    uint32_t u;
    std::memcpy(&u, &s, sizeof u);
    return (u & 0x80000000u) ? u : u ^ 0x7fffffffu;
}

inline float score_of(uint32_t bits) {
    const uint32_t u = (bits & 0x80000000u) ? bits : bits ^ 0x7fffffffu;
    float s;
    std::memcpy(&s, &u, sizeof s);
    return s;
}

// An exception must not leave an OpenMP region (that calls std::terminate). Work items run through
// run(): the first exception is kept, later items are skipped, and rethrow() after the region
// raises it on the caller's thread.
class FirstError {
public:
    template <class F>
    void run(F&& work) noexcept {
        if (failed_.load(std::memory_order_relaxed)) return;
        try {
            work();
        } catch (...) {
            if (!failed_.exchange(true)) error_ = std::current_exception();
        }
    }
    void rethrow() const {  // after the region: its closing barrier orders error_ before this read
        if (error_) std::rethrow_exception(error_);
    }

private:
    std::atomic<bool> failed_{false};
    std::exception_ptr error_;
};

inline int resolve_threads(int threads) {
#ifdef _OPENMP
    return threads > 0 ? threads : omp_get_max_threads();
#else
    return 1;
#endif
}

inline int thread_id() {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

// Selection and sorting of candidate keys (uint64: score bits over index bits, see score_bits). They
// arrive in random order, so branchy std:: partitions mispredict on about every other key; these
// partition with no branch on the keys. Keys are distinct (each carries its own index).

// Partitions [lo, hi) (hi - lo >= 3) around the median of three keys: returns i, lo < i < hi, with
// [lo, i) < pivot <= [i, hi) (both sides non-empty, so callers always make progress).
inline int64_t partition(uint64_t* a, int64_t lo, int64_t hi) {
    const uint64_t x = a[lo], y = a[lo + (hi - lo) / 2], z = a[hi - 1];
    const uint64_t p = std::max(std::min(x, y), std::min(std::max(x, y), z));
    int64_t i = lo;  // [lo, i) < p <= [i, j)
    for (int64_t j = lo; j < hi; ++j) {
        const uint64_t v = a[j];
        a[j] = a[i];
        a[i] = v;
        i += v < p;
    }
    return i;
}

// Batcher's odd-even merge sorting networks on 8 and 16 keys: (i, j) pairs, compare-exchanged in order.
constexpr uint8_t kNetwork8[][2] = {{0, 1}, {2, 3}, {4, 5}, {6, 7}, {0, 2}, {1, 3}, {4, 6}, {5, 7}, {1, 2}, {5, 6},
                                    {0, 4}, {1, 5}, {2, 6}, {3, 7}, {2, 4}, {3, 5}, {1, 2}, {3, 4}, {5, 6}};
constexpr uint8_t kNetwork16[][2] = {
    {0, 1},   {2, 3},  {4, 5},  {6, 7},  {8, 9},   {10, 11}, {12, 13}, {14, 15}, {0, 2},   {1, 3},   {4, 6},
    {5, 7},   {8, 10}, {9, 11}, {12, 14}, {13, 15}, {1, 2},   {5, 6},   {9, 10},  {13, 14}, {0, 4},   {1, 5},
    {2, 6},   {3, 7},  {8, 12}, {9, 13}, {10, 14}, {11, 15}, {2, 4},   {3, 5},   {10, 12}, {11, 13}, {1, 2},
    {3, 4},   {5, 6},  {9, 10}, {11, 12}, {13, 14}, {0, 8},   {1, 9},   {2, 10},  {3, 11},  {4, 12},  {5, 13},
    {6, 14},  {7, 15}, {4, 8},  {5, 9},  {6, 10},  {7, 11},  {2, 4},   {3, 5},   {6, 8},   {7, 9},   {10, 12},
    {11, 13}, {1, 2},  {3, 4},  {5, 6},  {7, 8},   {9, 10},  {11, 12}, {13, 14}};

// Sorts a[0, len), len <= N, through a copy padded with the largest key.
template <int N, size_t P>
inline void network_sort(uint64_t* a, int len, const uint8_t (&pairs)[P][2]) {
    uint64_t x[N];
    for (int i = 0; i < N; ++i) x[i] = i < len ? a[i] : ~uint64_t{0};
#pragma GCC unroll 64
    for (size_t p = 0; p < P; ++p) {
        const uint64_t u = x[pairs[p][0]], v = x[pairs[p][1]];
        const uint64_t swap = (u ^ v) & (uint64_t{0} - static_cast<uint64_t>(v < u));  // masks: no branch
        x[pairs[p][0]] = u ^ swap;
        x[pairs[p][1]] = v ^ swap;
    }
    for (int i = 0; i < len; ++i) a[i] = x[i];
}

// Sorts [lo, hi), hi - lo <= 16, with no branch on the keys (an insertion sort mispredicts about
// once a key: it was half the time of sorting a row's 100 best).
inline void small_sort(uint64_t* a, int64_t lo, int64_t hi) {
    const int len = static_cast<int>(hi - lo);
    if (len <= 8) network_sort<8>(a + lo, len, kNetwork8);
    else network_sort<16>(a + lo, len, kNetwork16);
}

// std::sort(a + lo, a + hi); `depth` rounds of bad pivots fall back to the library's bound.
inline void sort_keys(uint64_t* a, int64_t lo, int64_t hi, int depth = 64) {
    while (hi - lo > 16) {
        if (--depth < 0) return std::sort(a + lo, a + hi);
        const int64_t i = partition(a, lo, hi);
        if (i - lo < hi - i) {  // recurse into the smaller side: stack depth O(log n)
            sort_keys(a, lo, i, depth);
            lo = i;
        } else {
            sort_keys(a, i, hi, depth);
            hi = i;
        }
    }
    small_sort(a, lo, hi);
}

// std::nth_element(a, a + m - 1, a + n).
inline void select_smallest(uint64_t* a, int64_t n, int64_t m) {
    int64_t lo = 0, hi = n;
    for (int rounds = 0; hi - lo > 16; ++rounds) {
        if (rounds == 64) return std::nth_element(a + lo, a + m - 1, a + hi);
        const int64_t i = partition(a, lo, hi);
        if (m - 1 < i) hi = i;
        else lo = i;
    }
    small_sort(a, lo, hi);
}

}  // namespace attnrules
