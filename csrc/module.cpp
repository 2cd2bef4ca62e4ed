// attnrules._C: the CPU core, bound with nanobind.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>

#include <new>
#include <optional>
#include <stdexcept>
#include <string>

#include "common.h"
#include "multi.h"
#include "sparse.h"
#include "topk.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

// Inputs are taken as they are (no conversion, no copy): float32, C-contiguous, on the CPU.
using Matrix = nb::ndarray<const float, nb::ndim<2>, nb::c_contig, nb::device::cpu>;
using Vector = nb::ndarray<const float, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using OutScores = nb::ndarray<float, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using OutIndex = nb::ndarray<int64_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using Index = nb::ndarray<const int64_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using Queries = nb::ndarray<const int32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using OutFlags = nb::ndarray<uint8_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using Dense64 = nb::ndarray<const double, nb::ndim<2>, nb::c_contig, nb::device::cpu>;
using Values64 = nb::ndarray<const double, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using Out64 = nb::ndarray<double, nb::ndim<2>, nb::c_contig, nb::device::cpu>;

attnrules::Score parse_score(const std::string& s) {
    if (s == "signed") return attnrules::Score::Signed;
    if (s == "absolute") return attnrules::Score::Absolute;
    if (s == "exp") return attnrules::Score::Exp;
    throw std::invalid_argument("score must be 'signed', 'absolute' or 'exp', got '" + s + "'");
}

void require(bool ok, const std::string& message) {
    if (!ok) throw std::invalid_argument(message);
}

nb::dict topk(Matrix rows, Matrix cols, int64_t k, bool per_row, const std::string& score,
          std::optional<Vector> row_weight, std::optional<Vector> col_weight, std::optional<Matrix> row_acts,
          std::optional<Matrix> col_acts, OutScores out_scores, std::optional<OutIndex> out_rows,
          OutIndex out_cols, int threads, const std::string& isa, int64_t block_rows, int64_t block_cols, int64_t sample_cols,
          bool share_threshold, const std::string& test_throw, std::optional<OutScores> out_scores_low,
          std::optional<OutIndex> out_cols_low, int64_t sorted) {
    attnrules::TopKCall c;
    c.rows = rows.data();
    c.cols = cols.data();
    c.n_rows = static_cast<int64_t>(rows.shape(0));
    c.n_cols = static_cast<int64_t>(cols.shape(0));
    c.d = static_cast<int>(rows.shape(1));
    require(c.n_rows > 0 && c.n_cols > 0 && c.d > 0, "rows and cols must not be empty");
    require(static_cast<int64_t>(cols.shape(1)) == c.d, "rows and cols must have the same number of columns");
    require(row_acts.has_value() == col_acts.has_value(), "row_acts and col_acts go together");
    if (row_acts) {
        c.n_acts = static_cast<int>(row_acts->shape(1));
        require(static_cast<int64_t>(row_acts->shape(0)) == c.n_rows && static_cast<int64_t>(col_acts->shape(0)) == c.n_cols &&
                    static_cast<int64_t>(col_acts->shape(1)) == c.n_acts && c.n_acts > 0,
                "row_acts must be [n_rows, n] and col_acts [n_cols, n]");
        require(!row_weight && !col_weight, "weights do not apply with activations (dual scores)");
        c.row_acts = row_acts->data();
        c.col_acts = col_acts->data();
    }
    require(!(row_weight && col_weight), "give row_weight or col_weight, not both");
    if (row_weight) {
        require(static_cast<int64_t>(row_weight->shape(0)) == c.n_rows, "row_weight must have n_rows entries");
        c.row_weight = row_weight->data();
    }
    if (col_weight) {
        require(static_cast<int64_t>(col_weight->shape(0)) == c.n_cols, "col_weight must have n_cols entries");
        c.col_weight = col_weight->data();
    }
    c.score = parse_score(score);
    require(!(c.n_acts > 0 && c.score == attnrules::Score::Exp), "score 'exp' does not apply to dual scores");
    c.k = k;
    c.per_row = per_row;
    const int64_t candidates = per_row ? c.n_cols : c.n_rows * c.n_cols;
    require(k >= 1 && k <= candidates, "k must be in [1, number of candidates]");
    const size_t n_out = static_cast<size_t>(per_row ? c.n_rows * k : k);
    require(out_scores.shape(0) == n_out && out_cols.shape(0) == n_out, "outputs have the wrong size");
    require(per_row || (out_rows && out_rows->shape(0) == n_out), "global top-k needs out_rows of size k");
    c.out_scores = out_scores.data();
    c.out_rows = out_rows ? out_rows->data() : nullptr;
    c.out_cols = out_cols.data();
    require(out_scores_low.has_value() == out_cols_low.has_value(), "out_scores_low and out_cols_low go together");
    if (out_scores_low) {
        require(per_row && out_scores_low->shape(0) == n_out && out_cols_low->shape(0) == n_out,
                "out_scores_low and out_cols_low are per row, with the size of out_scores");
        c.out_scores_low = out_scores_low->data();
        c.out_cols_low = out_cols_low->data();
    }
    require(sorted <= 0 || per_row, "sorted applies per row");
    c.sorted = sorted;
    c.threads = threads;
    c.isa = isa;
    c.block_rows = block_rows;
    c.block_cols = block_cols;
    c.sample_cols = sample_cols;
    c.share_threshold = share_threshold;
    require(test_throw.empty() || test_throw == "bad_alloc" || test_throw == "runtime_error",
            "test_throw must be '', 'bad_alloc' or 'runtime_error', got '" + test_throw + "'");
    c.test_throw = test_throw;
    attnrules::TopKStats stats;
    try {
        nb::gil_scoped_release release;
        stats = attnrules::run_topk(c);
    } catch (const std::bad_alloc&) {  // the GIL is held again here; say what ran out
        PyErr_SetString(PyExc_MemoryError, "out of memory in attnrules._C.topk: a buffer of the engine could not be allocated");
        throw nb::python_error();
    }
    nb::dict out;
    out["pushed"] = stats.pushed;
    out["selections"] = stats.selections;
    out["redone"] = stats.redone;
    return out;
}

nb::dict multi_topk(Vector table_scores, Queries table_queries, Index row_start, Index row_len, Matrix weights,
                    Index features, int64_t k, int64_t n_queries, int64_t first_keys, OutScores out_scores,
                    OutIndex out_queries, OutIndex out_keys, OutFlags deeper, OutFlags incomplete,
                    std::optional<Index> grown, std::optional<Index> old_len, std::optional<Index> row_sorted,
                    int threads) {
    attnrules::MultiCall c;
    c.n_keys = static_cast<int64_t>(weights.shape(0));
    c.n_weights = static_cast<int64_t>(weights.shape(1));
    c.n_queries = n_queries;
    require(row_start.shape(0) == static_cast<size_t>(2 * c.n_keys) && row_len.shape(0) == row_start.shape(0),
            "row_start and row_len must have 2 × n_keys entries (one per key and side)");
    require(table_queries.shape(0) == table_scores.shape(0), "table_scores and table_queries must have one size");
    const size_t n_table = table_scores.shape(0);
    for (size_t r = 0; r < row_start.shape(0); ++r)
        require(row_start.data()[r] >= 0 && row_len.data()[r] >= 0 &&
                    static_cast<size_t>(row_start.data()[r] + row_len.data()[r]) <= n_table,
                "a table row lies outside table_scores");
    c.table_scores = table_scores.data();
    c.table_queries = table_queries.data();
    c.row_start = row_start.data();
    c.row_len = row_len.data();
    require(!row_sorted || row_sorted->shape(0) == row_len.shape(0), "row_sorted must have 2 × n_keys entries");
    c.row_sorted = row_sorted ? row_sorted->data() : nullptr;
    c.weights = weights.data();
    c.features = features.data();
    c.n_features = static_cast<int64_t>(features.shape(0));
    c.k = k;
    c.first_keys = first_keys;
    c.threads = threads;
    const size_t n_out = static_cast<size_t>(c.n_weights * k);
    require(k >= 1 && out_scores.shape(0) == n_out && out_queries.shape(0) == n_out && out_keys.shape(0) == n_out,
            "out_scores, out_queries and out_keys must have n_weights × k entries");
    require(deeper.shape(0) == row_start.shape(0), "deeper must have 2 × n_keys entries");
    require(incomplete.shape(0) == features.shape(0), "incomplete must have one entry per feature");
    require(grown.has_value() == old_len.has_value() && (!grown || grown->shape(0) == old_len->shape(0)),
            "grown and old_len go together, one entry each");
    if (grown) {
        c.resume = true;
        c.grown = grown->data();
        c.old_len = old_len->data();
        c.n_grown = static_cast<int64_t>(grown->shape(0));
    }
    c.out_scores = out_scores.data();
    c.out_queries = out_queries.data();
    c.out_keys = out_keys.data();
    c.deeper = deeper.data();
    c.incomplete = incomplete.data();
    attnrules::MultiStats stats;
    try {
        nb::gil_scoped_release release;
        stats = attnrules::run_multi(c);
    } catch (const std::bad_alloc&) {
        PyErr_SetString(PyExc_MemoryError, "out of memory in attnrules._C.multi_topk: a buffer could not be allocated");
        throw nb::python_error();
    }
    nb::dict out;
    out["read"] = stats.read;
    out["selections"] = stats.selections;
    return out;
}

void count_nonzero(Matrix x, OutIndex counts, int threads) {
    const int64_t rows = static_cast<int64_t>(x.shape(0)), n = static_cast<int64_t>(x.shape(1));
    require(static_cast<int64_t>(counts.shape(0)) == rows, "counts must have one entry per row of x");
    nb::gil_scoped_release release;
    attnrules::count_nonzero_rows(x.data(), rows, n, counts.data(), attnrules::resolve_threads(threads));
}

void gather_nonzero(Matrix x, Index starts, OutIndex index, OutScores values, int threads) {
    const int64_t rows = static_cast<int64_t>(x.shape(0)), n = static_cast<int64_t>(x.shape(1));
    require(static_cast<int64_t>(starts.shape(0)) == rows, "starts must have one entry per row of x");
    require(index.shape(0) == values.shape(0), "index and values must have the same length");
    nb::gil_scoped_release release;
    attnrules::gather_nonzero_rows(x.data(), rows, n, starts.data(), index.data(), values.data(),
                                   attnrules::resolve_threads(threads));
}

void sparse_matmul(Index row_start, Index index, Values64 values, Dense64 dense, Out64 out, int threads) {
    const int64_t rows = static_cast<int64_t>(out.shape(0)), d = static_cast<int64_t>(out.shape(1));
    const int64_t n = static_cast<int64_t>(dense.shape(0)), nnz = static_cast<int64_t>(index.shape(0));
    require(static_cast<int64_t>(row_start.shape(0)) == rows + 1, "row_start must have rows + 1 entries");
    require(static_cast<int64_t>(dense.shape(1)) == d, "dense and out must have the same number of columns");
    require(static_cast<int64_t>(values.shape(0)) == nnz, "index and values must have the same length");
    const int64_t* rs = row_start.data();
    const int64_t* ix = index.data();
    require(rs[0] == 0 && rs[rows] == nnz, "row_start must run from 0 to the number of entries");
    for (int64_t r = 0; r < rows; ++r) require(rs[r] <= rs[r + 1], "row_start must not decrease");
    for (int64_t e = 0; e < nnz; ++e) require(ix[e] >= 0 && ix[e] < n, "index out of range of dense's rows");
    nb::gil_scoped_release release;
    attnrules::sparse_rows_matmul(rs, rows, ix, values.data(), dense.data(), d, out.data(),
                                  attnrules::resolve_threads(threads));
}

}  // namespace

NB_MODULE(_C, m) {
    m.doc() = "attnrules CPU core (C++17, nanobind)";
    m.def("build_info", []() {
        nb::dict info;
#ifdef _OPENMP
        info["openmp"] = true;
#else
        info["openmp"] = false;
#endif
        info["cxx_standard"] = static_cast<long>(__cplusplus);
        info["isa"] = attnrules::select_kernel("auto").isa;
        nb::list isas;
        for (const char* isa : {"avx512", "avx2", "generic"})
            if (attnrules::isa_supported(isa)) isas.append(isa);
        info["isas"] = isas;
        return info;
    }, "Facts about how this module was built (OpenMP, C++ standard) and the SIMD kernels this CPU runs.");

    m.def("topk", &topk, "rows"_a.noconvert(), "cols"_a.noconvert(), "k"_a, "per_row"_a, "score"_a,
          "row_weight"_a.noconvert().none() = nb::none(), "col_weight"_a.noconvert().none() = nb::none(),
          "row_acts"_a.noconvert().none() = nb::none(), "col_acts"_a.noconvert().none() = nb::none(),
          "out_scores"_a.noconvert(), "out_rows"_a.noconvert().none(), "out_cols"_a.noconvert(),
          "threads"_a = 0, "isa"_a = "auto", "block_rows"_a = 0, "block_cols"_a = 0, "sample_cols"_a = -1,
          "share_threshold"_a = true, "test_throw"_a = "", "out_scores_low"_a.noconvert().none() = nb::none(),
          "out_cols_low"_a.noconvert().none() = nb::none(), "sorted"_a = 0,
          "Fused blocked score + top-k over rows × cols (the GIL is released while it runs).\n\n"
          "Scores are (rows[r]·cols[c]) × weight, |…| or exp(…) × weight, or with row_acts/col_acts\n"
          "(rows[r]·cols[c]) × (row_acts[r]·col_acts[c]). per_row=False writes the k best (score, row, col)\n"
          "to out_scores/out_rows/out_cols; per_row=True writes each row's k best (score, col), row-major.\n"
          "Best first; ties by lower (row, col). Inputs must be float32, C-contiguous, CPU (never copied).\n"
          "threads/block_rows/block_cols <= 0 and sample_cols < 0 mean automatic; sample_cols = 0 turns off\n"
          "the per-row threshold guess from a sample of cols. share_threshold (global): threads prune with one\n"
          "threshold, a k-th best score known over all of them (False: each with its own; same answer).\n"
          "Returns stats: {'pushed': candidates collected, 'selections': cut-backs to k} of a global call,\n"
          "{'redone': rows scored again because their sampled threshold guess was too high} of a per-row one.\n"
          "test_throw (test hook): 'bad_alloc' / 'runtime_error' makes one worker thread throw that, to check\n"
          "that it reaches Python as MemoryError / RuntimeError. out_scores_low / out_cols_low (per row, signed,\n"
          "no weights or acts): also each row's k best cols by -score, from the same sweep. sorted > 0 (per row):\n"
          "only each row's best `sorted` entries come sorted; the rest follow them in no order.");

    m.def("count_nonzero", &count_nonzero, "x"_a.noconvert(), "counts"_a.noconvert(), "threads"_a = 0,
          "counts[r] = entries of float32 row x[r] whose bits are not +0.0 (-0.0 and NaN count).");
    m.def("gather_nonzero", &gather_nonzero, "x"_a.noconvert(), "starts"_a.noconvert(), "index"_a.noconvert(),
          "values"_a.noconvert(), "threads"_a = 0,
          "Row r's counted entries (column, value), in column order, into index/values from starts[r].");
    m.def("sparse_matmul", &sparse_matmul, "row_start"_a.noconvert(), "index"_a.noconvert(), "values"_a.noconvert(),
          "dense"_a.noconvert(), "out"_a.noconvert(), "threads"_a = 0,
          "out[r] = sum of values[e] * dense[index[e]] over row r's entries (float64): one fused\n"
          "multiply-add chain per element in entry order from +0.0, as BLAS's dense product rounds it.");

    m.def("multi_topk", &multi_topk, "table_scores"_a.noconvert(), "table_queries"_a.noconvert(),
          "row_start"_a.noconvert(), "row_len"_a.noconvert(), "weights"_a.noconvert(), "features"_a.noconvert(),
          "k"_a, "n_queries"_a, "first_keys"_a, "out_scores"_a.noconvert(), "out_queries"_a.noconvert(),
          "out_keys"_a.noconvert(), "deeper"_a.noconvert(), "incomplete"_a.noconvert(),
          "grown"_a.noconvert().none() = nb::none(), "old_len"_a.noconvert().none() = nb::none(),
          "row_sorted"_a.noconvert().none() = nb::none(), "threads"_a = 0,
          "Each listed feature's global top-k of (queries·keys) × weights[:, g], from a per-key table of\n"
          "best queries (rows 0..n_keys-1: A descending; n_keys..: -A descending; row r is\n"
          "table_*[row_start[r] : row_start[r] + row_len[r]]). Writes rows g of out_* ([n_weights × k], best\n"
          "first, ties by the lower (query, key)); sets deeper[row] for rows that must be read further and\n"
          "incomplete[i] for features whose answer depends on them (the GIL is released while it runs).\n"
          "With grown / old_len (rows read deeper since, and their former lengths), the listed features\n"
          "resume from the top-k already in out_* and read only those rows' new entries. row_sorted: how\n"
          "many first entries of each row are sorted (the rest follow unsorted, all below them; None: all).\n"
          "Returns stats: {'read': table entries scored, 'selections': cut-backs to k}.");
}
