#!/usr/bin/env python3
"""Rebuild the vendored, pruned schemas in this folder from upstream files.

Usage: refresh.py UPSTREAM_DIR [OUTPUT...]
UPSTREAM_DIR holds the unmodified upstream files named in README.md (swagger.json and the CRD
YAMLs). The output is deterministic (sorted keys, fixed indentation), so running this on the
files of the same tags reproduces the committed JSON byte for byte; that is how a reader checks
that nothing was edited by hand. Given OUTPUT names (kubernetes.json, istio.json, ...), only
those are rebuilt, and only their upstream files are needed.

Pruning keeps what validation needs and drops what it does not:
  - Kubernetes: only the definitions reachable through $ref from the kinds in K8S_KINDS.
  - CRDs: only the openAPIV3Schema of the versions in CRD_VERSIONS.
  - everywhere: the `description` texts (prose, most of the bytes), nothing else.
"""
import hashlib
import json
import os
import sys

import yaml

# (group, version, kind) of the Kubernetes types the manifests in deploy/kubernetes may use.
# Add a kind here (and rerun) before a manifest uses it: the check refuses kinds it has no
# schema for.
K8S_KINDS = [
    ("", "v1", "Service"),
    ("", "v1", "ServiceAccount"),
    ("", "v1", "ConfigMap"),
    ("", "v1", "Secret"),
    ("apps", "v1", "Deployment"),
    ("apps", "v1", "StatefulSet"),
    ("networking.k8s.io", "v1", "NetworkPolicy"),
    ("policy", "v1", "PodDisruptionBudget"),
    ("rbac.authorization.k8s.io", "v1", "Role"),
    ("rbac.authorization.k8s.io", "v1", "RoleBinding"),
    ("rbac.authorization.k8s.io", "v1", "ClusterRole"),
    ("rbac.authorization.k8s.io", "v1", "ClusterRoleBinding"),
]
K8S_SOURCE = {
    "file": "swagger.json",
    "repo": "kubernetes-client/python",
    "path": "kubernetes/swagger.json.unprocessed",
    "tag": "v35.0.0",
    "commit": "ce36f0b893ab125afab3c8a204284d278747fed3",
    "note": "the unmodified api/openapi-spec/swagger.json of kubernetes/kubernetes "
            "release-1.35 (OpenAPI v2), as the Python client vendors it",
}
GW = {"repo": "kubernetes-sigs/gateway-api", "tag": "v1.5.1",
      "commit": "e7677b70ae75d14a4448fba94870e7deea6cf0ad"}
GIE = {"repo": "kubernetes-sigs/gateway-api-inference-extension", "tag": "v1.5.0",
       "commit": "df9f8909fe06fe2dfd4a6fc0bd0c01a0acabf849"}
ISTIO = {"repo": "istio/api", "tag": "v1.30.3",
         "commit": "2e43f07b30b6744bc8252fce39fb58b03f85ff8b"}
# output name -> (upstream source, CRD file, versions kept)
CRD_VERSIONS = {
    "gateway-api.json": [
        (GW, "config/crd/standard/gateway.networking.k8s.io_gatewayclasses.yaml", ["v1"]),
        (GW, "config/crd/standard/gateway.networking.k8s.io_gateways.yaml", ["v1"]),
        (GW, "config/crd/standard/gateway.networking.k8s.io_httproutes.yaml", ["v1"]),
    ],
    "inferencepool.json": [
        (GIE, "config/crd/bases/inference.networking.k8s.io_inferencepools.yaml", ["v1"]),
    ],
    # Istio ships all its CRDs in one multi-document file: the fourth item names the one kept.
    "istio.json": [
        (ISTIO, "kubernetes/customresourcedefinitions.gen.yaml", ["v1"],
         "destinationrules.networking.istio.io"),
    ],
}

SCHEMA_MAPS = ("properties", "definitions", "patternProperties")
SCHEMA_LISTS = ("allOf", "anyOf", "oneOf")
SCHEMA_ONE = ("items", "additionalProperties", "not")


def strip(s):
    """A copy of schema s without its description texts. Property *names* are kept even when
    a property is called "description": only the keyword is dropped."""
    if not isinstance(s, dict):
        return s
    out = {}
    for k, v in s.items():
        if k == "description":
            continue
        if k in SCHEMA_MAPS and isinstance(v, dict):
            out[k] = {n: strip(sub) for n, sub in v.items()}
        elif k in SCHEMA_LISTS and isinstance(v, list):
            out[k] = [strip(sub) for sub in v]
        elif k in SCHEMA_ONE and isinstance(v, dict):
            out[k] = strip(v)
        else:
            out[k] = v
    return out


def refs(s, found):
    if isinstance(s, dict):
        r = s.get("$ref")
        if isinstance(r, str) and r.startswith("#/definitions/"):
            found.add(r[len("#/definitions/"):])
        for v in s.values():
            refs(v, found)
    elif isinstance(s, list):
        for v in s:
            refs(v, found)


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def dump(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")


def kubernetes(up, here):
    src = os.path.join(up, K8S_SOURCE["file"])
    with open(src) as f:
        defs = json.load(f)["definitions"]
    roots = []
    for name, d in defs.items():
        for gvk in d.get("x-kubernetes-group-version-kind", []):
            if (gvk["group"], gvk["version"], gvk["kind"]) in K8S_KINDS:
                roots.append(name)
    missing = set(K8S_KINDS) - {(g["group"], g["version"], g["kind"]) for n in roots
                                for g in defs[n]["x-kubernetes-group-version-kind"]}
    if missing:
        sys.exit("refresh: not in swagger.json: %s" % sorted(missing))
    keep, todo = set(), list(roots)
    while todo:
        n = todo.pop()
        if n in keep:
            continue
        keep.add(n)
        found = set()
        refs(defs[n], found)
        todo.extend(found - keep)
    source = dict(K8S_SOURCE, sha256=sha256(src))
    dump(os.path.join(here, "kubernetes.json"),
         {"source": source, "definitions": {n: strip(defs[n]) for n in sorted(keep)}})


def load_crd(local, name):
    with open(local) as f:
        if name is None:
            return yaml.safe_load(f)
        for d in yaml.safe_load_all(f):
            if d and d.get("metadata", {}).get("name") == name:
                return d
    sys.exit("refresh: %s holds no CRD %s" % (local, name))


def crds(up, here, only=None):
    for out, entries in CRD_VERSIONS.items():
        if only and out not in only:
            continue
        kinds = {}
        for entry in entries:
            src, path, versions = entry[:3]
            local = os.path.join(up, os.path.basename(path))
            crd = load_crd(local, entry[3] if len(entry) > 3 else None)
            spec = crd["spec"]
            kept = {}
            for v in spec["versions"]:
                if v["name"] in versions:
                    kept[v["name"]] = strip(v["schema"]["openAPIV3Schema"])
            if sorted(kept) != sorted(versions):
                sys.exit("refresh: %s lacks versions %s" % (path, versions))
            kinds[spec["names"]["kind"]] = {
                "group": spec["group"],
                "scope": spec["scope"],
                "source": dict(src, path=path, sha256=sha256(local)),
                "versions": kept,
            }
        dump(os.path.join(here, out), {"kinds": kinds})


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    here = os.path.dirname(os.path.abspath(__file__))
    only = sys.argv[2:]  # output names (e.g. istio.json): rebuild just those
    if not only or "kubernetes.json" in only:
        kubernetes(sys.argv[1], here)
    crds(sys.argv[1], here, only)


if __name__ == "__main__":
    main()
