// mcl_runtime._C: Python bindings of the C++ block manager. Same interface, return types and
// exceptions as mcl_runtime.engine.block_manager_ref.PyBlockManager.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "block_manager.h"

namespace py = pybind11;

namespace {

// A list or tuple of ints (the common case) is read directly: pybind11's generic vector caster
// costs several times more per item. Anything else goes through that caster.
std::vector<int64_t> to_int64s(const py::sequence& seq) {
    PyObject* obj = seq.ptr();
    if (!PyList_Check(obj) && !PyTuple_Check(obj)) return seq.cast<std::vector<int64_t>>();
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(obj);
    PyObject** items = PySequence_Fast_ITEMS(obj);
    std::vector<int64_t> out(static_cast<size_t>(n));
    for (Py_ssize_t i = 0; i < n; ++i) {
        const long long v = PyLong_AsLongLong(items[i]);
        if (v == -1 && PyErr_Occurred()) throw py::error_already_set();
        out[static_cast<size_t>(i)] = v;
    }
    return out;
}

py::tuple build_metadata(const mcl::BlockManager& bm, const py::sequence& seq_ids,
                         const py::sequence& num_new_tokens) {
    const mcl::MetadataPlan plan = bm.plan_metadata(to_int64s(seq_ids), to_int64s(num_new_tokens));
    const auto B = static_cast<py::ssize_t>(plan.seqs.size());
    const auto T = static_cast<py::ssize_t>(plan.num_tokens);
    py::array_t<int64_t> positions(T), slot_mapping(T);
    py::array_t<int32_t> block_tables({B, static_cast<py::ssize_t>(plan.max_blocks)});
    py::array_t<int32_t> context_lens(B), cu_seqlens_q(B + 1);
    bm.write_metadata(plan, positions.mutable_data(), slot_mapping.mutable_data(), block_tables.mutable_data(),
                      context_lens.mutable_data(), cu_seqlens_q.mutable_data());
    return py::make_tuple(positions, slot_mapping, block_tables, context_lens, cu_seqlens_q);
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

    m.def("block_hash", [](uint64_t parent_hash, const py::sequence& token_ids, int64_t adapter_id) {
        const std::vector<int64_t> tokens = to_int64s(token_ids);
        return mcl::block_hash(parent_hash, tokens.data(), tokens.size(), adapter_id);
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
        .def("add_sequence", [](BM& bm, int64_t seq_id, const py::sequence& token_ids, int64_t adapter_id) {
            return bm.add_sequence(seq_id, to_int64s(token_ids), adapter_id);
        }, py::arg("seq_id"), py::arg("token_ids"), py::arg("adapter_id"))
        .def("append_tokens", [](BM& bm, int64_t seq_id, const py::sequence& token_ids) {
            return bm.append_tokens(seq_id, to_int64s(token_ids));
        }, py::arg("seq_id"), py::arg("token_ids"))
        .def("append_one_each", [](BM& bm, const py::sequence& seq_ids, const py::sequence& tokens) {
            return bm.append_one_each(to_int64s(seq_ids), to_int64s(tokens));
        }, py::arg("seq_ids"), py::arg("tokens"))
        .def("fork", &BM::fork, py::arg("parent_id"), py::arg("child_id"))
        .def("free", &BM::free, py::arg("seq_id"))
        .def("pop_block_copies", &BM::pop_block_copies)
        .def("build_metadata", &build_metadata, py::arg("seq_ids"), py::arg("num_new_tokens"));
}
