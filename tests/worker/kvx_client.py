#!/usr/bin/python3
"""kvx_client: a raw client of kvr-worker's KV side channel (worker/kv_xfer.h), for
worker_disagg. Prints the answer's status byte (or "closed" when the server closed without an
answer) and, with status 0, how many payload bytes followed.

  kvx_client.py PORT SECRET_FILE RID ENGINE_ID ID[,ID...]     a request MACed with SECRET_FILE
  kvx_client.py PORT --garbage                                 bytes that are not a request
"""
import hashlib
import hmac
import socket
import struct
import sys


def recv_exact(s, n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            return None
        b += c
    return b


def main():
    port = int(sys.argv[1])
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    hello = recv_exact(s, 36)
    if hello is None or hello[:4] != b"KVX1":
        print("no-hello")
        return
    ns = hello[4:]
    if sys.argv[2] == "--garbage":
        s.sendall(b"GET / HTTP/1.1\r\n\r\n")
    else:
        key = open(sys.argv[2], "rb").read().rstrip(b" \t\r\n")
        rid, eng = sys.argv[3].encode(), sys.argv[4].encode()
        ids = [int(x) for x in sys.argv[5].split(",") if x != ""]
        req = b"KVQ1" + struct.pack(">HHI", len(rid), len(eng), len(ids)) + rid + eng
        req += b"".join(struct.pack(">I", i) for i in ids)
        req += hmac.new(key, b"kvr-kvx-req\0" + ns + req, hashlib.sha256).digest()
        s.sendall(req)
    resp = recv_exact(s, 48)
    if resp is None:
        print("closed")
        return
    status = resp[4]
    bpb, n = struct.unpack(">II", resp[8:16])
    got = 0
    if status == 0:
        while True:
            c = s.recv(65536)
            if not c:
                break
            got += len(c)
            if got >= bpb * n:
                break
    print(status, got)


if __name__ == "__main__":
    main()
