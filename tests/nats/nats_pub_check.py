#!/usr/bin/env python3
"""A raw NATS client (its own code, not kvroute's) for permission checks.

  nats_pub_check.py HOST PORT SEED_FILE SUBJECT...

Connects with the NKEY seed (signs the INFO nonce with python3-cryptography), publishes one
message on each subject, then PING; prints "allowed SUBJECT" or "denied SUBJECT" per subject
from whether the server answered -ERR 'Permissions Violation for Publish to ...' before PONG.
A SUBJECT written "sub:S" is subscribed to instead, in a queue group as a thief would join the
routers' groups ("SUB S kvr-check N"), and judged by 'Permissions Violation for Subscription
to ...'; the line printed keeps the "sub:" prefix.
Exit 3 when the connection itself is refused."""
import base64, json, socket, sys

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from nkeys import encode  # same directory: the NKEY text encoding (base32 + CRC16) lives there


def main():
    host, port, seed_file, subjects = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
    seed = open(seed_file).read().strip()
    raw = base64.b32decode(seed + "=" * (-len(seed) % 8))
    key = Ed25519PrivateKey.from_private_bytes(raw[2:34])
    pub = bytes([20 << 3]) + key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    pub_s = encode(pub)
    s = socket.create_connection((host, port), timeout=5)
    f = s.makefile("rb")
    info = json.loads(f.readline().decode()[5:])
    sig = base64.urlsafe_b64encode(key.sign(info["nonce"].encode())).decode().rstrip("=")
    connect = {"verbose": False, "pedantic": False, "nkey": pub_s, "sig": sig, "lang": "py",
               "version": "test", "protocol": 1, "name": "perm-check"}
    s.sendall(f"CONNECT {json.dumps(connect)}\r\nPING\r\n".encode())
    line = f.readline().decode()
    if not line.startswith("PONG"):
        print("refused", line.strip())
        sys.exit(3)
    for sid, arg in enumerate(subjects, 1):
        if arg.startswith("sub:"):
            subj, what = arg[4:], "Subscription to"
            s.sendall(f"SUB {subj} kvr-check {sid}\r\nPING\r\n".encode())
        else:
            subj, what = arg, "Publish to"
            s.sendall(f"PUB {subj} 5\r\nforge\r\nPING\r\n".encode())
        denied = False
        while True:
            line = f.readline().decode()
            if not line:
                print("closed")
                sys.exit(3)
            if line.startswith("PONG"):
                break
            if f"Permissions Violation for {what}" in line and f'"{subj}"' in line:
                denied = True
        print(("denied " if denied else "allowed ") + arg)


if __name__ == "__main__":
    main()
