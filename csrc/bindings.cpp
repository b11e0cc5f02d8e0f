// mcl_runtime._C: Python bindings of the C++ block manager (same interface, return types and
// exceptions as mcl_runtime.engine.block_manager_ref.PyBlockManager) and of the CPU paged-attention
// kernel (wrapped for torch tensors by mcl_runtime.kernels.paged_attention_cpu).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>

#include "block_manager.h"
#include "paged_attention.h"
#include "layer_ops.h"
#include "lora_cpu.h"

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

// The checks that keep a kernel inside its buffers; the semantics are in its header.
void check(bool ok, const std::string& what, const char* kernel = "paged_attention") {
    if (!ok) throw std::invalid_argument(std::string(kernel) + ": " + what);
}

mcl::DType parse_dtype(const std::string& dtype, const char* kernel) {
    if (dtype == "float32") return mcl::DType::f32;
    if (dtype == "float16") return mcl::DType::f16;
    if (dtype == "bfloat16") return mcl::DType::bf16;
    throw py::type_error(std::string(kernel) + ": dtype " + dtype);
}

int64_t elem_stride(const py::array& a, int dim) { return a.strides(dim) / static_cast<int64_t>(a.itemsize()); }


// out [T, N], x [T, N], residual [T, N] or None, weight [N]: one dtype, unit stride along N.
void rms_norm(py::array out, const py::array& x, std::optional<py::array> residual, const py::array& weight,
              double eps, const std::string& dtype) {
    const mcl::DType dt = parse_dtype(dtype, "rms_norm");
    const py::ssize_t itemsize = dt == mcl::DType::f32 ? 4 : 2;
    check(x.ndim() == 2 && weight.ndim() == 1 && x.shape(1) == weight.shape(0), "x [T, N] and weight [N]", "rms_norm");
    std::vector<const py::array*> arrays{&out, &x, &weight};
    if (residual) arrays.push_back(&*residual);
    for (const py::array* a : arrays) {
        if (a->itemsize() != itemsize) throw py::type_error("rms_norm: every tensor must be " + dtype);
        check(a->strides(a->ndim() - 1) == itemsize, "unit stride along the last dim needed", "rms_norm");
        check(a == &x || a == &weight || (a->ndim() == 2 && a->shape(0) == x.shape(0) && a->shape(1) == x.shape(1) &&
                                          a->writeable()), "out and residual: writeable, x's shape", "rms_norm");
    }
    const mcl::RMSNormArgs args{out.mutable_data(), elem_stride(out, 0), x.data(), elem_stride(x, 0),
                                residual ? residual->mutable_data() : nullptr, residual ? elem_stride(*residual, 0) : 0,
                                weight.data(), x.shape(0), x.shape(1), static_cast<float>(eps)};
    py::gil_scoped_release release;
    mcl::rms_norm(args, dt);
}

// x [T, H, D] (unit stride along D; rotated in place), cos and sin [T, D] contiguous: one dtype.
void rope(py::array x, const py::array& cos, const py::array& sin, const std::string& dtype) {
    const mcl::DType dt = parse_dtype(dtype, "rope");
    const py::ssize_t itemsize = dt == mcl::DType::f32 ? 4 : 2;
    for (const py::array* a : std::initializer_list<const py::array*>{&x, &cos, &sin})
        if (a->itemsize() != itemsize) throw py::type_error("rope: every tensor must be " + dtype);
    check(x.ndim() == 3 && x.shape(2) % 2 == 0 && x.strides(2) == itemsize && x.writeable(),
          "x [T, H, D]: even D, unit stride along D, writeable", "rope");
    for (const py::array* a : {&cos, &sin})
        check(a->ndim() == 2 && a->shape(0) == x.shape(0) && a->shape(1) == x.shape(2) &&
              (a->flags() & py::array::c_style) != 0, "cos and sin [T, D], contiguous", "rope");
    const mcl::RopeArgs args{x.mutable_data(), elem_stride(x, 0), elem_stride(x, 1), cos.data(), sin.data(),
                             x.shape(0), x.shape(1), x.shape(2)};
    py::gil_scoped_release release;
    mcl::rope(args, dt);
}

// y [T, out] (updated in place), x [T, in], lora_a [S, n*R, in], lora_b [S, out, R]: one dtype;
// scaling [S] float32, ranks [S, n] int32, offsets [n + 1] int64, seg_starts [nseg + 1] and
// seg_slots [nseg] int32. Semantics in lora_cpu.h.
void lora_apply(py::array y, const py::array& x, const py::array& lora_a, const py::array& lora_b,
                const py::array_t<float, 0>& scaling, const py::array_t<int32_t, 0>& ranks,
                const py::array_t<int64_t, 0>& offsets, const py::array_t<int32_t, 0>& seg_starts,
                const py::array_t<int32_t, 0>& seg_slots, const std::string& dtype) {
    const char* kernel = "lora_apply";
    const mcl::DType dt = parse_dtype(dtype, kernel);
    const py::ssize_t itemsize = dt == mcl::DType::f32 ? 4 : 2;
    for (const py::array* a : std::initializer_list<const py::array*>{&y, &x, &lora_a, &lora_b})
        if (a->itemsize() != itemsize) throw py::type_error("lora_apply: y, x and the weights must be " + dtype);
    check(y.ndim() == 2 && x.ndim() == 2 && lora_a.ndim() == 3 && lora_b.ndim() == 3,
          "y [T, out], x [T, in], lora_a [S, n*R, in], lora_b [S, out, R]", kernel);
    const int64_t T = x.shape(0), in = x.shape(1), out = y.shape(1), S = lora_a.shape(0), R = lora_b.shape(2);
    const int64_t n = offsets.ndim() == 1 ? offsets.shape(0) - 1 : -1;
    check(n >= 1 && y.shape(0) == T && lora_a.shape(2) == in && lora_a.shape(1) == n * R && lora_b.shape(0) == S &&
          lora_b.shape(1) == out, "shapes do not match", kernel);
    check(x.strides(1) == itemsize && y.strides(1) == itemsize && y.writeable(),
          "x and y need unit stride along features; y writeable", kernel);
    check((lora_a.flags() & lora_b.flags() & py::array::c_style) != 0, "lora_a and lora_b must be contiguous", kernel);
    check(scaling.ndim() == 1 && scaling.shape(0) == S && ranks.ndim() == 2 && ranks.shape(0) == S &&
          ranks.shape(1) == n, "scaling [S], ranks [S, n]", kernel);
    const int64_t* off = offsets.data();
    check(off[0] == 0 && off[n] == out, "offsets must run from 0 to out", kernel);
    for (int64_t j = 0; j < n; ++j) check(off[j + 1] >= off[j], "offsets must not decrease", kernel);
    for (int64_t i = 0; i < S * n; ++i) check(ranks.data()[i] >= 0 && ranks.data()[i] <= R, "ranks in [0, R]", kernel);
    const int64_t nseg = seg_slots.ndim() == 1 ? seg_slots.shape(0) : -1;
    check(nseg >= 0 && seg_starts.ndim() == 1 && seg_starts.shape(0) == nseg + 1, "seg_starts [nseg + 1], seg_slots [nseg]",
          kernel);
    const int32_t *starts = seg_starts.data(), *slots = seg_slots.data();
    check(starts[0] >= 0 && starts[nseg] <= T, "segments out of the rows", kernel);
    for (int64_t i = 0; i < nseg; ++i) {
        check(starts[i + 1] >= starts[i], "seg_starts must not decrease", kernel);
        check(slots[i] >= -1 && slots[i] < S, "seg_slots must be -1 (no adapter) or a slot", kernel);
    }
    const mcl::LoRAArgs args{y.mutable_data(), elem_stride(y, 0), x.data(), elem_stride(x, 0), lora_a.data(),
                             lora_b.data(), scaling.data(), ranks.data(), off, starts, slots, nseg, n, R, in, out};
    py::gil_scoped_release release;
    mcl::lora_apply(args, dt);
}

// One step's attention metadata, checked once (the block-table entries each sequence uses
// included); run() is called per layer and checks only the tensors that change with the layer.
class PagedAttentionPlan {
  public:
    PagedAttentionPlan(py::array_t<int32_t, 0> block_tables, py::array_t<int32_t, 0> context_lens,
                       py::array_t<int32_t, 0> cu_seqlens_q, int64_t block_size)
        : tables_(std::move(block_tables)), ctx_(std::move(context_lens)), cu_(std::move(cu_seqlens_q)),
          block_size_(block_size) {
        const int64_t B = ctx_.ndim() == 1 ? ctx_.shape(0) : -1, M = tables_.ndim() == 2 ? tables_.shape(1) : -1;
        check(B >= 0 && M >= 0 && tables_.shape(0) == B && cu_.ndim() == 1 && cu_.shape(0) == B + 1 &&
              (tables_.flags() & ctx_.flags() & cu_.flags() & py::array::c_style) != 0 && block_size > 0,
              "block_tables [B, M], context_lens [B], cu_seqlens_q [B + 1] (contiguous), block_size > 0");
        const int32_t *cu = cu_.data(), *ctx = ctx_.data(), *table = tables_.data();
        check(cu[0] >= 0, "cu_seqlens_q must not be negative");
        for (int64_t b = 0; b < B; ++b) {
            check(cu[b + 1] >= cu[b], "cu_seqlens_q must not decrease");
            if (cu[b + 1] == cu[b]) continue;
            check(ctx[b] >= 0 && ctx[b] <= M * block_size, "context_lens[b] must be in [0, M * block_size]");
            for (int64_t i = 0; i < (ctx[b] + block_size - 1) / block_size; ++i) {
                check(table[b * M + i] >= 0, "block_tables entry out of the cache");
                max_block_ = std::max<int64_t>(max_block_, table[b * M + i]);
            }
        }
    }

    void run(py::array out, const py::array& q, const py::array& k_cache, const py::array& v_cache, double scale,
             const std::string& dtype, int num_threads) const {
        const mcl::DType dt = parse_dtype(dtype, "paged_attention");
        const py::ssize_t itemsize = dt == mcl::DType::f32 ? 4 : 2;
        for (const py::array* a : std::initializer_list<const py::array*>{&out, &q, &k_cache, &v_cache})
            if (a->itemsize() != itemsize) throw py::type_error("paged_attention: q, caches and out must be " + dtype);
        check(q.ndim() == 3 && out.ndim() == 3 && k_cache.ndim() == 4, "q, out [T, Hq, D], caches [N, bs, Hkv, D]");
        check(k_cache.request().shape == v_cache.request().shape, "k_cache and v_cache shapes differ");
        const int64_t T = q.shape(0), Hq = q.shape(1), D = q.shape(2);
        const int64_t N = k_cache.shape(0), Hkv = k_cache.shape(2);
        check(out.shape(0) == T && out.shape(1) == Hq && out.shape(2) == D, "out must have q's shape");
        check(k_cache.shape(1) == block_size_, "the cache's block size is not the plan's");
        check(k_cache.shape(3) == D && Hkv > 0 && Hq % Hkv == 0, "head_dim or head counts do not match the cache");
        check((k_cache.flags() & v_cache.flags() & py::array::c_style) != 0, "caches must be contiguous");
        check(q.strides(2) == itemsize && out.strides(2) == itemsize, "q and out need unit stride along D");
        check(out.writeable(), "out must be writeable");
        const int64_t B = ctx_.shape(0);
        check(cu_.data()[B] <= T, "cu_seqlens_q out of the rows of q");
        check(max_block_ < N, "block_tables entry out of the cache");
        const mcl::PagedAttentionArgs args{
            out.mutable_data(), elem_stride(out, 0), elem_stride(out, 1), q.data(), elem_stride(q, 0), elem_stride(q, 1),
            k_cache.data(), v_cache.data(), tables_.data(), tables_.shape(1), ctx_.data(), cu_.data(), B, Hq, Hkv, D,
            block_size_, static_cast<float>(scale)};
        py::gil_scoped_release release;
        mcl::paged_attention(args, dt, num_threads);
    }

  private:
    py::array_t<int32_t, 0> tables_, ctx_, cu_;  // held: the kernel reads them
    int64_t block_size_;
    int64_t max_block_ = -1;
};

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "C++ paged KV block manager (semantics: mcl_runtime/engine/block_manager_ref.py) and CPU paged attention";

    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
        } catch (const mcl::UnknownSequence& e) {
            py::set_error(PyExc_KeyError, e.what());
        }
    });

    py::class_<PagedAttentionPlan>(m, "PagedAttentionPlan")
        .def(py::init<py::array_t<int32_t, 0>, py::array_t<int32_t, 0>, py::array_t<int32_t, 0>, int64_t>(),
             py::arg("block_tables"), py::arg("context_lens"), py::arg("cu_seqlens_q"), py::arg("block_size"))
        .def("run", &PagedAttentionPlan::run, py::arg("out"), py::arg("q"), py::arg("k_cache"), py::arg("v_cache"),
             py::arg("scale"), py::arg("dtype"), py::arg("num_threads") = 1);

    m.def("rms_norm", &rms_norm, py::arg("out"), py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("eps"),
          py::arg("dtype"));

    m.def("rope", &rope, py::arg("x"), py::arg("cos"), py::arg("sin"), py::arg("dtype"));

    m.def("lora_apply", &lora_apply, py::arg("y"), py::arg("x"), py::arg("lora_a"), py::arg("lora_b"),
          py::arg("scaling"), py::arg("ranks"), py::arg("offsets"), py::arg("seg_starts"), py::arg("seg_slots"),
          py::arg("dtype"));

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
