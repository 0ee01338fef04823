#!/usr/bin/python3
"""A stand-in for the Kubernetes API server's Deployment and StatefulSet scale subresource, over HTTPS with a
certificate from a CA the test made. It checks what a real API server checks for this call
(bearer token, method, path, merge-patch content type, body shape) and records every request.

  fake_kube.py PORTFILE CERT KEY TOKEN_FILE LOG PLAN

PLAN: comma-separated actions, one per PATCH in order, the last repeating: a status code
(200 answers the Scale object), 'hang' (never answer), 'rotate' (write a new token into
TOKEN_FILE, then answer 401: the old one is no longer valid)."""
import http.server, json, os, re, ssl, sys, threading, time

portfile, cert, key, token_file, log, plan = sys.argv[1:7]
plan = plan.split(",")
state = {"n": 0, "token": open(token_file).read().strip()}
lock = threading.Lock()
PATH = re.compile(r"^/apis/apps/v1/namespaces/([a-z0-9.-]+)/(?:deployments|statefulsets)/([a-z0-9.-]+)/scale$")


class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def answer(self, code, obj):
        b = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(b)))
        self.end_headers()
        self.wfile.write(b)

    def do_PATCH(self):
        n = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(n)
        with lock:
            action = plan[min(state["n"], len(plan) - 1)]
            state["n"] += 1
            token = state["token"]
        auth = self.headers.get("Authorization", "")
        m = PATH.match(self.path)
        rec = {"path": self.path, "ctype": self.headers.get("Content-Type"),
               "auth_ok": auth == "Bearer " + token, "body": body.decode(errors="replace"),
               "action": action}
        with open(log, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if action == "hang":
            time.sleep(30)
            return
        if action == "rotate":
            with lock:
                state["token"] = "rotated-" + os.urandom(8).hex()
                tmp = token_file + ".tmp"
                with open(tmp, "w") as f:
                    f.write(state["token"] + "\n")
                os.replace(tmp, token_file)
            return self.answer(401, {"kind": "Status", "code": 401, "reason": "Unauthorized"})
        if not rec["auth_ok"]:
            return self.answer(401, {"kind": "Status", "code": 401, "reason": "Unauthorized"})
        if not m or rec["ctype"] != "application/merge-patch+json":
            return self.answer(415 if m else 404, {"kind": "Status", "code": 400})
        try:
            reps = json.loads(body)["spec"]["replicas"]
            assert isinstance(reps, int) and reps >= 0
        except Exception:
            return self.answer(422, {"kind": "Status", "code": 422})
        code = int(action)
        if code != 200:
            return self.answer(code, {"kind": "Status", "code": code})
        spec = {"replicas": reps} if reps else {}  # omitempty, as the real API does
        self.answer(200, {"kind": "Scale", "apiVersion": "autoscaling/v1",
                          "metadata": {"name": m.group(2), "namespace": m.group(1)},
                          "spec": spec, "status": {"replicas": 0}})


srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
srv.daemon_threads = True
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
with open(portfile + ".tmp", "w") as f:
    f.write(str(srv.server_address[1]))
os.replace(portfile + ".tmp", portfile)
srv.serve_forever()
