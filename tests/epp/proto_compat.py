#!/usr/bin/python3
"""epp_proto_compat: every message of kvr-epp's pruned protos (epp/proto) exists in the real
protos (tests/epp/protos, Envoy's and gRPC's) under the same full name, and every field it
keeps has the same name, number, label and wire type there (an enum kept as int32 is the same
varint). Prints the mismatches and exits 1 on any."""
import os
import subprocess
import sys
import tempfile

from google.protobuf import descriptor_pb2 as d

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
REAL = os.path.join(HERE, "protos")
F = d.FieldDescriptorProto


def load(include, files):
    with tempfile.NamedTemporaryFile(suffix=".pb") as t:
        subprocess.run(["protoc", "-I", include, "-I", "/usr/include", "--include_imports",
                        "--descriptor_set_out=" + t.name] + files, check=True)
        fds = d.FileDescriptorSet()
        fds.ParseFromString(open(t.name, "rb").read())
    msgs = {}

    def walk(prefix, m):
        name = prefix + "." + m.name
        msgs[name] = m
        for n in m.nested_type:
            walk(name, n)
    for f in fds.file:
        for m in f.message_type:
            walk("." + f.package, m)
    return msgs


def wire(f):
    varint = {F.TYPE_INT32, F.TYPE_INT64, F.TYPE_UINT32, F.TYPE_UINT64, F.TYPE_BOOL, F.TYPE_ENUM}
    if f.type in varint:
        return "varint"
    if f.type in (F.TYPE_STRING, F.TYPE_BYTES):
        return "len"
    return f.type  # messages, fixed, sint: must match exactly


def main():
    ours_files = sorted("epp/proto/" + n for n in os.listdir(os.path.join(ROOT, "epp/proto"))
                        if n.endswith(".proto"))
    real_files = []
    for r, _, names in os.walk(REAL):
        real_files += [os.path.relpath(os.path.join(r, n), REAL) for n in names if n.endswith(".proto")]
    ours = load(ROOT, ours_files)
    real = load(REAL, real_files)
    bad, checked = [], 0
    for name, m in ours.items():
        if name.startswith(".google.protobuf."):
            continue
        if name not in real:
            bad.append("%s: no such message in the real protos" % name)
            continue
        rf = {f.number: f for f in real[name].field}
        for f in m.field:
            checked += 1
            g = rf.get(f.number)
            if g is None:
                bad.append("%s.%s = %d: no field with that number" % (name, f.name, f.number))
            elif g.name != f.name or g.label != f.label or wire(g) != wire(f) or \
                    (f.type == F.TYPE_MESSAGE and g.type_name.split(".")[-1] != f.type_name.split(".")[-1]):
                bad.append("%s.%s = %d: real is %s %s (type %d %s)" % (
                    name, f.name, f.number, g.name, g.label, g.type, g.type_name))
            elif f.type == F.TYPE_INT32 and g.type == F.TYPE_ENUM:
                pass  # an enum kept as int32: same varint
    for b in bad:
        print("MISMATCH", b)
    print("checked %d fields of %d messages: %d mismatches" % (checked, len(ours), len(bad)))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
