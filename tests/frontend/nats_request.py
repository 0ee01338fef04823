#!/usr/bin/python3
"""One raw NATS request (its own protocol code, not kvroute's), for tests.

  nats_request.py NATS_URL SUBJECT PAYLOAD [TIMEOUT_S]

Prints the reply payload; exit 1 on a timeout or no responders."""
import socket, sys, time, urllib.parse


def main():
    u = urllib.parse.urlsplit(sys.argv[1])
    subj, payload = sys.argv[2], sys.argv[3].encode()
    timeout = float(sys.argv[4]) if len(sys.argv) > 4 else 5.0
    s = socket.create_connection((u.hostname, u.port or 4222), timeout=timeout)
    f = s.makefile("rb")
    f.readline()  # INFO
    inbox = "_INBOX.test.%d" % time.monotonic_ns()
    s.sendall(b'CONNECT {"verbose":false,"pedantic":false,"headers":true,"no_responders":true,'
              b'"protocol":1,"name":"nats-request-test"}\r\n')
    s.sendall(("SUB %s 1\r\n" % inbox).encode())
    s.sendall(("PUB %s %s %d\r\n" % (subj, inbox, len(payload))).encode() + payload + b"\r\n")
    while True:
        line = f.readline().decode()
        if not line:
            sys.exit(1)
        if line.startswith("PING"):
            s.sendall(b"PONG\r\n")
        elif line.startswith("HMSG"):  # no responders: a header-only status message
            n = int(line.split()[-1])
            f.read(n + 2)
            print("no responders")
            sys.exit(1)
        elif line.startswith("MSG"):
            n = int(line.split()[-1])
            sys.stdout.write(f.read(n).decode())
            print()
            return


if __name__ == "__main__":
    try:
        main()
    except socket.timeout:
        print("timeout")
        sys.exit(1)
