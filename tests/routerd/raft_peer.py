#!/usr/bin/env python3
"""A hostile or wrong-keyed router peer for test_raft_auth.sh.

raft_peer.py expire HOST PORT [SECRET_FILE]
    connects to a router's forward port (raft port + 1); with SECRET_FILE it first runs the
    peer_auth handshake (sync/peer_auth.h) as a client with that secret; then sends a
    forwarded EXPIRE{before_ms: far future} (frees every booking if applied) and prints what
    came back: "reply status=N", "closed" (the router hung up) or "handshake-refused".
raft_peer.py hello HOST PORT SECRET_FILE CTX
    only the handshake (CTX 1 = Raft port, 2 = forward port); prints "ok" or "refused".
"""
import hashlib, hmac, os, socket, struct, sys

def recv_exact(s, n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            return None
        b += c
    return b

def handshake(s, secret, ctx, my_id=0, addr=b""):
    nc = os.urandom(32)
    s.sendall(b"KVRA" + bytes([1, ctx, 0, 0]) + nc)
    chal = recv_exact(s, 72)
    if chal is None or chal[:8] != b"KVRA" + bytes([1, ctx, 0, 0]):
        return False
    ns, smac = chal[8:40], chal[40:72]
    want = hmac.new(secret, b"kvr-server\0" + bytes([ctx]) + nc + ns, hashlib.sha256).digest()
    # a client with the wrong secret cannot check the server; it tries its proof anyway
    extra = struct.pack(">Q", my_id) + addr.ljust(64, b"\0")
    proof = hmac.new(secret, b"kvr-client\0" + bytes([ctx]) + nc + ns + extra, hashlib.sha256).digest()
    s.sendall(extra + proof)
    return hmac.compare_digest(want, smac)

def expire_frame():
    # command: version byte 1, msgpack [8 (EXPIRE), before_ms = 2^53]
    cmd = bytes([1]) + bytes([0x92, 0x08, 0xCF]) + struct.pack(">Q", 1 << 53)
    # forward request: msgpack [1, rpc_id 7, bin cmd]
    body = bytes([0x93, 0x01, 0x07, 0xC4, len(cmd)]) + cmd
    return struct.pack(">I", len(body)) + body

def read_secret(path):
    return open(path, "rb").read().rstrip(b" \t\r\n")

def main():
    op, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    s = socket.create_connection((host, port), timeout=5)
    if op == "hello":
        ok = handshake(s, read_secret(sys.argv[4]), int(sys.argv[5]), 99, b"127.0.0.1:9")
        s.settimeout(2)
        try:
            closed = s.recv(1) == b""
        except socket.timeout:
            closed = False
        print("ok" if ok and not closed else "refused")
        return
    if len(sys.argv) > 4:
        if not handshake(s, read_secret(sys.argv[4]), 2):
            print("handshake-refused")
    s.sendall(expire_frame())
    try:
        hdr = recv_exact(s, 4)
        if hdr is None:
            print("closed")
            return
        body = recv_exact(s, struct.unpack(">I", hdr)[0])
        # [2, rpc, status, ...]: status is a positive fixint 0 or a negative fixint
        st = body[3] if body[3] < 0x80 else body[3] - 256
        print("reply status=%d" % st)
    except (ConnectionResetError, socket.timeout):
        print("closed")

main()
