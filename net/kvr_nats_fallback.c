/* kvr_nats_publish_fallback: a message for whoever subscribes to a subject, or, when NATS says
 * nobody does, for a fallback subject. The message goes out with a reply subject in this
 * connection's inbox (<inbox>.f<id>); nats-server answers a message that reached no subscriber
 * with a 503 status there (no responders: the core client's CONNECT asks for it), and only
 * then is it published again on the fallback subject. A subscriber never answers, so a
 * message held here is one nobody said was lost: it is kept KN_FB_HOLD_MS, by which time a
 * 503 would have come back through the server, and forgotten after.
 *
 * A server whose permissions do not let this user publish on the subject drops the message
 * with an -ERR and sends no 503 (a cluster upgraded without new permissions): the first such
 * -ERR sends every held message of that subject to its fallback, and every later one goes
 * there at once. */
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

static int publish_plain(kvr_nats_impl *ki, const char *subject, const void *data, size_t len)
{
    int rc = kvr_nats_core_publish(ki->core, subject, NULL, data, len);
    if (rc == 0) {
        ki->stats.msgs_out++;
        ki->stats.bytes_out += len;
    }
    return rc;
}

static bool denied(const kvr_nats_impl *ki, const char *subject, size_t len)
{
    for (int i = 0; i < ki->n_fb_denied; i++)
        if (strlen(ki->fb_denied[i]) == len && memcmp(ki->fb_denied[i], subject, len) == 0)
            return true;
    return false;
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
    if (denied(ki, subject, sl)) {
        ki->stats.fallback_busy++;
        return publish_plain(ki, fallback, data, len);
    }
    if (!ki->fb && !(ki->fb = calloc(KN_FB_SLOTS, sizeof *ki->fb)))
        return publish_plain(ki, fallback, data, len); /* no memory to hold it: the sure path */
    uint64_t id = ++ki->next_fb_id;
    kn_fb *s = &ki->fb[id % KN_FB_SLOTS];
    int64_t now = kvr_mono_ms();
    if (s->buf && now - s->at_ms < KN_FB_HOLD_MS) {
        /* every slot holds a message a 503 may still come back for: never drop one of those,
         * and never send this one where nobody may listen */
        ki->stats.fallback_busy++;
        return publish_plain(ki, fallback, data, len);
    }
    slot_clear(s);
    if (!(s->buf = malloc(len + fl + 1 + sl + 1)))
        return publish_plain(ki, fallback, data, len);
    memcpy(s->buf, data, len);
    memcpy(s->buf + len, fallback, fl + 1);
    memcpy(s->buf + len + fl + 1, subject, sl + 1);
    s->len = len;
    s->id = id;
    s->at_ms = now;
    char reply[sizeof ki->inbox + 24];
    snprintf(reply, sizeof reply, "%s.f%" PRIu64, ki->inbox, id);
    int rc = kvr_nats_core_publish(ki->core, subject, reply, data, len);
    if (rc != 0) {
        slot_clear(s);
        return rc;
    }
    ki->stats.msgs_out++;
    ki->stats.bytes_out += len;
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
        return; /* forgotten already (held past KN_FB_HOLD_MS) */
    if (no_responders) {
        ki->stats.fallbacks++;
        const char *fallback = s->buf + s->len;
        int rc = publish_plain(ki, fallback, s->buf, s->len);
        if (rc != 0)
            KVR_LOG_WARN_RL(5, "nats: a message nobody took could not go to its fallback",
                            "fallback=%s rc=%d", fallback, rc);
    }
    slot_clear(s); /* an answer of any other kind: someone took it */
}

void kn_fallback_denied(kvr_nats_impl *ki, const char *subject, size_t len)
{
    if (!ki->fb || denied(ki, subject, len) || ki->n_fb_denied == KN_FB_DENIED_MAX)
        return;
    /* any refused subject (only kvr_nats_publish_fallback consults the set) */
    char *copy = malloc(len + 1);
    if (!copy)
        return;
    memcpy(copy, subject, len);
    copy[len] = 0;
    ki->fb_denied[ki->n_fb_denied++] = copy;
    unsigned resent = 0;
    for (size_t i = 0; i < KN_FB_SLOTS; i++) {
        kn_fb *s = &ki->fb[i];
        if (!s->buf)
            continue;
        const char *fallback = s->buf + s->len;
        const char *subj = fallback + strlen(fallback) + 1;
        if (strcmp(subj, copy) != 0)
            continue;
        if (publish_plain(ki, fallback, s->buf, s->len) == 0)
            resent++;
        ki->stats.fallbacks++;
        slot_clear(s);
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
