// Paged KV block manager with prefix cache and batch metadata: the fast twin of
// mcl_runtime/engine/block_manager_ref.py, whose module docstring is the specification.
// Plain C++17; csrc/bindings.cpp exposes it to Python as mcl_runtime._C.BlockManager.
#pragma once

#include <cstdint>
#include <deque>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace mcl {

// Raised for an unknown sequence id (KeyError in Python); std::invalid_argument is ValueError.
struct UnknownSequence : std::out_of_range {
    explicit UnknownSequence(int64_t seq_id) : std::out_of_range("unknown sequence " + std::to_string(seq_id)) {}
};

// Chained splitmix64 hash of one full block; parent_hash is 0 for the first block.
uint64_t block_hash(uint64_t parent_hash, const int64_t* tokens, size_t n, int64_t adapter_id);

struct Sequence {
    std::vector<int32_t> blocks;
    int64_t num_tokens = 0;
    std::vector<int64_t> last_tokens;  // tokens of the partially filled last block
    uint64_t last_hash = 0;            // hash of the last full block (0: none yet)
    int64_t adapter_id = 0;
};

// A validated build_metadata batch; valid until the manager changes.
struct MetadataPlan {
    std::vector<const Sequence*> seqs;    // B
    std::vector<int64_t> num_new_tokens;  // B
    int64_t num_tokens = 0;               // T
    size_t max_blocks = 0;                // M
};

class BlockManager {
public:
    BlockManager(int64_t num_blocks, int64_t block_size, bool enable_prefix_caching);

    int64_t num_blocks() const { return num_blocks_; }
    int64_t block_size() const { return block_size_; }
    bool enable_prefix_caching() const { return prefix_caching_; }
    int64_t num_free_blocks() const { return static_cast<int64_t>(free_.size()) + num_evictable_; }
    int64_t num_cached_blocks() const { return static_cast<int64_t>(cached_.size()); }

    bool has_sequence(int64_t seq_id) const { return seqs_.count(seq_id) != 0; }
    const std::vector<int32_t>& block_table(int64_t seq_id) const { return seq(seq_id).blocks; }
    int64_t num_tokens(int64_t seq_id) const { return seq(seq_id).num_tokens; }
    const std::vector<int32_t>& ref_counts() const { return ref_; }
    int64_t blocks_needed(int64_t seq_id, int64_t num_new_tokens) const;
    bool can_append(int64_t seq_id, int64_t num_new_tokens) const {
        return blocks_needed(seq_id, num_new_tokens) <= num_free_blocks();
    }

    int64_t add_sequence(int64_t seq_id, const std::vector<int64_t>& token_ids, int64_t adapter_id);
    bool append_tokens(int64_t seq_id, const std::vector<int64_t>& token_ids);
    // One token for each sequence, in order, until one does not fit; returns how many were appended.
    int64_t append_one_each(const std::vector<int64_t>& seq_ids, const std::vector<int64_t>& tokens);
    void fork(int64_t parent_id, int64_t child_id);
    void free(int64_t seq_id);
    std::vector<std::pair<int32_t, int32_t>> pop_block_copies();

    // build_metadata in two steps, so that the caller allocates the arrays (numpy, without a copy):
    // plan_metadata validates the batch and sizes the arrays, write_metadata fills
    // positions [T], slot_mapping [T], block_tables [B, M] (row-major), context_lens [B], cu_seqlens_q [B + 1].
    MetadataPlan plan_metadata(const std::vector<int64_t>& seq_ids, std::vector<int64_t> num_new_tokens) const;
    void write_metadata(const MetadataPlan& plan, int64_t* positions, int64_t* slot_mapping, int32_t* block_tables,
                        int32_t* context_lens, int32_t* cu_seqlens_q) const;

private:
    const Sequence& seq(int64_t seq_id) const;
    Sequence& seq(int64_t seq_id) { return const_cast<Sequence&>(std::as_const(*this).seq(seq_id)); }
    int32_t lookup(uint64_t h, uint64_t parent, int64_t adapter_id, const int64_t* tokens) const;
    bool parent_registered(const Sequence& s, uint64_t parent) const;  // first block, or parent is the cached one
    void on_block_full(Sequence& s);
    int32_t allocate();
    void release(int32_t block);
    void lru_push_back(int32_t block);
    void lru_remove(int32_t block);

    int64_t num_blocks_, block_size_;
    bool prefix_caching_;
    std::vector<int32_t> ref_;
    std::deque<int32_t> free_;  // FIFO

    // Registration of each block in the prefix cache (valid where registered_ is set).
    std::vector<uint8_t> registered_;
    std::vector<uint64_t> hash_, parent_hash_;
    std::vector<int64_t> adapter_, tokens_;  // tokens_: block_size_ per block
    std::unordered_map<uint64_t, int32_t> cached_;  // hash -> block id

    // Evictable blocks (registered, refcount 0) as an intrusive doubly linked list, oldest first.
    std::vector<int32_t> lru_prev_, lru_next_;
    int32_t lru_head_ = -1, lru_tail_ = -1;
    int64_t num_evictable_ = 0;

    std::unordered_map<int64_t, Sequence> seqs_;
    std::vector<std::pair<int32_t, int32_t>> copies_;
};

}  // namespace mcl
