#!/usr/bin/env python3
"""cel.py against the vendored CRDs' own rules: every rule parses, and chosen rules give CEL's
answers on inputs that pass and inputs that break them (each case was worked out from the
cel-spec semantics: errors absorbed by && and ||, has() on absent fields, exists_one)."""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import cel  # noqa: E402

passed = failed = 0


def check(name, got, want):
    global passed, failed
    if got == want:
        passed += 1
    else:
        failed += 1
        print("FAIL %s: got %r, want %r" % (name, got, want))


def ev(rule, value):
    try:
        return cel.evaluate(rule, value)
    except cel.EvalError as e:
        return "error: %s" % e


# 1. every rule of the vendored CRDs parses (transition rules aside: they run on update only)
rules = set()


def walk(s):
    if isinstance(s, dict):
        for r in s.get("x-kubernetes-validations", []):
            rules.add(r["rule"])
        for v in s.values():
            walk(v)
    elif isinstance(s, list):
        for v in s:
            walk(v)


for f in ("gateway-api.json", "inferencepool.json", "istio.json"):
    with open(os.path.join(HERE, "schemas", f)) as fh:
        walk(json.load(fh))
for r in sorted(rules):
    if "oldSelf" in r:
        continue
    try:
        cel._Parser(r).parse()
        passed += 1
    except cel.Unsupported as e:
        failed += 1
        print("FAIL parse %r: %s" % (r, e))
check("rules found", len(rules) > 50, True)

# 2. the InferencePool's rules
PORT = "self.kind != 'Service' || has(self.port)"
check("epp port present", ev(PORT, {"kind": "Service", "name": "e", "port": {"number": 9002}}), True)
check("epp port absent", ev(PORT, {"kind": "Service", "name": "e"}), False)
check("epp other kind", ev(PORT, {"kind": "Other", "name": "e"}), True)
UNIQ = "self.all(p1, self.exists_one(p2, p1.number==p2.number))"
check("ports unique", ev(UNIQ, [{"number": 1}, {"number": 2}]), True)
check("ports repeated", ev(UNIQ, [{"number": 1}, {"number": 2}, {"number": 1}]), False)
check("ports empty", ev(UNIQ, []), True)

# 3. HTTPRoute's
PATH_SLASH = "(self.type in ['Exact','PathPrefix']) ? self.value.startsWith('/') : true"
check("path /v1/", ev(PATH_SLASH, {"type": "PathPrefix", "value": "/v1/"}), True)
check("path v1/", ev(PATH_SLASH, {"type": "PathPrefix", "value": "v1/"}), False)
check("path regex", ev(PATH_SLASH, {"type": "RegularExpression", "value": "v1.*"}), True)
PATH_RE = ("(self.type in ['Exact','PathPrefix']) ? self.value.matches(r\"\"\"^(?:[-A-Za-z0-9/._~!$&'()*+,;=:@]|[%][0-9a-fA-F]{2})+$\"\"\") : true")
check("path chars ok", ev(PATH_RE, {"type": "Exact", "value": "/v1/chat%20x"}), True)
check("path chars bad", ev(PATH_RE, {"type": "Exact", "value": "/v1/a b"}), False)
check("path //", ev("(self.type in ['Exact','PathPrefix']) ? !self.value.contains('//') : true",
                    {"type": "PathPrefix", "value": "/v1//x"}), False)
BACKEND = "(size(self.group) == 0 && self.kind == 'Service') ? has(self.port) : true"
check("service backend without port", ev(BACKEND, {"group": "", "kind": "Service", "name": "s"}), False)
check("pool backend", ev(BACKEND, {"group": "inference.networking.k8s.io", "kind": "InferencePool",
                                   "name": "p"}), True)
TIMEOUT = ("!(has(self.request) && has(self.backendRequest) && duration(self.request) != "
           "duration('0s') && duration(self.backendRequest) > duration(self.request))")
check("timeouts ok", ev(TIMEOUT, {"request": "300s", "backendRequest": "1m"}), True)
check("timeouts backend longer", ev(TIMEOUT, {"request": "1m", "backendRequest": "1h30m"}), False)
check("timeouts request 0s", ev(TIMEOUT, {"request": "0s", "backendRequest": "1h"}), True)
check("timeouts only request", ev(TIMEOUT, {"request": "300s"}), True)
PARENTS = [r for r in rules if r.startswith("self.all(p1, self.exists_one(p2, p1.group == p2.group")][0]
a = {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "gw"}
b = dict(a, sectionName="http")
check("parents distinct", ev(PARENTS, [a, dict(a, name="other")]), True)
check("parents repeated", ev(PARENTS, [a, dict(a)]), False)
check("parents by section", ev(PARENTS, [b, dict(b, sectionName="https")]), True)
check("namespace escape", ev("has(self.__namespace__) && self.__namespace__ == 'x'",
                             {"namespace": "x"}), True)
KEYS = "self.all(key, key.split(\"/\")[0].size() < 253)"
check("label keys", ev(KEYS, {"app": "a", "example.com/x": "b"}), True)
check("label key too long", ev(KEYS, {"a" * 300 + "/x": "b"}), False)
# CEL's error absorption: a missing field on one side of || is forgiven when the other decides
check("|| absorbs", ev("self.missing == 1 || true", {}), True)
check("&& absorbs", ev("self.missing == 1 && false", {}), False)
check("missing field", ev("self.missing == 1", {}), "error: no such key: missing")
check("exists_one", ev("self.exists_one(x, x > 1)", [1, 2, 3]), False)
check("filter size", ev("self.filter(f, f.type == 'CORS').size() <= 1",
                        [{"type": "CORS"}, {"type": "CORS"}]), False)
try:
    cel.evaluate("self.foo()", {})
    check("unsupported method", "no exception", "Unsupported")
except cel.Unsupported:
    check("unsupported method", "Unsupported", "Unsupported")

print("%d passed, %d failed" % (passed, failed))
sys.exit(1 if failed else 0)
