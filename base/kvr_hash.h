/* kvr_hash: block hashing, bit-exact with NVIDIA Dynamo's router (DESIGN section 2).
 *
 *   local[i] = XXH3_64bits_withSeed(LE u32 bytes of tokens[i*B .. i*B+B), 4*B, 1337)
 *   seq[0]   = local[0]
 *   seq[i]   = XXH3_64bits_withSeed(LE64(seq[i-1]) || LE64(local[i]), 16, 1337)
 *
 * Only full blocks are hashed. Pure functions, any thread. */
#ifndef KVR_HASH_H
#define KVR_HASH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define KVR_HASH_SEED 1337u

/* Hash of one block of `block_size` tokens. */
uint64_t kvr_hash_block(const uint32_t *tokens, uint32_t block_size);

/* LoRA adapters' blocks are hashed apart, as Dynamo does: an adapter's local block hashes use
 * the seed KVR_HASH_SEED + XXH3_64(name) (seed 0); the chain keeps KVR_HASH_SEED. The base
 * model (len 0) has KVR_HASH_SEED. Names are at most KVR_LORA_NAME_MAX bytes on every wire. */
#define KVR_LORA_NAME_MAX 128
uint64_t kvr_hash_lora_seed(const char *name, size_t len);
uint64_t kvr_hash_block_seeded(const uint32_t *tokens, uint32_t block_size, uint64_t seed);

/* seq hash of a block whose parent's seq hash is parent_seq. */
uint64_t kvr_hash_chain(uint64_t parent_seq, uint64_t local);

/* Writes the seq hashes of the full blocks of tokens[0..n_tokens) into out (at most max_out),
 * chained from parent_seq when has_parent, else from the root (seq[0] = local[0]).
 * Returns the number written: min(n_tokens / block_size, max_out). block_size 0 → 0. */
size_t kvr_hash_seq(const uint32_t *tokens, size_t n_tokens, uint32_t block_size, bool has_parent,
                    uint64_t parent_seq, uint64_t *out, size_t max_out);
/* kvr_hash_seq with the local hashes under `seed` (kvr_hash_lora_seed). */
size_t kvr_hash_seq_seeded(const uint32_t *tokens, size_t n_tokens, uint32_t block_size,
                           bool has_parent, uint64_t parent_seq, uint64_t seed, uint64_t *out,
                           size_t max_out);

/* Reduces an opaque byte-string block hash (e.g. vLLM's sha256) to 64 bits: XXH3-64, seed 0. */
uint64_t kvr_hash_bytes(const void *data, size_t len);

/* The splitmix64 finaliser: a bijection in which every input bit affects every output bit.
 * Digests and synthetic ids build on it; a change of constants changes them all. */
static inline uint64_t kvr_mix64(uint64_t x)
{
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
}

#endif
