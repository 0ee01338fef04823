/* Unit tests of the approximate index (indexer/approx.h): matching, LRU bound, TTL, removal,
 * digest determinism, and a random run against a simple reference model. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "approx.h"
#include "kvr_err.h"

static uint32_t depth_of(const kvr_index_match *m, size_t n, uint64_t id)
{
    for (size_t i = 0; i < n; i++)
        if (m[i].worker_id == id)
            return m[i].depth;
    return 0;
}

static void seqs(uint64_t base, uint32_t n, uint64_t *out)
{
    for (uint32_t i = 0; i < n; i++)
        out[i] = base * 1000003ULL + i + 1;
}

static void test_assume_and_match(void **state)
{
    (void)state;
    kvr_approx *a;
    assert_int_equal(kvr_approx_create(&a, NULL), 0);
    uint64_t s[8], q[8];
    seqs(1, 8, s);
    kvr_index_match m[4];
    assert_int_equal(kvr_approx_find_matches(a, s, 8, 0, m, 4), 0);
    assert_int_equal(kvr_approx_assume(a, 7, 100, s, 5, 1000), 0);
    assert_int_equal(kvr_approx_find_matches(a, s, 8, 1000, m, 4), 1);
    assert_int_equal(m[0].worker_id, 7);
    assert_int_equal(m[0].depth, 5);
    /* a query that diverges after 3 blocks */
    memcpy(q, s, sizeof q);
    q[3] = 42;
    assert_int_equal(kvr_approx_find_matches(a, q, 8, 1000, m, 4), 1);
    assert_int_equal(m[0].depth, 3);
    /* second worker with a shorter prefix; re-assume refreshes */
    assert_int_equal(kvr_approx_assume(a, 9, 100, s, 2, 1100), 0);
    assert_int_equal(kvr_approx_assume(a, 7, 100, s, 5, 1200), 0);
    size_t n = kvr_approx_find_matches(a, s, 8, 1200, m, 4);
    assert_int_equal(n, 2);
    assert_int_equal(depth_of(m, n, 7), 5);
    assert_int_equal(depth_of(m, n, 9), 2);
    kvr_approx_stats st;
    kvr_approx_stats_get(a, &st);
    assert_int_equal(st.entries, 7);
    assert_int_equal(st.inserted, 7);
    assert_int_equal(st.refreshed, 5);
    assert_int_equal(st.workers, 2);
    assert_true(st.bytes > 0);
    assert_int_equal(kvr_approx_remove_worker(a, 7), 5);
    assert_int_equal(kvr_approx_worker_entries(a, 7), 0);
    n = kvr_approx_find_matches(a, s, 8, 1200, m, 4);
    assert_int_equal(n, 1);
    assert_int_equal(depth_of(m, n, 9), 2);
    kvr_approx_destroy(a);
}

/* Capacity 6: a second request of 4 blocks evicts the first request's LEAVES (its root was
 * touched last, so it is the most recent of its request). */
static void test_lru_capacity(void **state)
{
    (void)state;
    kvr_approx *a;
    assert_int_equal(kvr_approx_create(&a, NULL), 0);
    uint64_t s1[4], s2[4];
    seqs(1, 4, s1);
    seqs(2, 4, s2);
    assert_int_equal(kvr_approx_assume(a, 1, 6, s1, 4, 10), 0);
    assert_int_equal(kvr_approx_assume(a, 1, 6, s2, 4, 20), 0);
    assert_int_equal(kvr_approx_worker_entries(a, 1), 6);
    kvr_index_match m[2];
    assert_int_equal(kvr_approx_find_matches(a, s2, 4, 0, m, 2), 1);
    assert_int_equal(m[0].depth, 4);
    assert_int_equal(kvr_approx_find_matches(a, s1, 4, 0, m, 2), 1);
    assert_int_equal(m[0].depth, 2); /* blocks 2 and 3 (leaves) went first */
    kvr_approx_stats st;
    kvr_approx_stats_get(a, &st);
    assert_int_equal(st.evicted, 2);
    /* touching s1 again makes s2's leaves the LRU ones */
    assert_int_equal(kvr_approx_assume(a, 1, 6, s1, 4, 30), 0);
    assert_int_equal(kvr_approx_find_matches(a, s1, 4, 0, m, 2), 1);
    assert_int_equal(m[0].depth, 4);
    assert_int_equal(kvr_approx_find_matches(a, s2, 4, 0, m, 2), 1);
    assert_int_equal(m[0].depth, 2);
    /* a request longer than the capacity keeps its first capacity blocks */
    uint64_t big[10];
    seqs(3, 10, big);
    assert_int_equal(kvr_approx_assume(a, 2, 3, big, 10, 40), 0);
    assert_int_equal(kvr_approx_worker_entries(a, 2), 3);
    assert_int_equal(kvr_approx_find_matches(a, big, 10, 0, m, 2), 1);
    assert_int_equal(m[0].depth, 3);
    /* unknown capacity: the default */
    kvr_approx_destroy(a);
    kvr_approx_opts o = {.default_capacity_blocks = 2};
    assert_int_equal(kvr_approx_create(&a, &o), 0);
    assert_int_equal(kvr_approx_assume(a, 1, 0, big, 10, 40), 0);
    assert_int_equal(kvr_approx_worker_entries(a, 1), 2);
    kvr_approx_destroy(a);
    /* the bound over all workers drops the oldest entries of any worker */
    kvr_approx_opts g = {.max_entries = 5};
    assert_int_equal(kvr_approx_create(&a, &g), 0);
    assert_int_equal(kvr_approx_assume(a, 1, 0, s1, 4, 10), 0);
    assert_int_equal(kvr_approx_assume(a, 2, 0, s2, 4, 20), 0);
    assert_int_equal(kvr_approx_worker_entries(a, 1), 1); /* its root, touched last */
    assert_int_equal(kvr_approx_worker_entries(a, 2), 4);
    assert_int_equal(kvr_approx_find_matches(a, s1, 4, 0, m, 2), 1);
    assert_int_equal(m[0].depth, 1);
    kvr_approx_destroy(a);
}

static void test_ttl(void **state)
{
    (void)state;
    kvr_approx_opts o = {.ttl_ms = 1000};
    kvr_approx *a;
    assert_int_equal(kvr_approx_create(&a, &o), 0);
    uint64_t s1[3], s2[3];
    seqs(1, 3, s1);
    seqs(2, 3, s2);
    assert_int_equal(kvr_approx_assume(a, 1, 0, s1, 3, 5000), 0);
    assert_int_equal(kvr_approx_assume(a, 2, 0, s2, 3, 5500), 0);
    kvr_index_match m[2];
    /* the read filter hides expired entries without dropping them */
    assert_int_equal(kvr_approx_find_matches(a, s1, 3, 6000, m, 2), 0);
    assert_int_equal(kvr_approx_find_matches(a, s1, 3, 5999, m, 2), 1);
    kvr_approx_stats st;
    kvr_approx_stats_get(a, &st);
    assert_int_equal(st.entries, 6);
    /* a time going backwards is taken as the latest seen: nothing expires early */
    assert_int_equal(kvr_approx_expire(a, 100), 0);
    assert_int_equal(kvr_approx_expire(a, 6000), 3);
    assert_int_equal(kvr_approx_worker_entries(a, 1), 0);
    assert_int_equal(kvr_approx_worker_entries(a, 2), 3);
    /* an assume expires what is due at its time first */
    assert_int_equal(kvr_approx_assume(a, 1, 0, s1, 1, 6600), 0);
    kvr_approx_stats_get(a, &st);
    assert_int_equal(st.expired, 6);
    assert_int_equal(st.entries, 1);
    kvr_approx_destroy(a);
}

/* Same calls -> same digest; the digest does not depend on slot numbers; a different time
 * or set changes it; empty -> 0. */
static void test_digest(void **state)
{
    (void)state;
    kvr_approx *a, *b;
    assert_int_equal(kvr_approx_create(&a, NULL), 0);
    assert_int_equal(kvr_approx_create(&b, NULL), 0);
    assert_int_equal(kvr_approx_digest(a), 0);
    uint64_t s[5];
    seqs(4, 5, s);
    /* b first gives a slot to worker 99 and frees it: worker 1 gets another slot number */
    assert_int_equal(kvr_approx_assume(b, 99, 0, s, 1, 1), 0);
    kvr_approx_remove_worker(b, 99);
    assert_int_equal(kvr_approx_assume(b, 3, 0, s, 2, 2), 0);
    assert_int_equal(kvr_approx_assume(a, 3, 0, s, 2, 2), 0);
    assert_int_equal(kvr_approx_assume(a, 1, 0, s, 5, 10), 0);
    assert_int_equal(kvr_approx_assume(b, 1, 0, s, 5, 10), 0);
    assert_int_equal(kvr_approx_digest(a), kvr_approx_digest(b));
    assert_int_equal(kvr_approx_assume(a, 1, 0, s, 1, 11), 0);
    assert_int_not_equal(kvr_approx_digest(a), kvr_approx_digest(b));
    assert_int_equal(kvr_approx_assume(b, 1, 0, s, 1, 11), 0);
    assert_int_equal(kvr_approx_digest(a), kvr_approx_digest(b));
    kvr_approx_remove_worker(a, 1);
    kvr_approx_remove_worker(a, 3);
    assert_int_equal(kvr_approx_digest(a), 0);
    kvr_approx_destroy(a);
    kvr_approx_destroy(b);
}

/* Random operations against a reference: per worker an array in recency order. */
#define RW 4
#define RCAP 40
typedef struct ref_ent {
    uint64_t seq, ts;
} ref_ent;
typedef struct ref_w {
    ref_ent e[RCAP + 64];
    uint32_t n; /* e[0] oldest */
} ref_w;

static void ref_touch(ref_w *w, uint64_t seq, uint64_t ts)
{
    for (uint32_t i = 0; i < w->n; i++) {
        if (w->e[i].seq == seq) {
            memmove(&w->e[i], &w->e[i + 1], (w->n - i - 1) * sizeof *w->e);
            w->n--;
            break;
        }
    }
    w->e[w->n++] = (ref_ent){seq, ts};
}

static void test_random_vs_reference(void **state)
{
    (void)state;
    kvr_approx_opts o = {.ttl_ms = 500};
    kvr_approx *a;
    assert_int_equal(kvr_approx_create(&a, &o), 0);
    static ref_w ref[RW];
    memset(ref, 0, sizeof ref);
    srand(1234);
    uint64_t now = 1000;
    for (int it = 0; it < 20000; it++) {
        now += (uint64_t)(rand() % 20);
        uint32_t w = (uint32_t)(rand() % RW);
        uint32_t doc = (uint32_t)(rand() % 12);
        uint32_t n = 1 + (uint32_t)(rand() % 12);
        uint64_t s[12];
        seqs(doc, n, s);
        assert_int_equal(kvr_approx_assume(a, w + 1, RCAP, s, n, now), 0);
        /* reference: expire, touch last to first, evict */
        for (uint32_t x = 0; x < RW; x++) {
            uint32_t k = 0;
            for (uint32_t i = 0; i < ref[x].n; i++)
                if (ref[x].e[i].ts + o.ttl_ms > now)
                    ref[x].e[k++] = ref[x].e[i];
            ref[x].n = k;
        }
        for (uint32_t i = n; i-- > 0;)
            ref_touch(&ref[w], s[i], now);
        while (ref[w].n > RCAP) {
            memmove(&ref[w].e[0], &ref[w].e[1], (ref[w].n - 1) * sizeof *ref[w].e);
            ref[w].n--;
        }
        /* compare a random query */
        uint32_t qd = (uint32_t)(rand() % 12);
        uint64_t q[12];
        seqs(qd, 12, q);
        kvr_index_match m[RW];
        size_t nm = kvr_approx_find_matches(a, q, 12, now, m, RW);
        for (uint32_t x = 0; x < RW; x++) {
            uint32_t d = 0;
            for (; d < 12; d++) {
                bool has = false;
                for (uint32_t i = 0; i < ref[x].n && !has; i++)
                    has = ref[x].e[i].seq == q[d];
                if (!has)
                    break;
            }
            assert_int_equal(depth_of(m, nm, x + 1), d);
            assert_int_equal(kvr_approx_worker_entries(a, x + 1), ref[x].n);
        }
    }
    kvr_approx_destroy(a);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_assume_and_match),
        cmocka_unit_test(test_lru_capacity),
        cmocka_unit_test(test_ttl),
        cmocka_unit_test(test_digest),
        cmocka_unit_test(test_random_vs_reference),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
