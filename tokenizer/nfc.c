/* NFC quick check: most prompt text is already NFC, and running utf8proc's full
 * decompose/reorder/compose over it was a third of Qwen3's encode time. A character is marked
 * "may change" when
 *   - NFC of the character alone differs from it (singletons, exclusions), or
 *   - its canonical combining class is not 0 (it may be reordered or composed), or
 *   - it appears after the first place in some canonical decomposition (it may compose with
 *     the starter before it: combining marks, Hangul V/T jamo, the few ccc=0 vowel signs), or
 *   - its decomposition starts with a non-starter.
 * A string with no marked character is NFC already: each character's decomposition recomposes
 * to itself and nothing can compose or reorder across a boundary (the next character starts
 * with a starter that is no composition's second). Marks are computed once from utf8proc, for
 * code points below TK_SINGLE_CPS; anything above (planes 3+) counts as marked. The unit test
 * (tests/tokenizer/test_hftok_fast.c) checks the claim against utf8proc for every code point. */
#include "tk_internal.h"

#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <utf8proc.h>

#define NFC_CPS TK_SINGLE_CPS
static uint64_t nfc_marked[NFC_CPS / 64];
static pthread_once_t nfc_once = PTHREAD_ONCE_INIT;

static void mark(uint32_t cp)
{
    if (cp < NFC_CPS)
        nfc_marked[cp / 64] |= 1ull << (cp % 64);
}

static void nfc_init(void)
{
    for (uint32_t cp = 0; cp < NFC_CPS; cp++) {
        if (cp >= 0xD800 && cp <= 0xDFFF)
            continue; /* not in valid UTF-8 */
        if (utf8proc_get_property((utf8proc_int32_t)cp)->combining_class)
            mark(cp);
        utf8proc_int32_t d[32];
        int bc = 0;
        utf8proc_ssize_t n =
            utf8proc_decompose_char((utf8proc_int32_t)cp, d, 32, UTF8PROC_DECOMPOSE, &bc);
        if (n < 0 || n > 32) {
            mark(cp);
            continue;
        }
        if (n == 1 && (uint32_t)d[0] == cp)
            continue;
        for (utf8proc_ssize_t i = 1; i < n; i++)
            mark((uint32_t)d[i]);
        if (utf8proc_get_property(d[0])->combining_class)
            mark(cp);
        /* does NFC give the character back? */
        utf8proc_uint8_t src[4], *dst = NULL;
        utf8proc_ssize_t sl = utf8proc_encode_char((utf8proc_int32_t)cp, src);
        utf8proc_ssize_t l = utf8proc_map(src, sl, &dst, UTF8PROC_STABLE | UTF8PROC_COMPOSE);
        if (l != sl || memcmp(dst, src, (size_t)sl) != 0)
            mark(cp);
        free(dst);
    }
}

int tk_nfc_quick(const char *s, size_t n)
{
    pthread_once(&nfc_once, nfc_init);
    const unsigned char *p = (const unsigned char *)s;
    for (size_t i = 0; i < n;) {
        if (p[i] < 0x80) { /* ASCII is never marked */
            i++;
            continue;
        }
        size_t l;
        uint32_t cp = tk_utf8_decode(s + i, n - i, &l);
        if (cp >= NFC_CPS || (nfc_marked[cp / 64] >> (cp % 64) & 1))
            return 0;
        i += l;
    }
    return 1;
}

static int marked(uint32_t cp)
{
    return cp >= NFC_CPS || (nfc_marked[cp / 64] >> (cp % 64) & 1);
}

/* NFC of one region with utf8proc, appended to out. */
static int nfc_region(const char *s, size_t n, kvr_buf *out, kvr_err *err)
{
    utf8proc_uint8_t *dst = NULL;
    utf8proc_ssize_t l = utf8proc_map((const utf8proc_uint8_t *)s, (utf8proc_ssize_t)n, &dst,
                                      UTF8PROC_STABLE | UTF8PROC_COMPOSE);
    if (l < 0)
        return kvr_err_set(err, KVR_EINVAL, "tokenizer: NFC: %s", utf8proc_errmsg(l));
    int rc = kvr_buf_append(out, dst, (size_t)l);
    free(dst);
    return rc ? kvr_err_set(err, KVR_ENOMEM, "tokenizer: out of memory") : 0;
}

/* NFC is local: at the start of an unmarked character nothing before can compose with or
 * reorder against anything after (its decomposition starts with a starter, which blocks, and
 * that starter is no composition's second). So only each run of marked characters, with the
 * unmarked character before it (the starter a mark may compose with), goes through utf8proc;
 * the rest is copied. Text with a few combining marks no longer pays NFC over all of it. */
int tk_nfc_fast(const char *s, size_t n, kvr_buf *out, kvr_err *err)
{
    pthread_once(&nfc_once, nfc_init);
    const unsigned char *p = (const unsigned char *)s;
    size_t copied = 0, last_ok = SIZE_MAX;
    int rc;
    for (size_t i = 0; i < n;) {
        if (p[i] < 0x80) { /* ASCII is never marked: skip it eight bytes at a time */
            while (i + 8 <= n) {
                uint64_t w;
                memcpy(&w, s + i, 8);
                if (w & 0x8080808080808080ull)
                    break;
                i += 8;
            }
            while (i < n && p[i] < 0x80)
                i++;
            last_ok = i - 1;
            continue;
        }
        size_t l = 1;
        uint32_t cp = tk_utf8_decode(s + i, n - i, &l);
        if (!marked(cp)) {
            last_ok = i;
            i += l;
            continue;
        }
        size_t rs = last_ok != SIZE_MAX && last_ok >= copied ? last_ok : i, j = i + l;
        while (j < n) {
            size_t m = 1;
            uint32_t c = p[j] < 0x80 ? p[j] : tk_utf8_decode(s + j, n - j, &m);
            if (!marked(c))
                break;
            j += m;
        }
        if (kvr_buf_append(out, s + copied, rs - copied))
            return kvr_err_set(err, KVR_ENOMEM, "tokenizer: out of memory");
        if ((rc = nfc_region(s + rs, j - rs, out, err)) != 0)
            return rc;
        copied = i = j;
    }
    if (kvr_buf_append(out, s + copied, n - copied))
        return kvr_err_set(err, KVR_ENOMEM, "tokenizer: out of memory");
    return 0;
}
