"""The token usage parser (ngx_infer_route/ngx_http_infer_route_usage.c),
alone: driven through t/unit/route_usage_cli.c built with ASan and UBSan,
every document fed whole, a byte at a time and cut at random places, and
checked against an oracle written here from Python's json module and a
small SSE framer following the WHATWG parser, including where a caller
that strips the usage event may cut the stream after each buffer.  Then a
bounded libFuzzer run (t/unit/route_usage_fuzz.c) and the parser's speed
(printed, not asserted)."""

import hashlib
import json
import random
import re
import subprocess

import pytest

from harness.cunit import (REPO, UNIT, VARIANTS, build_sanitized, compile_c,
                           fuzz)

PARSER = REPO / "ngx_infer_route" / "ngx_http_infer_route_usage.c"

LINE_MAX = 8192         # NGX_HTTP_INFER_USAGE_LINE_MAX
DEPTH_MAX = 64
INT_MAX = 2 ** 53
FIELDS = ("prompt_tokens", "completion_tokens", "total_tokens",
          "cached_tokens", "reasoning_tokens")
RESULTS = ("found", "done", "content_events", "usage_event_start",
           "usage_event_end") + FIELDS
BOM = b"\xef\xbb\xbf"


def build_cli(tmp_path_factory, variant):
    out = tmp_path_factory.mktemp("route_usage") / "route_usage_cli"
    return build_sanitized(out, [UNIT / "route_usage_cli.c", PARSER],
                           variant)


@pytest.fixture(scope="session")
def cli(tmp_path_factory):
    return build_cli(tmp_path_factory, "sse2")


@pytest.fixture(scope="session", params=list(VARIANTS))
def cli_variant(request, tmp_path_factory):
    if request.param == "sse2":
        return request.getfixturevalue("cli")
    return build_cli(tmp_path_factory, request.param)


def run_many(cli, records):
    """records: [(doc, mode, strip, cuts)], cuts "-", "eK" or a list of
    offsets -> one result dict each, with a "trace" for SSE."""
    parts = []
    for doc, mode, strip, cuts in records:
        if not isinstance(cuts, str):
            cuts = "c:" + ",".join(map(str, cuts))
        trace = 1 if mode == "sse" else 0
        parts.append(b"%d %s %d %d %s\n" % (len(doc), mode.encode(), strip,
                                            trace, cuts.encode()) + doc)
    r = subprocess.run([str(cli), "--batch"], input=b"".join(parts),
                       capture_output=True, timeout=300)
    assert r.returncode == 0 and not r.stderr, r.stderr.decode()[-5000:]
    lines = r.stdout.decode().splitlines()
    assert len(lines) == len(records)
    return [json.loads(line) for line in lines]


def report(problems, limit=25):
    assert not problems, (f"{len(problems)} problems:\n"
                          + "\n".join(problems[:limit]))


# -- the oracle ------------------------------------------------------------

class RawInt(int):
    """An integer as json.loads saw it, with its text (to tell -0 from 0)."""

    def __new__(cls, raw):
        n = super().__new__(cls, int(raw))
        n.raw = raw
        return n


def _no_constant(name):
    raise ValueError(f"{name} is not JSON")


def py_depth(v):
    if isinstance(v, dict):
        return 1 + max(map(py_depth, v.values()), default=0)
    if isinstance(v, list):
        return 1 + max(map(py_depth, v), default=0)
    return 0


def strict_loads(data):
    """RFC 8259 JSON, at most 64 containers deep, or ValueError."""
    try:
        v = json.loads(data.decode("utf-8"), parse_int=RawInt,
                       parse_constant=_no_constant)
    except (UnicodeDecodeError, RecursionError) as e:
        raise ValueError(str(e))
    if py_depth(v) > DEPTH_MAX:
        raise ValueError("too deep")
    return v


def integer(x):
    """A field's value: a non-negative integer up to 2^53, else -1."""
    if isinstance(x, RawInt) and not x.raw.startswith("-") and x <= INT_MAX:
        return int(x)
    return -1


def usage_fields(u):
    pd = u.get("prompt_tokens_details")
    cd = u.get("completion_tokens_details")
    return {"prompt_tokens": integer(u.get("prompt_tokens")),
            "completion_tokens": integer(u.get("completion_tokens")),
            "total_tokens": integer(u.get("total_tokens")),
            "cached_tokens": integer(pd.get("cached_tokens"))
            if isinstance(pd, dict) else -1,
            "reasoning_tokens": integer(cd.get("reasoning_tokens"))
            if isinstance(cd, dict) else -1}


def nothing():
    return {"found": 0, "done": 0, "content_events": 0,
            "usage_event_start": 0, "usage_event_end": 0,
            **{f: -1 for f in FIELDS}}


def json_oracle(doc):
    """A JSON answer: valid or not, and the top-level usage."""
    out = nothing()
    try:
        v = strict_loads(doc)
    except ValueError:
        out["valid"] = False
        return out
    out["valid"] = True
    if isinstance(v, dict) and isinstance(v.get("usage"), dict):
        out["found"] = 1
        out.update(usage_fields(v["usage"]))
    return out


EOL = re.compile(rb"[\r\n]")


def sse_frame(stream):
    """The events of a stream, as the WHATWG parser cuts them, each with
    its byte range: from its first line to the end of the blank line
    ending it (a CRLF whole), or to the end of the stream ("eof").  Lines
    are kept with their raw length; a BOM at the start is dropped."""
    events, cur, i, n, first = [], None, 0, len(stream), True
    while i < n:
        m = EOL.search(stream, i)
        if m is None:
            j = end = n
        else:
            j = m.start()
            end = j + (2 if stream[j:j + 2] == b"\r\n" else 1)
        raw = line = stream[i:j]
        if first:
            first = False
            if line.startswith(BOM):
                line = line[3:]
        if raw and cur is None:
            cur = {"start": i, "lines": [], "eof": False}
        if line:
            cur["lines"].append((line, len(raw)))
        elif cur is not None:
            cur["end"] = end
            events.append(cur)
            cur = None
        i = end
    if cur is not None:
        cur.update(end=n, eof=True)
        events.append(cur)
    return events


def event_data(ev):
    """The data of an event, None if it has none or lost a line."""
    values = []
    for line, rawlen in ev["lines"]:
        if line == b"data":
            value = b""
        elif line.startswith(b"data:"):
            value = line[5:]
            if value.startswith(b" "):
                value = value[1:]
        else:
            continue
        if rawlen > LINE_MAX:
            return None
        values.append(value)
    return b"\n".join(values) if values else None


def has_content(choice):
    if not isinstance(choice, dict):
        return False
    delta, text = choice.get("delta"), choice.get("text")
    if isinstance(delta, dict):
        content = delta.get("content")
        if isinstance(content, str) and content:
            return True
    return isinstance(text, str) and text != ""


def sse_events(stream):
    """The framed events, each with what it says: "done", "usage" (the
    fields), "usage_only", "content"."""
    events = sse_frame(stream)
    for ev in events:
        ev.update(done=False, usage=None, usage_only=False, content=False)
        data = event_data(ev)
        if data is None:
            continue
        if data.startswith(b"[DONE]"):
            ev["done"] = True
            continue
        try:
            v = strict_loads(data)
        except ValueError:
            continue
        if not isinstance(v, dict):
            continue
        if isinstance(v.get("usage"), dict):
            ev["usage"] = usage_fields(v["usage"])
            ev["usage_only"] = v.get("choices") in ([], None)
        choices = v.get("choices")
        ev["content"] = (isinstance(choices, list)
                         and any(map(has_content, choices)))
    return events


def sse_results(events, strip, upto=None):
    """The results once the events up to index upto are dispatched."""
    out = nothing()
    for ev in events[:upto]:
        out["done"] |= ev["done"]
        if ev["usage"] is not None:
            out["found"] = 1
            out.update(ev["usage"])
            if strip and ev["usage_only"]:
                out["usage_event_start"] = ev["start"]
                out["usage_event_end"] = ev["end"]
        out["content_events"] += ev["content"]
    return out


def dispatched(stream, ev, fed):
    """Has the parser completed this event after fed bytes (no finish)? A
    CR at the end of what was fed may be half of a CRLF."""
    if ev["eof"] or ev["end"] > fed:
        return False
    return not (ev["end"] == fed and stream[fed - 1:fed] == b"\r")


def expected_trace(stream, events, strip, offsets):
    """(event_start, usage_event_start, usage_event_end) after each feed,
    the feeds ending at offsets, then after finish()."""
    out, k, rng = [], 0, (0, 0)
    for fed in offsets:
        while k < len(events) and dispatched(stream, events[k], fed):
            if strip and events[k]["usage_only"]:
                rng = (events[k]["start"], events[k]["end"])
            k += 1
        es = fed
        if k < len(events) and events[k]["start"] < fed:
            es = events[k]["start"]
        out.append((es, *rng))
    r = sse_results(events, strip)
    out.append((len(stream), r["usage_event_start"], r["usage_event_end"]))
    return out


def feed_offsets(n, cuts):
    """Where each feed of the CLI ends (as route_usage_cli.c cuts)."""
    if cuts == "-":
        return [n]
    if isinstance(cuts, str):
        k = int(cuts[1:])
        ends = list(range(k, n, k)) + [n]
    else:
        ends = list(cuts) + [n]
        if ends[-2:-1] == [n] and n > 0:
            ends.pop()
    return ends


def actual_trace(res, nfeeds):
    """The CLI's trace, one entry per feed, then one after finish()."""
    points = {f: tuple(x) for f, *x in res["trace"]}
    out, cur = [], points[-1]
    for f in range(nfeeds + 1):
        cur = points.get(f, cur)
        out.append(cur)
    return out


def sse_lines_of(stream):
    return [[line for line, _ in ev["lines"]] for ev in sse_frame(stream)
            if ev["lines"]]


def check_sse(stream, strip, cuts, res, events=None):
    """[problem] of one SSE run against the oracle."""
    events = sse_events(stream) if events is None else events
    problems = []
    want = sse_results(events, strip)
    for f in RESULTS:
        if res[f] != want[f]:
            problems.append(f"{f} {res[f]}, expected {want[f]}")
    if res["rc"] != "ok" or res["final"] != "ok":
        problems.append(f"rc {res['rc']}/{res['final']} in SSE mode")
    offsets = feed_offsets(len(stream), cuts)
    if res["feeds"] != len(offsets):
        return problems + [f"{res['feeds']} feeds, expected {len(offsets)}"]
    got = actual_trace(res, len(offsets))
    exp = expected_trace(stream, events, strip, offsets)
    for i, (g, e) in enumerate(zip(got, exp)):
        if g != e:
            at = offsets[i] if i < len(offsets) else "finish"
            problems.append(f"after feed {i} (at {at}): event_start, usage "
                            f"range {g}, expected {e}")
            break
    if strip:
        problems += check_strip(stream, got)
    return problems


def check_strip(stream, trace):
    """A caller that strips: after each feed it sends what is before
    event_start but the usage event.  It must send every event but the
    usage-only ones reported, none of which it sent before."""
    problems, sent, pos, ranges = [], [], 0, []
    for es, us, ue in trace:
        if ue and (us, ue) not in ranges:
            if us < pos:
                problems.append(f"usage event {us}..{ue} reported after "
                                f"{pos} bytes were sent")
            ranges.append((us, ue))
        while pos < es:
            r = next((r for r in ranges if r[0] <= pos < r[1]), None)
            if r:
                pos = r[1]
                continue
            nxt = min([r[0] for r in ranges if r[0] > pos] + [es])
            sent.append(stream[pos:nxt])
            pos = nxt
    out = b"".join(sent)
    events = sse_events(stream)
    by_range = {(ev["start"], ev["end"]): ev for ev in events}
    for r in ranges:
        if r not in by_range or not by_range[r]["usage_only"]:
            problems.append(f"range {r} is not a usage-only event")
    kept = [[line for line, _ in ev["lines"]] for ev in events
            if ev["lines"] and (ev["start"], ev["end"]) not in ranges]
    if sse_lines_of(out) != kept:
        problems.append("the stream sent is not the events but the usage "
                        "ones")
    # the last one reported, cut out of the whole stream
    if trace[-1][2]:
        us, ue = trace[-1][1:]
        want = [[line for line, _ in ev["lines"]] for ev in events
                if ev["lines"] and (ev["start"], ev["end"]) != (us, ue)]
        if sse_lines_of(stream[:us] + stream[ue:]) != want:
            problems.append(f"cutting {us}..{ue} changes other events")
    return problems


def check_json(doc, res, want=None):
    want = json_oracle(doc) if want is None else want
    problems = []
    if want["valid"]:
        if (res["rc"], res["final"]) != ("ok", "ok"):
            problems.append(f"rc {res['rc']}/{res['final']} on valid JSON"
                            f" (feed {res['error_feed']})")
        for f in RESULTS:
            if res[f] != want[f]:
                problems.append(f"{f} {res[f]}, expected {want[f]}")
    elif res["final"] != "error":
        problems.append("invalid JSON not reported")
    if res["event_start"] != len(doc) or res["offset"] != len(doc):
        problems.append("offsets wrong")
    return problems


def cut_patterns(rng, n, bytewise=True):
    """Ways to cut a document of n bytes: whole, a byte at a time, and at
    random places, a few or many."""
    pats = ["-"]
    if bytewise:
        pats.append("e1")
    pats.append(rng.choice(["e2", "e3", "e7", "e64", "e1000"]))
    for k in (1, 3, 40):
        if n > 1:
            pats.append(sorted(rng.sample(range(1, n), min(k, n - 1))))
    return pats


def same_results(results):
    keys = RESULTS + ("rc", "final", "event_start", "offset")
    first = {k: results[0][k] for k in keys}
    return all({k: r[k] for k in keys} == first for r in results[1:])


# -- generated answers -----------------------------------------------------

WORDS = ["Hello", " world", ",", " the", " quick", " brown", " fox", ".",
         " caf\u00e9", " \u4e2d\u6587", " \U0001F600", ' "quoted"',
         " back\\slash", "\n", "\t", " \u2028", "\x00", " /path", " ",
         ' "usage": {"prompt_tokens": 99}', " data: [DONE]", "\r\n\r\n",
         ' {"choices": []}', " \\u0075sage"]

OUR_KEYS = ("usage", "prompt_tokens", "completion_tokens", "total_tokens",
            "prompt_tokens_details", "cached_tokens",
            "completion_tokens_details", "reasoning_tokens", "choices",
            "delta", "content", "text")
KEY_RE = re.compile(r'"(%s)"(\s*):' % "|".join(OUR_KEYS))


def text(rng, lo=0, hi=8):
    return "".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def escape_keys(rng, s, p):
    """Our keys, some of their letters as \\u escapes: JSON strings hold
    no bare '"', so the pattern only meets keys."""
    def sub(m):
        if rng.random() >= p:
            return m.group(0)
        key = "".join("\\u%04x" % ord(ch) if rng.random() < 0.4 else ch
                      for ch in m.group(1))
        return '"%s"%s:' % (key, m.group(2))
    return KEY_RE.sub(sub, s)


def dumps(rng, v, pretty=None, p_escape=0.1):
    if pretty is None:
        pretty = rng.random() < 0.1
    s = json.dumps(v, ensure_ascii=rng.random() < 0.5,
                   indent=rng.choice([None, 1, 2, "\t"]) if pretty else None,
                   separators=rng.choice([(",", ":"), (", ", ": ")])
                   if not pretty else None)
    return escape_keys(rng, s, p_escape)


def rtoken(rng):
    r = rng.random()
    if r < 0.8:
        return rng.randint(0, 5000)
    return rng.choice([0, 2 ** 53, 2 ** 53 + 1, 2 ** 63, 10 ** 30, -1, -0.0,
                       1.0, 1.5, 1e3, "5", True, None, [], {}])


def rusage(rng):
    """A usage object, mostly as servers send it, sometimes not."""
    p, c = rng.randint(1, 4000), rng.randint(0, 2000)
    u = {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
    r = rng.random()
    if r < 0.15:
        del u["total_tokens"]
    elif r < 0.25:
        u[rng.choice(list(u))] = rtoken(rng)
    elif r < 0.3:
        del u["completion_tokens"]          # embeddings
    if rng.random() < 0.4:
        u["prompt_tokens_details"] = rng.choice(
            [{"cached_tokens": rng.randint(0, p)}, None, {},
             {"cached_tokens": rtoken(rng)}, {"audio_tokens": 0}, 5])
    if rng.random() < 0.2:
        u["completion_tokens_details"] = rng.choice(
            [{"reasoning_tokens": rng.randint(0, c),
              "accepted_prediction_tokens": 0}, None,
             {"reasoning_tokens": rtoken(rng)}])
    if rng.random() < 0.05:
        u["usage"] = {"prompt_tokens": 1}           # not the top one
    if rng.random() < 0.05:
        u["nested"] = {"prompt_tokens": 123, "total_tokens": [1, {}]}
    items = list(u.items())
    rng.shuffle(items)
    return dict(items)


def decoy(rng):
    """Things named like ours where they do not count."""
    return rng.choice([
        {"usage": {"prompt_tokens": 777}},
        [{"usage": {"total_tokens": 1}}, "usage"],
        {"x": {"choices": [{"delta": {"content": "no"}}]}},
        "\"usage\": {\"prompt_tokens\": 5}",
        {"text": "no", "content": "no", "delta": {"content": "no"}},
    ])


def json_answer(rng):
    """A non-streamed answer: chat, completion, embeddings, /api/infer."""
    kind = rng.choice(["chat", "completion", "embeddings", "infer"])
    model = rng.choice(["llama-3-8b", "gpt-4o", "mistral/7b"])
    if kind == "chat":
        d = {"id": "chatcmpl-%x" % rng.getrandbits(40),
             "object": "chat.completion", "created": 1700000000,
             "model": model,
             "choices": [{"index": i, "message": {
                 "role": "assistant", "content": text(rng, 0, 40),
                 **({"tool_calls": [{"id": "c", "type": "function",
                                     "function": {"name": "f",
                                                  "arguments": "{}"}}]}
                    if rng.random() < 0.1 else {})},
                 "logprobs": None, "finish_reason": "stop"}
                 for i in range(rng.choice([1, 1, 2]))]}
    elif kind == "completion":
        d = {"id": "cmpl-1", "object": "text_completion", "created": 1,
             "model": model,
             "choices": [{"index": 0, "text": text(rng, 0, 40),
                          "logprobs": None, "finish_reason": "length"}]}
    elif kind == "embeddings":
        d = {"object": "list", "model": model,
             "data": [{"object": "embedding", "index": i,
                       "embedding": [round(rng.uniform(-1, 1), 6)
                                     for _ in range(rng.randint(0, 64))]}
                      for i in range(rng.randint(1, 3))]}
    else:
        d = {"model": model, "output": {"echo": decoy(rng),
                                        "text": text(rng)}}
    r = rng.random()
    if r < 0.8:
        d["usage"] = rusage(rng)
    elif r < 0.9:
        d["usage"] = rng.choice([None, 5, "x", [], [rusage(rng)], True])
    if rng.random() < 0.2:
        d["system_fingerprint"] = decoy(rng)
    items = list(d.items())
    rng.shuffle(items)
    return dict(items)


def json_doc(rng):
    d = json_answer(rng)
    s = dumps(rng, d, p_escape=0.2)
    if rng.random() < 0.1:
        s = rng.choice([" ", "\n", "\r\n", "\t "]) + s + rng.choice(
            ["", " ", "\n", "\r\n\r\n"])
    return s.encode("utf-8")


CHUNK_BASE = {"object": "chat.completion.chunk", "created": 1700000000,
              "model": "llama-3-8b"}


def chat_chunk(rng, content, finish=None, role=False, usage=None,
               with_usage=False):
    delta = {}
    if role:
        delta["role"] = "assistant"
    if content is not None:
        delta["content"] = content
    d = {"id": "chatcmpl-1", **CHUNK_BASE,
         "choices": [{"index": 0, "delta": delta, "logprobs": None,
                      "finish_reason": finish}]}
    if with_usage:
        d["usage"] = usage
    return d


def text_chunk(rng, t, finish=None, usage=None, with_usage=False):
    d = {"id": "cmpl-1", "object": "text_completion", "created": 1,
         "model": "m", "choices": [{"index": 0, "text": t,
                                    "logprobs": None,
                                    "finish_reason": finish}]}
    if with_usage:
        d["usage"] = usage
    return d


def stream_payloads(rng):
    """The events of a streamed answer, as JSON values (or raw bytes)."""
    chat = rng.random() < 0.7
    include_usage = rng.random() < 0.7
    nulls = include_usage and rng.random() < 0.6    # "usage": null on all
    continuous = rng.random() < 0.1                 # usage on every chunk
    out = []

    def chunk(content, finish=None, role=False):
        usage = rusage(rng) if continuous else None
        w = nulls or continuous
        if chat:
            return chat_chunk(rng, content, finish, role, usage, w)
        return text_chunk(rng, content or "", finish, usage, w)

    if chat:
        out.append(chunk("", role=True))
    for _ in range(rng.randint(0, 12)):
        r = rng.random()
        if r < 0.8:
            out.append(chunk(text(rng, 1, 3)))
        elif r < 0.85:
            out.append(chunk(rng.choice(["", None])))
        elif r < 0.9 and chat:
            c = chat_chunk(rng, None)
            c["choices"][0]["delta"]["tool_calls"] = [
                {"index": 0, "function": {"arguments": "{\"a\":"}}]
            out.append(c)
        elif r < 0.93:
            c = chunk(text(rng, 1, 2))             # two choices, n=2
            c["choices"].append({"index": 1, "delta": {"content": ""},
                                 "text": "", "finish_reason": None})
            rng.shuffle(c["choices"])
            out.append(c)
        elif r < 0.96:
            out.append(chunk("x" * rng.choice([3000, 8100, 9000, 20000])))
        else:
            out.append({"choices": rng.choice([None, [], {}, "x", [None],
                                               [{"delta": None}],
                                               [{"delta": {"content": 5}}],
                                               [{"text": "t"}]]),
                        "odd": decoy(rng)})
    out.append(chunk(None if chat else "", finish="stop"))
    if include_usage:
        r = rng.random()
        final = {"id": "chatcmpl-1", **CHUNK_BASE, "choices": [],
                 "usage": rusage(rng)}
        if r < 0.1:
            final["choices"] = None
        elif r < 0.2:
            del final["choices"]
        elif r < 0.3:
            # the usage on the last chunk with content: not usage-only
            out[-1]["usage"] = final["usage"]
            final = None
        elif r < 0.35:
            final["usage"] = None
        if final is not None:
            items = list(final.items())
            rng.shuffle(items)
            out.append(dict(items))
    if rng.random() < 0.1:
        # a usage-only event in the middle, and another later
        out.insert(rng.randint(0, len(out)),
                   {"choices": [], "usage": rusage(rng)})
    if rng.random() < 0.05:
        out.insert(rng.randint(0, len(out)), {"usage": None, "choices": []})
    return out


def sse_stream(rng):
    """A stream as vLLM and OpenAI send it, with the odd shapes of other
    servers and of the spec: comments, other fields, CRLF or CR, data on
    several lines, broken events, a last event with no blank line."""
    style = rng.random()
    eol_choice = (["\n"] if style < 0.5 else ["\r\n"] if style < 0.75
                  else ["\r"] if style < 0.85 else ["\n", "\r\n", "\r"])

    def eol():
        return rng.choice(eol_choice).encode()

    out = []
    if rng.random() < 0.03:
        out.append(BOM)
    if rng.random() < 0.1:
        out.append(b": connected" + eol() + eol())

    for payload in stream_payloads(rng):
        lines = []
        if rng.random() < 0.1:
            lines.append(rng.choice([b": ping", b":", b"event: message",
                                     b"id: 7", b"retry: 1000", b"foo: bar",
                                     b"event", b"dat: x", b"Data: x",
                                     b"data : x"]))
        s = dumps(rng, payload, pretty=rng.random() < 0.08)
        if rng.random() < 0.03:
            s = s[:rng.randrange(len(s) + 1)]          # broken
        elif rng.random() < 0.02:
            s = s + rng.choice(["x", "}", " {}", ","])
        prefix = rng.choice([b"data: "] * 8 + [b"data:", b"data:  "])
        data = s.encode("utf-8").split(b"\n")
        lines += [prefix + d for d in data]
        if rng.random() < 0.05:
            lines.append(rng.choice([b"id: 9", b": c"]))
        body = eol().join(lines) + eol() + eol()
        if rng.random() < 0.05:
            body += eol() * rng.randint(1, 3)           # extra blank lines
        out.append(body)

    end = rng.random()
    if end < 0.7:
        out.append(rng.choice([b"data: [DONE]", b"data:[DONE]"]) + eol()
                   + eol())
    elif end < 0.8:
        out.append(b"data: [DONE]" + eol())              # closed at once
    elif end < 0.85:
        out.append(b"data: [DONE]")
    elif end < 0.9:
        out.append(b"data: {\"choices\": [], \"usage\": "
                   b"{\"prompt_tokens\": 3}}" + rng.choice([b"", eol()]))
    elif end < 0.95:
        out.append(b"data: {\"choices\": [")             # cut short
    return b"".join(out)


# -- the tests -------------------------------------------------------------

def test_json_generated(cli_variant):
    """Generated answers, each cut six ways: the results are the oracle's
    and do not depend on the cuts."""
    rng = random.Random(20240611)
    docs = [json_doc(rng) for _ in range(300)]
    records, index = [], []
    for i, doc in enumerate(docs):
        for cuts in cut_patterns(rng, len(doc), len(doc) < 6000):
            records.append((doc, "json", rng.randint(0, 1), cuts))
            index.append(i)
    results = run_many(cli_variant, records)
    problems, by_doc, found = [], {}, 0
    for (doc, _, _, cuts), i, res in zip(records, index, results):
        want = json_oracle(doc)
        found += res["found"]
        problems += [f"doc {i} {doc[:200]!r} cut {str(cuts)[:40]}: {x}"
                     for x in check_json(doc, res, want)]
        by_doc.setdefault(i, []).append(res)
    problems += [f"doc {i}: results depend on the cuts"
                 for i, rs in by_doc.items() if not same_results(rs)]
    report(problems)
    assert found > 0.6 * len(records)


def test_json_invalid(cli):
    """Truncations and one-character edits of valid answers: NGX_ERROR
    exactly when Python's json says invalid, whatever the cuts."""
    rng = random.Random(5)
    valid = [json_doc(rng) for _ in range(60)]
    docs = []
    for d in valid[:6]:
        docs += [d[:i] for i in range(0, len(d), max(1, len(d) // 150))]
    edits = "{}[],:\"\\ \t0123456789-+.eEtrufalsn\x00\x1f'x\u00e9"
    for _ in range(2500):
        t = rng.choice(valid).decode("utf-8")
        i = rng.randrange(len(t) + 1)
        op = rng.random()
        if op < 0.3:
            t = t[:i] + t[i + 1:]
        elif op < 0.65:
            t = t[:i] + rng.choice(edits) + t[i:]
        else:
            t = t[:i] + rng.choice(edits) + t[i + 1:]
        docs.append(t.encode("utf-8"))
    docs += [b"", b" ", b"{}{}", b"{} x", b"[]]", b"\xef\xbb\xbf{}",
             b"{\"usage\":{\"prompt_tokens\":1}}\x00",
             b"[" * 64 + b"]" * 64, b"[" * 65 + b"]" * 65,
             b'{"a":' * 63 + b"{}" + b"}" * 63,
             b'{"a":' * 64 + b"{}" + b"}" * 64]
    records = []
    for d in docs:
        records.append((d, "json", 0, "-"))
        if len(d) > 1:
            records.append((d, "json", 0, sorted(rng.sample(
                range(1, len(d)), min(len(d) - 1, 5)))))
    results = run_many(cli, records)
    problems, counts, by_doc = [], {True: 0, False: 0}, {}
    for (doc, _, _, cuts), res in zip(records, results):
        want = json_oracle(doc)
        counts[want["valid"]] += 1
        problems += [f"{doc[:200]!r}: {x}" for x in check_json(doc, res,
                                                               want)]
        by_doc.setdefault(doc, []).append(res)
    problems += [f"{doc[:200]!r}: results depend on the cuts"
                 for doc, rs in by_doc.items() if not same_results(rs)]
    print(f"\ninvalid JSON: {counts[False]} runs invalid, "
          f"{counts[True]} valid")
    report(problems)
    assert counts[False] > 1000


def json_edge_cases():
    """(name, answer, expected fields): JSON answers that need saying."""
    U = b'{"prompt_tokens":10,"completion_tokens":5,"total_tokens":15}'
    return [
        ("usage-found",
         b'{"usage":' + U + b'}', {"found": 1, "prompt_tokens": 10,
                                   "completion_tokens": 5,
                                   "total_tokens": 15}),
        ("usage-null", b'{"usage":null}', {"found": 0}),
        ("usage-then-null-usage",
         b'{"usage":' + U + b',"usage":null}', {"found": 0,
                                                "prompt_tokens": -1}),
        ("null-usage-then-usage",
         b'{"usage":null,"usage":' + U + b'}', {"found": 1,
                                                "total_tokens": 15}),
        ("two-usage-objects-last-wins",
         b'{"usage":{"prompt_tokens":1},"usage":{"total_tokens":2}}',
         {"found": 1, "prompt_tokens": -1, "total_tokens": 2}),
        ("duplicate-prompt-tokens-last-not-an-integer",
         b'{"usage":{"prompt_tokens":1,"prompt_tokens":2.0}}',
         {"found": 1, "prompt_tokens": -1}),
        ("negative-zero-zero-and-2-to-the-53",
         b'{"usage":{"prompt_tokens":-0,"completion_tokens":0,'
         b'"total_tokens":9007199254740992}}',
         {"prompt_tokens": -1, "completion_tokens": 0,
          "total_tokens": 9007199254740992}),
        ("total-tokens-past-2-to-the-53",
         b'{"usage":{"total_tokens":9007199254740993}}',
         {"found": 1, "total_tokens": -1}),
        ("exponent-string-and-true-not-counts",
         b'{"usage":{"total_tokens":1e2,"prompt_tokens":"5",'
         b'"completion_tokens":true}}',
         {"found": 1, "total_tokens": -1, "prompt_tokens": -1,
          "completion_tokens": -1}),
        ("escaped-keys-and-token-details",
         b'{"\\u0075sag\\u0065":{"prompt_t\\u006Fkens":4,'
         b'"prompt_tokens_details":{"cached_tokens":3},'
         b'"completion_tokens_details":{"reasoning_tokens":2}}}',
         {"found": 1, "prompt_tokens": 4, "cached_tokens": 3,
          "reasoning_tokens": 2}),
        ("token-details-then-null",
         b'{"usage":{"prompt_tokens_details":{"cached_tokens":3},'
         b'"prompt_tokens_details":null}}', {"cached_tokens": -1}),
        ("details-fields-outside-their-objects-ignored",
         b'{"usage":{"cached_tokens":3,"reasoning_tokens":4}}',
         {"found": 1, "cached_tokens": -1, "reasoning_tokens": -1}),
        ("near-miss-usage-keys-ignored",
         b'{"usage ":' + U + b',"Usage":' + U + b',"usage\\u0000":' + U
         + b',"us\\u00e1ge":' + U + b'}', {"found": 0}),
        ("usage-under-another-long-key-ignored",
         b'{"' + b"x" * 100 + b'":' + U + b'}', {"found": 0}),
        ("nested-usage-ignored",
         b'{"choices":[{"usage":' + U + b'}],"data":{"usage":' + U + b'}}',
         {"found": 0}),
        ("usage-inside-a-top-level-array-ignored",
         b'[{"usage":' + U + b'}]', {"found": 0}),
        ("usage-inside-a-string-ignored",
         b'{"choices":[{"message":{"content":"\\"usage\\":' + U.replace(
            b'"', b'\\"') + b'"}}]}', {"found": 0}),
        ("whitespace-everywhere",
         b' \r\n\t{"usage" : {\n "prompt_tokens" : 7 } }\n', {
            "found": 1, "prompt_tokens": 7}),
        ("prompt-tokens-of-400-digits",
         b'{"usage":{"prompt_tokens":' + b"9" * 400 + b'}}',
         {"found": 1, "prompt_tokens": -1}),
    ]


JSON_EDGE = json_edge_cases()


def named(case):
    """A table case's test id: its name, first in the tuple."""
    return case[0]


@pytest.fixture(scope="module")
def json_edge_runs(cli):
    """Each answer of JSON_EDGE whole and a byte at a time, in one run of
    the cli for them all: name -> its two results."""
    records = []
    for _, doc, _ in JSON_EDGE:
        records += [(doc, "json", 0, "-"), (doc, "json", 0, "e1")]
    results = run_many(cli, records)
    return {name: results[2 * i:2 * i + 2]
            for i, (name, _, _) in enumerate(JSON_EDGE)}


@pytest.mark.parametrize("case", JSON_EDGE, ids=named)
def test_json_edge_cases(json_edge_runs, case):
    """Whole and a byte at a time: what the oracle says, and the fields
    the case expects."""
    name, doc, want = case
    problems = []
    for res in json_edge_runs[name]:
        problems += [f"{doc[:120]!r}: {x}" for x in check_json(doc, res)]
        problems += [f"{doc[:120]!r}: {f} {res[f]}, want {w}"
                     for f, w in want.items() if res[f] != w]
    report(problems)


def test_json_an_answer_cut_short_or_followed_by_more(cli):
    """An answer cut short keeps what was read, and says it is invalid; a
    second document after the answer is an error at the feed that brings
    it, and the usage read before it stays."""
    U = b'{"prompt_tokens":10,"completion_tokens":5,"total_tokens":15}'
    doc = b'{"usage":' + U + b',"choices":[{"text":"abc'
    res, = run_many(cli, [(doc, "json", 0, "e5")])
    assert (res["rc"], res["final"]) == ("ok", "error"), res
    assert (res["found"], res["total_tokens"]) == (1, 15), res
    doc = b'{"usage":' + U + b'} {"usage":{"prompt_tokens":1}}'
    res, = run_many(cli, [(doc, "json", 0, [5, len(U) + 11])])
    assert (res["rc"], res["error_feed"], res["final"]) == ("error", 2,
                                                            "error"), res
    assert res["prompt_tokens"] == 10, res


def test_json_large(cli):
    """Answers of megabytes: strings with "usage" in them, an embeddings
    array, the usage before or after them."""
    rng = random.Random(3)
    content = ("the \"usage\": {\"prompt_tokens\": 1} caf\u00e9 \u4e2d "
               "\\n data: [DONE]\n ") * 60000
    usage = {"prompt_tokens": 321, "completion_tokens": 123,
             "total_tokens": 444}
    docs = [
        json.dumps({"choices": [{"message": {"content": content}}],
                    "usage": usage}, ensure_ascii=False),
        json.dumps({"usage": usage, "choices": [{"text": content}]}),
        json.dumps({"object": "list", "data": [
            {"embedding": [rng.uniform(-1, 1) for _ in range(4096)]}
            for _ in range(12)], "usage": usage}),
    ]
    records = []
    for d in docs:
        d = d.encode("utf-8")
        records += [(d, "json", 0, "-"), (d, "json", 0, "e4096"),
                    (d, "json", 0, sorted(rng.sample(range(1, len(d)),
                                                     2000)))]
    results = run_many(cli, records)
    problems = []
    for (doc, _, _, cuts), res in zip(records, results):
        problems += [f"{len(doc)} bytes: {x}" for x in check_json(doc, res)]
        assert res["prompt_tokens"] == 321
    report(problems)


def test_sse_generated(cli_variant):
    """Generated streams, each cut seven ways: the results, event_start
    after every feed and what a stripping caller sends are the oracle's."""
    rng = random.Random(20240612)
    streams = [sse_stream(rng) for _ in range(250)]
    records, index = [], []
    for i, s in enumerate(streams):
        strip = 1 if rng.random() < 0.7 else 0
        pats = cut_patterns(rng, len(s), len(s) < 40000)
        # between every CR and LF, and inside every "data:"
        pats.append(sorted({m.start() + 1 for m in re.finditer(rb"\r", s)
                            if m.start() + 1 < len(s)}
                           | {m.start() + 3 for m in
                              re.finditer(rb"data", s)}))
        for cuts in pats:
            records.append((s, "sse", strip, cuts))
            index.append(i)
    results = run_many(cli_variant, records)
    problems, by_doc, stats = [], {}, {"found": 0, "stripped": 0,
                                       "content": 0, "done": 0}
    events = {}
    for (s, _, strip, cuts), i, res in zip(records, index, results):
        if i not in events:
            events[i] = sse_events(s)
        problems += [f"stream {i} cut {str(cuts)[:40]}: {x}"
                     for x in check_sse(s, strip, cuts, res, events[i])]
        by_doc.setdefault(i, []).append(res)
        stats["found"] += res["found"]
        stats["stripped"] += res["usage_event_end"] > 0
        stats["content"] += res["content_events"] > 0
        stats["done"] += res["done"]
    problems += [f"stream {i}: results depend on the cuts"
                 for i, rs in by_doc.items() if not same_results(rs)]
    print(f"\nSSE: {len(streams)} streams, {len(records)} runs, {stats}")
    report(problems)
    assert stats["stripped"] > 0.3 * len(records)


def E(d):
    return b"data: " + json.dumps(d, separators=(",", ":")).encode()


USAGE = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
USAGE_JSON = json.dumps(USAGE).encode()


def sse_edge_cases():
    """(name, stream, expected fields): shapes of streams that need
    saying."""
    C = E({"choices": [{"delta": {"content": "hi"}}], "usage": None})
    U = E({"choices": [], "usage": USAGE})
    long_line = E({"choices": [{"delta": {"content": "y" * 9000}}]})
    at_max = b"data: " + b" " * (LINE_MAX - 6 - len(U) + 6) + U[6:]
    return [
        ("content-then-usage-then-done",
         C + b"\n\n" + U + b"\n\ndata: [DONE]\n\n",
         {"content_events": 1, "found": 1, "done": 1, "total_tokens": 7}),
        # the end: no blank line, no newline, a CR
        ("done-without-a-blank-line", U + b"\n\ndata: [DONE]\n", {"done": 1}),
        ("done-without-a-newline", U + b"\n\ndata: [DONE]", {"done": 1}),
        ("cr-line-ends", U + b"\r\rdata: [DONE]\r", {"done": 1, "found": 1}),
        ("usage-then-crlf-at-the-end",
         U + b"\r\n", {"found": 1, "usage_event_end": len(U) + 2}),
        ("usage-at-the-end-without-a-newline",
         U, {"found": 1, "usage_event_end": len(U)}),
        ("done-followed-by-a-character", b"data: [DONE]x\n\n", {"done": 1}),
        ("truncated-done-is-not-done", b"data: [DON\n\n", {"done": 0}),
        ("empty-data-lines-and-blank-lines",
         b"data:\n\n" + b"data\n\n" + b"\n\n\n", {"done": 0}),
        # choices null, absent, with content; usage null; total missing
        ("choices-null-with-usage",
         E({"choices": None, "usage": USAGE}) + b"\n\n",
         {"usage_event_end": len(E({"choices": None, "usage": USAGE}))
          + 2}),
        ("usage-without-total-tokens",
         E({"usage": {"prompt_tokens": 1, "completion_tokens": 2}})
         + b"\n\n", {"found": 1, "total_tokens": -1}),
        ("usage-with-content-not-stripped",
         E({"choices": [{"delta": {"content": "a"}}], "usage": USAGE})
         + b"\n\n", {"found": 1, "content_events": 1,
                     "usage_event_end": 0}),
        ("usage-then-null-usage-kept",
         U + b"\n\n" + E({"choices": [], "usage": None}) + b"\n\n",
         {"found": 1, "total_tokens": 7}),
        ("empty-then-non-empty-text",
         E({"choices": [{"text": ""}, {"text": "t"}]}) + b"\n\n",
         {"content_events": 1}),
        ("empty-text-and-empty-delta-no-content",
         E({"choices": [{"text": "", "delta": {"content": ""}}]})
         + b"\n\n", {"content_events": 0}),
        ("duplicate-delta-last-has-no-content",
         b'data: {"choices":[{"delta":{"content":"a"},"delta":{}}]}\n\n',
         {"content_events": 0}),
        ("escaped-nul-counts-as-content",
         b'data: {"choices":[{"delta":{"content":"\\u0000"}}]}\n\n',
         {"content_events": 1}),
        ("escaped-keys-in-a-content-event",
         b'data: {"ch\\u006fices":[{"d\\u0065lta":{"content":"a"}}]}\n\n',
         {"content_events": 1}),
        ("top-level-array-event-ignored",
         b'data: [{"choices":[{"delta":{"content":"a"}}]}]\n\n',
         {"content_events": 0}),
        # broken JSON: that event only
        ("broken-json-event-then-usage",
         b'data: {"choices":[],"usage":{"prompt_tokens":1}\n\n' + U
         + b"\n\n", {"found": 1, "prompt_tokens": 5}),
        ("usage-then-broken-json-event",
         U + b'\n\ndata: {"choices":[],"usage":{"prompt_tokens":1}}}\n\n',
         {"found": 1, "prompt_tokens": 5}),
        # several data lines, fields, comments
        ("event-split-over-two-data-lines",
         b'data: {"choices":[],\ndata: "usage":{"prompt_tokens":3}}\n\n',
         {"found": 1, "prompt_tokens": 3}),
        ("newline-inside-a-string-splits-lines",
         b'data: {"choices":[{"text":"a\ndata: b"}]}\n\n',
         {"content_events": 0}),
        ("comments-and-other-fields-around-usage",
         b": hi\nevent: x\nid: 1\nretry: 5\nfoo\n" + U + b"\n: c\n\n",
         {"found": 1, "usage_event_start": 0}),
        ("data-colon-without-a-space",
         b"data:" + U[6:] + b"\n\n", {"found": 1}),
        ("data-colon-two-spaces", b"data:  " + U[6:] + b"\n\n", {"found": 1}),
        ("field-names-case-and-space-sensitive",
         b"Data: " + U[6:] + b"\n\ndata : x\n\n", {"found": 0}),
        # a BOM, line endings mixed
        ("byte-order-mark-then-usage-crlf",
         BOM + U + b"\r\n\r\n", {"found": 1, "usage_event_start": 0}),
        ("byte-order-mark-then-a-blank-line",
         BOM + b"\n" + U + b"\n\n", {"found": 1, "usage_event_start": 4}),
        ("byte-order-mark-not-at-the-start",
         b"\n" + BOM + U + b"\n\n", {"found": 0}),
        ("mixed-line-endings",
         C + b"\r\n\n" + U + b"\r\r\n" + C + b"\n\r\n",
         {"content_events": 2, "found": 1}),
        # long lines: parsed up to LINE_MAX, framed past it
        ("content-line-past-line-max-framed",
         long_line + b"\n\n" + U + b"\n\n", {"content_events": 0,
                                             "found": 1}),
        ("usage-line-of-line-max-bytes", at_max + b"\n\n", {"found": 1}),
        ("usage-line-one-past-line-max",
         b"data:  " + at_max[6:] + b"\n\n", {"found": 0}),
        ("long-comment-before-usage",
         b":" + b"c" * 20000 + b"\n" + U + b"\n\n", {"found": 1,
                                                    "usage_event_start": 0}),
        ("done-then-long-line-not-done",
         b"data: [DONE]\n" + b"data: " + b"x" * 9000 + b"\n\n",
         {"done": 0}),
        # two usage-only events: the last one is reported
        ("two-usage-events-last-reported",
         U + b"\n\n" + U.replace(b"7", b"8") + b"\n\n",
         {"total_tokens": 8, "usage_event_start": len(U) + 2}),
        # JSON too deep
        ("deep-arrays-event-then-usage",
         b"data: " + b"[" * 64 + b"]" * 64 + b"\n\n" + U + b"\n\n",
         {"found": 1}),
        ("usage-beside-too-deep-arrays",
         b'data: {"usage":' + USAGE_JSON + b',"x":' + b"[" * 64
         + b"]" * 64 + b"}\n\n", {"found": 0}),
    ]


SSE_EDGE = sse_edge_cases()


@pytest.fixture(scope="module")
def sse_edge_runs(cli):
    """Each stream of SSE_EDGE whole and a byte at a time, stripped, and
    three bytes at a time, not, in one run of the cli for them all: name
    -> its three (record, result)."""
    records = []
    for _, s, _ in SSE_EDGE:
        records += [(s, "sse", 1, "-"), (s, "sse", 1, "e1"),
                    (s, "sse", 0, "e3")]
    results = run_many(cli, records)
    return {name: list(zip(records[3 * i:3 * i + 3],
                           results[3 * i:3 * i + 3]))
            for i, (name, _, _) in enumerate(SSE_EDGE)}


@pytest.mark.parametrize("case", SSE_EDGE, ids=named)
def test_sse_edge_cases(sse_edge_runs, case):
    """Each stream checked against the oracle and its expected values,
    whole and a byte at a time."""
    name, s, want = case
    problems = []
    for (_, _, strip, cuts), res in sse_edge_runs[name]:
        problems += [f"{s[:100]!r} cut {cuts}: {x}"
                     for x in check_sse(s, strip, cuts, res)]
        problems += [f"{s[:100]!r}: {f} {res[f]}, want {w}"
                     for f, w in want.items()
                     if res[f] != w and (strip or "usage_event" not in f)]
    report(problems)


def test_sse_strip_hold(cli):
    """What a stripping caller holds back: nothing but the pending event,
    and the usage event until it is known to be whole (a CR at the end
    of a buffer waits for the next byte)."""
    U = E({"choices": [], "usage": USAGE})
    C = E({"choices": [{"delta": {"content": "hi"}}]})
    s = C + b"\r\n\r\n" + U + b"\r\n\r\n" + b"data: [DONE]\r\n\r\n"
    start, end = len(C) + 4, len(C) + 4 + len(U) + 4
    cut_cr = end - 1                        # between the last CR and LF
    res, = run_many(cli, [(s, "sse", 1, [len(C) + 2, start + 3, cut_cr])])
    trace = actual_trace(res, 4)
    assert trace == [(0, 0, 0), (start, 0, 0), (start, 0, 0),
                     (len(s), start, end), (len(s), start, end)], trace
    assert check_sse(s, 1, [len(C) + 2, start + 3, cut_cr], res) == []


def test_fuzz(tmp_path):
    """libFuzzer, ASan and UBSan over the parser for 5 s."""
    tokens = ["{", "}", "[", "]", ",", ":", '"', "\\u", "\\u0075", "\\\\",
              "true", "false", "null", "-0", "1e5", "9007199254740993",
              '"usage"', '"prompt_tokens"', '"completion_tokens"',
              '"total_tokens"', '"prompt_tokens_details"',
              '"cached_tokens"', '"completion_tokens_details"',
              '"reasoning_tokens"', '"choices"', '"delta"', '"content"',
              '"text"', "data: ", "data:", "\n\n", "\r\n", "\r\n\r\n", "\r",
              "[DONE]", ": ping\n", "event: x\n", "\ufeff"]
    fuzz(tmp_path, [UNIT / "route_usage_fuzz.c", PARSER],
         UNIT / "usage_corpus",
         "".join('t%d="%s"\n' % (i, "".join(
             chr(c) if 0x20 <= c < 0x7f and c not in b'"\\' else "\\x%02x" % c
             for c in t.encode("utf-8"))) for i, t in enumerate(tokens)),
         args=["-max_len=20000"])


def bench_stream(rng, events):
    """A chat stream as vLLM sends it with include_usage: ~200-300 bytes
    an event."""
    out = []
    for i in range(events - 2):
        c = chat_chunk(rng, text(rng, 1, 2), None, i == 0, None, True)
        c["id"] = "chatcmpl-%032x" % 7
        out.append(b"data: " + json.dumps(c, ensure_ascii=False).encode()
                   + b"\n\n")
    out.append(b"data: " + json.dumps({"id": "chatcmpl-1", **CHUNK_BASE,
                                       "choices": [], "usage": USAGE})
               .encode() + b"\n\n")
    out.append(b"data: [DONE]\n\n")
    return out


def test_bench(tmp_path):
    """Speed of the parser built as nginx builds it (-O2): printed, with
    no assertion on time."""
    bench = compile_c(tmp_path / "route_usage_bench",
                      [UNIT / "route_usage_cli.c", PARSER],
                      ["-O2", "-g", "-Wall", "-Werror"])
    rng = random.Random(1)
    print()

    events = bench_stream(rng, 1000)
    stream = tmp_path / "stream.sse"
    stream.write_bytes(b"".join(events))
    size = len(stream.read_bytes())
    avg = size / len(events)
    for label, k in (("one buffer", 0), ("a buffer per event", round(avg)),
                     ("4 KB buffers", 4096)):
        r = subprocess.run([str(bench), "--bench", "sse", str(stream),
                            "300", str(k)], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr
        res = json.loads(r.stdout)
        assert res["found"] == 1 and res["content_events"] >= 990, res
        print(f"bench SSE ({label}): {len(events)} events of {avg:.0f} "
              f"bytes, {res['ns_per_pass'] / len(events):.0f} ns per event,"
              f" {res['mb_per_s']:.0f} MB/s")

    content = ("the quick brown fox \"usage\" caf\u00e9 \u4e2d\u6587 "
               "\\ jumps\n") * 20000
    docs = {
        "chat, one 1 MB string": {
            "id": "x", "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant",
                                                 "content": content}}],
            "usage": USAGE},
        "embeddings, 1 MB of floats": {
            "object": "list", "data": [
                {"object": "embedding", "index": i,
                 "embedding": [rng.uniform(-1, 1) for _ in range(1024)]}
                for i in range(50)], "usage": USAGE},
    }
    for label, d in docs.items():
        body = tmp_path / "answer.json"
        body.write_bytes(json.dumps(d, ensure_ascii=False).encode())
        for k in (0, 16384):
            r = subprocess.run([str(bench), "--bench", "json", str(body),
                                "50", str(k)], capture_output=True,
                               text=True, timeout=120)
            assert r.returncode == 0, r.stderr
            res = json.loads(r.stdout)
            assert res["found"] == 1 and res["prompt_tokens"] == 5, res
            print(f"bench JSON ({label}, "
                  f"{'one buffer' if k == 0 else '16 KB buffers'}): "
                  f"{res['bytes']} bytes, {res['mb_per_s']:.0f} MB/s")


# -- through nginx: the usage chunk the gateway asked for, removed ---------
#
# infer_stream_include_usage on and a client that did not ask for usage:
# the backend is asked for it, and the client must see exactly the stream
# the backend sends without it (same events, byte for byte, but for the
# chunks' id and created time, which differ from one request to another).

import http.client                                              # noqa: E402
import socket                                                   # noqa: E402
import threading                                                # noqa: E402

STRIP_CONF = """
    log_format usage '$infer_usage_completion_tokens|$infer_usage_estimated';
    upstream pool {{ {servers} }}
    infer_model m upstream=pool alias=alias-m;
    server {{
        listen 127.0.0.1:{{port}};
        client_max_body_size 64m;
        client_body_buffer_size 16k;
        infer_route on;
        infer_stream_include_usage on;
        {extra}
        location / {{
            proxy_pass http://$infer_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering {buffering};
            access_log {log} usage;
        }}
    }}"""


def strip_gateway(nginx_factory, sim, extra="", buffering="off",
                  servers=None, workers=2):
    n = nginx_factory("", start=False, modules=["route"], workers=workers)
    n.http = STRIP_CONF.format(servers=servers or f"server {sim.addr};",
                               extra=extra, buffering=buffering,
                               log=n.workdir / "usage.log")
    return n.start()


def post(host, port, body, headers=None, timeout=20):
    c = http.client.HTTPConnection(host, port, timeout=timeout)
    c.request("POST", "/v1/chat/completions", json.dumps(body),
              {"content-type": "application/json", **(headers or {})})
    r = c.getresponse()
    return r, r.read()


def normalized(raw):
    """The stream with each chunk's id and created time made equal."""
    raw = re.sub(rb'"id": ?"[^"]*"', b'"id": "X"', raw)
    return re.sub(rb'"created": ?\d+', b'"created": 0', raw)


def usage_log(gw, count=1):
    import time
    path = gw.workdir / "usage.log"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= count:
            return [line.split("|") for line in lines]
        time.sleep(0.02)
    raise AssertionError("no usage line")


STREAM = {"model": "m", "stream": True, "max_tokens": 5,
          "messages": [{"role": "user", "content": "Hello there"}]}


@pytest.fixture
def strip_sim(sim_factory):
    return sim_factory("m", "strip-a", ttft_ms=1, tpot_ms=1)


@pytest.mark.parametrize("headers", [
    {}, {"x-sim-split-writes": "1"}, {"x-sim-usage-chunks": "2"},
    {"x-sim-usage-unterminated": "1"},
    {"x-sim-usage-chunks": "2", "x-sim-usage-unterminated": "1",
     "x-sim-split-writes": "1"},
], ids=["plain", "split", "two-usage-chunks", "unterminated",
        "two-unterminated-split"])
@pytest.mark.parametrize("buffering", ["off", "on"])
def test_strip_gives_the_client_the_stream_without_usage(
        nginx_factory, strip_sim, headers, buffering):
    gw = strip_gateway(nginx_factory, strip_sim, buffering=buffering)
    r, raw = post(gw.host, gw.port, STREAM, headers)
    assert r.status == 200
    # what the backend sends to a client that did not ask for usage
    _, want = post(strip_sim.host, strip_sim.port, STREAM, headers)
    assert b'"usage"' not in want
    if "x-sim-usage-unterminated" in headers:
        # the stream ended with the usage chunk: no [DONE] after it
        assert want.endswith(b"\n\ndata: [DONE]\n\n")
        want = want[:-len(b"data: [DONE]\n\n")]
    assert normalized(raw) == normalized(want)
    # and the gateway read the real usage, even from a last event cut short
    assert usage_log(gw)[0] == ["5", "0"]


def test_strip_passes_an_event_longer_than_the_buffer_unchanged(
        nginx_factory, strip_sim):
    gw = strip_gateway(nginx_factory, strip_sim,
                       extra="infer_stream_event_buffer_size 4k;")
    headers = {"x-sim-pad-bytes": "6000"}
    r, raw = post(gw.host, gw.port, STREAM, headers)
    assert r.status == 200
    _, asked = post(strip_sim.host, strip_sim.port,
                    dict(STREAM, stream_options={"include_usage": True}),
                    headers)
    # each long content event as the backend sent it ("usage": null and
    # all), the short usage chunk still removed
    events = [e for e in asked.split(b"\n\n") if e]
    long = [e for e in events if len(e) > 4096]
    assert len(long) == 6
    assert normalized(raw) == normalized(b"".join(
        e + b"\n\n" for e in events if len(e) > 4096 or e == b"data: [DONE]"))
    assert "is passed on as it is" in gw.log_text()
    assert usage_log(gw)[0] == ["5", "0"]


@pytest.mark.parametrize("value", ['"true"', "1", "null", '"yes"', "{}"])
def test_include_usage_of_another_type_is_replaced_not_repeated(
        nginx_factory, strip_sim, value):
    gw = strip_gateway(nginx_factory, strip_sim)
    body = json.dumps(STREAM)[:-1] + (
        ', "stream_options": {"x": 1, "include_usage": %s}}' % value)
    c = http.client.HTTPConnection(gw.host, gw.port, timeout=20)
    c.request("POST", "/v1/chat/completions", body,
              {"content-type": "application/json"})
    raw = c.getresponse().read()
    sent = [q for q in strip_sim.requests()
            if q["path"] == "/v1/chat/completions"][-1]["body"]
    assert sent.count("include_usage") == 1
    assert json.loads(sent)["stream_options"] == {"x": 1,
                                                  "include_usage": True}
    assert b'"usage"' not in raw
    assert usage_log(gw)[0] == ["5", "0"]


class DropFirst:
    """An upstream server that reads a request and closes without an
    answer, so that nginx sends the body again to the next server."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.addr = "127.0.0.1:%d" % self.sock.getsockname()[1]
        threading.Thread(target=self.run, daemon=True).start()

    def run(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            c.settimeout(5)
            try:
                c.recv(65536)
            except OSError:
                pass
            c.close()


@pytest.mark.parametrize("size", [1000, 300 * 1024, 3 * 1024 * 1024],
                         ids=["memory", "file", "file-3m"])
@pytest.mark.parametrize("model_last", [False, True],
                         ids=["model-first", "model-last"])
def test_a_rewritten_body_is_sent_whole_and_again_to_the_next_server(
        nginx_factory, strip_sim, size, model_last):
    drop = DropFirst()
    gw = strip_gateway(nginx_factory, strip_sim,
                       extra="proxy_next_upstream error non_idempotent;",
                       servers=f"server {drop.addr}; server "
                               f"{strip_sim.addr};")
    msgs = [{"role": "user", "content": "y" * size}]
    if model_last:
        body = ('{"messages": %s, "stream": true, "max_tokens": 5, '
                '"model": "alias-m"}' % json.dumps(msgs))
    else:
        body = ('{"model": "alias-m", "messages": %s, "stream": true, '
                '"max_tokens": 5}' % json.dumps(msgs))
    want = body.replace('"alias-m"', '"m"')[:-1] + \
        ', "stream_options": {"include_usage": true}}'
    c = http.client.HTTPConnection(gw.host, gw.port, timeout=30)
    c.request("POST", "/v1/chat/completions", body,
              {"content-type": "application/json"})
    r = c.getresponse()
    r.read()
    assert r.status == 200
    got = [q for q in strip_sim.requests()
           if q["path"] == "/v1/chat/completions"]
    assert len(got) == 1
    assert got[0]["body_len"] == len(want)
    assert got[0]["body_sha256"] == hashlib.sha256(
        want.encode()).hexdigest()
    # it was sent twice: to the server that dropped it, then to the sim
    assert "upstream server temporarily disabled" in gw.log_text()
    drop.sock.close()


def peak_growth_mb(gw, fn):
    """How much the worker's anonymous memory (its heap, not the pages of
    code that a busy machine may evict and fault in again) grows at most
    during fn(), in MB, sampled every 5 ms."""
    import time
    from pathlib import Path
    pid, = gw.worker_pids()

    def anon():
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1])

    before = anon()
    peak = [before]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], anon())
            time.sleep(0.005)

    t = threading.Thread(target=sample)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    peak[0] = max(peak[0], anon())
    assert gw.worker_pids() == [pid]
    return (peak[0] - before) / 1024


def test_a_long_stripped_stream_costs_a_fixed_amount_of_memory(
        nginx_factory, sim_factory):
    sim = sim_factory("m", "strip-long", ttft_ms=0, tpot_ms=0,
                      max_tokens_cap=100000)
    gw = strip_gateway(nginx_factory, sim, workers=1)
    tokens = 7000                               # ~30 MB of 4 KB chunks
    headers = {"x-sim-pad-bytes": "4000",
               "x-sim-completion-tokens": str(tokens)}
    body = dict(STREAM, max_tokens=tokens)

    def stream():
        c = http.client.HTTPConnection(gw.host, gw.port, timeout=60)
        c.request("POST", "/v1/chat/completions", json.dumps(body),
                  {"content-type": "application/json", **headers})
        r = c.getresponse()
        n = 0
        while True:
            chunk = r.read(1 << 16)
            if not chunk:
                break
            n += len(chunk)
        assert r.status == 200 and n > 28 * 10 ** 6

    # on a fresh worker: memory freed by an earlier stream would stay
    # resident in the heap and hide the growth of the next one
    grew = peak_growth_mb(gw, stream)
    assert grew < 3, f"a 30 MB stream grew the worker by {grew:.1f} MB"
    assert usage_log(gw)[0] == [str(tokens), "0"]


def test_rewritten_bodies_are_not_copied(nginx_factory, strip_sim):
    gw = strip_gateway(nginx_factory, strip_sim, workers=1)
    body = json.dumps({"model": "alias-m", "max_tokens": 1, "messages": [
        {"role": "user", "content": "y" * (6 * 1024 * 1024)}]})

    def send(clients):
        def one():
            c = http.client.HTTPConnection(gw.host, gw.port, timeout=60)
            c.request("POST", "/v1/chat/completions", body,
                      {"content-type": "application/json"})
            r = c.getresponse()
            r.read()
            status.append(r.status)
        status = []
        threads = [threading.Thread(target=one) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert status == [200] * clients

    send(1)     # the worker's scan buffer grows to the body's size once
    grew = peak_growth_mb(gw, lambda: send(4))
    # a copy of each body would be 24 MB, two copies 48 MB
    assert grew < 8, f"4 rewritten 6 MB bodies grew the worker {grew:.1f} MB"
