#include "kvr_hash.h"

#include <string.h>
#include <xxhash.h>

static inline void put_le64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

uint64_t kvr_hash_lora_seed(const char *name, size_t len)
{
    return len ? KVR_HASH_SEED + XXH3_64bits(name, len) : KVR_HASH_SEED;
}

uint64_t kvr_hash_block(const uint32_t *tokens, uint32_t block_size)
{
    return kvr_hash_block_seeded(tokens, block_size, KVR_HASH_SEED);
}

uint64_t kvr_hash_block_seeded(const uint32_t *tokens, uint32_t block_size, uint64_t seed)
{
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    return XXH3_64bits_withSeed(tokens, (size_t)block_size * 4, seed);
#else
    /* Big-endian hosts hash the little-endian byte image, in bounded stack chunks. */
    XXH3_state_t st;
    XXH3_64bits_reset_withSeed(&st, seed);
    uint8_t tmp[256];
    for (uint32_t i = 0; i < block_size;) {
        uint32_t n = 0;
        for (; n < sizeof tmp / 4 && i < block_size; n++, i++) {
            uint32_t t = tokens[i];
            tmp[4 * n] = (uint8_t)t;
            tmp[4 * n + 1] = (uint8_t)(t >> 8);
            tmp[4 * n + 2] = (uint8_t)(t >> 16);
            tmp[4 * n + 3] = (uint8_t)(t >> 24);
        }
        XXH3_64bits_update(&st, tmp, 4 * n);
    }
    return XXH3_64bits_digest(&st);
#endif
}

uint64_t kvr_hash_chain(uint64_t parent_seq, uint64_t local)
{
    uint8_t buf[16];
    put_le64(buf, parent_seq);
    put_le64(buf + 8, local);
    return XXH3_64bits_withSeed(buf, sizeof buf, KVR_HASH_SEED);
}

size_t kvr_hash_seq(const uint32_t *tokens, size_t n_tokens, uint32_t block_size, bool has_parent,
                    uint64_t parent_seq, uint64_t *out, size_t max_out)
{
    return kvr_hash_seq_seeded(tokens, n_tokens, block_size, has_parent, parent_seq, KVR_HASH_SEED,
                               out, max_out);
}

size_t kvr_hash_seq_seeded(const uint32_t *tokens, size_t n_tokens, uint32_t block_size,
                           bool has_parent, uint64_t parent_seq, uint64_t seed, uint64_t *out,
                           size_t max_out)
{
    if (block_size == 0)
        return 0;
    size_t n = n_tokens / block_size;
    if (n > max_out)
        n = max_out;
    uint64_t prev = parent_seq;
    for (size_t i = 0; i < n; i++) {
        uint64_t local = kvr_hash_block_seeded(tokens + i * block_size, block_size, seed);
        prev = (i == 0 && !has_parent) ? local : kvr_hash_chain(prev, local);
        out[i] = prev;
    }
    return n;
}

uint64_t kvr_hash_bytes(const void *data, size_t len)
{
    return XXH3_64bits(data, len);
}
