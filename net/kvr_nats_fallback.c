/* kvr_nats_publish_fallback: a message for whoever subscribes to a subject, or, when NATS says
 * nobody does, for a fallback subject. The message goes out with a reply subject in this
 * connection's inbox (<inbox>.f<id>); nats-server answers a message that reached no subscriber
 * with a 503 status there (no responders: the core client's CONNECT asks for it), and only
 * then is it published again on the fallback subject. A subscriber never answers, so silence
 * means delivered; the question is when silence is final. The server handles a connection's
 * messages in order, so once it has answered a PING sent after a message, a 503 for that
 * message would already have been read: each held message is covered by the next PING, sent
 * KN_FB_PING_MS after the first message it covers (so a burst shares one PING), one PING
 * outstanding at a time, and released at its PONG. A message is held a few milliseconds.
 *
 * A dropped connection forgets which PING was which: its held messages go to their fallback
 * (the events this is for are idempotent: one may arrive twice, none is lost). A server whose
 * permissions do not let this user publish on the subject drops the message with an -ERR and
 * sends no 503 (a cluster upgraded without new permissions): the first such -ERR sends every
 * held message of that subject to its fallback, and every later one goes there at once. */
#include "kvr_nats_int.h"

#include "kvr_log.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void slot_clear(kn_fb *s)
{
    free(s->buf);
    s->buf = NULL;
    s->id = 0;
}

static const char *slot_fallback(const kn_fb *s)
{
    return s->buf + s->len;
}

static const char *slot_subject(const kn_fb *s)
{
    const char *f = slot_fallback(s);
    return f + strlen(f) + 1;
}

static int publish_plain(kvr_nats_impl *ki, const char *subject, const void *data, size_t len)
{
    return kvr_nats_publish(ki->kn, subject, data, len);
}

/* The held message goes to its fallback now (nobody took it, or nobody can tell). */
static void slot_to_fallback(kvr_nats_impl *ki, kn_fb *s)
{
    ki->stats.fallbacks++;
    int rc = publish_plain(ki, slot_fallback(s), s->buf, s->len);
    if (rc != 0)
        KVR_LOG_WARN_RL(5, "nats: a message nobody took could not go to its fallback",
                        "fallback=%s rc=%d", slot_fallback(s), rc);
    slot_clear(s);
}

static bool denied(const kvr_nats_impl *ki, const char *subject, size_t len)
{
    for (int i = 0; i < ki->n_fb_denied; i++)
        if (strlen(ki->fb_denied[i]) == len && memcmp(ki->fb_denied[i], subject, len) == 0)
            return true;
    return false;
}

/* A PING behind every message held since the last one (ids up to next_fb_id). */
static void cover(uv_timer_t *t)
{
    kvr_nats_impl *ki = t->data;
    if (ki->closing || !ki->core || ki->fb_ping_seq || ki->next_fb_id == ki->fb_covered_id)
        return;
    uint64_t seq = kvr_nats_core_ping(ki->core);
    if (!seq)
        return; /* not connected: kn_fallback_reset sends them on */
    ki->fb_ping_seq = seq;
    ki->fb_covered_id = ki->next_fb_id;
}

static void cover_soon(kvr_nats_impl *ki)
{
    if (!ki->fb_ping_seq && !uv_is_active((uv_handle_t *)&ki->fb_timer))
        uv_timer_start(&ki->fb_timer, cover, KN_FB_PING_MS, 0);
}

int kvr_nats_publish_fallback(kvr_nats *kn, const char *subject, const char *fallback,
                              const void *data, size_t len)
{
    kvr_nats_impl *ki = kn->impl;
    if (!ki || ki->closing || !ki->core)
        return KVR_ECLOSED;
    if (!subject || !*subject || !fallback || !*fallback || len > KN_FB_MAX_BYTES)
        return KVR_EINVAL;
    size_t fl = strlen(fallback), sl = strlen(subject);
    if (fl > KN_SUBJECT_MAX || sl > KN_SUBJECT_MAX)
        return KVR_EINVAL;
    if (denied(ki, subject, sl) || !atomic_load(&ki->connected)) {
        ki->stats.fallback_busy++; /* nobody can say whether it was taken: the sure path */
        return publish_plain(ki, fallback, data, len);
    }
    if (!ki->fb && !(ki->fb = calloc(KN_FB_SLOTS, sizeof *ki->fb)))
        return publish_plain(ki, fallback, data, len);
    kn_fb *s = &ki->fb[(ki->next_fb_id + 1) % KN_FB_SLOTS];
    if (s->buf) {
        /* every slot holds a message whose answer may still come: never drop one of those,
         * and never send this one where nobody may listen */
        ki->stats.fallback_busy++;
        return publish_plain(ki, fallback, data, len);
    }
    if (!(s->buf = malloc(len + fl + 1 + sl + 1)))
        return publish_plain(ki, fallback, data, len);
    uint64_t id = ++ki->next_fb_id;
    memcpy(s->buf, data, len);
    memcpy(s->buf + len, fallback, fl + 1);
    memcpy(s->buf + len + fl + 1, subject, sl + 1);
    s->len = len;
    s->id = id;
    char reply[sizeof ki->inbox + 24];
    snprintf(reply, sizeof reply, "%s.f%" PRIu64, ki->inbox, id);
    int rc = kvr_nats_core_publish(ki->core, subject, reply, data, len);
    if (rc != 0) {
        slot_clear(s);
        return rc;
    }
    ki->stats.msgs_out++;
    ki->stats.bytes_out += len;
    cover_soon(ki);
    return 0;
}

void kn_fallback_msg(kvr_nats_impl *ki, const char *id_str, bool no_responders)
{
    char *end = NULL;
    unsigned long long id = strtoull(id_str, &end, 10);
    if (!ki->fb || !end || *end || id == 0)
        return;
    kn_fb *s = &ki->fb[id % KN_FB_SLOTS];
    if (!s->buf || s->id != id)
        return; /* released already */
    if (no_responders)
        slot_to_fallback(ki, s);
    else
        slot_clear(s); /* an answer of any other kind: someone took it */
}

void kn_fallback_pong(kvr_nats_impl *ki, uint64_t pong_seq)
{
    if (!ki->fb || !ki->fb_ping_seq || pong_seq < ki->fb_ping_seq)
        return;
    /* no 503 came for the covered messages: each reached a subscriber */
    for (uint64_t id = ki->fb_released_id + 1; id <= ki->fb_covered_id; id++) {
        kn_fb *s = &ki->fb[id % KN_FB_SLOTS];
        if (s->buf && s->id == id)
            slot_clear(s);
    }
    ki->fb_released_id = ki->fb_covered_id;
    ki->fb_ping_seq = 0;
    if (ki->next_fb_id > ki->fb_covered_id)
        cover_soon(ki); /* the ones published while that PING was out */
}

void kn_fallback_reset(kvr_nats_impl *ki)
{
    ki->fb_ping_seq = 0;
    uv_timer_stop(&ki->fb_timer);
    if (!ki->fb)
        return;
    unsigned n = 0;
    for (uint64_t id = ki->fb_released_id + 1; id <= ki->next_fb_id; id++) {
        kn_fb *s = &ki->fb[id % KN_FB_SLOTS];
        if (s->buf && s->id == id) {
            slot_to_fallback(ki, s);
            n++;
        }
    }
    ki->fb_released_id = ki->fb_covered_id = ki->next_fb_id;
    if (n)
        KVR_LOG_INFO("nats: messages whose delivery the dropped connection left unknown sent to "
                     "their fallback",
                     "n=%u", n);
}

void kn_fallback_denied(kvr_nats_impl *ki, const char *subject, size_t len)
{
    if (denied(ki, subject, len) || ki->n_fb_denied == KN_FB_DENIED_MAX)
        return;
    /* any refused subject (only kvr_nats_publish_fallback consults the set) */
    char *copy = malloc(len + 1);
    if (!copy)
        return;
    memcpy(copy, subject, len);
    copy[len] = 0;
    ki->fb_denied[ki->n_fb_denied++] = copy;
    unsigned resent = 0;
    for (size_t i = 0; ki->fb && i < KN_FB_SLOTS; i++) {
        kn_fb *s = &ki->fb[i];
        if (s->buf && strcmp(slot_subject(s), copy) == 0) {
            slot_to_fallback(ki, s);
            resent++;
        }
    }
    KVR_LOG_WARN("nats: this user may not publish on a subject: its messages go to their "
                 "fallback (update the server's permissions: docs/SECURITY.md)",
                 "subject=%s resent=%u", copy, resent);
}

void kn_fallback_free(kvr_nats_impl *ki)
{
    for (int i = 0; i < ki->n_fb_denied; i++)
        free(ki->fb_denied[i]);
    ki->n_fb_denied = 0;
    if (!ki->fb)
        return;
    for (size_t i = 0; i < KN_FB_SLOTS; i++)
        free(ki->fb[i].buf);
    free(ki->fb);
    ki->fb = NULL;
}
