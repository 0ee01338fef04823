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
