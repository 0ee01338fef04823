#!/usr/bin/env python3
"""render_ref.py MODEL_DIR CONV.json | MODEL_DIR -o OUTDIR CONV...: the reference rendering, jinja2 configured as
transformers' apply_chat_template configures it (chat_template_utils._compile_jinja_template:
ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[AssistantTracker,
loopcontrols]), its tojson filter, raise_exception and strftime_now globals)."""
import json, sys
from datetime import datetime
import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment


class Generation(Extension):
    # transformers' AssistantTracker: {% generation %}...{% endgeneration %} renders its body
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_gen"), [], [], body).set_lineno(lineno)

    def _gen(self, caller):
        return caller()


def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def strftime_now(fmt):
    return datetime.now().strftime(fmt)


def render(d, conv_path):
    cfg = json.load(open(d + "/tokenizer_config.json", encoding="utf-8"))
    conv = json.load(open(conv_path, encoding="utf-8"))
    tmpl = cfg["chat_template"]
    tools = conv.get("tools")
    if isinstance(tmpl, list):
        named = {t["name"]: t["template"] for t in tmpl}
        tmpl = named["tool_use"] if tools is not None and "tool_use" in named else named["default"]
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    special = {}
    for k in ("bos_token", "eos_token", "unk_token", "pad_token"):
        v = cfg.get(k)
        if isinstance(v, dict):
            v = v.get("content")
        if isinstance(v, str):
            special[k] = v
    kwargs = {**special, **(conv.get("chat_template_kwargs") or {})}
    try:
        out = env.from_string(tmpl).render(messages=conv["messages"], tools=tools,
                                           documents=conv.get("documents"),
                                           add_generation_prompt=bool(conv.get("add_generation_prompt")),
                                           **kwargs)
    except Exception:  # the C renderer must refuse it too: both print ERROR
        out = "ERROR\n"
    return out


def main():
    # render_ref.py MODEL_DIR CONV.json: to stdout. render_ref.py MODEL_DIR -o OUTDIR CONV...:
    # each to OUTDIR/<conv file name> (one interpreter start for many conversations).
    d = sys.argv[1]
    if len(sys.argv) > 3 and sys.argv[2] == "-o":
        for c in sys.argv[4:]:
            with open(sys.argv[3] + "/" + c.rsplit("/", 1)[-1], "w", encoding="utf-8") as f:
                f.write(render(d, c))
    else:
        sys.stdout.write(render(d, sys.argv[2]))


main()
