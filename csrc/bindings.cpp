// mcl_runtime._C: Python bindings of the C++ block manager (same interface, return types and
// exceptions as mcl_runtime.engine.block_manager_ref.PyBlockManager) and of the CPU kernels (paged
// attention, multi-LoRA, RMSNorm, rotary embedding, SiLU-and-multiply, the greedy argmax; wrapped for torch
// tensors by mcl_runtime.kernels.cpu).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>

#include "block_manager.h"
#include "paged_attention.h"
#include "layer_ops.h"
#include "lora_cpu.h"
#include "sampling_ops.h"

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

// The checks that keep a kernel inside its buffers; the semantics are in its header. The message is
// a literal, made into a string only on failure: some checks run once per block-table entry.
void check(bool ok, const char* what, const char* kernel = "paged_attention") {
    if (!ok) throw std::invalid_argument(std::string(kernel) + ": " + what);
}

// The kernels take torch tensors as DLPack capsules (torch.utils.dlpack.to_dlpack): shape,
// strides, dtype and device are read from the capsule in place, without a numpy array per tensor.
// The structs are those of dlpack.h (a stable ABI), declared here so the build needs no torch.
struct DLDevice { int32_t device_type; int32_t device_id; };
struct DLDataType { uint8_t code; uint8_t bits; uint16_t lanes; };
struct DLTensor {
    void* data; DLDevice device; int32_t ndim; DLDataType dtype; int64_t* shape; int64_t* strides;
    uint64_t byte_offset;
};
struct DLManagedTensor { DLTensor dl_tensor; void* manager_ctx; void (*deleter)(DLManagedTensor*); };
constexpr int32_t kDLCPU = 1;
constexpr uint8_t kDLInt = 0, kDLFloat = 2, kDLBfloat = 4;

// One tensor of a kernel call: the capsule (which keeps the tensor alive) and its view.
struct Tensor {
    py::capsule capsule;
    const DLTensor* t;
    int64_t ndim() const { return t->ndim; }
    int64_t size(int d) const { return t->shape[d]; }
    int64_t stride(int d) const {   // in elements; NULL strides mean compact row-major
        if (t->strides) return t->strides[d];
        int64_t s = 1;
        for (int i = t->ndim - 1; i > d; --i) s *= t->shape[i];
        return s;
    }
    bool contiguous() const {
        int64_t s = 1;
        for (int d = t->ndim - 1; d >= 0; --d) {
            if (t->shape[d] != 1 && stride(d) != s) return false;
            s *= t->shape[d];
        }
        return true;
    }
    template <typename T = void> T* data() const {
        return reinterpret_cast<T*>(static_cast<char*>(t->data) + t->byte_offset);
    }
    bool is(uint8_t code, uint8_t bits) const { return t->dtype.code == code && t->dtype.bits == bits && t->dtype.lanes == 1; }
    std::optional<mcl::DType> float_dtype() const {
        if (is(kDLFloat, 32)) return mcl::DType::f32;
        if (is(kDLFloat, 16)) return mcl::DType::f16;
        if (is(kDLBfloat, 16)) return mcl::DType::bf16;
        return std::nullopt;
    }
};

Tensor tensor(const py::handle& obj, const char* kernel, const char* name) {
    if (!PyCapsule_IsValid(obj.ptr(), "dltensor"))
        throw py::type_error(std::string(kernel) + ": " + name + " must be a tensor's DLPack capsule (to_dlpack)");
    auto* managed = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(obj.ptr(), "dltensor"));
    Tensor out{py::reinterpret_borrow<py::capsule>(obj), &managed->dl_tensor};
    if (out.t->device.device_type != kDLCPU)
        throw std::invalid_argument(std::string(kernel) + ": " + name + " must be on the CPU");
    return out;
}

// The kernels' float dtype: that of the first tensor, which every other must share.
mcl::DType one_dtype(std::initializer_list<const Tensor*> tensors, const char* kernel, const char* names) {
    const std::optional<mcl::DType> dt = (*tensors.begin())->float_dtype();
    bool ok = dt.has_value();
    for (const Tensor* t : tensors) ok = ok && t->float_dtype() == dt;
    if (!ok) throw py::type_error(std::string(kernel) + ": " + names + " must share one of float32, float16, bfloat16");
    return *dt;
}

void check_int(const Tensor& t, uint8_t bits, const char* kernel, const char* name) {
    if (!t.is(kDLInt, bits))
        throw py::type_error(std::string(kernel) + ": " + name + " must be int" + std::to_string(bits));
}

// The dot-product tile width a kernel is asked for: 0 (the machine's), 8 or 16.
void check_lanes(int lanes, const char* kernel) {
    check(lanes == 0 || lanes == 8 || lanes == 16, "lanes must be 0 (the machine's), 8 or 16", kernel);
}

// out [T, N], x [T, N], residual [T, N] or None, weight [N]: one dtype, unit stride along N.
void rms_norm(const py::handle& out_, const py::handle& x_, const py::handle& residual_, const py::handle& weight_,
              double eps) {
    const char* k = "rms_norm";
    const Tensor out = tensor(out_, k, "out"), x = tensor(x_, k, "x"), weight = tensor(weight_, k, "weight");
    const std::optional<Tensor> residual = residual_.is_none() ? std::nullopt
                                                               : std::optional<Tensor>(tensor(residual_, k, "residual"));
    const mcl::DType dt = residual ? one_dtype({&x, &weight, &out, &*residual}, k, "x, weight, out and residual")
                                   : one_dtype({&x, &weight, &out}, k, "x, weight and out");
    check(x.ndim() == 2 && weight.ndim() == 1 && x.size(1) == weight.size(0), "x [T, N] and weight [N]", k);
    for (const Tensor* a : {&out, &x, &weight}) check(a->stride(a->ndim() - 1) == 1, "unit stride along the last dim needed", k);
    for (const Tensor* a : {&out, residual ? &*residual : &out})
        check(a->ndim() == 2 && a->size(0) == x.size(0) && a->size(1) == x.size(1) && a->stride(1) == 1,
              "out and residual: x's shape, unit stride along the last dim", k);
    const mcl::RMSNormArgs args{out.data(), out.stride(0), x.data(), x.stride(0),
                                residual ? residual->data() : nullptr, residual ? residual->stride(0) : 0,
                                weight.data(), x.size(0), x.size(1), static_cast<float>(eps)};
    py::gil_scoped_release release;
    mcl::rms_norm(args, dt);
}

// x [T, H, D] (unit stride along D; rotated in place), cos and sin [T, D] contiguous: one dtype.
void rope(const py::handle& x_, const py::handle& cos_, const py::handle& sin_) {
    const char* k = "rope";
    const Tensor x = tensor(x_, k, "x"), cos = tensor(cos_, k, "cos"), sin = tensor(sin_, k, "sin");
    const mcl::DType dt = one_dtype({&x, &cos, &sin}, k, "x, cos and sin");
    check(x.ndim() == 3 && x.size(2) % 2 == 0 && x.stride(2) == 1, "x [T, H, D]: even D, unit stride along D", k);
    for (const Tensor* a : {&cos, &sin})
        check(a->ndim() == 2 && a->size(0) == x.size(0) && a->size(1) == x.size(2) && a->contiguous(),
              "cos and sin [T, D], contiguous", k);
    const mcl::RopeArgs args{x.data(), x.stride(0), x.stride(1), cos.data(), sin.data(), x.size(0), x.size(1), x.size(2)};
    py::gil_scoped_release release;
    mcl::rope(args, dt);
}

// out [T] int64 (contiguous), x [T, V] (V >= 1, unit stride along V): a float dtype.
void argmax_rows(const py::handle& out_, const py::handle& x_, int num_threads) {
    const char* k = "argmax_rows";
    const Tensor out = tensor(out_, k, "out"), x = tensor(x_, k, "x");
    const std::optional<mcl::DType> dt = x.float_dtype();
    if (!dt) throw py::type_error("argmax_rows: x must be float32, float16 or bfloat16");
    check_int(out, 64, k, "out");
    check(x.ndim() == 2 && x.size(1) >= 1 && x.stride(1) == 1, "x [T, V]: V >= 1, unit stride along V", k);
    check(out.ndim() == 1 && out.size(0) == x.size(0) && out.contiguous(), "out [T], contiguous", k);
    const mcl::ArgmaxArgs args{out.data<int64_t>(), x.data(), x.stride(0), x.size(0), x.size(1)};
    py::gil_scoped_release release;
    mcl::argmax_rows(args, *dt, num_threads);
}

// out [T, I], x [T, 2I] (gate | up): one dtype, unit stride along the columns.
void silu_and_mul(const py::handle& out_, const py::handle& x_, int num_threads) {
    const char* k = "silu_and_mul";
    const Tensor out = tensor(out_, k, "out"), x = tensor(x_, k, "x");
    const mcl::DType dt = one_dtype({&x, &out}, k, "x and out");
    check(x.ndim() == 2 && x.size(1) % 2 == 0 && x.stride(1) == 1,
          "x [T, 2I]: an even number of columns, unit stride along them", k);
    check(out.ndim() == 2 && out.size(0) == x.size(0) && 2 * out.size(1) == x.size(1) && out.stride(1) == 1,
          "out [T, I] (half of x's columns), unit stride along them", k);
    const mcl::SiluAndMulArgs args{out.data(), out.stride(0), x.data(), x.stride(0), x.size(0), out.size(1)};
    py::gil_scoped_release release;
    mcl::silu_and_mul(args, dt, num_threads);
}

// y [T, out] (updated in place), x [T, in], lora_a [S, n*R, in], lora_bt [S, R, out] or, for the
// pair arithmetic, [S, R/2, out, 2]: one dtype; scaling [S] float32, ranks [S, n] int32 (tensors);
// offsets [n + 1] int64, seg_starts [nseg + 1] and seg_slots [nseg] int32 (host arrays). Semantics
// in lora_cpu.h.
void lora_apply(const py::handle& y_, const py::handle& x_, const py::handle& lora_a_, const py::handle& lora_bt_,
                const py::handle& scaling_, const py::handle& ranks_, const py::array_t<int64_t, 0>& offsets,
                const py::array_t<int32_t, 0>& seg_starts, const py::array_t<int32_t, 0>& seg_slots, int num_threads,
                int lanes) {
    const char* kernel = "lora_apply";
    const Tensor y = tensor(y_, kernel, "y"), x = tensor(x_, kernel, "x"), lora_a = tensor(lora_a_, kernel, "lora_a"),
                 lora_bt = tensor(lora_bt_, kernel, "lora_bt"), scaling = tensor(scaling_, kernel, "scaling"),
                 ranks = tensor(ranks_, kernel, "ranks");
    const mcl::DType dt = one_dtype({&x, &y, &lora_a, &lora_bt}, kernel, "x, y and the weights");
    if (!scaling.is(kDLFloat, 32)) throw py::type_error("lora_apply: scaling must be float32");
    check_int(ranks, 32, kernel, "ranks");
    const bool pairs = lora_bt.ndim() == 4;
    check(y.ndim() == 2 && x.ndim() == 2 && lora_a.ndim() == 3 && (lora_bt.ndim() == 3 || (pairs && lora_bt.size(3) == 2)),
          "y [T, out], x [T, in], lora_a [S, n*R, in], lora_bt [S, R, out] or [S, R/2, out, 2]", kernel);
    const int64_t T = x.size(0), in = x.size(1), out = y.size(1), S = lora_a.size(0);
    const int64_t R = pairs ? 2 * lora_bt.size(1) : lora_bt.size(1);
    const int64_t n = offsets.ndim() == 1 ? offsets.shape(0) - 1 : -1;
    check(n >= 1 && y.size(0) == T && lora_a.size(2) == in && lora_a.size(1) == n * R && lora_bt.size(0) == S &&
          lora_bt.size(2) == out, "shapes do not match", kernel);
    check(!pairs || mcl::can_lora_pairs(dt, R, in),
          "lora_bt in pairs needs bfloat16, an input width that is a multiple of 32 and a CPU with AVX512-BF16", kernel);
    check(x.stride(1) == 1 && y.stride(1) == 1, "x and y need unit stride along features", kernel);
    check(lora_a.contiguous() && lora_bt.contiguous(), "lora_a and lora_bt must be contiguous", kernel);
    check(scaling.ndim() == 1 && scaling.size(0) == S && ranks.ndim() == 2 && ranks.size(0) == S &&
          ranks.size(1) == n && scaling.contiguous() && ranks.contiguous(), "scaling [S], ranks [S, n]", kernel);
    const int64_t* off = offsets.data();
    check(off[0] == 0 && off[n] == out, "offsets must run from 0 to out", kernel);
    for (int64_t j = 0; j < n; ++j) check(off[j + 1] >= off[j], "offsets must not decrease", kernel);
    const int32_t* rank = ranks.data<int32_t>();
    for (int64_t i = 0; i < S * n; ++i) check(rank[i] >= 0 && rank[i] <= R, "ranks in [0, R]", kernel);
    const int64_t nseg = seg_slots.ndim() == 1 ? seg_slots.shape(0) : -1;
    check(nseg >= 0 && seg_starts.ndim() == 1 && seg_starts.shape(0) == nseg + 1, "seg_starts [nseg + 1], seg_slots [nseg]",
          kernel);
    check_lanes(lanes, kernel);
    const int32_t *starts = seg_starts.data(), *slots = seg_slots.data();
    check(starts[0] >= 0 && starts[nseg] <= T, "segments out of the rows", kernel);
    for (int64_t i = 0; i < nseg; ++i) {
        check(starts[i + 1] >= starts[i], "seg_starts must not decrease", kernel);
        check(slots[i] >= -1 && slots[i] < S, "seg_slots must be -1 (no adapter) or a slot", kernel);
    }
    const mcl::LoRAArgs args{y.data(), y.stride(0), x.data(), x.stride(0), lora_a.data(), lora_bt.data(),
                             scaling.data<float>(), rank, off, starts, slots, nseg, n, R, in, out, pairs};
    py::gil_scoped_release release;
    mcl::lora_apply(args, dt, num_threads, lanes);
}

// One step's attention metadata, checked once (the block-table entries each sequence uses
// included); run() is called per layer and checks only the tensors that change with the layer.
class PagedAttentionPlan {
  public:
    PagedAttentionPlan(const py::handle& block_tables, const py::handle& context_lens, const py::handle& cu_seqlens_q,
                       int64_t block_size)
        : tables_(tensor(block_tables, kernel, "block_tables")), ctx_(tensor(context_lens, kernel, "context_lens")),
          cu_(tensor(cu_seqlens_q, kernel, "cu_seqlens_q")), block_size_(block_size) {
        for (const auto& [t, name] : {std::pair{&tables_, "block_tables"}, {&ctx_, "context_lens"}, {&cu_, "cu_seqlens_q"}})
            check_int(*t, 32, kernel, name);
        const int64_t B = ctx_.ndim() == 1 ? ctx_.size(0) : -1, M = tables_.ndim() == 2 ? tables_.size(1) : -1;
        check(B >= 0 && M >= 0 && tables_.size(0) == B && cu_.ndim() == 1 && cu_.size(0) == B + 1 &&
              tables_.contiguous() && ctx_.contiguous() && cu_.contiguous() && block_size > 0,
              "block_tables [B, M], context_lens [B], cu_seqlens_q [B + 1] (contiguous), block_size > 0");
        const int32_t *cu = cu_.data<int32_t>(), *ctx = ctx_.data<int32_t>(), *table = tables_.data<int32_t>();
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

    void run(const py::handle& out_, const py::handle& q_, const py::handle& k_cache_, const py::handle& v_cache_,
             double scale, int num_threads, int lanes) const {
        const Tensor out = tensor(out_, kernel, "out"), q = tensor(q_, kernel, "q"),
                     k_cache = tensor(k_cache_, kernel, "k_cache"), v_cache = tensor(v_cache_, kernel, "v_cache");
        const mcl::DType dt = one_dtype({&q, &k_cache, &v_cache, &out}, kernel, "q, the caches and out");
        check(q.ndim() == 3 && out.ndim() == 3 && k_cache.ndim() == 4 && v_cache.ndim() == 4,
              "q, out [T, Hq, D], caches [N, bs, Hkv, D]");
        for (int d = 0; d < 4; ++d) check(k_cache.size(d) == v_cache.size(d), "k_cache and v_cache shapes differ");
        const int64_t T = q.size(0), Hq = q.size(1), D = q.size(2);
        const int64_t N = k_cache.size(0), Hkv = k_cache.size(2);
        check(out.size(0) == T && out.size(1) == Hq && out.size(2) == D, "out must have q's shape");
        check(k_cache.size(1) == block_size_, "the cache's block size is not the plan's");
        check(k_cache.size(3) == D && Hkv > 0 && Hq % Hkv == 0, "head_dim or head counts do not match the cache");
        check(k_cache.contiguous() && v_cache.contiguous(), "caches must be contiguous");
        check(q.stride(2) == 1 && out.stride(2) == 1, "q and out need unit stride along D");
        const int64_t B = ctx_.size(0);
        check(cu_.data<int32_t>()[B] <= T, "cu_seqlens_q out of the rows of q");
        check(max_block_ < N, "block_tables entry out of the cache");
        check_lanes(lanes, kernel);
        const mcl::PagedAttentionArgs args{
            out.data(), out.stride(0), out.stride(1), q.data(), q.stride(0), q.stride(1),
            k_cache.data(), v_cache.data(), tables_.data<int32_t>(), tables_.size(1), ctx_.data<int32_t>(),
            cu_.data<int32_t>(), B, Hq, Hkv, D, block_size_, static_cast<float>(scale)};
        py::gil_scoped_release release;
        mcl::paged_attention(args, dt, num_threads, lanes);
    }

  private:
    static constexpr const char* kernel = "paged_attention";
    Tensor tables_, ctx_, cu_;  // held (their capsules keep the tensors alive): the kernel reads them
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

    // The kernels' calling convention and set (6: tensors as DLPack capsules, a lanes argument,
    // silu_and_mul, lora_apply's pair layout and can_lora_pairs); kernels/cpu.py uses them only when
    // it matches, so a stale build falls back to torch's ops instead of failing at a call.
    m.attr("KERNEL_ABI") = 6;
    m.attr("HAS_BF16_DOT") = mcl::has_bf16_dot();
    // Whether lora_apply takes its pair arithmetic for LoRA buffers of this dtype ("float32",
    // "float16" or "bfloat16"), rank and input width here: the rule its own check applies.
    m.def(
        "can_lora_pairs",
        [](const std::string& dtype, int64_t max_rank, int64_t in_features) {
            if (dtype != "float32" && dtype != "float16" && dtype != "bfloat16")
                throw py::value_error("can_lora_pairs: dtype must be float32, float16 or bfloat16, got " + dtype);
            const mcl::DType dt = dtype == "bfloat16"  ? mcl::DType::bf16
                                : dtype == "float16" ? mcl::DType::f16
                                                     : mcl::DType::f32;
            return mcl::can_lora_pairs(dt, max_rank, in_features);
        },
        py::arg("dtype"), py::arg("max_rank"), py::arg("in_features"));
    // The width (floats) of the vectors the kernels' loops run on this CPU: 16 on AVX-512, else 8.
    m.attr("VECTOR_LANES") = mcl::dot_lanes();

    py::class_<PagedAttentionPlan>(m, "PagedAttentionPlan")
        .def(py::init<const py::handle&, const py::handle&, const py::handle&, int64_t>(),
             py::arg("block_tables"), py::arg("context_lens"), py::arg("cu_seqlens_q"), py::arg("block_size"))
        .def("run", &PagedAttentionPlan::run, py::arg("out"), py::arg("q"), py::arg("k_cache"), py::arg("v_cache"),
             py::arg("scale"), py::arg("num_threads") = 1, py::arg("lanes") = 0);

    m.def("rms_norm", &rms_norm, py::arg("out"), py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("eps"));

    m.def("rope", &rope, py::arg("x"), py::arg("cos"), py::arg("sin"));

    m.def("silu_and_mul", &silu_and_mul, py::arg("out"), py::arg("x"), py::arg("num_threads") = 1);

    m.def("argmax_rows", &argmax_rows, py::arg("out"), py::arg("x"), py::arg("num_threads") = 1);

    m.def("lora_apply", &lora_apply, py::arg("y"), py::arg("x"), py::arg("lora_a"), py::arg("lora_bt"),
          py::arg("scaling"), py::arg("ranks"), py::arg("offsets"), py::arg("seg_starts"), py::arg("seg_slots"),
          py::arg("num_threads") = 1, py::arg("lanes") = 0);

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
