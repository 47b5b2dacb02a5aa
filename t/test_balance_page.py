"""The metric page parser (ngx_infer_balance/ngx_http_infer_balance_signals.c),
alone: driven through t/unit/balance_signals_cli.c built with ASan and UBSan.
Pages as vLLM, SGLang and TGI serve them (vLLM's and SGLang's made with
prometheus_client itself, checked by promtool), each fed whole, a byte at
a time and cut at random places, checked against values written here by
hand, against prometheus_client's own parser, and against an oracle
written here from the spec's rules (regular expressions, Decimal);
generated pages and garbage against the oracle; then a bounded libFuzzer
run (t/unit/balance_signals_fuzz.c) and the parser's speed (printed)."""

import json
import random
import re
import shutil
import subprocess
from decimal import (MAX_EMAX, MIN_EMIN, ROUND_HALF_UP, Context, Decimal,
                     localcontext)

import pytest
from prometheus_client import (CollectorRegistry, Counter, GCCollector,
                               Gauge, Histogram, PlatformCollector,
                               ProcessCollector, generate_latest)
from prometheus_client.openmetrics.exposition import \
    generate_latest as generate_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from harness.cunit import REPO, UNIT, build_sanitized, compile_c, fuzz

PARSER = REPO / "ngx_infer_balance" / "ngx_http_infer_balance_signals.c"
CORPUS = UNIT / "signals_corpus"

LINE_MAX = 4096             # NGX_HTTP_INFER_SIGNALS_LINE_MAX
LORA_MAX = 8                # NGX_HTTP_INFER_SIGNALS_LORA_MAX
NAMES_MAX = 8               # NGX_HTTP_INFER_SIGNALS_NAMES
LIMIT = 2 ** 62             # values saturate here, thousandths
MAX_LORA = 2 ** 31 - 1

SIGNALS = ("queue", "running", "kv", "lora")
DEFAULT_NAMES = {
    "queue": ["vllm:num_requests_waiting", "sglang:num_queue_reqs",
              "tgi_queue_size"],
    "running": ["vllm:num_requests_running", "sglang:num_running_reqs",
                "tgi_batch_current_size"],
    "kv": ["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc",
           "sglang:token_usage"],
    "lora": ["vllm:lora_requests_info"],
}
RESULTS = ("queue", "running", "kv", "found", "name_index", "lora_stamp",
           "max_lora", "nrunning", "nwaiting", "lora_running",
           "lora_waiting", "samples", "skipped")

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


@pytest.fixture(scope="session")
def cli(tmp_path_factory):
    out = tmp_path_factory.mktemp("balance_signals") / "balance_signals_cli"
    return build_sanitized(out, [UNIT / "balance_signals_cli.c", PARSER],
                           "sse2")


def names_spec(names):
    """{signal: [name]} (the others keep their defaults) -> the CLI's
    NAMES, "-" for the defaults."""
    if not names:
        return "-"
    return ";".join(f"{k}={','.join(v)}" for k, v in names.items())


def run_many(cli, records):
    """records: [(page, cuts, names)], cuts "-", "eK" or a list of
    offsets, names None or {signal: [name]} -> one result each."""
    parts = []
    for page, cuts, names in records:
        if not isinstance(cuts, str):
            cuts = "c:" + ",".join(map(str, cuts)) if cuts else "-"
        parts.append(b"%d %s %s\n" % (len(page), cuts.encode(),
                                      names_spec(names).encode()) + page)
    r = subprocess.run([str(cli), "--batch"], input=b"".join(parts),
                       capture_output=True, timeout=300)
    assert r.returncode == 0 and not r.stderr, r.stderr.decode()[-5000:]
    lines = r.stdout.decode().splitlines()
    assert len(lines) == len(records)
    return [json.loads(line) for line in lines]


def run_one(cli, page, cuts="-", names=None):
    return run_many(cli, [(page, cuts, names)])[0]


def runs_of(cli, cases, cutss):
    """Each page of cases, (name, page, expected), fed each way of cutss,
    in one run of the cli for them all: name -> [(cuts, result)]."""
    records = [(page, cuts, None) for _, page, _ in cases for cuts in cutss]
    results = run_many(cli, records)
    k = len(cutss)
    return {name: list(zip(cutss, results[k * i:k * i + k]))
            for i, (name, _, _) in enumerate(cases)}


def named(case):
    """A table case's test id: its name, first in the tuple."""
    return case[0]


def expected(page, res, want):
    """What check() finds wrong with res, and the fields of want it does
    not have."""
    return check(page, res) + [f"{k} {res[k]}, want {v}"
                               for k, v in want.items() if res[k] != v]


def report(problems, limit=25):
    assert not problems, (f"{len(problems)} problems:\n"
                          + "\n".join(problems[:limit]))


# -- the oracle ------------------------------------------------------------

def murmur2(data):
    """MurmurHash2, 32 bits, seed 0: nginx's ngx_murmur_hash2."""
    m, mask = 0x5bd1e995, 0xffffffff
    n = len(data)
    h = n & mask
    i = 0
    while n - i >= 4:
        k = int.from_bytes(data[i:i + 4], "little")
        k = (k * m) & mask
        k ^= k >> 24
        k = (k * m) & mask
        h = ((h * m) & mask) ^ k
        i += 4
    rest = data[i:]
    if len(rest) == 3:
        h ^= rest[2] << 16
    if len(rest) >= 2:
        h ^= rest[1] << 8
    if rest:
        h ^= rest[0]
        h = (h * m) & mask
    h ^= h >> 13
    h = (h * m) & mask
    h ^= h >> 15
    return h


NAME_RE = re.compile(rb"[A-Za-z_:][A-Za-z0-9_:]*")
PAIR = rb'[A-Za-z_][A-Za-z0-9_]*[ \t]*=[ \t]*"(?:[^"\\]|\\.)*"'
LABELS_RE = re.compile(rb"\{[ \t]*(?:%s[ \t]*(?:,[ \t]*%s[ \t]*)*"
                       rb"(?:,[ \t]*)?)?\}" % (PAIR, PAIR), re.S)
PAIR_RE = re.compile(rb'([A-Za-z_][A-Za-z0-9_]*)[ \t]*=[ \t]*"((?:[^"\\]|'
                     rb'\\.)*)"', re.S)
NUMBER_RE = re.compile(rb"([+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+))"
                       rb"(?:[eE]([+-]?[0-9]+))?")
SPECIAL_RE = re.compile(rb"[+-]?(?:nan|inf|infinity)", re.I)
BLANKS = re.compile(rb"[ \t]+")

DECIMAL = Context(prec=20000, Emax=MAX_EMAX, Emin=MIN_EMIN)


def thousandths(token):
    """A value token -> its thousandths (int), None for NaN and
    infinities, or ValueError."""
    if SPECIAL_RE.fullmatch(token):
        return None
    m = NUMBER_RE.fullmatch(token)
    if not m:
        raise ValueError(token)
    mantissa = Decimal(m.group(1).decode())
    exp = int(m.group(2) or 0)
    if mantissa == 0:
        return 0
    if abs(exp) > 10 ** 6:
        # past any digit count a line can hold
        if exp < 0:
            return 0
        return LIMIT if mantissa > 0 else -LIMIT
    with localcontext(DECIMAL):
        d = mantissa.scaleb(exp + 3)
        if abs(d) >= LIMIT:
            return LIMIT if d > 0 else -LIMIT
        return int(d.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def unescape(v):
    """A label value as the parser reads it: \\\\, \\" and \\n, any other
    escape kept whole."""
    return re.sub(rb'\\(.)', lambda m: {b"n": b"\n", b"\\": b"\\",
                                        b'"': b'"'}.get(m.group(1),
                                                        m.group(0)),
                  v, flags=re.S)


def parse_line(line):
    """A line without its end -> None (blank, comment), "bad", or
    (name, labels dict, value thousandths or None)."""
    s = line.lstrip(b" \t")
    if not s or s.startswith(b"#"):
        return None
    m = NAME_RE.match(s)
    if not m:
        return "bad"
    name, rest = m.group(), s[m.end():]
    after = rest.lstrip(b" \t")
    labels = {}
    if after.startswith(b"{"):
        m = LABELS_RE.match(after)
        if not m:
            return "bad"
        for k, v in PAIR_RE.findall(m.group()):
            labels[k.decode()] = unescape(v)
        rest = after[m.end():]
    elif after == rest:
        return "bad"
    tokens = BLANKS.split(rest.strip(b" \t"))
    if tokens == [b""]:
        return "bad"
    if len(tokens) > 1 and not tokens[1].startswith(b"#"):
        try:
            if thousandths(tokens[1]) is None:
                return "bad"
        except ValueError:
            return "bad"
        if len(tokens) > 2 and not tokens[2].startswith(b"#"):
            return "bad"
    try:
        return name.decode(), labels, thousandths(tokens[0])
    except ValueError:
        return "bad"


def adapters(value):
    names = [x.strip(b" \t") for x in value.split(b",")]
    names = [x for x in names if x]
    return len(names), [murmur2(x) for x in names[:LORA_MAX]]


def max_lora(value):
    if value is None or not re.fullmatch(rb"[0-9]+", value):
        return 0
    return min(int(value), MAX_LORA)


def oracle(page, names=None):
    """What the parser must say of a page, from the spec's rules."""
    conf = dict(DEFAULT_NAMES)
    conf.update(names or {})
    out = {"queue": 0, "running": 0, "kv": 0, "found": [],
           "name_index": [NAMES_MAX] * 4, "lora_stamp": 0, "max_lora": 0,
           "nrunning": 0, "nwaiting": 0, "lora_running": [],
           "lora_waiting": [], "samples": 0, "skipped": 0}
    found = set()
    lines = page.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    for line in lines:
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) > LINE_MAX:
            head = line[:LINE_MAX].lstrip(b" \t")
            if not head.startswith(b"#"):
                out["skipped"] += 1
            continue
        r = parse_line(line)
        if r is None:
            continue
        if r == "bad":
            out["skipped"] += 1
            continue
        out["samples"] += 1
        name, labels, v = r
        if v is None:
            continue
        for i, sig in enumerate(SIGNALS):
            if name not in conf[sig]:
                continue
            j = conf[sig].index(name)
            if j > out["name_index"][i]:
                continue
            if j < out["name_index"][i]:
                found.discard(sig)
                if sig == "lora":
                    out.update(lora_stamp=0, max_lora=0, nrunning=0,
                               nwaiting=0, lora_running=[],
                               lora_waiting=[])
                else:
                    out[sig] = 0
                out["name_index"][i] = j
            if sig in ("queue", "running"):
                out[sig] = max(-LIMIT, min(LIMIT, out[sig] + v))
            elif sig == "kv":
                if sig not in found or v > out[sig]:
                    out[sig] = v
            elif sig not in found or v > out["lora_stamp"]:
                nr, hr = adapters(labels.get("running_lora_adapters", b""))
                nw, hw = adapters(labels.get("waiting_lora_adapters", b""))
                out.update(lora_stamp=v, nrunning=nr, nwaiting=nw,
                           lora_running=hr, lora_waiting=hw,
                           max_lora=max_lora(labels.get("max_lora")))
            found.add(sig)
    out["found"] = [s for s in SIGNALS if s in found]
    return out


def check(page, res, names=None, want=None):
    want = oracle(page, names) if want is None else want
    return [f"{k} {res[k]!r}, expected {want[k]!r}" for k in RESULTS
            if res[k] != want[k]]


def by_client(page, names=None):
    """The signals read with prometheus_client's parser (well-formed pages
    only): sums, max, the latest LoRA sample."""
    conf = dict(DEFAULT_NAMES)
    conf.update(names or {})
    samples = {}
    for fam in text_string_to_metric_families(page.decode()):
        for s in fam.samples:
            samples.setdefault(s.name, []).append(s)
    out = {}
    for sig in SIGNALS:
        name = next((n for n in conf[sig] if n in samples), None)
        if name is None:
            continue
        vals = samples[name]
        if sig == "kv":
            out[sig] = max(v.value for v in vals)
        elif sig == "lora":
            out[sig] = max(vals, key=lambda v: v.value)
        else:
            out[sig] = sum(v.value for v in vals)
    return out


def agrees_with_client(page, res):
    """[problem] between the CLI's result and prometheus_client's."""
    problems = []
    c = by_client(page)
    if sorted(c) != sorted(res["found"]):
        problems.append(f"found {res['found']}, client {sorted(c)}")
    for sig in ("queue", "running", "kv"):
        if sig in c and abs(res[sig] - c[sig] * 1000) > 0.5 + 1e-6:
            problems.append(f"{sig} {res[sig]}, client {c[sig]}")
    if "lora" in c:
        s = c["lora"]
        if abs(res["lora_stamp"] - s.value * 1000) > 1:
            problems.append(f"lora_stamp {res['lora_stamp']}, client "
                            f"{s.value}")
        for key, n, h in (("running_lora_adapters", "nrunning",
                           "lora_running"),
                          ("waiting_lora_adapters", "nwaiting",
                           "lora_waiting")):
            items = [x.strip() for x in s.labels.get(key, "").split(",")]
            items = [x.encode() for x in items if x]
            if res[n] != len(items) or res[h] != [murmur2(x) for x in
                                                  items[:LORA_MAX]]:
                problems.append(f"{key}: {res[n]} {res[h]}, client "
                                f"{items}")
        if res["max_lora"] != int(s.labels.get("max_lora", "0")):
            problems.append(f"max_lora {res['max_lora']}, client "
                            f"{s.labels.get('max_lora')}")
    return problems


def promtool_errors(page):
    """promtool's parse errors for a page (its lint remarks are not)."""
    if shutil.which("promtool") is None:
        return None
    r = subprocess.run(["promtool", "check", "metrics"], input=page,
                       capture_output=True, timeout=60)
    out = (r.stdout + r.stderr).decode()
    return [x for x in out.splitlines() if "error" in x.lower()]


def cut_patterns(rng, n, bytewise=True):
    """Ways to cut a page of n bytes: whole, a byte at a time, seven at a
    time, at random places, a few or many."""
    pats = ["-"]
    if bytewise:
        pats.append("e1")
    pats += ["e7", rng.choice(["e2", "e3", "e64", "e4096"])]
    for k in (1, 5, 60):
        if n > 1:
            pats.append(sorted(rng.sample(range(1, n), min(k, n - 1))))
    return pats


def same(results):
    first = {k: results[0][k] for k in RESULTS}
    return all({k: r[k] for k in RESULTS} == first for r in results[1:])


# -- pages -----------------------------------------------------------------

class Engine:
    def __init__(self, waiting, running, kv, by_reason=(0, 0)):
        self.waiting, self.running, self.kv = waiting, running, kv
        self.by_reason = by_reason


def registry(process=True):
    reg = CollectorRegistry()
    if process:
        GCCollector(registry=reg)
        PlatformCollector(registry=reg)
        ProcessCollector(registry=reg)
    return reg


def vllm_page(engines, lora=(), kv_name="vllm:kv_cache_usage_perc",
              model=MODEL, openmetrics=False, process=True):
    """A vLLM (V1) page as its prometheus_client makes it: lora is
    [(max_lora, running, waiting, stamp)]."""
    reg = registry(process)
    ln = ["model_name", "engine"]
    g = {
        "running": Gauge("vllm:num_requests_running",
                         "Number of requests in model execution batches.",
                         ln, registry=reg),
        "waiting": Gauge("vllm:num_requests_waiting",
                         "Number of requests waiting to be processed.",
                         ln, registry=reg),
        "reason": Gauge("vllm:num_requests_waiting_by_reason",
                        "Number of requests waiting, by reason.",
                        ln + ["reason"], registry=reg),
        "kv": Gauge(kv_name, "KV-cache usage. 1 means 100 percent usage.",
                    ln, registry=reg),
    }
    lora_info = Gauge("vllm:lora_requests_info",
                      "Running stats on lora requests.",
                      ["max_lora", "waiting_lora_adapters",
                       "running_lora_adapters"], registry=reg)
    cache = Gauge("vllm:cache_config_info",
                  "Information of the LLMEngine CacheConfig",
                  ["block_size", "cache_dtype", "enable_prefix_caching",
                   "gpu_memory_utilization", "num_gpu_blocks", "engine"],
                  registry=reg)
    preempt = Counter("vllm:num_preemptions",
                      "Cumulative number of preemption from the engine.",
                      ln, registry=reg)
    prompt = Counter("vllm:prompt_tokens",
                     "Number of prefill tokens processed.", ln,
                     registry=reg)
    queries = Counter("vllm:prefix_cache_queries",
                      "Prefix cache queries, in terms of number of "
                      "queried tokens.", ln, registry=reg)
    ttft = Histogram("vllm:time_to_first_token_seconds",
                     "Histogram of time to first token in seconds.", ln,
                     buckets=[0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08,
                              0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                              10.0, 20.0, 40.0, 80.0, 160.0, 640.0,
                              2560.0], registry=reg)
    tpot = Histogram("vllm:request_queue_time_seconds",
                     "Histogram of time spent in WAITING phase for "
                     "request.", ln, registry=reg)
    for i, e in enumerate(engines):
        lv = (model, str(i))
        g["running"].labels(*lv).set(e.running)
        g["waiting"].labels(*lv).set(e.waiting)
        g["reason"].labels(*lv, "capacity").set(e.by_reason[0])
        g["reason"].labels(*lv, "deferred").set(e.by_reason[1])
        g["kv"].labels(*lv).set(e.kv)
        cache.labels("16", "auto", "True", "0.9", "27514", str(i)).set(1)
        preempt.labels(*lv).inc(3 * i)
        prompt.labels(*lv).inc(123456 + i)
        queries.labels(*lv).inc(98765)
        for x in (0.004, 0.03, 0.2, 1.7, 12.0):
            ttft.labels(*lv).observe(x * (i + 1))
            tpot.labels(*lv).observe(x / 3)
    for maxl, running, waiting, stamp in lora:
        lora_info.labels(str(maxl), waiting, running).set(stamp)
    if openmetrics:
        return generate_openmetrics(reg)
    return generate_latest(reg)


def sglang_page(ranks, model=MODEL, process=False):
    """An SGLang page: ranks is [(queue, running, token_usage)], one
    label set each (data parallel)."""
    reg = registry(process)
    ln = ["model_name", "engine_type", "tp_rank", "pp_rank", "dp_rank"]
    running = Gauge("sglang:num_running_reqs",
                    "The number of running requests.", ln, registry=reg)
    used = Gauge("sglang:num_used_tokens", "The number of used tokens.",
                 ln, registry=reg)
    usage = Gauge("sglang:token_usage", "The token usage.", ln,
                  registry=reg)
    thru = Gauge("sglang:gen_throughput",
                 "The generation throughput (token/s).", ln, registry=reg)
    queue = Gauge("sglang:num_queue_reqs",
                  "The number of requests in the waiting queue.", ln,
                  registry=reg)
    grammar = Gauge("sglang:num_grammar_queue_reqs",
                    "The number of requests in the grammar waiting "
                    "queue.", ln, registry=reg)
    hit = Gauge("sglang:cache_hit_rate", "The prefix cache hit rate.", ln,
                registry=reg)
    prompt = Counter("sglang:prompt_tokens",
                     "Number of prefill tokens processed.", ln,
                     registry=reg)
    e2e = Histogram("sglang:e2e_request_latency_seconds",
                    "Histogram of End-to-end request latency in seconds",
                    ln, buckets=[0.1, 0.3, 0.5, 0.7, 0.9, 1, 2, 4, 6, 8,
                                 10, 20, 40, 60, 80, 100, 150, 200, 250,
                                 300, 350, 500, 1000], registry=reg)
    for i, (q, r, u) in enumerate(ranks):
        lv = (model, "unified", "0", "0", str(i))
        running.labels(*lv).set(r)
        used.labels(*lv).set(int(u * 200000))
        usage.labels(*lv).set(u)
        thru.labels(*lv).set(1234.5678)
        queue.labels(*lv).set(q)
        grammar.labels(*lv).set(0)
        hit.labels(*lv).set(0.4215)
        prompt.labels(*lv).inc(9876543)
        for x in (0.25, 1.5, 33.0):
            e2e.labels(*lv).observe(x)
    return generate_latest(reg)


def tgi_page(queue, batch):
    """A text-generation-inference page, as metrics-exporter-prometheus
    (Rust) writes it: integers without a fraction, no HELP."""
    lines = [
        "# TYPE tgi_request_count counter", "tgi_request_count 1532",
        "# TYPE tgi_request_success counter", "tgi_request_success 1529",
        "# TYPE tgi_request_failure counter",
        'tgi_request_failure{err="validation"} 3',
        "# TYPE tgi_queue_size gauge", f"tgi_queue_size {queue}",
        "# TYPE tgi_batch_current_size gauge",
        f"tgi_batch_current_size {batch}",
        "# TYPE tgi_batch_current_max_tokens gauge",
        "tgi_batch_current_max_tokens 19876",
        "# TYPE tgi_batch_next_size histogram",
    ]
    for le in ("1", "2", "4", "8", "16", "32", "64", "+Inf"):
        lines.append(f'tgi_batch_next_size_bucket{{le="{le}"}} 12')
    lines += ["tgi_batch_next_size_sum 96", "tgi_batch_next_size_count 12",
              "# TYPE tgi_request_queue_duration summary"]
    for q, v in (("0", "0.000012"), ("0.5", "0.0021"), ("0.9", "0.0312"),
                 ("0.99", "0.4"), ("1", "1.25")):
        lines.append(f'tgi_request_queue_duration{{quantile="{q}"}} {v}')
    lines += ["tgi_request_queue_duration_sum 12.5",
              "tgi_request_queue_duration_count 1532",
              "# TYPE tgi_batch_inference_duration histogram"]
    for method in ("prefill", "decode"):
        for le in ("0.005", "0.01", "0.025", "0.05", "0.1", "+Inf"):
            lines.append(f'tgi_batch_inference_duration_bucket'
                         f'{{method="{method}",le="{le}"}} 40')
        lines.append(f'tgi_batch_inference_duration_sum{{method="{method}"'
                     f'}} 1.0234')
        lines.append(f'tgi_batch_inference_duration_count'
                     f'{{method="{method}"}} 40')
    return ("\n".join(lines) + "\n").encode()


STAMP = 1753741235.8735502      # vLLM: time.time() of the label set


def corpus_pages():
    """The corpus (t/unit/signals_corpus), as pages: its files less the
    fuzzer's two header bytes."""
    return {p.name: p.read_bytes()[2:] for p in sorted(CORPUS.iterdir())}


# -- the tests -------------------------------------------------------------

def test_vllm(cli):
    """vLLM V1 with two engines (data parallel): queue and running summed
    across engines, kv the larger; num_requests_waiting_by_reason, whose
    name starts with num_requests_waiting, not counted; of three LoRA
    label sets the latest wins, whatever their order; with the same
    results in the OpenMetrics format."""
    engines = [Engine(3, 2, 0.25, (40, 50)), Engine(4, 1, 0.953, (60, 70))]
    lora = [(4, "sql-lora", "", STAMP - 100),
            (4, "sql-lora,chat-lora", "tool-lora", STAMP),
            (4, "", "", STAMP - 50)]
    for om in (False, True):
        page = vllm_page(engines, lora, openmetrics=om)
        assert b"vllm:num_requests_waiting_by_reason{" in page
        res = run_one(cli, page)
        assert (res["queue"], res["running"], res["kv"]) == (7000, 3000,
                                                             953), res
        assert res["found"] == ["queue", "running", "kv", "lora"], res
        assert res["name_index"] == [0, 0, 0, 0], res
        assert res["lora_stamp"] == 1753741235874, res
        assert (res["max_lora"], res["nrunning"], res["nwaiting"]) == (
            4, 2, 1), res
        assert res["lora_running"] == [murmur2(b"sql-lora"),
                                       murmur2(b"chat-lora")], res
        assert res["lora_waiting"] == [murmur2(b"tool-lora")], res
        assert res["skipped"] == 0, res
        report(check(page, res) + agrees_with_client(page, res))
        if not om:
            assert promtool_errors(page) in ([], None)

    # vLLM V0: the KV use under its old name, no LoRA
    page = vllm_page([Engine(0, 5, 0.5)], kv_name="vllm:gpu_cache_usage_perc")
    res = run_one(cli, page)
    assert (res["queue"], res["running"], res["kv"]) == (0, 5000, 500), res
    assert res["found"] == ["queue", "running", "kv"], res
    assert res["name_index"][2] == 1 and res["lora_stamp"] == 0, res
    report(check(page, res) + agrees_with_client(page, res))


def test_sglang_tgi(cli):
    """SGLang (two data-parallel ranks) and TGI pages."""
    page = sglang_page([(7, 5, 0.28), (2, 6, 0.4125)], process=True)
    res = run_one(cli, page)
    assert (res["queue"], res["running"], res["kv"]) == (9000, 11000,
                                                         413), res
    assert res["found"] == ["queue", "running", "kv"], res
    assert res["name_index"] == [1, 1, 2, NAMES_MAX], res
    report(check(page, res) + agrees_with_client(page, res))
    assert promtool_errors(page) in ([], None)

    page = tgi_page(4, 12)
    res = run_one(cli, page)
    assert (res["queue"], res["running"], res["kv"]) == (4000, 12000, 0)
    assert res["found"] == ["queue", "running"], res
    assert res["name_index"] == [2, 2, NAMES_MAX, NAMES_MAX], res
    assert res["skipped"] == 0 and res["samples"] == 39, res
    report(check(page, res) + agrees_with_client(page, res))
    assert promtool_errors(page) in ([], None)


def test_corpus(cli):
    """Every page of the fuzzer's corpus: promtool reads the well-formed
    ones, and the parser says what the oracle and prometheus_client
    say."""
    pages = corpus_pages()
    assert len(pages) >= 8
    results = run_many(cli, [(p, "-", None) for p in pages.values()])
    problems = []
    for (name, page), res in zip(pages.items(), results):
        problems += [f"{name}: {x}" for x in check(page, res)]
        if not name.startswith("odd_"):
            problems += [f"{name}: {x}" for x in
                         agrees_with_client(page, res)]
            errors = promtool_errors(page)
            if errors:
                problems.append(f"{name}: promtool: {errors[:3]}")
            if res["skipped"]:
                problems.append(f"{name}: {res['skipped']} lines skipped")
    report(problems)


def test_cuts(cli):
    """Each page fed whole, a byte at a time, seven at a time and cut at
    random places says the same."""
    rng = random.Random(7)
    pages = list(corpus_pages().values())
    pages += [vllm_page([Engine(1, 2, 0.5)] * 3,
                        [(2, "a,b", "c", STAMP)]),
              sglang_page([(1, 2, 0.3)]), tgi_page(0, 0)]
    records, index = [], []
    for i, page in enumerate(pages):
        for cuts in cut_patterns(rng, len(page), len(page) < 200000):
            records.append((page, cuts, None))
            index.append(i)
    # every cut of one short page
    short = (b'# HELP x y\r\nvllm:num_requests_waiting{a="}\\",b"} 2.5e0 1\r'
             b'\nvllm:lora_requests_info{max_lora="3",running_lora_adapters'
             b'=" x , y",waiting_lora_adapters=""} 17\n')
    for k in range(1, len(short)):
        records.append((short, [k], None))
        index.append(len(pages))
    for k in range(1, len(short) - 5, 3):
        records.append((short, [k, k + 1, k + 5], None))
        index.append(len(pages))
    pages.append(short)
    results = run_many(cli, records)
    by_page, problems = {}, []
    for (page, cuts, _), i, res in zip(records, index, results):
        by_page.setdefault(i, []).append(res)
        problems += [f"page {i} cut {str(cuts)[:40]}: {x}"
                     for x in check(page, res)]
    problems += [f"page {i}: results depend on the cuts"
                 for i, rs in by_page.items() if not same(rs)]
    report(problems)
    assert by_page[len(pages) - 1][0]["queue"] == 2500
    assert by_page[len(pages) - 1][0]["nrunning"] == 2


def lines_cases():
    """(name, page, expected fields): line ends, comments, blank lines,
    spaces and tabs, timestamps and exemplars, names that another name
    starts with."""
    Q = b"vllm:num_requests_waiting"
    return [
        ("crlf-line-ends",
         Q + b" 1\r\n" + Q + b"{a=\"b\"} 2\r\n", {"queue": 3000}),
        ("blank-and-whitespace-lines",
         Q + b" 1\n\n\n \t \n" + Q + b" 2", {"queue": 3000, "samples": 2}),
        ("comments-are-not-samples",
         b"# " + Q + b" 5\n#" + Q + b" 5\n  # x\n" + Q + b" 1\n",
         {"queue": 1000, "samples": 1, "skipped": 0}),
        ("spaces-tabs-and-a-timestamp",
         b" \t" + Q + b" \t{ a = \"1\" , b=\"2\" , } \t 4 \t 1700000000000 "
         b"\t\r\n", {"queue": 4000, "skipped": 0}),
        ("empty-label-sets-and-a-trailing-comma",
         Q + b"{} 4\n" + Q + b"{}4\n" + Q + b"{a=\"b\",}  4\n",
         {"queue": 12000, "skipped": 0}),
        ("exemplars-and-timestamps",
         Q + b" 4 # {trace_id=\"x\"} 1.0 2\n" + Q + b" 4 17 # x\n",
         {"queue": 8000, "skipped": 0}),
        ("names-that-start-with-ours-or-differ-in-case",
         Q + b"_by_reason{reason=\"capacity\"} 5\n" + Q + b"x 5\n" + b"x"
         + Q + b" 5\n" + Q[:-1] + b" 5\n" + b"VLLM:num_requests_waiting 5\n",
         {"queue": 0, "found": [], "samples": 5}),
        ("longer-names-are-not-ours",
         Q + b":x 1\n" + b"vllm:num_requests_waiting_total 1\n",
         {"found": []}),
        # a CR not at the end of the line, a bare CR as line end
        ("cr-inside-a-line-or-alone",
         Q + b" 1\r\r\n" + Q + b"\r1\n" + Q + b" 1\r" + Q + b" 1\n",
         {"queue": 0, "skipped": 3}),
        # a last line without LF, with a CR
        ("last-line-ends-in-a-cr", Q + b" 1\n" + Q + b" 2\r", {"queue": 3000}),
        ("a-blank-line-alone", b"\n", {"samples": 0}),
        ("an-empty-page", b"", {"samples": 0}),
    ]


LINES = lines_cases()


@pytest.fixture(scope="module")
def lines_runs(cli):
    return runs_of(cli, LINES, ("-", "e1"))


@pytest.mark.parametrize("case", LINES, ids=named)
def test_lines(lines_runs, case):
    """Line ends, comments, blank lines, spaces and tabs, timestamps and
    exemplars, names that another name starts with."""
    _, page, want = case
    report([f"{page[:80]!r} cut {cuts}: {x}"
            for cuts, res in lines_runs[case[0]]
            for x in expected(page, res, want)])


def long_lines_cases():
    """(name, page, expected fields): lines about LINE_MAX bytes long, of
    samples, comments and spaces, then a line after them."""
    Q = b"vllm:num_requests_waiting"

    def sample(n, value=b"1"):
        """A queue sample of exactly n bytes."""
        pad = n - len(Q) - len(b'{a=""} ') - len(value)
        return Q + b'{a="' + b"x" * pad + b'"} ' + value

    sizes = {LINE_MAX - 1: "line-max-less-1", LINE_MAX: "line-max",
             LINE_MAX + 1: "line-max-plus-1", LINE_MAX + 2: "line-max-plus-2",
             3 * LINE_MAX: "3-line-max"}
    cases = []
    for n in (LINE_MAX - 1, LINE_MAX, LINE_MAX + 1, LINE_MAX + 2,
              3 * LINE_MAX):
        ok = n <= LINE_MAX
        size = sizes[n]
        for eol, ends in ((b"\n", "lf"), (b"\r\n", "crlf")):
            page = sample(n) + eol + Q + b" 2" + eol
            cases.append((f"sample-of-{size}-then-a-line-{ends}", page,
                          {"queue": 3000 if ok else 2000,
                           "skipped": 0 if ok else 1}))
        cases.append((f"sample-of-{size}-at-the-end", sample(n),
                      {"queue": 1000 if ok else 0}))
        cases.append((f"sample-of-{size}-then-a-cr-at-the-end",
                      sample(n) + b"\r", {"queue": 1000 if ok else 0}))
        # a comment, and a long run of spaces before one
        comment = b"# HELP " + b"h" * (n - 7)
        cases.append((f"comment-of-{size}-then-a-line",
                      comment + b"\n" + Q + b" 2\n",
                      {"queue": 2000, "skipped": 0}))
        cases.append((f"spaces-and-a-hash-of-{size}-then-a-line",
                      b" " * (n - 1) + b"#" + b"\n" + Q + b" 2\n",
                      {"queue": 2000, "skipped": 0 if ok else 1}))
    cases.append(("100000-bytes-of-x-then-a-line",
                  b"x" * 100000 + b"\n" + Q + b" 2\n",
                  {"queue": 2000, "skipped": 1}))
    cases.append(("comment-of-100000-hashes-then-a-line-and-blank-lines",
                  b"#" * 100000 + b"\n" + Q + b" 2\n" + b"\n" * 5000,
                  {"queue": 2000, "skipped": 0}))
    return cases


LONG_LINES = long_lines_cases()


@pytest.fixture(scope="module")
def long_lines_runs(cli):
    """Each page of LONG_LINES whole, in buffers about LINE_MAX long, of
    1000 bytes and cut at 30 random places, in one run of the cli for
    them all: name -> [(cuts, result)]."""
    rng = random.Random(4)
    records = []
    for _, page, _ in LONG_LINES:
        records += [(page, cuts, None) for cuts in
                    ("-", "e4096", "e4097", "e1000",
                     sorted(rng.sample(range(1, len(page)), 30)))]
    results = run_many(cli, records)
    return {name: [(cuts, res) for (_, cuts, _), res in
                   zip(records[5 * i:5 * i + 5], results[5 * i:5 * i + 5])]
            for i, (name, _, _) in enumerate(LONG_LINES)}


@pytest.mark.parametrize("case", LONG_LINES, ids=named)
def test_long_lines(long_lines_runs, case):
    """Lines up to LINE_MAX bytes (a CR before the LF not counted) are
    parsed, longer ones skipped and counted, but long comments not; the
    line after a long one is whole."""
    _, page, want = case
    report([f"{len(page)} bytes cut {str(cuts)[:40]}: {x}"
            for cuts, res in long_lines_runs[case[0]]
            for x in expected(page, res, want)])


def test_labels(cli):
    """Label values with "}", "," and escapes in them; malformed label
    sets skip the line."""
    Q = b"vllm:num_requests_waiting"
    good = [b'{a="}"}', b'{a=","}', b'{a="\\"}"}', b'{a="\\\\"}',
            b'{a="\\n"}', b'{a="x\\"},b=\\"y"}', b'{a="\\x"}',
            b'{a="", b="{"}', b'{ _a_1 = "v" }', b'{a="\t}\t"}',
            b'{a="\xff\xfe\x00"}', b'{le="+Inf"}']
    bad = [b'{a=b}', b'{a="b}', b'{a="b"', b'{a="b",,}', b'{,}',
           b'{a "b"}', b'{a="b" c="d"}', b'{1a="b"}', b'{a:b="c"}',
           b'{a="\\"}', b'{=""}', b'{a=""}}', b'{"a"="b"}', b'{a=\'b\'}',
           b'{a="b"}x', b'{a="b"']
    page = b"".join(Q + lab + b" 1\n" for lab in good + bad)
    res = run_one(cli, page)
    assert res["queue"] == 1000 * len(good), res
    assert res["skipped"] == len(bad), res
    report(check(page, res))
    # each bad one alone, and before a good line
    records = [(Q + lab + b" 1\n" + Q + b" 2\n", "e1", None) for lab in bad]
    for (page, _, _), res in zip(records, run_many(cli, records)):
        assert (res["queue"], res["skipped"]) == (2000, 1), (page, res)


def test_names(cli):
    """The names of a signal are ordered: the first present on the page
    wins, even when a later one came first, and a name may serve two
    signals; a signal without names finds nothing."""
    page = (b"b 1\nb 2\nc 10\na 5\nb 7\na{x=\"1\"} 6\nc 1\nd 3\n"
            b"l{running_lora_adapters=\"z\"} 9\nk 0.5\nk 0.25\n"
            b"m{running_lora_adapters=\"w\"} 1\n")
    names = {"queue": ["a", "b", "c"], "running": ["c", "b"],
             "kv": ["k", "d"], "lora": ["m", "l"]}
    res = run_one(cli, page, names=names)
    assert res["queue"] == 11000 and res["running"] == 11000, res
    assert res["kv"] == 500, res
    assert res["name_index"] == [0, 0, 0, 0], res
    assert res["lora_stamp"] == 1000, res
    assert res["lora_running"] == [murmur2(b"w")], res
    report(check(page, res, names))

    # later names only, and no names at all
    names2 = {"queue": ["zz", "b"], "running": [], "kv": ["d", "k"],
              "lora": ["l"]}
    res = run_one(cli, page, names=names2)
    assert (res["queue"], res["running"], res["kv"]) == (10000, 0, 3000)
    assert res["found"] == ["queue", "kv", "lora"], res
    assert res["name_index"] == [1, NAMES_MAX, 0, 0], res
    report(check(page, res, names2))

    # NaN does not count as present: the later name stays in use
    page2 = b"b 4\na NaN\na +Inf\nb 1\n"
    res = run_one(cli, page2, names={"queue": ["a", "b"]})
    assert res["queue"] == 5000 and res["name_index"][0] == 1, res

    # eight names, from the command line too
    names3 = {"queue": [f"n{i}" for i in range(8)]}
    page3 = b"n7 1\nn6 2\nn5 3\nn7 4\n"
    res = run_one(cli, page3, names=names3)
    assert res["queue"] == 3000 and res["name_index"][0] == 5, res
    page4 = page3 + b"vllm:kv_cache_usage_perc 1\n"
    r = subprocess.run([str(cli), "-", "--names", "queue=n7,n6", "kv=",
                        "--cuts", "e3"], input=page4,
                       capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert (res["queue"], res["feeds"], res["found"]) == (
        5000, (len(page4) + 2) // 3, ["queue"]), res


def test_values(cli):
    """Values as thousandths, rounded half away from zero, saturated at
    2^62, exponents and all, against Decimal; NaN and infinities ignored,
    malformed values skip the line."""
    Q = b"vllm:num_requests_waiting"
    fixed = [b"3.0", b"0.953", b"9.53e-1", b"953e-3", b"0.0005", b"0.0004999",
             b"-0.0005", b"-0.0015", b"0.0015", b"2.5e-4", b".5", b"5.",
             b"+7", b"-7", b"0", b"-0", b"00012", b"1e3", b"1E+3", b"1e-3",
             b"4611686018427387.904", b"4611686018427387.9035",
             b"4611686018427387.905", b"-4611686018427387.905",
             b"9223372036854775807", b"1e400", b"-1e400", b"1e-400",
             b"0e999999999999", b"1e99999999999999999999",
             b"0.000000000000000000000000000000000000001e39",
             b"123456789012345678901234567890e-30",
             b"1234567890123456789.5e-3", b"12345678901234567895e-4",
             b"12345678901234567894999e-6", b"0.99999999999999999999",
             b"1.7537412358735502e+09", b"1e-3", b"0.00050000000000000000001",
             b"0.00049999999999999999999", b"9" * 3000, b"0." + b"9" * 3000,
             b"0." + b"0" * 3000 + b"5e3000", b"1" + b"0" * 2000 + b"e-2000"]
    specials = [b"NaN", b"nan", b"+Inf", b"-Inf", b"Inf", b"inf",
                b"+infinity", b"-Infinity", b"NAN"]
    bad = [b"+", b"-", b".", b"e5", b"1e", b"1e+", b"1.2.3", b"--1",
           b"+-1", b"0x10", b"1_000", b"1,5", b"infinit", b"nanx", b"++Inf",
           b"1e5.5", b"\xd9\xa1", b"1\x00", b"\xff", b"Infinityy", b"In",
           b"1..", b"..1", b"1e--3", b"5f"]
    rng = random.Random(11)
    generated = []
    for _ in range(3000):
        sign = rng.choice([b"", b"+", b"-"])
        ip = str(rng.randint(0, 10 ** rng.randint(0, 25))).encode()
        fp = str(rng.randint(0, 10 ** rng.randint(0, 25))).encode()
        body = rng.choice([ip, ip + b"." + fp, b"." + fp, ip + b"."])
        if rng.random() < 0.5:
            body += rng.choice([b"e", b"E"]) + rng.choice([b"", b"+", b"-"]) \
                + str(rng.randint(0, 30)).encode()
        generated.append(sign + body)
    # ties at every place
    for k in range(1, 25):
        generated.append(b"0." + b"0" * 2 + b"5" + b"0" * k)
        generated.append(b"1" + b"0" * k + b"5e-" + str(k + 4).encode())
    values = fixed + generated
    page = b"".join(Q + b"{i=\"%d\"} %s\n" % (i, v)
                    for i, v in enumerate(values))
    # one signal per line: kv's max is a line's value, summed by queue
    problems = []
    records = []
    for v in values:
        records.append((b"vllm:kv_cache_usage_perc " + v + b"\n", "-",
                        None))
    for v in specials + bad:
        records.append((b"vllm:kv_cache_usage_perc " + v + b"\n" + Q
                        + b" 1 " + v + b"\n", "-", None))
    results = run_many(cli, records)
    for v, res in zip(values, results):
        want = thousandths(v)
        if res["kv"] != want or res["found"] != ["kv"]:
            problems.append(f"{v[:60]!r}: {res['kv']}, expected {want}")
    for v, res in zip(specials + bad, results[len(values):]):
        special = v in specials
        if res["found"] or res["samples"] != (1 if special else 0) \
                or res["skipped"] != (1 if special else 2):
            problems.append(f"{v!r}: found {res['found']}, samples "
                            f"{res['samples']}, skipped {res['skipped']}")
    report(problems)
    res = run_one(cli, page, "e5")
    report(check(page, res))
    assert res["samples"] == len(values)

    # sums saturate
    big = b"".join(Q + b" 4e15\n" for _ in range(3))
    big += b"".join(Q + b" -4e15\n" for _ in range(8))
    res = run_one(cli, big)
    assert res["queue"] == -LIMIT, res
    report(check(big, res))
    res = run_one(cli, Q + b" 3e15\n" + Q + b" 3e15\n" + Q + b" -1\n")
    assert res["queue"] == LIMIT - 1000, res

    # samples of other names are checked all the same
    res = run_one(cli, b"foo 1\nfoo x\nfoo 1 y\nfoo 1 2 3\nfoo 1 2 #\n")
    assert (res["samples"], res["skipped"]) == (2, 3), res


def lora_cases():
    """(name, page, expected fields) of LoRA samples."""
    L = b"vllm:lora_requests_info"

    def info(value, running=None, waiting=None, maxl=None, extra=b""):
        labels = []
        if maxl is not None:
            labels.append(b'max_lora="%s"' % maxl)
        if running is not None:
            labels.append(b'running_lora_adapters="%s"' % running)
        if waiting is not None:
            labels.append(b'waiting_lora_adapters="%s"' % waiting)
        return L + b"{" + b",".join(labels) + extra + b"} " + value + b"\n"

    many = b",".join(b"a%d" % i for i in range(20))
    return [
        ("largest-value-wins",
         info(b"5", b"a,b", b"c", b"4") + info(b"7", b"d", b"", b"2")
         + info(b"6", b"e,f,g", b"h", b"8"),
         {"lora_stamp": 7000, "nrunning": 1, "nwaiting": 0, "max_lora": 2,
          "lora_running": [murmur2(b"d")]}),
        ("first-of-equal-values-wins",
         info(b"5", b"a", b"", b"1") + info(b"5", b"b", b"", b"9"),
         {"max_lora": 1, "lora_running": [murmur2(b"a")]}),
        ("nan-and-infinities-ignored",
         info(b"NaN", b"a") + info(b"-3", b"b") + info(b"+Inf", b"c"),
         {"lora_stamp": -3000, "lora_running": [murmur2(b"b")]}),
        ("lists-counted-past-lora-max",
         info(b"1", many, many, b"20"),
         {"nrunning": 20, "nwaiting": 20,
          "lora_running": [murmur2(b"a%d" % i) for i in range(8)]}),
        ("items-trimmed-and-empty-ones-skipped",
         info(b"1", b" a , ,b,\tc\t,,", b",", b"04"),
         {"nrunning": 3, "nwaiting": 0, "max_lora": 4,
          "lora_running": [murmur2(x) for x in (b"a", b"b", b"c")]}),
        ("items-unescaped",
         info(b"1", b'q\\"x,y\\\\z,n\\nl,o\\tk', b""),
         {"nrunning": 4, "lora_running": [murmur2(b'q"x'),
                                          murmur2(b"y\\z"),
                                          murmur2(b"n\nl"),
                                          murmur2(b"o\\tk")]}),
        ("braces-and-escaped-quotes-in-lists",
         info(b"1", b"a}b", b"c{d,e\\\",f"),
         {"nrunning": 1, "nwaiting": 3}),
        ("no-lora-labels",
         info(b"1"), {"found": ["lora"], "nrunning": 0, "max_lora": 0}),
        ("no-label-set", L + b" 1\n", {"found": ["lora"], "lora_stamp": 1000}),
        ("max-lora-negative", info(b"1", maxl=b"-1"), {"max_lora": 0}),
        ("max-lora-with-a-fraction", info(b"1", maxl=b"4.0"), {"max_lora": 0}),
        ("max-lora-with-a-space", info(b"1", maxl=b" 4"), {"max_lora": 0}),
        ("max-lora-empty", info(b"1", maxl=b""), {"max_lora": 0}),
        ("max-lora-huge-saturates",
         info(b"1", maxl=b"99999999999999999999"), {"max_lora": MAX_LORA}),
        ("max-lora-int32-max-saturates",
         info(b"1", maxl=b"2147483647"), {"max_lora": MAX_LORA}),
        ("max-lora-just-under-the-cap",
         info(b"1", maxl=b"2147483646"), {"max_lora": MAX_LORA - 1}),
        # duplicate labels: the last one
        ("duplicate-labels-last-wins",
         info(b"1", b"a", b"b", b"3",
              b',running_lora_adapters="x,y,z",max_lora="6"'),
         {"nrunning": 3, "max_lora": 6}),
        # a later sample with fewer labels clears what an earlier set
        ("later-sample-with-fewer-labels-clears",
         info(b"1", b"a", b"b", b"3") + info(b"2"),
         {"nrunning": 0, "nwaiting": 0, "max_lora": 0,
          "lora_running": []}),
        # malformed: skipped, whatever its value
        ("malformed-sample-skipped",
         info(b"1", b"a") + L + b'{running_lora_adapters="b} 9\n',
         {"lora_running": [murmur2(b"a")], "skipped": 1}),
    ]


LORA = lora_cases()


@pytest.fixture(scope="module")
def lora_runs(cli):
    return runs_of(cli, LORA, ("-", "e1", "e13"))


@pytest.mark.parametrize("case", LORA, ids=named)
def test_lora(lora_runs, case):
    """The LoRA sample with the largest value wins, the first of equals;
    its lists counted past LORA_MAX, trimmed, unescaped, empty items
    skipped; max_lora a non-negative integer or 0."""
    _, page, want = case
    report([f"cut {cuts}: {x}" for cuts, res in lora_runs[case[0]]
            for x in expected(page, res, want)])


LINE_KINDS = [
    b"# HELP {n} Help text.", b"# TYPE {n} gauge", b"#", b"", b"  ",
    b"{n} {v}", b"{n}{{engine=\"{i}\",model_name=\"m\"}} {v}",
    b"{n}{{a=\"}}\\\",{{\"}} {v} 1700000000000", b"{n} {v} # {{t=\"x\"}} 1",
    b"{n}_by_reason{{reason=\"capacity\"}} {v}", b"x{n} {v}",
    b"{n} {v} {v}", b"{n}{{a=\"b\"}}{v}",
]
GARBAGE = [b"{n} ", b"{n}", b"{n}{{a=\"b\"}", b"{n} {v} x", b"{n}\x00 {v}",
           b"{n} {v} 1 2", b"\xff\xfe", b"{n} \x7f", b"{{", b"}} {v}"]
VALUES = [b"0", b"1", b"3.0", b"0.5", b"-2", b"1e2", b"NaN", b"+Inf",
          b"0.0005", b"1.7537412358735502e+09", b"x", b"1e400", b".5"]


def random_page(rng, names):
    """Lines of every kind, of our names and others, some broken."""
    pool = [n for v in names.values() for n in v] + ["other", "vllm:other"]
    lines = []
    for _ in range(rng.randint(0, 60)):
        n = rng.choice(pool).encode()
        v = rng.choice(VALUES)
        if n.endswith(b"lora_requests_info") and rng.random() < 0.7:
            line = (n + b'{max_lora="%d",running_lora_adapters="%s",'
                    b'waiting_lora_adapters="%s"} %s'
                    % (rng.randint(0, 9),
                       b",".join(rng.sample([b"a", b"b", b" c", b"", b"d\\\"",
                                             b"e\\\\", b"f"],
                                            rng.randint(0, 5))),
                       rng.choice([b"", b"w", b"w,x"]), v))
        else:
            kind = rng.choice(GARBAGE if rng.random() < 0.1 else LINE_KINDS)
            line = (kind.replace(b"{n}", n).replace(b"{v}", v)
                    .replace(b"{i}", b"%d" % rng.randint(0, 3))
                    .replace(b"{{", b"{").replace(b"}}", b"}"))
        if rng.random() < 0.05:
            line = line[:rng.randint(0, len(line))]
        lines.append(line)
    eol = rng.choice([b"\n", b"\r\n", None])
    out = b""
    for line in lines:
        out += line + (eol or rng.choice([b"\n", b"\r\n"]))
    if out and rng.random() < 0.2:
        out = out.rstrip(b"\r\n")
    return out


def test_generated(cli):
    """Generated pages of good and broken lines, with the default names
    and others, each cut several ways, against the oracle."""
    rng = random.Random(20250601)
    pages = []
    for i in range(300):
        names = None
        if i % 3 == 0:
            names = {s: rng.sample(["a", "b", "c", "vllm:num_requests_"
                                    "waiting"], rng.randint(0, 3))
                     for s in SIGNALS}
            names["lora"] = rng.choice([["l"], ["l", "vllm:lora_requests_"
                                                    "info"]])
        pages.append((random_page(rng, names or DEFAULT_NAMES), names))
    records, index = [], []
    for i, (page, names) in enumerate(pages):
        for cuts in cut_patterns(rng, len(page), i % 10 == 0)[:4]:
            records.append((page, cuts, names))
            index.append(i)
    results = run_many(cli, records)
    problems, by_page = [], {}
    stats = {s: 0 for s in SIGNALS}
    for (page, cuts, names), i, res in zip(records, index, results):
        problems += [f"page {i} cut {str(cuts)[:30]}: {x}"
                     for x in check(page, res, names)]
        by_page.setdefault(i, []).append(res)
        for s in res["found"]:
            stats[s] += 1
    problems += [f"page {i}: results depend on the cuts"
                 for i, rs in by_page.items() if not same(rs)]
    print(f"\n{len(pages)} pages, {len(records)} runs, found {stats}")
    report(problems)
    assert min(stats.values()) > len(records) / 10


def test_garbage(cli):
    """Random bytes, binary, a page mangled: no crash, no read past a
    buffer (ASan), and what the oracle says."""
    rng = random.Random(99)
    base = vllm_page([Engine(2, 1, 0.5)], [(1, "a", "", STAMP)],
                     process=False)
    pages = [bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 3000)))
             for _ in range(20)]
    pages += [bytes(rng.choice(b"{}\",=\\ \t\n\r#.e+-0123456789aqlvNIn:_")
                    for _ in range(rng.randint(0, 3000)))
              for _ in range(40)]
    for _ in range(40):
        b = bytearray(base)
        for _ in range(rng.randint(1, 20)):
            at = rng.randrange(len(b))
            op = rng.random()
            if op < 0.4:
                b[at] = rng.getrandbits(8)
            elif op < 0.7:
                del b[at:at + rng.randint(1, 50)]
            else:
                b[at:at] = rng.choice([b"\n", b"\r", b"\x00", b'"', b"\\",
                                       b"{", b"}", b" ", b"#"])
        pages.append(bytes(b))
    pages.append(b"\x00" * 10000)
    pages.append(b"\n" * 10000)
    pages.append(b'vllm:num_requests_waiting{a="' + b"\\" * 5000 + b'"} 1\n')
    records = [(p, cuts, None) for p in pages
               for cuts in ("-", "e1" if len(p) < 4000 else "e3", "e61")]
    results = run_many(cli, records)
    problems = []
    for i, res in enumerate(results):
        problems += [f"page {i // 3}: {x}" for x in
                     check(records[i][0], res)]
    report(problems)


def test_fuzz(tmp_path):
    """libFuzzer, ASan and UBSan over the parser for 5 s."""
    tokens = ["\n", "\r\n", "{", "}", "=", '"', ",", "\\", '\\"', "\\n",
              "\\\\", " ", "\t", "#", "# HELP ", "# TYPE ", "# EOF", "e",
              "E", "e-", "e+", ".", "-", "+", "NaN", "+Inf", "-Inf",
              "Infinity", "1.7537412358735502e+09", "0.953", "1e400",
              "9223372036854775807", "4611686018427387.904",
              "vllm:num_requests_waiting", "vllm:num_requests_running",
              "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc",
              "vllm:lora_requests_info", "sglang:num_queue_reqs",
              "sglang:num_running_reqs", "sglang:token_usage",
              "tgi_queue_size", "tgi_batch_current_size", "_by_reason",
              "running_lora_adapters", "waiting_lora_adapters",
              "max_lora", 'running_lora_adapters="', 'max_lora="4"',
              "q ", "qq ", "r ", "k ", "l{", "ll{", "engine="]
    fuzz(tmp_path, [UNIT / "balance_signals_fuzz.c", PARSER], CORPUS,
         "".join('t%d="%s"\n' % (i, "".join(
             chr(c) if 0x20 <= c < 0x7f and c not in b'"\\' else "\\x%02x" % c
             for c in t.encode("utf-8"))) for i, t in enumerate(tokens)),
         seconds=5, args=["-max_len=16384"])


def test_bench(tmp_path):
    """Speed of the parser built as nginx builds it (-O2): printed, with
    no assertion on time."""
    bench = compile_c(tmp_path / "balance_signals_bench",
                      [UNIT / "balance_signals_cli.c", PARSER],
                      ["-O2", "-g", "-Wall", "-Werror"])
    page = vllm_page([Engine(3, 2, 0.5)] * 8, [(4, "a,b", "", STAMP)])
    path = tmp_path / "page.txt"
    path.write_bytes(page)
    print()
    for label, k in (("one buffer", 0), ("4 KB buffers", 4096),
                     ("64-byte buffers", 64)):
        r = subprocess.run([str(bench), "--bench", str(path), "200",
                            str(k)], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr
        res = json.loads(r.stdout)
        assert res["found_bits"] == 15, res
        print(f"bench ({label}): a vLLM page of {res['bytes']} bytes, "
              f"{res['samples']} samples: {res['ns_per_pass'] / 1000:.0f}"
              f" us a page, {res['mb_per_s']:.0f} MB/s")
