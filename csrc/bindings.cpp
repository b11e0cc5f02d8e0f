// mcl_runtime._C: Python bindings of the C++ block manager. Same interface, return types and
// exceptions as mcl_runtime.engine.block_manager_ref.PyBlockManager.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "block_manager.h"

namespace py = pybind11;

namespace {

// Hands the vector's buffer to numpy without copying; the capsule frees it with the array.
template <typename T>
py::array_t<T> to_numpy(std::vector<T>&& v, std::vector<py::ssize_t> shape) {
    auto* owner = new std::vector<T>(std::move(v));
    py::capsule base(owner, [](void* p) { delete static_cast<std::vector<T>*>(p); });
    return py::array_t<T>(std::move(shape), owner->data(), base);
}

py::tuple build_metadata(const mcl::BlockManager& bm, const std::vector<int64_t>& seq_ids,
                         const std::vector<int64_t>& num_new_tokens) {
    mcl::Metadata m = bm.build_metadata(seq_ids, num_new_tokens);
    const auto B = static_cast<py::ssize_t>(m.num_seqs);
    const auto T = static_cast<py::ssize_t>(m.positions.size());
    return py::make_tuple(to_numpy(std::move(m.positions), {T}),
                          to_numpy(std::move(m.slot_mapping), {T}),
                          to_numpy(std::move(m.block_tables), {B, static_cast<py::ssize_t>(m.max_blocks)}),
                          to_numpy(std::move(m.context_lens), {B}),
                          to_numpy(std::move(m.cu_seqlens_q), {B + 1}));
}

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "C++ paged KV block manager (see mcl_runtime/engine/block_manager_ref.py for the semantics)";

    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
        } catch (const mcl::UnknownSequence& e) {
            py::set_error(PyExc_KeyError, e.what());
        }
    });

    m.def("block_hash", [](uint64_t parent_hash, const std::vector<int64_t>& token_ids, int64_t adapter_id) {
        return mcl::block_hash(parent_hash, token_ids.data(), token_ids.size(), adapter_id);
    }, py::arg("parent_hash"), py::arg("token_ids"), py::arg("adapter_id"));

    using BM = mcl::BlockManager;
    py::class_<BM>(m, "BlockManager")
        .def(py::init<int64_t, int64_t, bool>(), py::arg("num_blocks"), py::arg("block_size") = 16,
             py::arg("enable_prefix_caching") = true)
        .def_property_readonly("num_blocks", &BM::num_blocks)
        .def_property_readonly("block_size", &BM::block_size)
        .def_property_readonly("enable_prefix_caching", &BM::enable_prefix_caching)
        .def_property_readonly("num_free_blocks", &BM::num_free_blocks)
        .def_property_readonly("num_cached_blocks", &BM::num_cached_blocks)
        .def("has_sequence", &BM::has_sequence, py::arg("seq_id"))
        .def("get_block_table", &BM::block_table, py::arg("seq_id"))
        .def("get_num_tokens", &BM::num_tokens, py::arg("seq_id"))
        .def("ref_counts", &BM::ref_counts)
        .def("blocks_needed", &BM::blocks_needed, py::arg("seq_id"), py::arg("num_new_tokens"))
        .def("can_append", &BM::can_append, py::arg("seq_id"), py::arg("num_new_tokens"))
        .def("add_sequence", &BM::add_sequence, py::arg("seq_id"), py::arg("token_ids"), py::arg("adapter_id"))
        .def("append_tokens", &BM::append_tokens, py::arg("seq_id"), py::arg("token_ids"))
        .def("fork", &BM::fork, py::arg("parent_id"), py::arg("child_id"))
        .def("free", &BM::free, py::arg("seq_id"))
        .def("pop_block_copies", &BM::pop_block_copies)
        .def("build_metadata", &build_metadata, py::arg("seq_ids"), py::arg("num_new_tokens"));
}
