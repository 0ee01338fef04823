#include "peer_auth.h"

#include "kvr_log.h"

#include <errno.h>
#include <fcntl.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

static const char MAGIC[4] = {'K', 'V', 'R', 'A'};
enum { VERSION = 1 };

int kvr_auth_key_load(kvr_auth_key *out, const char *path, kvr_err *err)
{
    int rc = 0;
    memset(out, 0, sizeof *out);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return kvr_err_set(err, KVR_EIO, "cluster secret %s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) {
        rc = kvr_err_set(err, KVR_EIO, "cluster secret %s: %s", path, strerror(errno));
        goto done;
    }
    if (st.st_mode & 077) {
        rc = kvr_err_set(err, KVR_EINVAL,
                         "cluster secret %s: mode %03o lets others read it (chmod 600)", path,
                         (unsigned)(st.st_mode & 0777));
        goto done;
    }
    /* one byte more than allowed, to tell "too long" from "exactly the maximum" */
    unsigned char buf[KVR_AUTH_SECRET_MAX + 1];
    size_t n = 0;
    while (n < sizeof buf) {
        ssize_t r = read(fd, buf + n, sizeof buf - n);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            rc = kvr_err_set(err, KVR_EIO, "cluster secret %s: %s", path, strerror(errno));
            goto done;
        }
        if (r == 0)
            break;
        n += (size_t)r;
    }
    /* a trailing newline from `echo` or an editor is not part of the secret */
    while (n > 0 &&
           (buf[n - 1] == '\n' || buf[n - 1] == '\r' || buf[n - 1] == ' ' || buf[n - 1] == '\t'))
        n--;
    if (n > KVR_AUTH_SECRET_MAX || n < KVR_AUTH_SECRET_MIN) {
        rc = kvr_err_set(err, KVR_EINVAL, "cluster secret %s: must be %d to %d bytes", path,
                         KVR_AUTH_SECRET_MIN, KVR_AUTH_SECRET_MAX);
        OPENSSL_cleanse(buf, sizeof buf);
        goto done;
    }
    memcpy(out->k, buf, n);
    out->len = n;
    OPENSSL_cleanse(buf, sizeof buf);
done:
    close(fd);
    return rc;
}

/* HMAC-SHA256(K, label NUL ctx Nc Ns extra). One-shot HMAC(): the HMAC_CTX calls are
 * deprecated in OpenSSL 3, and the input is under 200 bytes anyway. */
static int mac(const kvr_auth_hs *hs, const char *label, const unsigned char *extra,
               size_t extra_len, unsigned char out[KVR_AUTH_MAC])
{
    unsigned char in[16 + 1 + 2 * KVR_AUTH_NONCE + 8 + KVR_AUTH_ADDR];
    size_t ll = strlen(label) + 1, n = 0;
    if (ll > 16 || extra_len > 8 + KVR_AUTH_ADDR)
        return KVR_EINVAL;
    memcpy(in, label, ll);
    n += ll;
    in[n++] = hs->ctx;
    memcpy(in + n, hs->nc, KVR_AUTH_NONCE);
    n += KVR_AUTH_NONCE;
    memcpy(in + n, hs->ns, KVR_AUTH_NONCE);
    n += KVR_AUTH_NONCE;
    if (extra_len)
        memcpy(in + n, extra, extra_len);
    n += extra_len;
    unsigned int olen = 0;
    if (!HMAC(EVP_sha256(), hs->key->k, (int)hs->key->len, in, n, out, &olen) ||
        olen != KVR_AUTH_MAC)
        return KVR_EIO;
    return 0;
}

static void finish(kvr_auth_hs *hs, int status)
{
    if (hs->done)
        return;
    hs->done = true;
    uv_read_stop(hs->stream);
    hs->stream->data = hs->saved_data;
    OPENSSL_cleanse(hs->in, sizeof hs->in);
    hs->cb(hs, status);
}

/* Handshake messages are at most 104 bytes and each side sends at most two on a fresh socket
 * whose buffer is empty, so a write that does not go out at once means the peer is not reading:
 * fail rather than keep a write request (and its lifetime) around. */
static int send_all(kvr_auth_hs *hs, const void *buf, size_t len)
{
    uv_buf_t b = uv_buf_init((char *)buf, (unsigned)len);
    int n = uv_try_write(hs->stream, &b, 1);
    return n == (int)len ? 0 : KVR_EIO;
}

static void put_header(unsigned char *p, uint8_t ctx)
{
    memcpy(p, MAGIC, 4);
    p[4] = VERSION;
    p[5] = ctx;
    p[6] = p[7] = 0;
}

static bool header_ok(const unsigned char *p, uint8_t ctx)
{
    return memcmp(p, MAGIC, 4) == 0 && p[4] == VERSION && p[5] == ctx && p[6] == 0 && p[7] == 0;
}

static void proof_extra(const kvr_auth_hs *hs, uint64_t id, const char *addr, unsigned char *out)
{
    for (int i = 0; i < 8; i++)
        out[i] = (unsigned char)(id >> (56 - 8 * i));
    memset(out + 8, 0, KVR_AUTH_ADDR);
    (void)hs;
    memcpy(out + 8, addr, strnlen(addr, KVR_AUTH_ADDR));
}

/* A full message is in hs->in: act on it. */
static void on_message(kvr_auth_hs *hs)
{
    unsigned char m[KVR_AUTH_MAC];
    if (hs->server && hs->need == KVR_AUTH_HELLO_LEN) {
        if (!header_ok(hs->in, hs->ctx)) {
            finish(hs, KVR_EINVAL);
            return;
        }
        memcpy(hs->nc, hs->in + 8, KVR_AUTH_NONCE);
        unsigned char out[KVR_AUTH_CHAL_LEN];
        put_header(out, hs->ctx);
        memcpy(out + 8, hs->ns, KVR_AUTH_NONCE);
        if (mac(hs, "kvr-server", NULL, 0, out + 8 + KVR_AUTH_NONCE) != 0 ||
            send_all(hs, out, sizeof out) != 0) {
            finish(hs, KVR_EIO);
            return;
        }
        hs->need = KVR_AUTH_PROOF_LEN;
        hs->got = 0;
        return;
    }
    if (hs->server) { /* PROOF */
        uint64_t id = 0;
        for (int i = 0; i < 8; i++)
            id = id << 8 | hs->in[i];
        char addr[KVR_AUTH_ADDR + 1];
        memcpy(addr, hs->in + 8, KVR_AUTH_ADDR);
        addr[KVR_AUTH_ADDR] = 0;
        if (mac(hs, "kvr-client", hs->in, 8 + KVR_AUTH_ADDR, m) != 0) {
            finish(hs, KVR_EIO);
            return;
        }
        if (CRYPTO_memcmp(m, hs->in + 8 + KVR_AUTH_ADDR, KVR_AUTH_MAC) != 0) {
            finish(hs, KVR_ECORRUPT);
            return;
        }
        hs->peer_id = id;
        memcpy(hs->peer_addr, addr, sizeof addr);
        finish(hs, 0);
        return;
    }
    /* client: CHAL */
    if (!header_ok(hs->in, hs->ctx)) {
        finish(hs, KVR_EINVAL);
        return;
    }
    memcpy(hs->ns, hs->in + 8, KVR_AUTH_NONCE);
    if (mac(hs, "kvr-server", NULL, 0, m) != 0) {
        finish(hs, KVR_EIO);
        return;
    }
    if (CRYPTO_memcmp(m, hs->in + 8 + KVR_AUTH_NONCE, KVR_AUTH_MAC) != 0) {
        finish(hs, KVR_ECORRUPT); /* the server does not hold the secret either */
        return;
    }
    unsigned char out[KVR_AUTH_PROOF_LEN];
    proof_extra(hs, hs->my_id, hs->my_addr, out);
    if (mac(hs, "kvr-client", out, 8 + KVR_AUTH_ADDR, out + 8 + KVR_AUTH_ADDR) != 0 ||
        send_all(hs, out, sizeof out) != 0) {
        finish(hs, KVR_EIO);
        return;
    }
    finish(hs, 0);
}

static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf)
{
    (void)hint;
    kvr_auth_hs *hs = h->data;
    /* exactly what the current message still lacks: never read into the next protocol */
    buf->base = (char *)hs->in + hs->got;
    buf->len = hs->need - hs->got;
}

static void on_read(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf)
{
    (void)buf;
    kvr_auth_hs *hs = st->data;
    if (hs->done)
        return;
    if (nread < 0) {
        finish(hs, KVR_EIO);
        return;
    }
    hs->got += (size_t)nread;
    if (hs->got == hs->need)
        on_message(hs);
}

int kvr_auth_start(kvr_auth_hs *hs, uv_stream_t *stream, const kvr_auth_key *key, bool server,
                   uint8_t ctx, uint64_t my_id, const char *my_addr, kvr_auth_done_cb cb)
{
    void *data = hs->data;
    memset(hs, 0, sizeof *hs);
    hs->data = data;
    hs->stream = stream;
    hs->saved_data = stream->data;
    hs->key = key;
    hs->server = server;
    hs->ctx = ctx;
    hs->cb = cb;
    hs->my_id = my_id;
    if (my_addr)
        memcpy(hs->my_addr, my_addr, strnlen(my_addr, KVR_AUTH_ADDR));
    hs->deadline_ms = kvr_mono_ms() + KVR_AUTH_TIMEOUT_MS;
    unsigned char *nonce = server ? hs->ns : hs->nc;
    if (getrandom(nonce, KVR_AUTH_NONCE, 0) != KVR_AUTH_NONCE)
        return KVR_EIO;
    if (server) {
        hs->need = KVR_AUTH_HELLO_LEN;
    } else {
        unsigned char out[KVR_AUTH_HELLO_LEN];
        put_header(out, ctx);
        memcpy(out + 8, hs->nc, KVR_AUTH_NONCE);
        if (send_all(hs, out, sizeof out) != 0)
            return KVR_EIO;
        hs->need = KVR_AUTH_CHAL_LEN;
    }
    stream->data = hs;
    if (uv_read_start(stream, on_alloc, on_read) != 0) {
        stream->data = hs->saved_data;
        return KVR_EIO;
    }
    return 0;
}

bool kvr_auth_expired(const kvr_auth_hs *hs, int64_t now_ms)
{
    return !hs->done && hs->stream && now_ms >= hs->deadline_ms;
}
