"""The request body scanner (ngx_infer_route/ngx_http_infer_route_json.c),
alone: driven through t/unit/route_json_cli.c built with ASan and UBSan,
with Python's json module as the oracle for what is valid JSON and what
the fields are, and documents generated here (so the raw bytes of every
string are known) for the prompt counters and the prefix hash.  Then a
bounded libFuzzer run (t/unit/route_json_fuzz.c) and the scanner's speed
on a 2 KB and a 1 MB chat body (printed, not asserted)."""

import json
import random
import subprocess

import pytest

from harness.cunit import (REPO, UNIT, VARIANTS, build_sanitized, compile_c,
                           fuzz)

SCANNER = REPO / "ngx_infer_route" / "ngx_http_infer_route_json.c"

MODEL_MAX = 256         # NGX_HTTP_INFER_MODEL_MAX
DEPTH_MAX = 64
UNIQUE = ("model", "stream", "max_tokens", "max_completion_tokens",
          "stream_options")
FNV_BASIS = 14695981039346656037
FNV_PRIME = 1099511628211


def fnv1a(data):
    h = FNV_BASIS
    for c in data:
        h = ((h ^ c) * FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
    return h


@pytest.fixture(scope="session", params=list(VARIANTS))
def cli(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("route_json") / "route_json_cli"
    return build_sanitized(out, [UNIT / "route_json_cli.c", SCANNER],
                           request.param)


def scan_many(cli, docs):
    """docs: [(bytes, prefix_max)] -> one result dict each, "model" as
    bytes (or None)."""
    stdin = b"".join(b"%d %d\n" % (len(d), pm) + d for d, pm in docs)
    r = subprocess.run([str(cli), "--batch"], input=stdin,
                       capture_output=True, timeout=120)
    assert r.returncode == 0 and not r.stderr, r.stderr.decode()[-5000:]
    lines = r.stdout.decode("utf-8", "surrogateescape").splitlines()
    assert len(lines) == len(docs)
    results = []
    for line in lines:
        res = json.loads(line)
        if res["model"] is not None:
            res["model"] = res["model"].encode("utf-8", "surrogateescape")
        results.append(res)
    return results


# -- the oracle: Python's json module, and the contract's extra rules ------

class RawInt(int):
    """An integer as json.loads saw it, with its text (to tell -0 from 0)."""

    def __new__(cls, raw):
        n = super().__new__(cls, int(raw))
        n.raw = raw
        return n


class Pairs(dict):
    """A JSON object that remembers its members in order, duplicates too."""

    def __init__(self, pairs):
        super().__init__(pairs)
        self.pairs = pairs


def _no_constant(name):
    raise ValueError(f"{name} is not JSON")


def py_parse(doc):
    return json.loads(doc.decode("utf-8"), object_pairs_hook=Pairs,
                      parse_int=RawInt, parse_constant=_no_constant)


def py_depth(v):
    if isinstance(v, Pairs):
        return 1 + max((py_depth(x) for _, x in v.pairs), default=0)
    if isinstance(v, list):
        return 1 + max((py_depth(x) for x in v), default=0)
    return 0


def oracle(doc):
    """What the scanner must say of doc (valid UTF-8): rc and the fields
    read through json.loads."""
    try:
        v = py_parse(doc)
    except (ValueError, RecursionError):
        return {"rc": "error", "why": "invalid JSON"}
    if py_depth(v) > DEPTH_MAX:
        return {"rc": "error", "why": "too deep"}
    if not isinstance(v, Pairs):
        return {"rc": "declined"}

    def error(why):
        return {"rc": "error", "why": why}

    out = {"rc": "ok", "model": None, "stream": -1, "include_usage": -1,
           "value": v}
    seen = set()
    tokens = {"max_tokens": -1, "max_completion_tokens": -1}
    for k, x in v.pairs:
        if k in UNIQUE:
            if k in seen:
                return error("duplicate " + k)
            seen.add(k)
        if k == "model":
            if not isinstance(x, str):
                return error("model type")
            try:
                out["model"] = x.encode("utf-8")
            except UnicodeEncodeError:
                return error("unpaired surrogate in model")
            if len(out["model"]) > MODEL_MAX:
                return error("model too long")
        elif k == "stream":
            if x is not None and not isinstance(x, bool):
                return error("stream type")
            out["stream"] = -1 if x is None else int(x)
        elif k in tokens:
            if x is None:
                tokens[k] = -1
            elif (isinstance(x, RawInt) and not x.raw.startswith("-")
                  and x < 2 ** 31):
                tokens[k] = int(x)
            else:
                return error(k + " type")
        elif k == "stream_options" and isinstance(x, Pairs):
            for k2, y in x.pairs:
                if k2 == "include_usage" and (y is None
                                              or isinstance(y, bool)):
                    out["include_usage"] = -1 if y is None else int(y)
    out["max_tokens"] = (tokens["max_completion_tokens"]
                         if tokens["max_completion_tokens"] != -1
                         else tokens["max_tokens"])
    return out


def check_against_oracle(doc, res):
    """[problem] comparing a scanner result with the oracle, offsets
    included: splicing a new value in at model_start..model_end must
    change the top-level "model" and nothing else, and the same for
    stream_options."""
    exp = oracle(doc)
    if res["rc"] != exp["rc"]:
        return [f"rc {res['rc']} ({res['error']} at {res['error_offset']})"
                f", expected {exp['rc']} ({exp.get('why')})"]
    if res["rc"] == "error":
        return ([] if 0 <= res["error_offset"] <= len(doc)
                else ["error_offset out of range"])
    problems = []
    if res["rc"] == "declined":
        return problems
    for f in ("model", "stream", "include_usage", "max_tokens"):
        if res[f] != exp[f]:
            problems.append(f"{f} {res[f]!r}, expected {exp[f]!r}")

    v = exp["value"]
    ms, me = res["model_start"], res["model_end"]
    if exp["model"] is None:
        if (ms, me) != (0, 0):
            problems.append(f"model span {ms}..{me} without a model")
    elif not (doc[ms:ms + 1] == b'"' and doc[me - 1:me] == b'"'):
        problems.append(f"model span {ms}..{me} not on quotes")
    else:
        v2 = py_parse(doc[:ms] + b'"\\u0000spliced"' + doc[me:])
        want = [(k, "\0spliced" if k == "model" else x) for k, x in v.pairs]
        if v2.pairs != want:
            problems.append(f"model span {ms}..{me} is not the model")

    ss, se = res["stream_options_start"], res["stream_options_end"]
    if not isinstance(v.get("stream_options"), Pairs):
        if (ss, se) != (0, 0):
            problems.append(f"stream_options span {ss}..{se} without one")
    elif not (doc[ss:ss + 1] == b"{" and doc[se - 1:se] == b"}"):
        problems.append(f"stream_options span {ss}..{se} not on braces")
    else:
        v2 = py_parse(doc[:ss] + b'{"spliced":1}' + doc[se:])
        want = [(k, {"spliced": 1} if k == "stream_options" else x)
                for k, x in v.pairs]
        if v2.pairs != want:
            problems.append(f"stream_options span {ss}..{se} is wrong")

    oe = res["object_end"]
    if not (doc[oe:oe + 1] == b"}" and not doc[oe + 1:].strip(b" \t\n\r")
            and doc[:oe].lstrip(b" \t\n\r")[:1] == b"{"):
        problems.append(f"object_end {oe} is not the closing brace")
    return problems


# -- generated documents: every string's raw text is known ----------------

class S:
    """A string: its value, and its text between the quotes as written."""

    def __init__(self, value, raw=None):
        self.value = value
        self.raw = json.dumps(value)[1:-1] if raw is None else raw


class Num:
    def __init__(self, raw):
        self.raw = raw


class Lit:
    def __init__(self, raw):
        self.raw = raw


class Arr:
    def __init__(self, items):
        self.items = items


class Obj:
    def __init__(self, pairs):
        self.pairs = [(S(k) if isinstance(k, str) else k, v)
                      for k, v in pairs]


TRUE, FALSE, NULL = Lit("true"), Lit("false"), Lit("null")
SHORT = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n",
         "\r": "\\r", "\t": "\\t"}
NUMBERS = ["0", "-0", "7", "42", "-13", "3.25", "-0.5", "1e5", "1E+2",
           "2.5e-3", "-1.0E10", "0.000", "123456789012345678901234567890",
           "1.5e300", "9007199254740993"]
ALPHABET = ("abcdefghijklmnopqrstuvwxyz ABCXYZ0123456789-_.,:;!?'/{}[]"
            "\"\\\n\t\r\b\f\x00\x01\x1f\x7f"
            "\u00e9\u00fc\u4e2d\u6587\u2028\U0001F600\U00010348")


def escape(rng, value, p=0.15):
    """The text of a string: characters that must be escaped are, others
    are at random, in every way JSON allows."""
    out = []
    for ch in value:
        o = ord(ch)
        must = ch in '"\\' or o < 0x20 or 0xD800 <= o <= 0xDFFF
        if not must and rng.random() >= p:
            out.append(ch)
            continue
        hexfmt = rng.choice(["\\u%04x", "\\u%04X"])
        r = rng.random()
        if ch in SHORT and r < 0.7:
            out.append(SHORT[ch])
        elif ch == "/" and r < 0.5:
            out.append("\\/")
        elif o >= 0x10000:
            o -= 0x10000
            out.append(hexfmt % (0xD800 + (o >> 10))
                       + hexfmt % (0xDC00 + (o & 0x3FF)))
        else:
            out.append(hexfmt % o)
    return "".join(out)


def rstr(rng, lo=0, hi=12, lone_surrogates=True):
    s = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(lo, hi)))
    if lone_surrogates and rng.random() < 0.03:
        s += chr(rng.choice([0xD800, 0xDBFF, 0xDC00, 0xDFFF]))
    return S(s, escape(rng, s))


def rkey(rng, name, p=0.1):
    return S(name, escape(rng, name, p))


def rany(rng, depth=0):
    """Any JSON value, keys sometimes named like the fields we read (they
    must not count where they are)."""
    r = rng.random()
    if depth > 4 or r < 0.35:
        return rstr(rng)
    if r < 0.5:
        return Num(rng.choice(NUMBERS))
    if r < 0.6:
        return rng.choice([TRUE, FALSE, NULL])
    if r < 0.8:
        return Arr([rany(rng, depth + 1) for _ in range(rng.randint(0, 4))])
    names = ["model", "content", "text", "include_usage", "messages",
             "prompt", "stream", "k", "data", "x"]
    return Obj([(rkey(rng, rng.choice(names)) if rng.random() < 0.5
                 else rstr(rng, 0, 6), rany(rng, depth + 1))
                for _ in range(rng.randint(0, 4))])


def rmodel(rng):
    base = rng.choice(["llama-3-8b", "gpt-4o", "mistral/7b", "",
                       "mod\u00e8le-\u4e2d", "m\U0001F600", "a\"b\\c"])
    if rng.random() < 0.02:
        return rng.choice([Num("1"), NULL, TRUE, Arr([]), Obj([])])
    if rng.random() < 0.03:
        base = "x" * rng.choice([255, 256, 257, 300])
    return S(base, escape(rng, base, 0.2))


def rmessages(rng):
    items = []
    for _ in range(rng.randint(0, 6)):
        r = rng.random()
        if r < 0.05:
            items.append(rng.choice([rstr(rng), Num("1"), NULL, Arr([])]))
            continue
        pairs = [(rkey(rng, "role"), S(rng.choice(["user", "system"])))]
        content = rng.random()
        if content < 0.55:
            pairs.append((rkey(rng, "content", 0.05), rstr(rng, 0, 40)))
        elif content < 0.85:
            parts = []
            for _ in range(rng.randint(0, 4)):
                if rng.random() < 0.7:
                    parts.append(Obj([("type", S("text")),
                                      (rkey(rng, "text", 0.05),
                                       rstr(rng, 0, 30))]))
                else:
                    parts.append(rany(rng, 3))
            pairs.append(("content", Arr(parts)))
        elif content < 0.95:
            pairs.append(("content", rng.choice([NULL, Num("3"),
                                                 rany(rng, 3)])))
        if rng.random() < 0.05:
            pairs.append(("content", rstr(rng)))        # a second one
        if rng.random() < 0.2:
            pairs.append(("name", rstr(rng)))
        rng.shuffle(pairs)
        items.append(Obj(pairs))
    return Arr(items)


def rtokens(rng):
    r = rng.random()
    if r < 0.1:
        return NULL
    if r < 0.15:
        return Num(rng.choice(["-1", "-0", "1.0", "1e3", "2147483648",
                               "99999999999999999999"]))
    if r < 0.17:
        return rng.choice([S("5"), TRUE, Arr([])])
    if r < 0.25:
        return Num(rng.choice(["0", "2147483647", "2147483646"]))
    return Num(str(rng.randint(1, 100000)))


def rdoc(rng):
    """A request body, mostly valid, its fields in any order."""
    pairs = []

    def maybe(p, name, value):
        if rng.random() < p:
            pairs.append((rkey(rng, name), value))

    maybe(0.85, "model", rmodel(rng))
    maybe(0.7, "messages", rmessages(rng) if rng.random() < 0.95
          else rany(rng, 2))
    maybe(0.5, "stream", rng.choice([TRUE, FALSE, NULL] * 15
                                    + [Num("1"), S("true"), Obj([])]))
    maybe(0.3, "stream_options", rng.choice(
        [Obj([("include_usage", rng.choice([TRUE, FALSE, NULL,
                                            S("yes")]))]),
         Obj([("x", rany(rng, 2)), ("include_usage", TRUE)]),
         Obj([("x", Obj([("include_usage", TRUE)]))]),
         Obj([]), NULL, Num("1"), Arr([Obj([("include_usage", TRUE)])])]))
    maybe(0.4, "max_tokens", rtokens(rng))
    maybe(0.2, "max_completion_tokens", rtokens(rng))
    maybe(0.25, "prompt", rng.choice([rstr(rng, 0, 60),
                                      Arr([rstr(rng) for _ in range(3)]),
                                      rany(rng, 1)]))
    maybe(0.1, "input", rany(rng, 1))
    maybe(0.1, "payload", rany(rng, 1))
    maybe(0.3, "temperature", Num(rng.choice(NUMBERS)))
    maybe(0.2, "content", rstr(rng))
    maybe(0.1, "text", rstr(rng))
    maybe(0.2, "tools", rany(rng, 1))
    maybe(0.1, "include_usage", TRUE)
    if pairs and rng.random() < 0.04:
        pairs.append(rng.choice(pairs))                 # a duplicate
    rng.shuffle(pairs)
    return Obj(pairs)


def emit(node, ws=lambda: ""):
    if isinstance(node, S):
        return '"' + node.raw + '"'
    if isinstance(node, (Num, Lit)):
        return node.raw
    if isinstance(node, Arr):
        return "[" + ws() + ",".join(ws() + emit(x, ws) + ws()
                                     for x in node.items) + "]"
    return "{" + ws() + ",".join(
        ws() + emit(k, ws) + ws() + ":" + ws() + emit(v, ws) + ws()
        for k, v in node.pairs) + "}"


def rws(rng):
    def ws():
        if rng.random() < 0.8:
            return ""
        return "".join(rng.choice(" \t\n\r") for _ in range(rng.randint(1, 3)))
    return ws


def to_py(node):
    if isinstance(node, S):
        return node.value
    if isinstance(node, (Num, Lit)):
        return json.loads(node.raw)
    if isinstance(node, Arr):
        return [to_py(x) for x in node.items]
    return ("obj", [(k.value, to_py(v)) for k, v in node.pairs])


def py_norm(v):
    if isinstance(v, Pairs):
        return ("obj", [(k, py_norm(x)) for k, x in v.pairs])
    if isinstance(v, list):
        return [py_norm(x) for x in v]
    return v


def prompt_texts(root):
    """The raw bytes of the prompt text strings, in document order, and
    the number of messages: the contract, over the generated tree."""
    texts, messages = [], 0

    def every_string(n):
        if isinstance(n, S):
            texts.append(n.raw)
        elif isinstance(n, Arr):
            for x in n.items:
                every_string(x)
        elif isinstance(n, Obj):
            for _, x in n.pairs:
                every_string(x)

    for k, v in root.pairs:
        if k.value == "messages" and isinstance(v, Arr):
            messages += len(v.items)
            for m in (m for m in v.items if isinstance(m, Obj)):
                for mk, c in m.pairs:
                    if mk.value != "content":
                        continue
                    if isinstance(c, S):
                        texts.append(c.raw)
                    elif isinstance(c, Arr):
                        for part in c.items:
                            if isinstance(part, Obj):
                                texts += [t.raw for pk, t in part.pairs
                                          if pk.value == "text"
                                          and isinstance(t, S)]
        elif k.value in ("prompt", "input", "payload"):
            every_string(v)
    return [t.encode("utf-8") for t in texts], messages


def check_prompt(res, texts, messages, prefix_max):
    stream = b"\0".join(texts)[:prefix_max]
    want = {"prompt_bytes": sum(map(len, texts)), "messages": messages,
            "prefix_len": len(stream), "prefix_hash": "%016x" % fnv1a(stream)}
    return [f"{f} {res[f]!r}, expected {w!r}" for f, w in want.items()
            if res[f] != w]


def report(problems, limit=25):
    assert not problems, (f"{len(problems)} problems:\n"
                          + "\n".join(problems[:limit]))


PREFIX_MAX = [0, 1, 5, 64, 256, 1 << 20]


def generated(seed, n):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        tree = rdoc(rng)
        ws = rws(rng)
        doc = (ws() + emit(tree, ws) + ws()).encode("utf-8")
        out.append((tree, doc, rng.choice(PREFIX_MAX)))
    return out


# -- the tests ------------------------------------------------------------

def test_generated_documents(cli):
    docs = generated(20240601, 600)
    results = scan_many(cli, [(d, pm) for _, d, pm in docs])
    problems = []
    counts = {"ok": 0, "error": 0, "declined": 0}
    for (tree, doc, pm), res in zip(docs, results):
        counts[res["rc"]] = counts.get(res["rc"], 0) + 1
        assert py_norm(py_parse(doc)) == to_py(tree), "generator bug"
        p = check_against_oracle(doc, res)
        if not p and res["rc"] == "ok":
            p = check_prompt(res, *prompt_texts(tree), pm)
        problems += [f"{doc[:300]!r} (prefix_max {pm}): {x}" for x in p]
    print(f"\ngenerated documents: {counts}")
    report(problems)
    # the generator must exercise both sides
    assert counts["ok"] > 400 and counts["error"] > 30


def test_truncations_and_mutations(cli):
    """Every prefix of some valid documents, and random one-character
    edits of many: validity and fields as Python sees them."""
    rng = random.Random(7)
    valid = [d for _, d, _ in generated(99, 200)
             if oracle(d)["rc"] == "ok"]
    docs = []
    for d in valid[:8]:
        docs += [d[:i] for i in range(len(d))]
    edits = "{}[],:\"\\ \t0123456789-+.eEtrufalsn/\x00\x1f\x7f'x\u00e9"
    for _ in range(4000):
        text = rng.choice(valid).decode("utf-8")
        i = rng.randrange(len(text) + 1)
        op = rng.random()
        if op < 0.3:
            text = text[:i] + text[i + 1:]
        elif op < 0.65:
            text = text[:i] + rng.choice(edits) + text[i:]
        elif op < 0.95:
            text = text[:i] + rng.choice(edits) + text[i + 1:]
        else:
            j = rng.randrange(len(text) + 1)
            text = text[:i] + text[min(i, j):max(i, j)] + text[i:]
        docs.append(text.encode("utf-8"))
    results = scan_many(cli, [(d, 256) for d in docs])
    problems = []
    counts = {}
    for doc, res in zip(docs, results):
        counts[res["rc"]] = counts.get(res["rc"], 0) + 1
        problems += [f"{doc[:300]!r}: {x}"
                     for x in check_against_oracle(doc, res)]
    print(f"\ntruncated and mutated: {len(docs)} documents, {counts}")
    report(problems)


def B(s):
    return s.encode("utf-8") if isinstance(s, str) else s


def texts_of(*texts):
    return [B(t) for t in texts]


# (name, document, expected fields); "texts": the raw prompt strings in
# order
EDGE = [
    # valid, the simplest
    ("empty-object", b"{}", {"rc": "ok", "object_end": 1, "model": None}),
    ("whitespace-around-an-empty-object",
     b" \t\r\n{ } \n", {"rc": "ok", "object_end": 6}),
    ("top-level-array-declined", b"[]", {"rc": "declined"}),
    ("top-level-string-declined", b'"x"', {"rc": "declined"}),
    ("top-level-number-declined", b"0", {"rc": "declined"}),
    ("top-level-exponent-declined", b"-1.5e3 ", {"rc": "declined"}),
    ("top-level-true-declined", b"true", {"rc": "declined"}),
    ("top-level-null-declined", b"null", {"rc": "declined"}),
    ("array-of-request-objects-declined",
     b' [ {"model": "x", "prompt": "y"} ] ',
     {"rc": "declined", "model": None, "prompt_bytes": 0}),

    # model
    ("model-and-its-offsets",
     b'{"model":"gpt-4o"}', {"rc": "ok", "model": b"gpt-4o",
                             "model_start": 9, "model_end": 17}),
    ("empty-model",
     b'{"model":""}', {"rc": "ok", "model": b"", "model_start": 9,
                       "model_end": 11}),
    ("escaped-letter-in-model-key",
     b'{"mod\\u0065l":"x"}', {"rc": "ok", "model": b"x"}),
    ("model-key-all-escapes-space-before-colon",
     b'{"\\u006d\\u006F\\u0064\\u0065\\u006c" : "x"}',
     {"rc": "ok", "model": b"x"}),
    ("surrogate-pair-in-model",
     b'{"model":"\\ud83d\\ude00"}', {"rc": "ok", "model": B("\U0001F600")}),
    ("uppercase-hex-surrogate-pair-and-accent-in-model",
     b'{"model":"\\uD83D\\uDE00x\\u00e9"}',
     {"rc": "ok", "model": B("\U0001F600x\u00e9")}),
    ("every-escape-in-model",
     b'{"model":"\\u00e9\\u4E2D\\n\\t\\"\\\\\\/\\b\\f\\r\\u0000"}',
     {"rc": "ok", "model": B('\u00e9\u4e2d\n\t"\\/\b\f\r\0')}),
    ("raw-utf8-in-model",
     B('{"model":"\u00e9\U0001F600"}'),
     {"rc": "ok", "model": B("\u00e9\U0001F600")}),
    ("model-of-256-bytes",
     b'{"model":"' + b"a" * 256 + b'"}', {"rc": "ok", "model": b"a" * 256}),
    ("model-of-257-bytes-too-long",
     b'{"model":"' + b"a" * 257 + b'"}',
     {"rc": "error", "error": "model name too long", "error_offset": 9}),
    ("model-of-128-escaped-two-byte-chars",
     b'{"model":"' + b"\\u00e9" * 128 + b'"}',
     {"rc": "ok", "model": B("\u00e9" * 128)}),
    ("model-of-257-bytes-once-unescaped",
     b'{"model":"' + b"\\u00e9" * 128 + b'a"}', {"rc": "error"}),
    ("model-of-64-escaped-surrogate-pairs",
     b'{"model":"' + b"\\ud83d\\ude00" * 64 + b'"}',
     {"rc": "ok", "model": B("\U0001F600" * 64)}),
    ("model-of-65-escaped-surrogate-pairs-too-long",
     b'{"model":"' + b"\\ud83d\\ude00" * 65 + b'"}', {"rc": "error"}),
    ("lone-high-surrogate-in-model",
     b'{"model":"\\ud83d"}',
     {"rc": "error", "error": "unpaired surrogate in model"}),
    ("lone-low-surrogate-in-model", b'{"model":"\\ude00"}', {"rc": "error"}),
    ("high-surrogate-then-other-escape-in-model",
     b'{"model":"\\ud83d\\u0041"}', {"rc": "error"}),
    ("high-surrogate-then-plain-char-in-model",
     b'{"model":"\\ud83dx"}', {"rc": "error"}),
    ("two-high-surrogates-in-model",
     b'{"model":"\\ud83d\\ud83d"}', {"rc": "error"}),
    ("lone-surrogates-outside-model-accepted",
     b'{"x":"\\ud83d","prompt":"\\udc00"}',
     {"rc": "ok", "texts": texts_of("\\udc00")}),
    ("model-a-number",
     b'{"model":1}', {"rc": "error", "error": "model must be a string",
                      "error_offset": 9}),
    ("model-null", b'{"model":null}', {"rc": "error"}),
    ("model-true", b'{"model":true}', {"rc": "error"}),
    ("model-an-array", b'{"model":[]}', {"rc": "error"}),
    ("model-an-object", b'{"model":{}}', {"rc": "error"}),
    ("nested-model-keys-ignored",
     b'{"x":{"model":1},"messages":[{"model":2}]}',
     {"rc": "ok", "model": None, "messages": 1}),

    # stream
    ("stream-true", b'{"stream":true}', {"rc": "ok", "stream": 1}),
    ("stream-false", b'{"stream":false}', {"rc": "ok", "stream": 0}),
    ("stream-null", b'{"stream":null}', {"rc": "ok", "stream": -1}),
    ("stream-a-number",
     b'{"stream":1}', {"rc": "error", "error": "stream must be a boolean"}),
    ("stream-a-string", b'{"stream":"true"}', {"rc": "error"}),
    ("stream-an-array", b'{"stream":[]}', {"rc": "error"}),
    ("nested-stream-ignored",
     b'{"x":{"stream":5}}', {"rc": "ok", "stream": -1}),

    # max_tokens, max_completion_tokens
    ("max-tokens-zero", b'{"max_tokens":0}', {"rc": "ok", "max_tokens": 0}),
    ("max-tokens-int32-max",
     b'{"max_tokens":2147483647}', {"rc": "ok", "max_tokens": 2147483647}),
    ("max-tokens-past-int32-max",
     b'{"max_tokens":2147483648}', {"rc": "error", "error_offset": 14}),
    ("max-tokens-huge",
     b'{"max_tokens":99999999999999999999999}', {"rc": "error"}),
    ("max-tokens-negative", b'{"max_tokens":-1}', {"rc": "error"}),
    ("max-tokens-negative-zero", b'{"max_tokens":-0}', {"rc": "error"}),
    ("max-tokens-with-a-fraction", b'{"max_tokens":1.0}', {"rc": "error"}),
    ("max-tokens-with-an-exponent", b'{"max_tokens":1e3}', {"rc": "error"}),
    ("max-tokens-null",
     b'{"max_tokens":null}', {"rc": "ok", "max_tokens": -1}),
    ("max-tokens-a-string", b'{"max_tokens":"5"}', {"rc": "error"}),
    ("max-tokens-true", b'{"max_tokens":true}', {"rc": "error"}),
    ("max-completion-tokens-an-object",
     b'{"max_completion_tokens":{}}', {"rc": "error"}),
    ("max-completion-tokens-after-max-tokens-wins",
     b'{"max_tokens":5,"max_completion_tokens":7}',
     {"rc": "ok", "max_tokens": 7}),
    ("max-completion-tokens-before-max-tokens-wins",
     b'{"max_completion_tokens":7,"max_tokens":5}',
     {"rc": "ok", "max_tokens": 7}),
    ("max-completion-tokens-null-keeps-max-tokens",
     b'{"max_tokens":5,"max_completion_tokens":null}',
     {"rc": "ok", "max_tokens": 5}),
    ("max-completion-tokens-zero-wins",
     b'{"max_completion_tokens":0,"max_tokens":5}',
     {"rc": "ok", "max_tokens": 0}),

    # duplicates: an error at the second key
    ("duplicate-model-key",
     b'{"model":"a","model":"b"}',
     {"rc": "error", "error": 'duplicate "model" key', "error_offset": 13}),
    ("duplicate-model-key-escaped",
     b'{"model":"a","mod\\u0065l":"a"}', {"rc": "error"}),
    ("duplicate-stream-key-escaped",
     b'{"stream":true,"str\\u0065am":true}',
     {"rc": "error", "error": 'duplicate "stream" key'}),
    ("duplicate-max-tokens-key",
     b'{"max_tokens":1,"max_tokens":1}', {"rc": "error"}),
    ("duplicate-max-completion-tokens-key",
     b'{"max_completion_tokens":1,"max_completion_tokens":null}',
     {"rc": "error"}),
    ("duplicate-stream-options-key",
     b'{"stream_options":null,"stream_options":{}}', {"rc": "error"}),
    ("nested-duplicates-allowed",
     b'{"x":{"model":1,"model":2},"y":[{"stream":1,"stream":2}]}',
     {"rc": "ok"}),
    ("duplicate-messages-key-allowed",
     b'{"messages":[],"messages":[{}]}', {"rc": "ok", "messages": 1}),

    # stream_options
    ("include-usage-true-and-stream-options-offsets",
     b'{"stream_options":{"include_usage":true}}',
     {"rc": "ok", "include_usage": 1, "stream_options_start": 18,
      "stream_options_end": 40}),
    ("include-usage-false",
     b'{"stream_options":{"include_usage":false}}',
     {"rc": "ok", "include_usage": 0}),
    ("include-usage-null",
     b'{"stream_options":{"include_usage":null}}',
     {"rc": "ok", "include_usage": -1}),
    ("include-usage-a-string",
     b'{"stream_options":{"include_usage":"yes"}}',
     {"rc": "ok", "include_usage": -1}),
    ("duplicate-include-usage-last-wins",
     b'{"stream_options":{"include_usage":true,"include_usage":false}}',
     {"rc": "ok", "include_usage": 0}),
    ("nested-include-usage-ignored",
     b'{"stream_options":{"x":{"include_usage":true}}}',
     {"rc": "ok", "include_usage": -1}),
    ("stream-options-a-number",
     b'{"stream_options":5}', {"rc": "ok", "stream_options_end": 0}),
    ("stream-options-null",
     b'{"stream_options":null}', {"rc": "ok", "stream_options_end": 0}),
    ("stream-options-an-array",
     b'{"stream_options":[{"include_usage":true}]}',
     {"rc": "ok", "include_usage": -1}),
    ("top-level-include-usage-ignored",
     b'{"include_usage":true}', {"rc": "ok", "include_usage": -1}),

    # prompt text
    ("prompt-a-string",
     b'{"prompt":"ab"}', {"rc": "ok", "texts": texts_of("ab")}),
    ("prompt-an-array-of-strings",
     b'{"prompt":["ab","c"]}', {"rc": "ok", "texts": texts_of("ab", "c")}),
    ("prompt-bytes-once-unescaped",
     b'{"prompt":"a\\nb\\u00e9"}', {"rc": "ok", "prompt_bytes": 10}),
    ("input-and-payload-texts",
     B('{"input":"\u00e9","payload":{"a":"b"}}'),
     {"rc": "ok", "texts": texts_of("\u00e9", "b")}),
    ("prompt-object-strings-in-order",
     b'{"prompt":{"key":"val","k2":["x",{"k3":"yz"}],"n":1}}',
     {"rc": "ok", "texts": texts_of("val", "x", "yz")}),
    ("messages-content-strings-and-text-parts",
     b'{"messages":[1,"x",{"content":"hi"},{"content":[{"type":"text",'
     b'"text":"yo"},{"text":5},"str",{"text":"z","text":"w"}]}]}',
     {"rc": "ok", "messages": 4, "texts": texts_of("hi", "yo", "z", "w")}),
    ("messages-a-string",
     b'{"messages":"x"}', {"rc": "ok", "messages": 0, "prompt_bytes": 0}),
    ("messages-an-object",
     b'{"messages":{"content":"x"}}', {"rc": "ok", "messages": 0,
                                       "prompt_bytes": 0}),
    ("content-an-object-not-read",
     b'{"messages":[{"content":{"text":"no"}}]}',
     {"rc": "ok", "messages": 1, "texts": []}),
    ("message-inside-an-array-not-read",
     b'{"messages":[[{"content":"a"}]]}',
     {"rc": "ok", "messages": 1, "texts": []}),
    ("top-level-content-and-text-ignored",
     b'{"content":"x","text":"y","messages":[{"role":"user",'
     b'"content":"a"}]}', {"rc": "ok", "messages": 1, "texts": [b"a"]}),
    ("escaped-content-key",
     b'{"messages":[{"cont\\u0065nt":"q"}]}', {"rc": "ok", "texts": [b"q"]}),
    ("duplicate-content-both-read",
     b'{"messages":[{"content":"a","content":"b"}]}',
     {"rc": "ok", "texts": [b"a", b"b"]}),
    ("two-empty-prompt-strings",
     b'{"prompt":["",""]}', {"rc": "ok", "texts": [b"", b""],
                             "prefix_len": 1}),
    ("prompt-messages-input-in-document-order",
     b'{"prompt":"p","messages":[{"content":"m"}],"input":"i"}',
     {"rc": "ok", "texts": [b"p", b"m", b"i"]}),
    ("nested-prompt-and-messages-ignored",
     b'{"x":{"prompt":"no","messages":[{"content":"no"}]}}',
     {"rc": "ok", "texts": [], "messages": 0}),

    # not UTF-8: not validated inside strings, an error outside
    ("invalid-utf8-inside-strings-kept",
     b'{"model":"\xff\xfe","prompt":"\xc3"}',
     {"rc": "ok", "model": b"\xff\xfe", "texts": [b"\xc3"]}),
    ("invalid-utf8-outside-strings", b'{\xff:1}', {"rc": "error"}),
    ("utf8-after-the-document", b'{"a":1}\xc3\xa9', {"rc": "error"}),
    ("byte-order-mark", b'\xef\xbb\xbf{}', {"rc": "error"}),

    # errors, with where and what
    ("empty-document", b"", {"rc": "error", "error_offset": 0}),
    ("whitespace-only", b" \n ", {"rc": "error", "error_offset": 3}),
    ("trailing-comma-in-object",
     b'{"a":1,}', {"rc": "error", "error_offset": 7}),
    ("trailing-characters",
     b"{} x", {"rc": "error", "error_offset": 3,
               "error": "trailing characters after JSON value"}),
    ("two-documents", b"{}{}", {"rc": "error", "error_offset": 2}),
    ("unterminated-string",
     b'{"a":"b', {"rc": "error", "error": "unterminated string",
                  "error_offset": 7}),
    ("bad-escape",
     b'{"a":"\\x"}', {"rc": "error", "error": "bad escape",
                      "error_offset": 6}),
    ("control-character-in-string",
     b'{"a":"\x01"}', {"rc": "error", "error_offset": 6,
                       "error": "control character in string"}),
    ("number-with-leading-zero",
     b'{"a":01}', {"rc": "error", "error_offset": 6}),
    ("number-ending-in-a-dot",
     b'{"a":1.}', {"rc": "error", "error_offset": 7}),
    ("nan-literal",
     b'{"a":NaN}', {"rc": "error", "error_offset": 5,
                    "error": "unexpected character"}),
]

MALFORMED = {
    "unclosed-object": "{",
    "lone-close-brace": "}",
    "unclosed-array": "[",
    "lone-close-bracket": "]",
    "object-closed-by-bracket": "{]",
    "array-closed-by-brace": "[}",
    "key-without-value": '{"a"}',
    "colon-without-value": '{"a":}',
    "missing-colon": '{"a" 1}',
    "comma-instead-of-colon": '{"a",1}',
    "missing-key": '{:1}',
    "number-as-key": '{1:1}',
    "null-as-key": '{null:1}',
    "trailing-comma-in-object": '{"a":1,}',
    "trailing-comma-in-array": "[1,]",
    "leading-comma-in-array": "[,1]",
    "comma-only-array": "[,]",
    "comma-only-object": "{,}",
    "missing-comma-in-object": '{"a":1 "b":2}',
    "missing-comma-in-array": "[1 2]",
    "single-quoted-key": "{'a':1}",
    "single-quoted-value": "{\"a\":'b'}",
    "unquoted-key": '{a:1}',
    "leading-zero": '{"a":01}',
    "double-zero": '{"a":00}',
    "negative-leading-zero": '{"a":-01}',
    "dot-without-fraction": '{"a":1.}',
    "fraction-without-integer": '{"a":.5}',
    "minus-alone": '{"a":-}',
    "double-minus": '{"a":--1}',
    "exponent-without-digits": '{"a":1e}',
    "exponent-sign-without-digits": '{"a":1e+}',
    "capital-exponent-minus-without-digits": '{"a":1E-}',
    "plus-sign": '{"a":+1}',
    "dot-then-exponent": '{"a":1.e5}',
    "hex-number": '{"a":0x10}',
    "underscore-in-number": '{"a":1_000}',
    "two-dots": '{"a":1.5.5}',
    "nan": '{"a":NaN}',
    "infinity": '{"a":Infinity}',
    "minus-infinity": '{"a":-Infinity}',
    "lowercase-nan": '{"a":nan}',
    "truncated-true": '{"a":tru}',
    "capitalised-true": '{"a":True}',
    "truncated-null": '{"a":nul}',
    "null-with-extra-letter": '{"a":nulll}',
    "truncated-false": '{"a":fals}',
    "false-then-true": '{"a":falsetrue}',
    "lone-t": '{"a":t}',
    "unknown-escape-x": '{"a":"\\x"}',
    "short-unicode-escape": '{"a":"\\u12"}',
    "non-hex-unicode-escape": '{"a":"\\u12g4"}',
    "capital-u-escape": '{"a":"\\U1234"}',
    "escaped-single-quote": '{"a":"\\\'"}',
    "bell-escape": '{"a":"\\a"}',
    "nul-escape": '{"a":"\\0"}',
    "backslash-at-end": '{"a":"\\',
    "unicode-escape-at-end": '{"a":"\\u',
    "half-unicode-escape-at-end": '{"a":"\\u00',
    "surrogate-then-empty-unicode-escape": '{"a":"\\ud83d\\u"}',
    "raw-nul-in-string": '{"a":"\x00"}',
    "raw-unit-separator-in-string": '{"a":"\x1f"}',
    "raw-newline-in-string": '{"a":"line\nbreak"}',
    "raw-tab-in-string": '{"a":"\t"}',
    "control-character-in-key": '{"a\x01":1}',
    "line-comment-after": '{"a":1}//c',
    "block-comment-before": '/*c*/{}',
    "slash-after": '{"a":1}/',
    "hash-comment-before": '#{}',
    "two-objects": "{} {}",
    "letter-after": "{}x",
    "close-bracket-after": "{}]",
    "unclosed-object-after-a-value": '{"a":"b"',
    "unterminated-top-level-string": '"abc',
    "array-closed-by-brace-in-object": '{"a" : [1, 2}',
    "close-brace-inside-array": '{"a":[}]',
    "close-bracket-inside-object": '{"a":{]}',
    "unclosed-outer-array": "[[]",
    "extra-close-bracket": "[]]",
    "byte-order-mark": "\ufeff{}",
    "nul-before": "\x00{}",
    "nul-after": "{}\x00",
    "vertical-tab-before": "\x0b{}",
    "form-feed-before": "\x0c{}",
    "no-break-space-before": "\u00a0{}",
    "line-separator-inside-object": "{\u2028}",
    "ctrl-z-after": '{"a":1}\x1a',
    "unclosed-after-model": '{"model":"x"',
    "comma-then-end-after-model": '{"model":"x",',
    "trailing-comma-after-model": '{"model":"x",}',
    "model-key-then-end": '{"model"',
    "model-colon-then-end": '{"model":',
    "truncated-true-stream": '{"stream":tru}',
    "trailing-comma-after-stream": '{"stream":true,}',
    "arrays-nested-65-deep": "[" * 65 + "]" * 65,
}


def named(case):
    """A table case's test id: its name, first in the tuple."""
    return case[0]


@pytest.fixture(scope="module")
def scanned(cli):
    """The scanner's result for every document of EDGE and MALFORMED, by
    document: one run of the cli for them all."""
    docs = [d for _, d, _ in EDGE] + [B(m) for m in MALFORMED.values()]
    return dict(zip(docs, scan_many(cli, [(d, 256) for d in docs])))


@pytest.mark.parametrize("case", EDGE, ids=named)
def test_edge_cases(scanned, case):
    """Each field the case names is what it expects, and a document that
    is UTF-8 agrees with the oracle."""
    _, doc, want = case
    res = scanned[doc]
    problems = []
    for f, w in want.items():
        if f == "texts":
            problems += [f"{doc[:120]!r}: {x}" for x in check_prompt(
                res, w, res["messages"] if "messages" not in want
                else want["messages"], 256)]
        elif res[f] != w:
            problems.append(f"{doc[:120]!r}: {f} {res[f]!r}, "
                            f"expected {w!r} ({res['error']})")
    try:
        doc.decode("utf-8")
    except UnicodeDecodeError:
        pass
    else:
        problems += [f"{doc[:120]!r}: {x}"
                     for x in check_against_oracle(doc, res)]
    report(problems)


@pytest.mark.parametrize("doc", list(MALFORMED.values()),
                         ids=list(MALFORMED))
def test_malformed_documents_are_errors(scanned, doc):
    """An error with a message, as the oracle says."""
    res = scanned[B(doc)]
    problems = []
    if res["rc"] != "error" or not res["error"]:
        problems.append(f"{doc[:120]!r}: {res['rc']}, expected an error")
    problems += [f"{doc[:120]!r}: {x}"
                 for x in check_against_oracle(B(doc), res)]
    report(problems)


def test_prefix_hash(cli):
    """FNV-1a 64 over the first prefix_max bytes of the prompt text, one
    0x00 between two strings."""
    doc = b'{"prompt":["ab","c"],"messages":[{"content":"d\\"e"}]}'
    stream = b"ab\0c\0d\\\"e"
    cases = list(range(len(stream) + 3)) + [1 << 40]
    results = scan_many(cli, [(doc, pm) for pm in cases])
    for pm, res in zip(cases, results):
        want = stream[:pm]
        assert (res["prefix_len"], res["prefix_hash"]) == (
            len(want), "%016x" % fnv1a(want)), pm
        assert res["prompt_bytes"] == 7
    assert results[0]["prefix_hash"] == "%016x" % FNV_BASIS

    # a document with no prompt text, and one too large for the prefix
    big = b'{"prompt":"' + b"x" * 100000 + b'"}'
    a, b = scan_many(cli, [(b'{"model":"m"}', 256), (big, 256)])
    assert (a["prefix_len"], a["prefix_hash"]) == (0, "%016x" % FNV_BASIS)
    assert b["prompt_bytes"] == 100000 and b["prefix_len"] == 256
    assert b["prefix_hash"] == "%016x" % fnv1a(b"x" * 256)


def nest(n, open_, close, inner="1"):
    return open_ * n + inner + close * n


def test_depth(cli):
    cases = [
        (nest(64, "[", "]"), "declined"),
        (nest(65, "[", "]"), "error"),
        (nest(63, '{"a":', "}", "{}"), "ok"),
        (nest(64, '{"a":', "}", "{}"), "error"),
        ('{"x":' + nest(63, "[", "]") + ',"model":"m"}', "ok"),
        ('{"x":' + nest(64, "[", "]") + ',"model":"m"}', "error"),
        ('{"prompt":' + nest(63, "[", "]", '"deep"') + "}", "ok"),
        (nest(10000, "[", "]"), "error"),
        ("[" * 100000, "error"),
    ]
    results = scan_many(cli, [(B(d), 256) for d, _ in cases])
    for (doc, rc), res in zip(cases, results):
        assert res["rc"] == rc, (doc[:80], res)
        if rc == "error":
            assert res["error"] == "JSON nested too deeply", res
        if len(doc) < 1000:
            # Python's json takes these, deeper than our limit or not
            json.loads(doc)
    assert results[4]["model"] == b"m"
    assert results[6]["prompt_bytes"] == 4
    assert results[1]["error_offset"] == 64


def test_fuzz(tmp_path):
    """libFuzzer, ASan and UBSan over the scanner for 5 s."""
    tokens = ["{", "}", "[", "]", ",", ":", '"', "\\u", "\\ud83d",
              "\\ude00", "\\\\", "true", "false", "null", "-0", "1e5",
              '"model"', '"stream"', '"max_tokens"',
              '"max_completion_tokens"', '"stream_options"',
              '"include_usage"', '"messages"', '"content"', '"text"',
              '"prompt"', '"input"', '"payload"', "mod\\u0065l"]
    fuzz(tmp_path, [UNIT / "route_json_fuzz.c", SCANNER], UNIT / "corpus",
         "".join("t%d=%s\n" % (i, json.dumps(t))
                 for i, t in enumerate(tokens)))


def chat_body(size, rng):
    """An OpenAI chat body of about size bytes: a long conversation."""
    words = ("the quick brown fox jumps over a lazy dog while \u00e9t\u00e9 "
             "caf\u00e9 \u4e2d\u6587 tokens \"quoted\" back\\slash").split()
    messages = [{"role": "system", "content": "You are a helpful assistant."
                 " Answer in the user's language.\nBe brief."}]
    body = {"model": "llama-3-8b-instruct", "messages": messages,
            "stream": True, "stream_options": {"include_usage": True},
            "max_tokens": 512, "temperature": 0.7}
    per = min(2000, max(200, size // 8))
    total = len(json.dumps(body, ensure_ascii=False).encode())
    while total < size:
        text = []
        while sum(map(len, text)) < per:
            text.append(rng.choice(words))
        messages.append({"role": rng.choice(["user", "assistant"]),
                         "content": " ".join(text) + "\n"})
        total += len(json.dumps(messages[-1], ensure_ascii=False).encode())
    return json.dumps(body, ensure_ascii=False).encode()


def test_bench(tmp_path):
    """Speed of the scanner built as nginx builds it (-O2), no assertion
    on time: only that it runs and says ok."""
    bench = compile_c(tmp_path / "route_json_bench",
                      [UNIT / "route_json_cli.c", SCANNER],
                      ["-O2", "-g", "-Wall", "-Werror"])
    rng = random.Random(1)
    print()
    for name, size, n in (("2KB", 2048, 200000), ("1MB", 1 << 20, 500)):
        body = tmp_path / f"chat-{name}.json"
        body.write_bytes(chat_body(size, rng))
        r = subprocess.run([str(bench), "--bench", str(body), str(n)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        res = json.loads(r.stdout)
        assert res["rc"] == 0, res                      # NGX_OK
        print(f"bench {name}: {res['bytes']} bytes, "
              f"{res['ns_per_scan']:.0f} ns per scan, "
              f"{res['mb_per_s']:.0f} MB/s")
