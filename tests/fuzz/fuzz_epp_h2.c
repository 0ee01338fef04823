/* libFuzzer target for kvr-epp's HTTP/2 + gRPC server (epp/epp_grpc.c on nghttp2): the bytes a
 * gateway sends on one connection, after the client preface (added here), run through a
 * socketless connection (epp_grpc_feed) in pieces whose size the first byte picks. The
 * handlers echo every ProcessingRequest that decodes, refuse one path, fail a call on an empty
 * message and finish calls on half-close, so calls end every way they can. Once the connection
 * is closed no call may be left open and no byte buffered. */
#include "epp_grpc.h"
#include "epp/proto/ext_proc_min.pb-c.h"
#include "fuzz_check.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static uint64_t opened, closed;

static int on_call(epp_grpc_call *call, const char *path)
{
    if (strcmp(path, "/refuse") == 0)
        return EPP_GRPC_UNIMPLEMENTED;
    call->data = NULL;
    opened++;
    return 0;
}

static void on_message(epp_grpc_call *call, const uint8_t *msg, size_t len)
{
    if (len == 0) {
        epp_grpc_finish(call, EPP_GRPC_INVALID_ARGUMENT, "empty \xff message");
        return;
    }
    Envoy__Service__ExtProc__V3__ProcessingRequest *r =
        envoy__service__ext_proc__v3__processing_request__unpack(NULL, len, msg);
    if (!r)
        return;
    size_t n = envoy__service__ext_proc__v3__processing_request__get_packed_size(r);
    uint8_t *b = malloc(n ? n : 1);
    CHECK(b);
    envoy__service__ext_proc__v3__processing_request__pack(r, b);
    epp_grpc_send(call, b, n);
    free(b);
    envoy__service__ext_proc__v3__processing_request__free_unpacked(r, NULL);
}

static void on_half_close(epp_grpc_call *call)
{
    epp_grpc_finish(call, EPP_GRPC_OK, NULL);
}

static void on_close(epp_grpc_call *call, bool finished)
{
    (void)call;
    (void)finished;
    closed++;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const char preface[] = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    if (size < 1)
        return 0;
    size_t piece = (size_t)data[0] * 13 + 1;
    data++;
    size--;
    uint8_t *in = malloc(sizeof preface - 1 + size);
    CHECK(in);
    memcpy(in, preface, sizeof preface - 1);
    if (size)
        memcpy(in + sizeof preface - 1, data, size);
    epp_grpc_server s;
    epp_grpc_handlers h = {.on_call = on_call,
                           .on_message = on_message,
                           .on_half_close = on_half_close,
                           .on_close = on_close};
    epp_grpc_limits lim = {.max_message = 65536, .max_buffered = 1 << 20, .max_streams = 64};
    CHECK(epp_grpc_init(&s, uv_default_loop(), &h, &lim) == 0);
    opened = closed = 0;
    CHECK(epp_grpc_feed(&s, in, sizeof preface - 1 + size, piece) == 0);
    free(in);
    CHECK(opened == closed);
    CHECK(s.stats.open_calls == 0);
    CHECK(s.stats.buffered == 0);
    return 0;
}
