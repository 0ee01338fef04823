/* Internal structures of the Hugging Face tokenizer (not part of the public contract; see
 * kvr_hftok.h). Everything here is immutable once kvr_hftok_load returns, so any number of
 * threads may encode/decode at once: per-call scratch lives on the caller's stack/heap. */
#ifndef TK_INTERNAL_H
#define TK_INTERNAL_H

#define PCRE2_CODE_UNIT_WIDTH 8
#include "kvr_buf.h"
#include "kvr_err.h"
#include "kvr_hftok.h"

#include <pcre2.h>
#include <stdint.h>

/* Bounds on what a tokenizer.json may declare (real files: 262k vocab, 515k merges). */
#define TK_MAX_FILE (64u << 20)
#define TK_MAX_VOCAB (4u << 20)
#define TK_MAX_MERGES (8u << 20)
#define TK_MAX_ADDED (1u << 20)
#define TK_MAX_STEPS 64 /* normalizer / pre-tokenizer / decoder steps after flattening */
#define TK_MAX_TEXT (64u << 20)
#define TK_BIGRAM_BITS (1u << 24)
#define TK_SINGLE_CPS 0x30000u

typedef struct tk_str {
    uint32_t off, len; /* into an arena */
} tk_str;

/* string -> id over strings stored in an arena, open addressing, slots hold id+1. */
typedef struct tk_strmap {
    uint32_t *slots;
    size_t mask;
} tk_strmap;

typedef struct tk_pair {
    uint64_t key;          /* (a << 32 | b) */
    uint32_t rank, new_id; /* rank UINT32_MAX = empty */
} tk_pair;

typedef struct tk_pairmap {
    tk_pair *slots;
    size_t mask;
} tk_pairmap;

/* Patterns: a literal string or a PCRE2 regex. */
typedef struct tk_pattern {
    char *lit; /* literal (owned) or NULL */
    size_t lit_len;
    pcre2_code *re; /* compiled with UTF|UCP, JIT when available */
} tk_pattern;

enum tk_step_kind {
    TK_NFC = 1,
    TK_REPLACE,
    TK_PREPEND,
    TK_SPLIT,
    TK_BYTELEVEL,
    TK_METASPACE,
    TK_DIGITS,
    TK_D_BYTELEVEL,
    TK_D_METASPACE,
    TK_D_BYTEFALLBACK,
    TK_D_FUSE,
    TK_D_STRIP,
    TK_D_REPLACE,
};

enum tk_behavior { TK_REMOVED, TK_ISOLATED, TK_MERGED_PREV, TK_MERGED_NEXT, TK_CONTIGUOUS };
enum tk_prepend { TK_PREPEND_ALWAYS, TK_PREPEND_FIRST, TK_PREPEND_NEVER };

typedef struct tk_step {
    int kind;
    tk_pattern pat; /* Replace, Split, Strip(content as lit) */
    char *content;  /* Replace content, Prepend text, Metaspace replacement (owned) */
    size_t content_len;
    int behavior, invert;            /* Split */
    int add_prefix_space, use_regex; /* ByteLevel */
    int prepend_scheme, split;       /* Metaspace */
    int individual_digits;           /* Digits */
    int strip_start, strip_stop;     /* Strip decoder */
} tk_step;

/* Added-token trie: edges in a hash map keyed by (node << 8 | byte). */
typedef struct tk_trie {
    uint32_t root[256]; /* child of the root for a first byte, +1; 0 = no token starts so */
    uint64_t *keys;     /* key+1, 0 = empty */
    uint32_t *child;
    size_t mask, count;
    int32_t *term; /* per node: added-token index or -1 */
    size_t nodes, nodes_cap;
} tk_trie;

typedef struct tk_added {
    uint32_t id;
    tk_str content; /* in added_arena */
    uint8_t special, lstrip, rstrip, normalized, single_word;
} tk_added;

struct kvr_hftok {
    uint64_t gen; /* unique per load: keys the per-thread word cache (model.c) */
    /* model (BPE) */
    kvr_buf arena;        /* vocab strings as in the file */
    tk_str *vocab;        /* by id; len 0 + off UINT32_MAX = no such id */
    uint32_t vocab_n;     /* ids 0..vocab_n-1 */
    uint32_t vocab_count; /* entries: the library's vocab size */
    tk_strmap vmap;       /* file string -> id */
    tk_pairmap merges;
    int byte_level;           /* pre-tokenizer ends in ByteLevel: words are raw bytes */
    int32_t byte_id[256];     /* byte-level: raw byte -> id of its mapped char, -1 none */
    int32_t fallback_id[256]; /* "<0xXX>" ids, -1 none */
    int byte_fallback, fuse_unk, ignore_merges;
    int64_t unk_id; /* -1 none */

    /* added tokens */
    kvr_buf added_arena;
    tk_added *added;
    size_t added_n;
    tk_trie trie_raw, trie_norm; /* normalized=false / normalized=true tokens */
    int32_t *added_by_id;        /* id -> index into added, -1 (size id_cap) */
    uint32_t id_cap;             /* max id + 1 over vocab and added */

    tk_step norm[TK_MAX_STEPS], pre[TK_MAX_STEPS], dec[TK_MAX_STEPS];
    size_t norm_n, pre_n, dec_n;
    int has_decoder;

    /* TemplateProcessing single: ids before and after sequence A */
    uint32_t *tpl_pre, *tpl_post;
    size_t tpl_pre_n, tpl_post_n;

    int64_t max_len; /* tokenizer_config.json model_max_length, -1 unknown */
    int slow;        /* kvr_hftok_set_fast(t, 0): no fast paths */

    /* Long-word cuts (not byte-level): a cut between characters x and y is safe when no
     * vocabulary string holds x followed by y (then no merge can make a token across it) and
     * both are single-character tokens (no byte fallback or unk fusing across it). bigram is
     * a bit set over a hash of (x, y): a false positive only loses a cut. */
    uint64_t *bigram; /* TK_BIGRAM_BITS bits, NULL = never cut */
    uint64_t *single; /* bit per code point < TK_SINGLE_CPS: a token of that one character */
    char name[64];
};

/* byte-level alphabet: byte -> code point, and code point -> byte (-1) */
uint16_t tk_bl_cp(unsigned char b);
int tk_bl_byte(uint32_t cp);
void tk_bl_init(void);

uint64_t tk_hash(const void *p, size_t n);
int tk_strmap_init(tk_strmap *m, size_t n);
void tk_strmap_free(tk_strmap *m);
/* Inserts id whose string is strs[id] in arena; returns 0, KVR_EEXIST if the string is there. */
int tk_strmap_put(tk_strmap *m, const kvr_buf *arena, const tk_str *strs, uint32_t id);
int64_t tk_strmap_get(const tk_strmap *m, const kvr_buf *arena, const tk_str *strs, const char *s,
                      size_t n);
int tk_pairmap_init(tk_pairmap *m, size_t n);
void tk_pairmap_free(tk_pairmap *m);
void tk_pairmap_put(tk_pairmap *m, uint32_t a, uint32_t b, uint32_t rank, uint32_t new_id);
const tk_pair *tk_pairmap_get(const tk_pairmap *m, uint32_t a, uint32_t b);

int tk_trie_add(tk_trie *t, const char *s, size_t n, int32_t idx);
void tk_trie_free(tk_trie *t);
/* Longest token starting at s[0..n): its length, or 0; *idx = added index. */
size_t tk_trie_longest(const tk_trie *t, const char *s, size_t n, int32_t *idx);

/* BPE over one pre-tokenized word; appends ids. */
int tk_bpe_word(const kvr_hftok *t, const char *w, size_t n, kvr_buf *out, kvr_err *err);

/* Normalizers / pre-tokenizers (pretok.c). */
int tk_normalize(const kvr_hftok *t, const char *s, size_t n, kvr_buf *out, kvr_err *err);
int tk_replace_all(const tk_pattern *pat, const char *s, size_t n, const char *rep, size_t rep_len,
                   kvr_buf *out);
int tk_encode_text(const kvr_hftok *t, const char *s, size_t n, kvr_buf *ids, kvr_err *err);

/* 1 if NFC leaves s[0..n) (valid UTF-8) unchanged for sure: no character in it can change
 * under NFC alone or combine with / reorder against a neighbour. 0 = run NFC. */
int tk_nfc_quick(const char *s, size_t n);
/* Appends NFC of s[0..n) (valid UTF-8) to out, running utf8proc only around the characters
 * tk_nfc_quick would refuse. Same bytes as NFC over the whole text. */
int tk_nfc_fast(const char *s, size_t n, kvr_buf *out, kvr_err *err);
/* Builds t->bigram and t->single from the vocabulary (not byte-level models). */
int tk_cuts_init(kvr_hftok *t);

/* UTF-8 helpers */
size_t tk_utf8_len(unsigned char lead); /* 1..4, 1 for invalid leads */
int tk_utf8_valid(const char *s, size_t n);
void tk_utf8_lossy(kvr_buf *out, const char *s, size_t n, int *err_nomem);
uint32_t tk_utf8_decode(const char *s, size_t n, size_t *len);
int tk_utf8_put(kvr_buf *out, uint32_t cp);

void tk_pattern_free(tk_pattern *p);
void tk_step_free(tk_step *s);

#endif
