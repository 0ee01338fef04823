/* tokenizer.json -> kvr_hftok. Every component is checked by name; anything the encoder does
 * not implement exactly is refused with an error naming it (never tokenized approximately).
 * Bounds: file <= 64 MiB, vocabulary <= 4M ids, merges <= 8M, added tokens <= 1M. */
#include "kvr_json.h"
#include "tk_internal.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>

static const char *GPT2_RE = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|"
                             "\\s+(?!\\S)|\\s+";

static int compile_re(tk_pattern *p, const char *re, const char *what, kvr_err *err)
{
    int ec;
    PCRE2_SIZE eo;
    p->re =
        pcre2_compile((PCRE2_SPTR)re, PCRE2_ZERO_TERMINATED, PCRE2_UTF | PCRE2_UCP, &ec, &eo, NULL);
    if (!p->re) {
        PCRE2_UCHAR msg[128];
        pcre2_get_error_message(ec, msg, sizeof(msg));
        return kvr_err_set(err, KVR_EUNSUPPORTED, "tokenizer: %s regex at offset %zu: %s", what,
                           (size_t)eo, (char *)msg);
    }
    pcre2_jit_compile(p->re, PCRE2_JIT_COMPLETE); /* falls back to the interpreter */
    return 0;
}

static int set_lit(tk_pattern *p, const char *s)
{
    p->lit_len = strlen(s);
    p->lit = strdup(s);
    return p->lit ? 0 : KVR_ENOMEM;
}

/* {"String": "..."} or {"Regex": "..."} */
static int parse_pattern(const cJSON *o, tk_pattern *p, const char *what, kvr_err *err)
{
    const cJSON *pat = cJSON_GetObjectItemCaseSensitive(o, "pattern");
    const cJSON *s = pat ? cJSON_GetObjectItemCaseSensitive(pat, "String") : NULL;
    const cJSON *r = pat ? cJSON_GetObjectItemCaseSensitive(pat, "Regex") : NULL;
    if (cJSON_IsString(s))
        return set_lit(p, s->valuestring) ? kvr_err_set(err, KVR_ENOMEM, "out of memory") : 0;
    if (cJSON_IsString(r))
        return compile_re(p, r->valuestring, what, err);
    return kvr_err_set(err, KVR_EINVAL, "tokenizer: %s: pattern must be {String} or {Regex}", what);
}

static const char *type_of(const cJSON *o)
{
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(o, "type");
    return cJSON_IsString(t) ? t->valuestring : "(no type)";
}

static int get_str(const cJSON *o, const char *k, const char *def, const char **out)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
    if (!v || cJSON_IsNull(v)) {
        *out = def;
        return 0;
    }
    if (!cJSON_IsString(v))
        return KVR_ETYPE;
    *out = v->valuestring;
    return 0;
}

static int get_flag(const cJSON *o, const char *k, int def)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
    return cJSON_IsBool(v) ? cJSON_IsTrue(v) : def;
}

static int add_step(tk_step *steps, size_t *n, tk_step **out, kvr_err *err)
{
    if (*n >= TK_MAX_STEPS)
        return kvr_err_set(err, KVR_ELIMIT, "tokenizer: more than %d steps", TK_MAX_STEPS);
    *out = &steps[(*n)++];
    memset(*out, 0, sizeof(**out));
    return 0;
}

static int dup_content(tk_step *st, const char *s)
{
    st->content_len = strlen(s);
    st->content = strdup(s);
    return st->content ? 0 : KVR_ENOMEM;
}

static int parse_normalizer(kvr_hftok *t, const cJSON *o, int depth, kvr_err *err)
{
    if (!o || cJSON_IsNull(o))
        return 0;
    const char *ty = type_of(o);
    tk_step *st = NULL;
    int rc;
    if (depth > 8)
        return kvr_err_set(err, KVR_ELIMIT, "tokenizer: normalizers nested too deep");
    if (!strcmp(ty, "Sequence")) {
        const cJSON *seq = cJSON_GetObjectItemCaseSensitive(o, "normalizers"), *it;
        if (!cJSON_IsArray(seq))
            return kvr_err_set(err, KVR_EINVAL, "tokenizer: normalizer Sequence without list");
        cJSON_ArrayForEach(it,
                           seq) if ((rc = parse_normalizer(t, it, depth + 1, err)) != 0) return rc;
        return 0;
    }
    if ((rc = add_step(t->norm, &t->norm_n, &st, err)) != 0)
        return rc;
    if (!strcmp(ty, "NFC")) {
        st->kind = TK_NFC;
        return 0;
    }
    if (!strcmp(ty, "Replace") || !strcmp(ty, "Prepend")) {
        const char *c;
        int repl = !strcmp(ty, "Replace");
        st->kind = repl ? TK_REPLACE : TK_PREPEND;
        if (get_str(o, repl ? "content" : "prepend", NULL, &c) || !c)
            return kvr_err_set(err, KVR_EINVAL, "tokenizer: normalizer %s without text", ty);
        if (dup_content(st, c))
            return kvr_err_set(err, KVR_ENOMEM, "out of memory");
        return repl ? parse_pattern(o, &st->pat, "Replace normalizer", err) : 0;
    }
    t->norm_n--;
    return kvr_err_set(err, KVR_EUNSUPPORTED, "tokenizer: normalizer '%s' is not supported", ty);
}

static int parse_behavior(const cJSON *o, int *out, kvr_err *err)
{
    const char *b;
    static const char *names[] = {"Removed", "Isolated", "MergedWithPrevious", "MergedWithNext",
                                  "Contiguous"};
    if (get_str(o, "behavior", "Isolated", &b))
        return kvr_err_set(err, KVR_ETYPE, "tokenizer: Split behavior must be a string");
    for (int i = 0; i < 5; i++)
        if (!strcmp(b, names[i])) {
            *out = i;
            return 0;
        }
    return kvr_err_set(err, KVR_EUNSUPPORTED, "tokenizer: Split behavior '%s'", b);
}

static int parse_prepend_scheme(const cJSON *o, int *out, kvr_err *err)
{
    const char *ps;
    if (get_str(o, "prepend_scheme", NULL, &ps))
        return kvr_err_set(err, KVR_ETYPE, "tokenizer: Metaspace prepend_scheme");
    if (!ps) /* legacy files: add_prefix_space */
        *out = get_flag(o, "add_prefix_space", 1) ? TK_PREPEND_ALWAYS : TK_PREPEND_NEVER;
    else if (!strcmp(ps, "always"))
        *out = TK_PREPEND_ALWAYS;
    else if (!strcmp(ps, "first"))
        *out = TK_PREPEND_FIRST;
    else if (!strcmp(ps, "never"))
        *out = TK_PREPEND_NEVER;
    else
        return kvr_err_set(err, KVR_EUNSUPPORTED, "tokenizer: Metaspace prepend_scheme '%s'", ps);
    return 0;
}

static int parse_pretok(kvr_hftok *t, const cJSON *o, int depth, kvr_err *err)
{
    if (!o || cJSON_IsNull(o))
        return 0;
    const char *ty = type_of(o);
    tk_step *st = NULL;
    int rc;
    if (depth > 8)
        return kvr_err_set(err, KVR_ELIMIT, "tokenizer: pre-tokenizers nested too deep");
    if (!strcmp(ty, "Sequence")) {
        const cJSON *seq = cJSON_GetObjectItemCaseSensitive(o, "pretokenizers"), *it;
        if (!cJSON_IsArray(seq))
            return kvr_err_set(err, KVR_EINVAL, "tokenizer: pre-tokenizer Sequence without list");
        cJSON_ArrayForEach(it, seq) if ((rc = parse_pretok(t, it, depth + 1, err)) != 0) return rc;
        return 0;
    }
    if ((rc = add_step(t->pre, &t->pre_n, &st, err)) != 0)
        return rc;
    if (!strcmp(ty, "Split")) {
        st->kind = TK_SPLIT;
        st->invert = get_flag(o, "invert", 0);
        if ((rc = parse_behavior(o, &st->behavior, err)) != 0)
            return rc;
        return parse_pattern(o, &st->pat, "Split pre-tokenizer", err);
    }
    if (!strcmp(ty, "ByteLevel")) {
        st->kind = TK_BYTELEVEL;
        st->add_prefix_space = get_flag(o, "add_prefix_space", 1);
        st->use_regex = get_flag(o, "use_regex", 1);
        st->behavior = TK_ISOLATED;
        return st->use_regex ? compile_re(&st->pat, GPT2_RE, "ByteLevel", err) : 0;
    }
    if (!strcmp(ty, "Metaspace")) {
        const char *r;
        st->kind = TK_METASPACE;
        st->split = get_flag(o, "split", 1);
        st->behavior = TK_MERGED_NEXT;
        if (get_str(o, "replacement", "\xE2\x96\x81", &r) || dup_content(st, r) ||
            set_lit(&st->pat, r))
            return kvr_err_set(err, KVR_EINVAL, "tokenizer: Metaspace replacement");
        return parse_prepend_scheme(o, &st->prepend_scheme, err);
    }
    if (!strcmp(ty, "Digits")) {
        st->kind = TK_DIGITS;
        st->individual_digits = get_flag(o, "individual_digits", 0);
        st->behavior = TK_ISOLATED;
        return compile_re(&st->pat, st->individual_digits ? "\\p{N}" : "\\p{N}+", "Digits", err);
    }
    t->pre_n--;
    return kvr_err_set(err, KVR_EUNSUPPORTED, "tokenizer: pre-tokenizer '%s' is not supported", ty);
}

static int parse_decoder(kvr_hftok *t, const cJSON *o, int depth, kvr_err *err)
{
    if (!o || cJSON_IsNull(o))
        return 0;
    const char *ty = type_of(o);
    tk_step *st = NULL;
    int rc;
    t->has_decoder = 1;
    if (depth > 8)
        return kvr_err_set(err, KVR_ELIMIT, "tokenizer: decoders nested too deep");
    if (!strcmp(ty, "Sequence")) {
        const cJSON *seq = cJSON_GetObjectItemCaseSensitive(o, "decoders"), *it;
        if (!cJSON_IsArray(seq))
            return kvr_err_set(err, KVR_EINVAL, "tokenizer: decoder Sequence without list");
        cJSON_ArrayForEach(it, seq) if ((rc = parse_decoder(t, it, depth + 1, err)) != 0) return rc;
        return 0;
    }
    if ((rc = add_step(t->dec, &t->dec_n, &st, err)) != 0)
        return rc;
    if (!strcmp(ty, "ByteLevel")) {
        st->kind = TK_D_BYTELEVEL;
        return 0;
    }
    if (!strcmp(ty, "ByteFallback")) {
        st->kind = TK_D_BYTEFALLBACK;
        return 0;
    }
    if (!strcmp(ty, "Fuse")) {
        st->kind = TK_D_FUSE;
        return 0;
    }
    if (!strcmp(ty, "Strip")) {
        const char *c;
        int64_t a = 0, b = 0;
        st->kind = TK_D_STRIP;
        if (get_str(o, "content", NULL, &c) || !c || dup_content(st, c) ||
            kvr_json_get_int(o, "start", false, 0, 1 << 20, &a, NULL) < KVR_ENOTFOUND ||
            kvr_json_get_int(o, "stop", false, 0, 1 << 20, &b, NULL) < KVR_ENOTFOUND)
            return kvr_err_set(err, KVR_EINVAL, "tokenizer: Strip decoder fields");
        kvr_json_get_int(o, "start", false, 0, 1 << 20, &a, NULL);
        kvr_json_get_int(o, "stop", false, 0, 1 << 20, &b, NULL);
        st->strip_start = (int)a;
        st->strip_stop = (int)b;
        return 0;
    }
    if (!strcmp(ty, "Replace")) {
        const char *c;
        st->kind = TK_D_REPLACE;
        if (get_str(o, "content", NULL, &c) || !c || dup_content(st, c))
            return kvr_err_set(err, KVR_EINVAL, "tokenizer: Replace decoder content");
        return parse_pattern(o, &st->pat, "Replace decoder", err);
    }
    if (!strcmp(ty, "Metaspace")) {
        const char *r;
        st->kind = TK_D_METASPACE;
        if (get_str(o, "replacement", "\xE2\x96\x81", &r) || dup_content(st, r))
            return kvr_err_set(err, KVR_EINVAL, "tokenizer: Metaspace decoder replacement");
        return parse_prepend_scheme(o, &st->prepend_scheme, err);
    }
    t->dec_n--;
    return kvr_err_set(err, KVR_EUNSUPPORTED, "tokenizer: decoder '%s' is not supported", ty);
}

static int parse_post(kvr_hftok *t, const cJSON *o, int depth, kvr_err *err)
{
    if (!o || cJSON_IsNull(o))
        return 0;
    const char *ty = type_of(o);
    int rc;
    if (depth > 8)
        return kvr_err_set(err, KVR_ELIMIT, "tokenizer: post-processors nested too deep");
    if (!strcmp(ty, "Sequence")) {
        const cJSON *seq = cJSON_GetObjectItemCaseSensitive(o, "processors"), *it;
        if (!cJSON_IsArray(seq))
            return kvr_err_set(err, KVR_EINVAL, "tokenizer: post-processor Sequence without list");
        cJSON_ArrayForEach(it, seq) if ((rc = parse_post(t, it, depth + 1, err)) != 0) return rc;
        return 0;
    }
    if (!strcmp(ty, "ByteLevel")) /* changes offsets only */
        return 0;
    if (strcmp(ty, "TemplateProcessing"))
        return kvr_err_set(err, KVR_EUNSUPPORTED, "tokenizer: post-processor '%s' is not supported",
                           ty);
    if (t->tpl_pre || t->tpl_post)
        return kvr_err_set(err, KVR_EUNSUPPORTED, "tokenizer: two TemplateProcessing steps");
    const cJSON *single = cJSON_GetObjectItemCaseSensitive(o, "single");
    const cJSON *specials = cJSON_GetObjectItemCaseSensitive(o, "special_tokens"), *it;
    if (!cJSON_IsArray(single) || !cJSON_IsObject(specials))
        return kvr_err_set(err, KVR_EINVAL,
                           "tokenizer: TemplateProcessing without single/special_tokens");
    int seen_a = 0;
    size_t cap = (size_t)cJSON_GetArraySize(single) * 4 + 4;
    if (cap > 4096)
        return kvr_err_set(err, KVR_ELIMIT, "tokenizer: TemplateProcessing too long");
    t->tpl_pre = calloc(cap, sizeof(uint32_t));
    t->tpl_post = calloc(cap, sizeof(uint32_t));
    if (!t->tpl_pre || !t->tpl_post)
        return kvr_err_set(err, KVR_ENOMEM, "out of memory");
    cJSON_ArrayForEach(it, single)
    {
        const cJSON *sp = cJSON_GetObjectItemCaseSensitive(it, "SpecialToken");
        const cJSON *sq = cJSON_GetObjectItemCaseSensitive(it, "Sequence");
        if (sq) {
            const char *id;
            if (get_str(sq, "id", "", &id) || strcmp(id, "A") || seen_a)
                return kvr_err_set(
                    err, KVR_EUNSUPPORTED,
                    "tokenizer: TemplateProcessing single must hold sequence A once");
            seen_a = 1;
            continue;
        }
        const char *name;
        if (!sp || get_str(sp, "id", NULL, &name) || !name)
            return kvr_err_set(err, KVR_EINVAL, "tokenizer: TemplateProcessing piece");
        const cJSON *def = cJSON_GetObjectItemCaseSensitive(specials, name);
        const cJSON *ids = def ? cJSON_GetObjectItemCaseSensitive(def, "ids") : NULL, *x;
        if (!cJSON_IsArray(ids))
            return kvr_err_set(err, KVR_EINVAL,
                               "tokenizer: TemplateProcessing special token '%s' undefined", name);
        cJSON_ArrayForEach(x, ids)
        {
            int64_t v;
            size_t *n = seen_a ? &t->tpl_post_n : &t->tpl_pre_n;
            if (kvr_json_int_exact(x, &v) || v < 0 || v >= TK_MAX_VOCAB || *n >= cap)
                return kvr_err_set(err, KVR_EINVAL, "tokenizer: TemplateProcessing id");
            (seen_a ? t->tpl_post : t->tpl_pre)[(*n)++] = (uint32_t)v;
        }
    }
    return 0;
}

static int arena_str(kvr_buf *arena, const char *s, size_t n, tk_str *out)
{
    if (arena->len + n > UINT32_MAX - 1)
        return KVR_ELIMIT;
    out->off = (uint32_t)arena->len;
    out->len = (uint32_t)n;
    return kvr_buf_append(arena, s, n);
}

static int merge_ids(const kvr_hftok *t, const char *a, size_t al, const char *b, size_t bl,
                     uint32_t *ia, uint32_t *ib, uint32_t *inew, kvr_buf *tmp, kvr_err *err)
{
    int64_t x = tk_strmap_get(&t->vmap, &t->arena, t->vocab, a, al);
    int64_t y = tk_strmap_get(&t->vmap, &t->arena, t->vocab, b, bl);
    if (x < 0 || y < 0)
        return kvr_err_set(err, KVR_EINVAL, "tokenizer: merge token '%.*s' not in vocabulary",
                           (int)(x < 0 ? al : bl), x < 0 ? a : b);
    kvr_buf_reset(tmp);
    if (kvr_buf_append(tmp, a, al) || kvr_buf_append(tmp, b, bl))
        return kvr_err_set(err, KVR_ENOMEM, "out of memory");
    int64_t z = tk_strmap_get(&t->vmap, &t->arena, t->vocab, tmp->base, tmp->len);
    if (z < 0)
        return kvr_err_set(err, KVR_EINVAL, "tokenizer: merged token '%.*s' not in vocabulary",
                           (int)tmp->len, tmp->base);
    *ia = (uint32_t)x;
    *ib = (uint32_t)y;
    *inew = (uint32_t)z;
    return 0;
}

static int parse_model(kvr_hftok *t, const cJSON *m, kvr_err *err)
{
    const char *ty = type_of(m), *s;
    int rc;
    if (!cJSON_IsObject(m))
        return kvr_err_set(err, KVR_EINVAL, "tokenizer: no model");
    if (strcmp(ty, "BPE"))
        return kvr_err_set(err, KVR_EUNSUPPORTED, "tokenizer: model '%s' is not supported", ty);
    const cJSON *dr = cJSON_GetObjectItemCaseSensitive(m, "dropout");
    if (dr && !cJSON_IsNull(dr) && !(cJSON_IsNumber(dr) && dr->valuedouble == 0))
        return kvr_err_set(err, KVR_EUNSUPPORTED, "tokenizer: BPE dropout is not supported");
    if (get_str(m, "continuing_subword_prefix", "", &s) || *s ||
        get_str(m, "end_of_word_suffix", "", &s) || *s)
        return kvr_err_set(err, KVR_EUNSUPPORTED,
                           "tokenizer: BPE continuing_subword_prefix/end_of_word_suffix");
    t->byte_fallback = get_flag(m, "byte_fallback", 0);
    t->fuse_unk = get_flag(m, "fuse_unk", 0);
    t->ignore_merges = get_flag(m, "ignore_merges", 0);

    const cJSON *vocab = cJSON_GetObjectItemCaseSensitive(m, "vocab"), *it;
    if (!cJSON_IsObject(vocab))
        return kvr_err_set(err, KVR_EINVAL, "tokenizer: BPE vocab must be an object");
    size_t nv = 0;
    uint32_t max_id = 0;
    cJSON_ArrayForEach(it, vocab)
    {
        int64_t id;
        if (++nv > TK_MAX_VOCAB)
            return kvr_err_set(err, KVR_ELIMIT, "tokenizer: vocabulary over %u", TK_MAX_VOCAB);
        if (kvr_json_int_exact(it, &id) || id < 0 || id >= TK_MAX_VOCAB)
            return kvr_err_set(err, KVR_EINVAL, "tokenizer: vocab id of '%s' out of range",
                               it->string);
        if ((uint32_t)id > max_id)
            max_id = (uint32_t)id;
    }
    t->vocab_n = nv ? max_id + 1 : 0;
    t->vocab_count = (uint32_t)nv;
    t->vocab = malloc((t->vocab_n + 1) * sizeof(tk_str));
    if (!t->vocab || tk_strmap_init(&t->vmap, nv))
        return kvr_err_set(err, KVR_ENOMEM, "out of memory");
    for (uint32_t i = 0; i < t->vocab_n; i++)
        t->vocab[i] = (tk_str){UINT32_MAX, 0};
    cJSON_ArrayForEach(it, vocab)
    {
        uint32_t id = (uint32_t)it->valuedouble;
        if (t->vocab[id].off != UINT32_MAX)
            return kvr_err_set(err, KVR_EINVAL, "tokenizer: vocab id %u given twice", id);
        if ((rc = arena_str(&t->arena, it->string, strlen(it->string), &t->vocab[id])) != 0)
            return kvr_err_set(err, rc, "tokenizer: vocabulary too large");
        if (tk_strmap_put(&t->vmap, &t->arena, t->vocab, id) == KVR_EEXIST)
            return kvr_err_set(err, KVR_EINVAL, "tokenizer: vocab token '%s' given twice",
                               it->string);
    }

    const cJSON *merges = cJSON_GetObjectItemCaseSensitive(m, "merges");
    size_t nm = cJSON_IsArray(merges) ? (size_t)cJSON_GetArraySize(merges) : 0;
    if (merges && !cJSON_IsArray(merges))
        return kvr_err_set(err, KVR_EINVAL, "tokenizer: BPE merges must be a list");
    if (nm > TK_MAX_MERGES)
        return kvr_err_set(err, KVR_ELIMIT, "tokenizer: %zu merges, over %u", nm, TK_MAX_MERGES);
    if (tk_pairmap_init(&t->merges, nm))
        return kvr_err_set(err, KVR_ENOMEM, "out of memory");
    kvr_buf tmp;
    kvr_buf_init(&tmp);
    uint32_t rank = 0;
    rc = 0;
    cJSON_ArrayForEach(it, merges)
    {
        uint32_t a, b, z;
        if (cJSON_IsString(it)) {
            const char *sp = strchr(it->valuestring, ' ');
            if (!sp || strchr(sp + 1, ' ')) {
                rc = kvr_err_set(err, KVR_EINVAL, "tokenizer: merge %u is not 'a b'", rank);
                break;
            }
            rc = merge_ids(t, it->valuestring, (size_t)(sp - it->valuestring), sp + 1,
                           strlen(sp + 1), &a, &b, &z, &tmp, err);
        } else if (cJSON_IsArray(it) && cJSON_GetArraySize(it) == 2 && cJSON_IsString(it->child) &&
                   cJSON_IsString(it->child->next)) {
            const char *x = it->child->valuestring, *y = it->child->next->valuestring;
            rc = merge_ids(t, x, strlen(x), y, strlen(y), &a, &b, &z, &tmp, err);
        } else
            rc = kvr_err_set(err, KVR_EINVAL, "tokenizer: merge %u must be 'a b' or [a, b]", rank);
        if (rc)
            break;
        tk_pairmap_put(&t->merges, a, b, rank++, z);
    }
    kvr_buf_free(&tmp);
    if (rc)
        return rc;

    const char *unk;
    t->unk_id = -1;
    if (get_str(m, "unk_token", NULL, &unk))
        return kvr_err_set(err, KVR_ETYPE, "tokenizer: unk_token must be a string");
    if (unk) {
        t->unk_id = tk_strmap_get(&t->vmap, &t->arena, t->vocab, unk, strlen(unk));
        if (t->unk_id < 0)
            return kvr_err_set(err, KVR_EINVAL, "tokenizer: unk_token '%s' not in vocabulary", unk);
    }
    for (int b = 0; b < 256; b++) {
        char name[8];
        snprintf(name, sizeof(name), "<0x%02X>", b);
        t->fallback_id[b] = (int32_t)tk_strmap_get(&t->vmap, &t->arena, t->vocab, name, 6);
        kvr_buf one;
        kvr_buf_init(&one);
        if (tk_utf8_put(&one, tk_bl_cp((unsigned char)b)))
            return kvr_err_set(err, KVR_ENOMEM, "out of memory");
        t->byte_id[b] = (int32_t)tk_strmap_get(&t->vmap, &t->arena, t->vocab, one.base, one.len);
        kvr_buf_free(&one);
    }
    return 0;
}

static int assign_added_ids(kvr_hftok *t, kvr_err *err);

static int parse_added(kvr_hftok *t, const cJSON *arr, kvr_err *err)
{
    const cJSON *it;
    if (!arr || cJSON_IsNull(arr))
        return 0;
    if (!cJSON_IsArray(arr))
        return kvr_err_set(err, KVR_EINVAL, "tokenizer: added_tokens must be a list");
    size_t n = (size_t)cJSON_GetArraySize(arr);
    if (n > TK_MAX_ADDED)
        return kvr_err_set(err, KVR_ELIMIT, "tokenizer: %zu added tokens, over %u", n,
                           TK_MAX_ADDED);
    t->added = calloc(n + 1, sizeof(tk_added));
    if (!t->added)
        return kvr_err_set(err, KVR_ENOMEM, "out of memory");
    cJSON_ArrayForEach(it, arr)
    {
        tk_added *a = &t->added[t->added_n];
        int64_t id;
        const char *c;
        if (kvr_json_get_int(it, "id", true, 0, TK_MAX_VOCAB - 1, &id, err) ||
            kvr_json_get_string(it, "content", true, &c, err))
            return kvr_err_wrap(err, KVR_EINVAL, "tokenizer: added token %zu", t->added_n);
        if (!*c)
            return kvr_err_set(err, KVR_EINVAL, "tokenizer: added token %zu is empty", t->added_n);
        a->id = (uint32_t)id;
        if (arena_str(&t->added_arena, c, strlen(c), &a->content))
            return kvr_err_set(err, KVR_ENOMEM, "out of memory");
        a->special = (uint8_t)get_flag(it, "special", 0);
        a->lstrip = (uint8_t)get_flag(it, "lstrip", 0);
        a->rstrip = (uint8_t)get_flag(it, "rstrip", 0);
        a->single_word = (uint8_t)get_flag(it, "single_word", 0);
        a->normalized = (uint8_t)get_flag(it, "normalized", !a->special);
        t->added_n++;
    }
    return assign_added_ids(t, err);
}

static int same_flags(const tk_added *a, const tk_added *b)
{
    return a->special == b->special && a->lstrip == b->lstrip && a->rstrip == b->rstrip &&
           a->normalized == b->normalized && a->single_word == b->single_word;
}

/* The ids in the file are not what the library uses: AddedVocabulary::add_tokens gives a
 * token the id its content already has as an added token, else the id of its content in the
 * model's vocabulary, else the next id after the largest added one (at least the vocabulary
 * size). Real files agree with their ids; one that does not is tokenized as the library does. */
static int assign_added_ids(kvr_hftok *t, kvr_err *err)
{
    size_t n = t->added_n;
    tk_str *cs = malloc((n + 1) * sizeof(tk_str));
    uint32_t *first_id = malloc((n + 1) * sizeof(uint32_t));
    tk_strmap cmap = {0};
    int rc = 0;
    int64_t max_id = -1;
    if (!cs || !first_id || tk_strmap_init(&cmap, n)) {
        rc = kvr_err_set(err, KVR_ENOMEM, "out of memory");
        goto done;
    }
    for (size_t i = 0; i < n; i++) {
        tk_added *a = &t->added[i];
        cs[i] = a->content;
        const char *c = t->added_arena.base + a->content.off;
        int64_t j = tk_strmap_get(&cmap, &t->added_arena, cs, c, a->content.len);
        int64_t id;
        if (j >= 0 && same_flags(&t->added[j], a)) { /* an identical token: ignored */
            a->id = first_id[j];
            continue;
        }
        if (j >= 0)
            id = first_id[j];
        else if ((id = tk_strmap_get(&t->vmap, &t->arena, t->vocab, c, a->content.len)) < 0)
            id = max_id < 0 ? (int64_t)t->vocab_count
                            : (max_id >= (int64_t)t->vocab_count || !t->vocab_count
                                   ? max_id + 1
                                   : (int64_t)t->vocab_count);
        if (id >= TK_MAX_VOCAB) {
            rc = kvr_err_set(err, KVR_ELIMIT, "tokenizer: added token id over %u", TK_MAX_VOCAB);
            goto done;
        }
        if (j < 0) {
            tk_strmap_put(&cmap, &t->added_arena, cs, (uint32_t)i);
            first_id[i] = (uint32_t)id;
        }
        if (id > max_id)
            max_id = id;
        a->id = (uint32_t)id;
    }
    uint32_t cap = t->vocab_n;
    for (size_t i = 0; i < n; i++)
        if (t->added[i].id + 1 > cap)
            cap = t->added[i].id + 1;
    t->id_cap = cap;
    t->added_by_id = malloc((cap + 1) * sizeof(int32_t));
    if (!t->added_by_id) {
        rc = kvr_err_set(err, KVR_ENOMEM, "out of memory");
        goto done;
    }
    for (uint32_t i = 0; i < cap; i++)
        t->added_by_id[i] = -1;
    for (size_t i = 0; i < n; i++)
        t->added_by_id[t->added[i].id] = (int32_t)i;
    /* the matcher: special tokens first, then the others; the first pattern wins a tie (as
     * aho-corasick's leftmost-longest does); normalized tokens are matched in their
     * normalized form */
    for (int pass = 0; pass < 2 && !rc; pass++)
        for (size_t i = 0; i < n && !rc; i++) {
            tk_added *a = &t->added[i];
            if (a->special != (pass == 0))
                continue;
            kvr_buf key;
            kvr_buf_init(&key);
            const char *c = t->added_arena.base + a->content.off;
            size_t cl = a->content.len;
            if (a->normalized) {
                if ((rc = tk_normalize(t, c, cl, &key, err)) != 0)
                    break;
                c = key.base;
                cl = key.len;
            }
            int32_t have;
            tk_trie *tr = a->normalized ? &t->trie_norm : &t->trie_raw;
            if (cl && tk_trie_longest(tr, c, cl, &have) != cl && tk_trie_add(tr, c, cl, (int32_t)i))
                rc = kvr_err_set(err, KVR_ENOMEM, "out of memory");
            kvr_buf_free(&key);
        }
done:
    free(cs);
    free(first_id);
    tk_strmap_free(&cmap);
    return rc;
}

int kvr_hftok_load_json(const char *json, size_t len, kvr_hftok **out, kvr_err *err)
{
    cJSON *root = NULL;
    int rc;
    tk_bl_init();
    kvr_hftok *t = calloc(1, sizeof(*t));
    if (!t)
        return kvr_err_set(err, KVR_ENOMEM, "out of memory");
    static _Atomic uint64_t next_gen = 1;
    t->gen = next_gen++;
    snprintf(t->name, sizeof(t->name), "hf");
    t->max_len = -1;
    /* The library reads the file into a Rust String, so a file that is not UTF-8 is refused
     * there too. It also matters here: every string the file gives (Replace content, Prepend,
     * Metaspace replacement, added tokens) can end up in the text PCRE2 matches with
     * PCRE2_NO_UTF_CHECK, where a broken sequence is undefined behaviour (fuzz_tokenizer found
     * a heap overflow from a Replace whose content was a truncated 4-byte sequence). cJSON
     * refuses lone surrogates in \u escapes, so valid UTF-8 in gives valid UTF-8 strings out. */
    if (!tk_utf8_valid(json, len)) {
        rc = kvr_err_set(err, KVR_EINVAL, "tokenizer.json: not valid UTF-8");
        goto fail;
    }
    if ((rc = kvr_json_parse((kvr_slice){json, len}, TK_MAX_FILE, 64, &root, err)) != 0) {
        kvr_err_wrap(err, rc, "tokenizer.json");
        goto fail;
    }
    if (!cJSON_IsObject(root)) {
        rc = kvr_err_set(err, KVR_EINVAL, "tokenizer.json: not an object");
        goto fail;
    }
    if ((rc = parse_model(t, cJSON_GetObjectItemCaseSensitive(root, "model"), err)) != 0 ||
        (rc = parse_normalizer(t, cJSON_GetObjectItemCaseSensitive(root, "normalizer"), 0, err)) !=
            0 ||
        (rc = parse_added(t, cJSON_GetObjectItemCaseSensitive(root, "added_tokens"), err)) != 0 ||
        (rc = parse_pretok(t, cJSON_GetObjectItemCaseSensitive(root, "pre_tokenizer"), 0, err)) !=
            0 ||
        (rc = parse_post(t, cJSON_GetObjectItemCaseSensitive(root, "post_processor"), 0, err)) !=
            0 ||
        (rc = parse_decoder(t, cJSON_GetObjectItemCaseSensitive(root, "decoder"), 0, err)) != 0)
        goto fail;
    if (!t->added_by_id && (rc = assign_added_ids(t, err)) != 0)
        goto fail;
    for (size_t i = 0; i < t->pre_n; i++)
        if (t->pre[i].kind == TK_BYTELEVEL) {
            /* Our words stay raw bytes and the vocabulary's mapped bytes are looked up per byte,
             * which is exact only when the mapping is the last step. */
            if (i + 1 != t->pre_n) {
                rc = kvr_err_set(err, KVR_EUNSUPPORTED,
                                 "tokenizer: a ByteLevel pre-tokenizer before other steps");
                goto fail;
            }
            t->byte_level = 1;
        }
    if (tk_cuts_init(t) != 0) {
        rc = kvr_err_set(err, KVR_ENOMEM, "out of memory");
        goto fail;
    }
    /* template ids are not checked against the vocabulary: the library does not either */
    cJSON_Delete(root);
    *out = t;
    return 0;
fail:
    cJSON_Delete(root);
    kvr_hftok_free(t);
    return rc;
}

void kvr_hftok_free(kvr_hftok *t)
{
    if (!t)
        return;
    kvr_buf_free(&t->arena);
    free(t->vocab);
    tk_strmap_free(&t->vmap);
    tk_pairmap_free(&t->merges);
    kvr_buf_free(&t->added_arena);
    free(t->added);
    free(t->bigram);
    free(t->single);
    tk_trie_free(&t->trie_raw);
    tk_trie_free(&t->trie_norm);
    free(t->added_by_id);
    for (size_t i = 0; i < TK_MAX_STEPS; i++) {
        tk_step_free(&t->norm[i]);
        tk_step_free(&t->pre[i]);
        tk_step_free(&t->dec[i]);
    }
    free(t->tpl_pre);
    free(t->tpl_post);
    free(t);
}

static int read_file(const char *path, size_t max, kvr_buf *out, kvr_err *err)
{
    FILE *f = fopen(path, "rb");
    struct stat st;
    if (!f)
        return kvr_err_set(err, errno == ENOENT ? KVR_ENOTFOUND : KVR_EIO, "%s: %s", path,
                           strerror(errno));
    if (fstat(fileno(f), &st) || (size_t)st.st_size > max) {
        fclose(f);
        return kvr_err_set(err, KVR_ELIMIT, "%s: larger than %zu bytes", path, max);
    }
    int rc = kvr_buf_reserve(out, (size_t)st.st_size + 1);
    if (!rc) {
        out->len = fread(out->base, 1, (size_t)st.st_size, f);
        if (out->len != (size_t)st.st_size)
            rc = kvr_err_set(err, KVR_EIO, "%s: short read", path);
    } else
        rc = kvr_err_set(err, KVR_ENOMEM, "out of memory");
    fclose(f);
    return rc;
}

int kvr_hftok_load(const char *dir, kvr_hftok **out, kvr_err *err)
{
    char path[4096];
    kvr_buf b;
    kvr_buf_init(&b);
    snprintf(path, sizeof(path), "%s/tokenizer.json", dir);
    int rc = read_file(path, TK_MAX_FILE, &b, err);
    if (!rc && (rc = kvr_hftok_load_json(b.base, b.len, out, err)) != 0)
        kvr_err_wrap(err, rc, "%s", path);
    kvr_buf_free(&b);
    if (!rc) {
        /* optional: model_max_length for /tokenize's max_model_len */
        cJSON *cfg = NULL;
        kvr_err e2 = {0};
        kvr_buf_reset(&b);
        snprintf(path, sizeof(path), "%s/tokenizer_config.json", dir);
        if (read_file(path, TK_MAX_FILE, &b, &e2) == 0 &&
            kvr_json_parse((kvr_slice){b.base, b.len}, TK_MAX_FILE, 64, &cfg, &e2) == 0) {
            int64_t ml;
            if (kvr_json_int_exact(cJSON_GetObjectItemCaseSensitive(cfg, "model_max_length"),
                                   &ml) == 0 &&
                ml > 0)
                (*out)->max_len = ml;
        }
        cJSON_Delete(cfg);
        kvr_buf_free(&b);
        const char *base = strrchr(dir, '/');
        base = base && base[1] ? base + 1 : dir;
        snprintf((*out)->name, sizeof((*out)->name), "hf:%s", base);
    }
    return rc;
}
