#!/usr/bin/env python3
"""NATS NKEYs and JWTs for tests, written from the spec with python3-cryptography (not with
kvroute's own kvr_nkey, so the C code is checked against an independent implementation).

  nkeys.py user DIR NAME       -> DIR/NAME.seed, DIR/NAME.pub (a user NKEY)
  nkeys.py operator DIR        -> DIR/op.jwt, DIR/resolver.conf (operator + one account, for
                                  nats-server's MEMORY resolver), DIR/acct.seed
  nkeys.py creds DIR NAME      -> DIR/NAME.creds: a user of that account (JWT + seed)
"""
import base64, hashlib, json, os, sys, time

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

PREFIX = {"O": 14 << 3, "A": 0, "U": 20 << 3, "S": 18 << 3}


def crc16(data):
    crc = 0
    for b in data:
        crc ^= b << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
            crc &= 0xFFFF
    return crc


def b32(raw):
    return base64.b32encode(raw).decode().rstrip("=")


def encode(raw):
    c = crc16(raw)
    return b32(raw + bytes([c & 0xFF, c >> 8]))


def new_key(kind):
    seed = os.urandom(32)
    pub = Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes(
        encoding=Encoding.Raw, format=PublicFormat.Raw)
    p = PREFIX[kind]
    s = PREFIX["S"]
    seed_str = encode(bytes([s | (p >> 5), (p & 31) << 3]) + seed)
    pub_str = encode(bytes([p]) + pub)
    return seed, seed_str, pub_str


def b64u(b):
    return base64.urlsafe_b64encode(b).decode().rstrip("=")


def jwt(issuer_seed, issuer_pub, sub, name, nats):
    claims = {"iat": int(time.time()), "iss": issuer_pub, "name": name, "sub": sub, "nats": nats}
    claims["jti"] = b32(hashlib.sha256(json.dumps(claims, sort_keys=True).encode()).digest())
    head = b64u(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    body = b64u(json.dumps(claims).encode())
    sig = Ed25519PrivateKey.from_private_bytes(issuer_seed).sign(f"{head}.{body}".encode())
    return f"{head}.{body}.{b64u(sig)}"


def write(path, text):
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


def main():
    cmd, d = sys.argv[1], sys.argv[2]
    if cmd == "user":
        _, seed, pub = new_key("U")
        write(f"{d}/{sys.argv[3]}.seed", seed + "\n")
        write(f"{d}/{sys.argv[3]}.pub", pub + "\n")
    elif cmd == "operator":
        oseed, _, opub = new_key("O")
        aseed, aseed_s, apub = new_key("A")
        write(f"{d}/op.jwt", jwt(oseed, opub, opub, "op", {"type": "operator", "version": 2}))
        unl = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
               "wildcards": True, "conn": -1, "leaf": -1}
        # the users' account may use JetStream (a kvr_nats opens a JetStream connection too)
        js = dict(unl, mem_storage=-1, disk_storage=-1, streams=-1, consumer=-1)
        ajwt = jwt(oseed, opub, apub, "acct", {"limits": js, "type": "account", "version": 2})
        # JetStream in operator mode needs a system account
        _, _, spub = new_key("A")
        sjwt = jwt(oseed, opub, spub, "SYS", {"limits": unl, "type": "account", "version": 2})
        write(f"{d}/resolver.conf", f'system_account: {spub}\nresolver: MEMORY\n'
              f'resolver_preload: {{ {apub}: "{ajwt}", {spub}: "{sjwt}" }}\n')
        write(f"{d}/acct.seed", aseed_s + "\n")
        write(f"{d}/acct.raw", b64u(aseed) + "\n" + apub + "\n")
    elif cmd == "creds":
        raw, apub = open(f"{d}/acct.raw").read().split()
        aseed = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))
        _, useed, upub = new_key("U")
        ujwt = jwt(aseed, apub, upub, sys.argv[3],
                   {"pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1,
                    "type": "user", "version": 2})
        write(f"{d}/{sys.argv[3]}.creds",
              "-----BEGIN NATS USER JWT-----\n" + ujwt + "\n------END NATS USER JWT------\n\n"
              "************************* IMPORTANT *************************\n"
              "NKEY Seed printed below can be used to sign and prove identity.\n\n"
              "-----BEGIN USER NKEY SEED-----\n" + useed + "\n------END USER NKEY SEED------\n")
    else:
        sys.exit("usage: nkeys.py user|operator|creds DIR [NAME]")


if __name__ == "__main__":
    main()
