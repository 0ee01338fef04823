#!/usr/bin/env python3
"""Offline check of Kubernetes manifests against the real schemas vendored in schemas/.

  check_manifests.py FILE...            every document must be valid; exit 1 otherwise
  check_manifests.py --refused FILE...  every file must be refused, with the message its
                                        `# expect: TEXT` lines name (negative fixtures; a
                                        schema-valid file has its references checked alone)

What a document must pass (as `kubectl apply --validate=strict` against a cluster that has the
Gateway API v1.5.1, InferencePool v1.5.0 and Istio 1.30 DestinationRule CRDs installed would
check, see schemas/README.md):
  - its apiVersion + kind has a schema: Kubernetes 1.35's OpenAPI definitions, or a CRD's
    openAPIV3Schema; a kind without one is refused, never skipped;
  - JSON-schema validation (type, required, enum, pattern, min/max, ...) with jsonschema's
    Draft 4 validator, the dialect both OpenAPI v2 and CRD schemas are written in;
  - strict fields: an object schema that lists properties refuses any other field (Kubernetes'
    OpenAPI never says additionalProperties: false; the API server's strict field validation
    refuses unknown fields all the same), unless it says x-kubernetes-preserve-unknown-fields;
  - metadata is checked as ObjectMeta for every kind (CRDs only say "type: object"), and a
    name is required;
  - duplicate keys in a YAML mapping are refused (strict decoding does);
  - x-kubernetes-list-type map/set: no two items with the same keys / no equal items;
  - x-kubernetes-validations (CEL): evaluated by cel.py, a small evaluator of the CEL subset
    CRD rules use, on the document with the CRD's defaults applied (as the API server does);
    a rule outside that subset is listed as "not evaluated", never passed silently.
Kubernetes' own conversions are honoured: IntOrString takes an integer or a string, a
Quantity a number or a quantity string.

Then, over all the files given together (one namespace), the references a schema cannot see
and the API server accepts but that leave the deployment broken (references()): an HTTPRoute's
parent Gateway and backend InferencePool/Service exist; an InferencePool's endpoint picker is a
Service port and its selector/targetPorts match a workload's pods and container ports; a
Service's or NetworkPolicy's selector matches pods that have its target ports; a binding's
roleRef and ServiceAccount exist and some workload runs as that account; a pod's
serviceAccountName exists; an Istio DestinationRule's host is a Service. A GatewayClass is not looked for: the gateway implementation
installs it.
"""
import argparse
import copy
import glob
import json
import os
import sys

try:
    import jsonschema
    import yaml
except ImportError as e:  # scripts/setup installs python3-jsonschema and python3-yaml
    print("skipped: %s (Debian: python3-jsonschema python3-yaml)" % e)
    sys.exit(77)

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import cel  # noqa: E402  (tests/deploy/cel.py)

OBJECT_META = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
# The pattern controller-gen puts on CRD fields of type resource.Quantity (the grammar of
# apimachinery's quantity parser); Kubernetes' OpenAPI only says "string".
QUANTITY_RE = r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"


class UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping with the same key twice (PyYAML keeps the last one
    silently; the API server's strict decoding refuses it)."""


def _construct_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, "duplicate key %r" % (key,), key_node.start_mark)
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def strict(s, branch=False):
    """Schema s with additionalProperties: false on every object schema that lists properties
    and says nothing about other fields. Recurses through every subschema, but adds nothing
    inside allOf/anyOf/oneOf/not: a branch may list only some of the object's properties
    (structural schemas allow that), and closing it would refuse the others."""
    if isinstance(s, list):
        return [strict(x, branch) for x in s]
    if not isinstance(s, dict):
        return s
    out = {}
    for k, v in s.items():
        if k in ("properties", "definitions", "patternProperties") and isinstance(v, dict):
            out[k] = {n: strict(sub) for n, sub in v.items()}
        elif k in ("enum", "required", "default", "example", "x-kubernetes-validations",
                   "x-kubernetes-list-map-keys", "x-kubernetes-group-version-kind"):
            out[k] = v  # data, not subschemas
        elif k in ("allOf", "anyOf", "oneOf", "not"):
            out[k] = strict(v, True)
        else:
            out[k] = strict(v)
    if ("properties" in out and "additionalProperties" not in out and not branch
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def apply_defaults(schema, value):
    """Fill in the `default` of every absent property of a structural (CRD) schema, in place,
    as the API server does for custom resources."""
    if not isinstance(schema, dict):
        return
    if isinstance(value, dict):
        for n, sub in (schema.get("properties") or {}).items():
            if n not in value and isinstance(sub, dict) and "default" in sub:
                value[n] = copy.deepcopy(sub["default"])
            if n in value:
                apply_defaults(sub, value[n])
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for n, v in value.items():
                if n not in (schema.get("properties") or {}):
                    apply_defaults(extra, v)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for v in value:
            apply_defaults(schema["items"], v)


# the vendored CRD schemas (schemas/README.md)
CRD_FILES = ("gateway-api.json", "inferencepool.json", "istio.json")


class Schemas:
    """apiVersion + kind -> a schema in one root document, so $refs resolve across."""

    def __init__(self, folder):
        with open(os.path.join(folder, "kubernetes.json")) as f:
            defs = json.load(f)["definitions"]
        defs["io.k8s.apimachinery.pkg.util.intstr.IntOrString"] = {
            "anyOf": [{"type": "integer"}, {"type": "string"}]}
        defs["io.k8s.apimachinery.pkg.api.resource.Quantity"] = {
            "anyOf": [{"type": "number"}, {"type": "string", "pattern": QUANTITY_RE}]}
        self.kinds = {}  # (apiVersion, kind) -> definition name
        for name, d in defs.items():
            for gvk in d.get("x-kubernetes-group-version-kind", []):
                av = gvk["version"] if not gvk["group"] else gvk["group"] + "/" + gvk["version"]
                self.kinds[(av, gvk["kind"])] = name
        for crdfile in CRD_FILES:
            with open(os.path.join(folder, crdfile)) as f:
                for kind, k in json.load(f)["kinds"].items():
                    for version, schema in k["versions"].items():
                        av = k["group"] + "/" + version
                        name = "crd.%s.%s" % (av.replace("/", "."), kind)
                        schema = copy.deepcopy(schema)
                        # the API server validates a custom resource's metadata as ObjectMeta,
                        # and always takes apiVersion and kind, listed by the CRD or not
                        # (Gateway API's list them, Istio's do not)
                        props = schema.setdefault("properties", {})
                        props["metadata"] = {"$ref": "#/definitions/" + OBJECT_META}
                        props.setdefault("apiVersion", {"type": "string"})
                        props.setdefault("kind", {"type": "string"})
                        defs[name] = schema
                        self.kinds[(av, kind)] = name
        self.root = {"definitions": strict(defs)}
        self.not_evaluated = set()
        outer = self

        def cel_rules(validator, rules, instance, schema):
            for r in rules:
                try:
                    ok = cel.evaluate(r["rule"], instance)
                except cel.Unsupported as e:
                    outer.not_evaluated.add("%s (%s)" % (r["rule"], e))
                    continue
                except cel.EvalError as e:
                    yield jsonschema.ValidationError(
                        "CEL rule failed to evaluate: %s (%s)" % (e, r["rule"]))
                    continue
                if not ok:
                    yield jsonschema.ValidationError("CEL rule refused: %s (%s)" % (
                        r.get("message") or r.get("messageExpression", ""), r["rule"]))

        def list_type(validator, lt, instance, schema):
            if not validator.is_type(instance, "array"):
                return
            if lt == "set":
                seen = []
                for x in instance:
                    if x in seen:
                        yield jsonschema.ValidationError("duplicate item %r in a set list" % (x,))
                    seen.append(x)
            elif lt == "map":
                keys = schema.get("x-kubernetes-list-map-keys", [])
                seen = set()
                for x in instance:
                    if not isinstance(x, dict):
                        continue
                    k = tuple(json.dumps(x.get(n), sort_keys=True) for n in keys)
                    if k in seen:
                        yield jsonschema.ValidationError(
                            "duplicate entry %s in a list keyed by %s"
                            % (", ".join("%s=%s" % kv for kv in zip(keys, k)), keys))
                    seen.add(k)

        self.Validator = jsonschema.validators.extend(
            jsonschema.Draft4Validator,
            {"x-kubernetes-validations": cel_rules, "x-kubernetes-list-type": list_type})
        self.resolver = jsonschema.RefResolver.from_schema(self.root)

    def errors(self, doc):
        """Messages for one document, empty when it is valid."""
        if not isinstance(doc, dict):
            return ["a document must be a mapping, not %s" % type(doc).__name__]
        av, kind = doc.get("apiVersion"), doc.get("kind")
        if not isinstance(av, str) or not isinstance(kind, str):
            return ["apiVersion and kind are required"]
        name = self.kinds.get((av, kind))
        if name is None:
            return ["no schema for apiVersion %s kind %s (add it to schemas/refresh.py)"
                    % (av, kind)]
        out = []
        md = doc.get("metadata")
        if not isinstance(md, dict) or not (md.get("name") or md.get("generateName")):
            out.append("metadata.name is required")
        if name.startswith("crd."):
            # the API server defaults a custom resource from its schema before it validates
            # (CEL rules count on it: `self.kind == 'Service'` where kind defaults to Service)
            doc = copy.deepcopy(doc)
            apply_defaults(self.root["definitions"][name], doc)
        v = self.Validator({"$ref": "#/definitions/" + name}, resolver=self.resolver)
        for e in sorted(v.iter_errors(doc), key=lambda e: list(e.absolute_path)):
            where = ".".join(str(p) for p in e.absolute_path) or "(document)"
            out.append("%s: %s" % (where, e.message))
            for sub in e.context or []:  # anyOf/oneOf: say why each branch failed
                out.append("  %s: %s" % (".".join(str(p) for p in sub.absolute_path), sub.message))
        return out


WORKLOADS = {("apps/v1", "Deployment"), ("apps/v1", "StatefulSet"), ("apps/v1", "DaemonSet"),
             ("apps/v1", "ReplicaSet"), ("batch/v1", "Job")}


def references(docs):
    """Errors in the references between the documents of one namespace (what a schema cannot
    see, and the API server accepts, but leaves the deployment broken): each (label, doc)."""
    by = {}
    for label, d in docs:
        md = d["metadata"]
        by.setdefault(d["kind"], {})[md.get("name") or md.get("generateName")] = (label, d)
    pods = []  # (label, pod template labels, container ports, pod spec)
    for label, d in docs:
        if (d["apiVersion"], d["kind"]) in WORKLOADS:
            t = d["spec"]["template"]
            ports = [p for c in t["spec"].get("containers", []) for p in c.get("ports", [])]
            pods.append((label, (t.get("metadata") or {}).get("labels") or {}, ports, t["spec"]))
    out = []

    def select(match):
        return [p for p in pods if match and all(p[1].get(k) == v for k, v in match.items())]

    def has_port(selected, port):
        for _, _, ports, _ in selected:
            for p in ports:
                if port in (p.get("containerPort"), p.get("name")):
                    return True
        return False

    def service_port(label, what, name, number):
        svc = by.get("Service", {}).get(name)
        if svc is None:
            out.append("%s: %s names Service %s, which no manifest defines" % (label, what, name))
        elif number not in [p.get("port") for p in svc[1]["spec"].get("ports", [])]:
            out.append("%s: %s names port %s of Service %s, which has no such port"
                       % (label, what, number, name))

    for label, d in docs:
        kind, spec = d["kind"], d.get("spec") or {}
        if kind == "HTTPRoute":
            for pr in spec.get("parentRefs", []):
                if pr.get("kind", "Gateway") == "Gateway" and pr["name"] not in by.get("Gateway", {}):
                    out.append("%s: parentRef Gateway %s is defined by no manifest" % (label, pr["name"]))
            for rule in spec.get("rules", []):
                for br in rule.get("backendRefs", []):
                    k = br.get("kind", "Service")
                    if k == "InferencePool":
                        if br.get("group") != "inference.networking.k8s.io":
                            out.append("%s: backendRef InferencePool %s needs group "
                                       "inference.networking.k8s.io" % (label, br["name"]))
                        if br["name"] not in by.get("InferencePool", {}):
                            out.append("%s: backendRef InferencePool %s is defined by no "
                                       "manifest" % (label, br["name"]))
                    elif k == "Service" and not br.get("group"):
                        service_port(label, "backendRef", br["name"], br.get("port"))
        elif kind == "InferencePool":
            epp = spec.get("endpointPickerRef", {})
            if epp.get("kind", "Service") == "Service":
                service_port(label, "endpointPickerRef", epp.get("name"),
                             (epp.get("port") or {}).get("number"))
            selected = select(spec.get("selector", {}).get("matchLabels"))
            if not selected:
                out.append("%s: selector matches no workload's pods" % label)
            for tp in spec.get("targetPorts", []):
                if selected and not has_port(selected, tp.get("number")):
                    out.append("%s: targetPort %s is no container port of the selected pods"
                               % (label, tp.get("number")))
        elif kind == "Service" and spec.get("selector"):
            selected = select(spec["selector"])
            if not selected:
                out.append("%s: selector matches no workload's pods" % label)
            for p in spec.get("ports", []):
                tp = p.get("targetPort", p.get("port"))
                if selected and not has_port(selected, tp):
                    out.append("%s: port %s: targetPort %s is no container port of the selected "
                               "pods" % (label, p.get("name", p.get("port")), tp))
        elif kind == "NetworkPolicy":
            ps = spec.get("podSelector") or {}
            if not ps.get("matchLabels"):
                continue  # {} selects every pod; matchExpressions are not followed here
            selected = select(ps["matchLabels"])
            if not selected:
                out.append("%s: podSelector matches no workload's pods" % label)
            for rule in spec.get("ingress", []):
                for p in rule.get("ports", []):
                    if selected and "port" in p and not has_port(selected, p["port"]):
                        out.append("%s: ingress port %s is no container port of the selected "
                                   "pods" % (label, p["port"]))
        elif kind == "DestinationRule":
            # Istio reads a short host relative to the rule's namespace, and a FQDN as
            # NAME.NAMESPACE.svc.cluster.local; either way NAME must be a Service here.
            host = spec.get("host", "")
            name = host.split(".")[0]
            if host.count(".") not in (0, 4) or (host.count(".") == 4 and
                                                   not host.endswith(".svc.cluster.local")):
                out.append("%s: host %s is neither a short Service name nor "
                           "NAME.NAMESPACE.svc.cluster.local" % (label, host))
            elif name not in by.get("Service", {}):
                out.append("%s: host %s names Service %s, which no manifest defines"
                           % (label, host, name))
        elif kind in ("RoleBinding", "ClusterRoleBinding"):
            rr = d["roleRef"]
            if rr["kind"] not in by or rr["name"] not in by[rr["kind"]]:
                out.append("%s: roleRef %s %s is defined by no manifest" % (label, rr["kind"], rr["name"]))
            for sub in d.get("subjects", []):
                if sub["kind"] != "ServiceAccount":
                    continue
                if sub["name"] not in by.get("ServiceAccount", {}):
                    out.append("%s: subject ServiceAccount %s is defined by no manifest"
                               % (label, sub["name"]))
                elif not any(p[3].get("serviceAccountName") == sub["name"] for p in pods):
                    out.append("%s: subject ServiceAccount %s: no workload runs as it, so the "
                               "binding grants nothing anyone uses" % (label, sub["name"]))
    for label, _, _, ps in pods:
        sa = ps.get("serviceAccountName")
        if sa and sa not in by.get("ServiceAccount", {}):
            out.append("%s: serviceAccountName %s is defined by no manifest" % (label, sa))
    return out


def load(path):
    """(index, document) for every non-empty document of a YAML file."""
    with open(path) as f:
        text = f.read()
    docs = list(yaml.load_all(text, Loader=UniqueKeyLoader))
    return [(i, d) for i, d in enumerate(docs) if d is not None]


def check_file(schemas, path, valid=None):
    """Error lines for a file (a YAML error is one of them). Appends (label, document) of each
    valid document to `valid`."""
    try:
        docs = load(path)
    except yaml.YAMLError as e:
        return ["%s: YAML: %s" % (path, " ".join(str(e).split()))]
    if not docs:
        return ["%s: no document" % path]
    out = []
    for i, d in docs:
        label = "%s #%d %s/%s" % (path, i, d.get("kind", "?") if isinstance(d, dict) else "?",
                                  (d.get("metadata") or {}).get("name", "?")
                                  if isinstance(d, dict) else "?")
        errs = schemas.errors(d)
        out += ["%s: %s" % (label, m) for m in errs]
        if not errs and valid is not None:
            valid.append((label, d))
    return out


def expectations(path):
    with open(path) as f:
        return [line.split(":", 1)[1].strip() for line in f if line.startswith("# expect:")]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--schemas", default=os.path.join(HERE, "schemas"))
    ap.add_argument("--refused", action="store_true",
                    help="every file must be refused with its '# expect:' messages")
    ap.add_argument("--no-references", action="store_true",
                    help="skip the checks between documents (serviceAccountName, selectors, "
                    "ports, parentRefs, backendRefs, roleRef)")
    ap.add_argument("files", nargs="+", help="YAML files, or folders: their *.yaml")
    a = ap.parse_args()
    files = []
    for f in a.files:
        files += sorted(glob.glob(os.path.join(f, "*.yaml"))) if os.path.isdir(f) else [f]
    schemas = Schemas(a.schemas)
    passed = failed = 0
    valid = []
    for path in files:
        mine = []
        errs = check_file(schemas, path, mine)
        valid += mine
        if a.refused and not errs and not a.no_references:
            errs = references(mine)  # a fixture stands alone: its references, within itself
        if not a.refused:
            ok = not errs
            for e in errs:
                print("REFUSED " + e)
        else:
            want = expectations(path)
            missing = [w for w in want if not any(w in e for e in errs)]
            ok = bool(errs) and bool(want) and not missing
            for e in errs:
                print("  (expected) " + e)
            if not want:
                print("%s: no '# expect:' line" % path)
            for w in missing:
                print("%s: not refused with %r" % (path, w))
        print("%s %s" % ("ok  " if ok else "FAIL", path))
        passed += ok
        failed += not ok
    if not a.refused and not a.no_references:
        if failed:
            print("references: not checked (documents above were refused)")
        else:
            errs = references(valid)
            for e in errs:
                print("REFUSED " + e)
            print("%s references between the %d documents" % ("FAIL" if errs else "ok  ", len(valid)))
            passed += not errs
            failed += bool(errs)
    for r in sorted(schemas.not_evaluated):
        print("note: CEL rule not evaluated: %s" % r)
    print("%d passed, %d failed" % (passed, failed))
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
