"""A small evaluator for the subset of CEL that CRD validation rules (x-kubernetes-validations)
use: literals, field access, has(), size(), in, ?:, && || !, comparisons, + - * / %, indexing,
the string methods contains/startsWith/endsWith/matches/split, duration(), and the macros all,
exists, exists_one, filter, map. No cluster and no CEL library here (Debian has none for
Python); the vendored CRDs' rules stay within this subset, and a rule outside it raises
Unsupported so the checker reports it as not evaluated instead of guessing.

  evaluate(rule, self_value) -> bool      raises Unsupported or EvalError

Semantics followed (cel-spec): && and || absorb an error on one side when the other side
decides; selecting a missing field is an error (has() is how rules test presence); regexes are
RE2, searched unanchored (Python's re agrees on the patterns used here).
"""
import re

RESERVED = {"namespace", "package", "as", "break", "const", "continue", "else", "for",
            "function", "if", "import", "let", "loop", "return", "var", "void", "while"}
MACROS = {"all", "exists", "exists_one", "filter", "map"}


class Unsupported(Exception):
    """The rule uses CEL this evaluator does not implement."""


class EvalError(Exception):
    """The rule's evaluation failed (CEL: an error value, e.g. a missing field)."""


_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<str>[rR]?("{3}|'{3}|"|')) 
  | (?P<num>\d+\.\d+|\d+[uU]?)
  | (?P<id>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op>&&|\|\||==|!=|<=|>=|[<>!+\-*/%?:.,()\[\]{}])
""", re.X)


def _tokens(src):
    i, out = 0, []
    while i < len(src):
        m = _TOKEN.match(src, i)
        if not m:
            raise Unsupported("cannot tokenize at %r" % src[i:i + 10])
        kind = m.lastgroup
        if kind == "ws":
            i = m.end()
        elif kind == "str":
            raw = m.group("str")[0] in "rR"
            quote = m.group(3)
            j = m.end()
            end = src.find(quote, j)
            while end != -1 and not raw and len(quote) == 1 and src[end - 1] == "\\":
                end = src.find(quote, end + 1)
            if end == -1:
                raise Unsupported("unterminated string")
            text = src[j:end]
            if not raw:
                text = re.sub(r"\\(.)", lambda e: {"n": "\n", "t": "\t"}.get(e.group(1), e.group(1)), text)
            out.append(("str", text))
            i = end + len(quote)
        elif kind == "num":
            t = m.group("num")
            out.append(("num", float(t) if "." in t else int(t.rstrip("uU"))))
            i = m.end()
        else:
            out.append((kind, m.group(kind)))
            i = m.end()
    out.append(("end", None))
    return out


class _Parser:
    def __init__(self, src):
        self.t = _tokens(src)
        self.i = 0

    def peek(self, value=None):
        k, v = self.t[self.i]
        if value is None:
            return k, v
        return (k in ("op", "id")) and v == value

    def take(self, value=None):
        k, v = self.t[self.i]
        if value is not None and not ((k in ("op", "id")) and v == value):
            raise Unsupported("expected %r, got %r" % (value, v))
        self.i += 1
        return k, v

    def parse(self):
        e = self.ternary()
        if self.peek()[0] != "end":
            raise Unsupported("trailing %r" % (self.peek()[1],))
        return e

    def ternary(self):
        c = self.or_()
        if self.peek("?"):
            self.take("?")
            a = self.ternary()
            self.take(":")
            b = self.ternary()
            return ("?", c, a, b)
        return c

    def or_(self):
        e = self.and_()
        while self.peek("||"):
            self.take()
            e = ("||", e, self.and_())
        return e

    def and_(self):
        e = self.rel()
        while self.peek("&&"):
            self.take()
            e = ("&&", e, self.rel())
        return e

    def rel(self):
        e = self.add()
        while True:
            k, v = self.peek()
            if (k == "op" and v in ("==", "!=", "<", "<=", ">", ">=")) or (k == "id" and v == "in"):
                self.take()
                e = ("bin", v, e, self.add())
            else:
                return e

    def add(self):
        e = self.mul()
        while self.peek("+") or self.peek("-"):
            _, v = self.take()
            e = ("bin", v, e, self.mul())
        return e

    def mul(self):
        e = self.unary()
        while self.peek("*") or self.peek("/") or self.peek("%"):
            _, v = self.take()
            e = ("bin", v, e, self.unary())
        return e

    def unary(self):
        if self.peek("!"):
            self.take()
            return ("!", self.unary())
        if self.peek("-"):
            self.take()
            return ("neg", self.unary())
        return self.member()

    def args(self):
        self.take("(")
        out = []
        if not self.peek(")"):
            out.append(self.ternary())
            while self.peek(","):
                self.take()
                out.append(self.ternary())
        self.take(")")
        return out

    def member(self):
        e = self.primary()
        while True:
            if self.peek("."):
                self.take()
                _, name = self.take()
                if self.peek("("):
                    e = ("call", name, e, self.args())
                else:
                    e = ("field", e, name)
            elif self.peek("["):
                self.take()
                idx = self.ternary()
                self.take("]")
                e = ("index", e, idx)
            else:
                return e

    def primary(self):
        k, v = self.take()
        if k in ("str", "num"):
            return ("lit", v)
        if k == "id":
            if v in ("true", "false"):
                return ("lit", v == "true")
            if v == "null":
                return ("lit", None)
            if self.peek("("):
                return ("call", v, None, self.args())
            return ("var", v)
        if v == "(":
            e = self.ternary()
            self.take(")")
            return e
        if v == "[":
            items = []
            if not self.peek("]"):
                items.append(self.ternary())
                while self.peek(","):
                    self.take()
                    items.append(self.ternary())
            self.take("]")
            return ("list", items)
        raise Unsupported("unexpected %r" % (v,))


_DUR = re.compile(r"(\d+(?:\.\d+)?)(h|ms|us|µs|ns|m|s)")
_DUR_NS = {"h": 3600e9, "m": 60e9, "s": 1e9, "ms": 1e6, "us": 1e3, "µs": 1e3, "ns": 1}


class Duration(float):
    pass


def _duration(s):
    if not isinstance(s, str):
        raise EvalError("duration() of a non-string")
    neg = s.startswith("-")
    body = s.lstrip("+-")
    if body == "0":
        return Duration(0)
    parts = _DUR.findall(body)
    if not parts or "".join(a + b for a, b in parts) != body:
        raise EvalError("bad duration %r" % s)
    ns = sum(float(a) * _DUR_NS[b] for a, b in parts)
    return Duration(-ns if neg else ns)


def _field(obj, name):
    if isinstance(obj, dict):
        if name not in obj:
            raise EvalError("no such key: %s" % name)
        return obj[name]
    raise EvalError("field %s of a %s" % (name, type(obj).__name__))


def _name(n):
    if n.startswith("__") and n.endswith("__") and n[2:-2] in RESERVED:
        return n[2:-2]
    return n


def _ev(e, env):
    op = e[0]
    if op == "lit":
        return e[1]
    if op == "var":
        if e[1] not in env:
            raise Unsupported("unknown variable %s" % e[1])
        return env[e[1]]
    if op == "list":
        return [_ev(x, env) for x in e[1]]
    if op == "field":
        return _field(_ev(e[1], env), _name(e[2]))
    if op == "index":
        obj, idx = _ev(e[1], env), _ev(e[2], env)
        try:
            return obj[idx]
        except (IndexError, KeyError, TypeError):
            raise EvalError("index %r out of range" % (idx,))
    if op == "!":
        v = _ev(e[1], env)
        if not isinstance(v, bool):
            raise EvalError("! of a non-bool")
        return not v
    if op == "neg":
        return -_ev(e[1], env)
    if op in ("&&", "||"):
        decide = op == "||"  # the value of one side that decides the whole
        err = None
        for side in (e[1], e[2]):
            try:
                v = _ev(side, env)
            except EvalError as x:
                err = x
                continue
            if v is decide:
                return decide
        if err:
            raise err
        return not decide
    if op == "?":
        c = _ev(e[1], env)
        if not isinstance(c, bool):
            raise EvalError("condition is not a bool")
        return _ev(e[2] if c else e[3], env)
    if op == "bin":
        o, a, b = e[1], _ev(e[2], env), _ev(e[3], env)
        if o == "==":
            return a == b
        if o == "!=":
            return a != b
        if o == "in":
            if isinstance(b, (list, dict)):
                return a in b
            raise EvalError("in of a %s" % type(b).__name__)
        try:
            if o == "<":
                return a < b
            if o == "<=":
                return a <= b
            if o == ">":
                return a > b
            if o == ">=":
                return a >= b
            if o == "+":
                return a + b
            if o == "-":
                return a - b
            if o == "*":
                return a * b
            if o == "/":
                return a // b if isinstance(a, int) and isinstance(b, int) else a / b
            if o == "%":
                return a % b
        except (TypeError, ZeroDivisionError) as x:
            raise EvalError(str(x))
    if op == "call":
        return _call(e[1], e[2], e[3], env)
    raise Unsupported("node %s" % op)


def _call(name, recv, args, env):
    if recv is None:
        if name == "has":
            if len(args) != 1 or args[0][0] != "field":
                raise Unsupported("has() of a non-field")
            obj = _ev(args[0][1], env)
            return isinstance(obj, dict) and _name(args[0][2]) in obj
        vals = [_ev(a, env) for a in args]
        if name == "size" and len(vals) == 1:
            return len(vals[0])
        if name == "duration" and len(vals) == 1:
            return _duration(vals[0])
        if name == "int" and len(vals) == 1:
            return int(vals[0])
        if name == "string" and len(vals) == 1:
            return str(vals[0])
        raise Unsupported("function %s" % name)
    if name in MACROS:
        target = _ev(recv, env)
        if len(args) != 2 or args[0][0] != "var":
            raise Unsupported("macro %s form" % name)
        var = args[0][1]
        items = list(target.keys()) if isinstance(target, dict) else target
        if not isinstance(items, list):
            raise EvalError("%s over a non-list" % name)

        def each(x):
            return _ev(args[1], dict(env, **{var: x}))
        if name == "all":
            return _fold(items, each, "&&") if items else True
        if name == "exists":
            return _fold(items, each, "||") if items else False
        if name == "exists_one":
            return sum(1 for x in items if each(x) is True) == 1
        if name == "filter":
            return [x for x in items if each(x) is True]
        if name == "map":
            return [each(x) for x in items]
    obj = _ev(recv, env)
    vals = [_ev(a, env) for a in args]
    if name == "size" and not vals:
        return len(obj)
    if isinstance(obj, str) and len(vals) == 1 and isinstance(vals[0], str):
        if name == "contains":
            return vals[0] in obj
        if name == "startsWith":
            return obj.startswith(vals[0])
        if name == "endsWith":
            return obj.endswith(vals[0])
        if name == "matches":
            return re.search(vals[0], obj) is not None
        if name == "split":
            return obj.split(vals[0])
    raise Unsupported("method %s" % name)


def _fold(items, each, op):
    """all (&&) / exists (||) with CEL's error absorption: an error only matters when no
    element decides the result."""
    decide = op == "||"
    err = None
    for x in items:
        try:
            v = each(x)
        except EvalError as e:
            err = e
            continue
        if v is decide:
            return decide
    if err:
        raise err
    return not decide


_CACHE = {}


def evaluate(rule, value):
    """True when `value` (the instance the rule's schema node applies to, defaults applied)
    satisfies `rule`."""
    ast = _CACHE.get(rule)
    if ast is None:
        if "oldSelf" in rule:
            raise Unsupported("transition rule (oldSelf): only checked on update")
        ast = _CACHE[rule] = _Parser(rule).parse()
    v = _ev(ast, {"self": value})
    if not isinstance(v, bool):
        raise EvalError("rule value is not a bool")
    return v
