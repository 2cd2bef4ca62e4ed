// attnrules._C: the CPU core, bound with nanobind.
#include <nanobind/nanobind.h>

namespace nb = nanobind;

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
        return info;
    }, "Facts about how this module was built (OpenMP, C++ standard).");
}
