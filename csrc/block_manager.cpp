#include "block_manager.h"

#include <algorithm>
#include <cstring>
#include <limits>

namespace mcl {

namespace {

inline uint64_t mix64(uint64_t h) {
    h = (h ^ (h >> 30)) * 0xBF58476D1CE4E5B9ULL;
    h = (h ^ (h >> 27)) * 0x94D049BB133111EBULL;
    return h ^ (h >> 31);
}

}  // namespace

uint64_t block_hash(uint64_t parent_hash, const int64_t* tokens, size_t n, int64_t adapter_id) {
    uint64_t h = mix64(parent_hash + 0x9E3779B97F4A7C15ULL);
    h = mix64(h ^ static_cast<uint64_t>(adapter_id));
    for (size_t i = 0; i < n; ++i) h = mix64(h ^ static_cast<uint64_t>(tokens[i]));
    return h;
}

BlockManager::BlockManager(int64_t num_blocks, int64_t block_size, bool enable_prefix_caching)
    : num_blocks_(num_blocks), block_size_(block_size), prefix_caching_(enable_prefix_caching) {
    if (num_blocks < 1 || block_size < 1)
        throw std::invalid_argument("num_blocks and block_size must be >= 1, got " + std::to_string(num_blocks) +
                                    ", " + std::to_string(block_size));
    if (num_blocks > std::numeric_limits<int32_t>::max())
        throw std::invalid_argument("num_blocks must be < 2**31 (block ids are int32), got " +
                                    std::to_string(num_blocks));
    const size_t n = static_cast<size_t>(num_blocks);
    ref_.assign(n, 0);
    for (size_t b = 0; b < n; ++b) free_.push_back(static_cast<int32_t>(b));
    registered_.assign(n, 0);
    hash_.assign(n, 0);
    parent_hash_.assign(n, 0);
    adapter_.assign(n, 0);
    if (prefix_caching_) tokens_.assign(n * static_cast<size_t>(block_size), 0);
    lru_prev_.assign(n, -1);
    lru_next_.assign(n, -1);
}

const Sequence& BlockManager::seq(int64_t seq_id) const {
    auto it = seqs_.find(seq_id);
    if (it == seqs_.end()) throw UnknownSequence(seq_id);
    return it->second;
}

int64_t BlockManager::blocks_needed(int64_t seq_id, int64_t num_new_tokens) const {
    const Sequence& s = seq(seq_id);
    if (num_new_tokens < 0)
        throw std::invalid_argument("num_new_tokens must be >= 0, got " + std::to_string(num_new_tokens));
    const int64_t total = s.num_tokens + num_new_tokens;
    int64_t needed = (total + block_size_ - 1) / block_size_ - static_cast<int64_t>(s.blocks.size());
    if (num_new_tokens > 0 && s.num_tokens % block_size_ && ref_[s.blocks.back()] > 1) ++needed;  // copy-on-write
    return std::max<int64_t>(needed, 0);
}

int64_t BlockManager::add_sequence(int64_t seq_id, const std::vector<int64_t>& token_ids, int64_t adapter_id) {
    if (seqs_.count(seq_id)) throw std::invalid_argument("sequence " + std::to_string(seq_id) + " already exists");
    Sequence& s = seqs_[seq_id];
    s.adapter_id = adapter_id;
    if (!prefix_caching_ || token_ids.empty()) return 0;
    const size_t bs = static_cast<size_t>(block_size_);
    const size_t full = (token_ids.size() - 1) / bs;  // the last token is never cached
    uint64_t parent = 0;
    s.blocks.reserve(full);
    for (size_t i = 0; i < full; ++i) {
        const int64_t* tokens = token_ids.data() + i * bs;
        const uint64_t h = block_hash(parent, tokens, bs, adapter_id);
        const int32_t block = lookup(h, parent, adapter_id, tokens);
        if (block < 0) break;
        if (ref_[block] == 0) lru_remove(block);
        ++ref_[block];
        s.blocks.push_back(block);
        parent = h;
    }
    s.num_tokens = static_cast<int64_t>(s.blocks.size()) * block_size_;
    s.last_hash = parent;
    return s.num_tokens;
}

bool BlockManager::append_tokens(int64_t seq_id, const std::vector<int64_t>& token_ids) {
    Sequence& s = seq(seq_id);
    if (token_ids.empty()) return true;
    if (blocks_needed(seq_id, static_cast<int64_t>(token_ids.size())) > num_free_blocks()) return false;
    const int64_t bs = block_size_;
    if (s.num_tokens % bs && ref_[s.blocks.back()] > 1) {
        const int32_t old = s.blocks.back();
        const int32_t fresh = allocate();
        release(old);
        s.blocks.back() = fresh;
        copies_.emplace_back(old, fresh);
    }
    for (int64_t t : token_ids) {
        if (s.num_tokens % bs == 0) s.blocks.push_back(allocate());
        s.last_tokens.push_back(t);
        if (++s.num_tokens % bs == 0) on_block_full(s);
    }
    return true;
}

int64_t BlockManager::append_one_each(const std::vector<int64_t>& seq_ids, const std::vector<int64_t>& tokens) {
    if (seq_ids.size() != tokens.size()) throw std::invalid_argument("seq_ids and tokens differ in length");
    std::vector<int64_t> token(1);
    for (size_t i = 0; i < seq_ids.size(); ++i) {
        token[0] = tokens[i];
        if (!append_tokens(seq_ids[i], token)) return static_cast<int64_t>(i);
    }
    return static_cast<int64_t>(seq_ids.size());
}

void BlockManager::fork(int64_t parent_id, int64_t child_id) {
    if (seqs_.count(child_id)) throw std::invalid_argument("sequence " + std::to_string(child_id) + " already exists");
    Sequence child = seq(parent_id);
    for (int32_t b : child.blocks) ++ref_[b];
    seqs_.emplace(child_id, std::move(child));
}

void BlockManager::free(int64_t seq_id) {
    auto it = seqs_.find(seq_id);
    if (it == seqs_.end()) throw UnknownSequence(seq_id);
    const std::vector<int32_t>& blocks = it->second.blocks;
    for (auto b = blocks.rbegin(); b != blocks.rend(); ++b) release(*b);
    seqs_.erase(it);
}

std::vector<std::pair<int32_t, int32_t>> BlockManager::pop_block_copies() {
    std::vector<std::pair<int32_t, int32_t>> out;
    out.swap(copies_);
    return out;
}

MetadataPlan BlockManager::plan_metadata(const std::vector<int64_t>& seq_ids,
                                         std::vector<int64_t> num_new_tokens) const {
    if (seq_ids.size() != num_new_tokens.size())
        throw std::invalid_argument("seq_ids and num_new_tokens differ in length");
    MetadataPlan plan;
    plan.seqs.reserve(seq_ids.size());
    for (int64_t id : seq_ids) {
        plan.seqs.push_back(&seq(id));
        plan.max_blocks = std::max(plan.max_blocks, plan.seqs.back()->blocks.size());
    }
    for (size_t i = 0; i < seq_ids.size(); ++i) {
        const int64_t n = num_new_tokens[i], have = plan.seqs[i]->num_tokens;
        if (n < 0 || n > have)
            throw std::invalid_argument("sequence " + std::to_string(seq_ids[i]) + " has " + std::to_string(have) +
                                        " tokens, asked for " + std::to_string(n) + " new");
        plan.num_tokens += n;
    }
    plan.num_new_tokens = std::move(num_new_tokens);
    return plan;
}

void BlockManager::write_metadata(const MetadataPlan& plan, int64_t* positions, int64_t* slot_mapping,
                                  int32_t* block_tables, int32_t* context_lens, int32_t* cu_seqlens_q) const {
    const int64_t bs = block_size_;
    const size_t width = plan.max_blocks;
    int64_t t = 0;
    cu_seqlens_q[0] = 0;
    for (size_t i = 0; i < plan.seqs.size(); ++i) {
        const Sequence& s = *plan.seqs[i];
        const int32_t* blocks = s.blocks.data();
        int32_t* row = block_tables + i * width;
        std::copy(blocks, blocks + s.blocks.size(), row);
        std::fill(row + s.blocks.size(), row + width, 0);
        context_lens[i] = static_cast<int32_t>(s.num_tokens);
        for (int64_t p = s.num_tokens - plan.num_new_tokens[i]; p < s.num_tokens; ++p, ++t) {
            positions[t] = p;
            slot_mapping[t] = static_cast<int64_t>(blocks[p / bs]) * bs + p % bs;
        }
        cu_seqlens_q[i + 1] = static_cast<int32_t>(t);
    }
}

int32_t BlockManager::lookup(uint64_t h, uint64_t parent, int64_t adapter_id, const int64_t* tokens) const {
    auto it = cached_.find(h);
    if (it == cached_.end()) return -1;
    const int32_t b = it->second;
    const size_t bs = static_cast<size_t>(block_size_);
    if (parent_hash_[b] != parent || adapter_[b] != adapter_id ||
        std::memcmp(&tokens_[b * bs], tokens, bs * sizeof(int64_t)) != 0)
        return -1;
    return b;
}

bool BlockManager::parent_registered(const Sequence& s, uint64_t parent) const {
    if (s.blocks.size() == 1) return true;
    auto it = cached_.find(parent);
    return it != cached_.end() && it->second == s.blocks[s.blocks.size() - 2];
}

void BlockManager::on_block_full(Sequence& s) {
    const uint64_t parent = s.last_hash;
    const uint64_t h = block_hash(parent, s.last_tokens.data(), s.last_tokens.size(), s.adapter_id);
    s.last_hash = h;
    const int32_t b = s.blocks.back();
    if (prefix_caching_ && !registered_[b] && parent_registered(s, parent) && cached_.emplace(h, b).second) {
        registered_[b] = 1;
        hash_[b] = h;
        parent_hash_[b] = parent;
        adapter_[b] = s.adapter_id;
        std::copy(s.last_tokens.begin(), s.last_tokens.end(), tokens_.begin() + b * block_size_);
    }
    s.last_tokens.clear();
}

int32_t BlockManager::allocate() {
    int32_t b;
    if (!free_.empty()) {
        b = free_.front();
        free_.pop_front();
    } else {
        b = lru_head_;  // callers check num_free_blocks() first, so this list is not empty
        lru_remove(b);
        registered_[b] = 0;
        cached_.erase(hash_[b]);
    }
    ref_[b] = 1;
    return b;
}

void BlockManager::release(int32_t b) {
    if (--ref_[b] == 0) {
        if (registered_[b])
            lru_push_back(b);
        else
            free_.push_back(b);
    }
}

void BlockManager::lru_push_back(int32_t b) {
    lru_prev_[b] = lru_tail_;
    lru_next_[b] = -1;
    if (lru_tail_ >= 0)
        lru_next_[lru_tail_] = b;
    else
        lru_head_ = b;
    lru_tail_ = b;
    ++num_evictable_;
}

void BlockManager::lru_remove(int32_t b) {
    const int32_t p = lru_prev_[b], n = lru_next_[b];
    if (p >= 0) lru_next_[p] = n; else lru_head_ = n;
    if (n >= 0) lru_prev_[n] = p; else lru_tail_ = p;
    lru_prev_[b] = lru_next_[b] = -1;
    --num_evictable_;
}

}  // namespace mcl
