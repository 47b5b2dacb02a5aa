#!/usr/bin/python3
"""infer_sim: a simulated GPU model server that behaves like vLLM's
OpenAI-compatible server (plus KServe v2 and a tiny custom API).

One process = one replica of one model.  Python 3 standard library only,
asyncio with a hand-written HTTP/1.1 server.  See sim/README.md.
"""

import argparse
import asyncio
import base64
import collections
import fcntl
import hashlib
import json
import math
import os
import random
import signal
import socket
import struct
import termios
import time
import traceback
import uuid
import zlib

MAX_BODY = 64 * 1024 * 1024          # request body limit (413 beyond)
MAX_HEAD = 1024 * 1024               # request line + headers limit (431 beyond)
RECORD_BODY_TEXT_MAX = 64 * 1024     # recorded body text only below this
RECORD_KEEP = 1000                   # recorded requests kept
EMBED_DIM = 8

WORDS = (
    "the quick brown fox jumps over lazy dog alpha beta gamma delta epsilon "
    "zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
    "upsilon phi chi psi omega red orange yellow green blue indigo violet "
    "one two three four five six seven eight nine ten apple banana cherry "
    "grape lemon mango melon peach pear plum river stone cloud rain snow"
).split()
assert len(WORDS) == 64

REASONS = {
    100: "Continue", 200: "OK", 204: "No Content", 400: "Bad Request",
    401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 408: "Request Timeout", 409: "Conflict",
    413: "Payload Too Large", 417: "Expectation Failed",
    422: "Unprocessable Entity", 429: "Too Many Requests",
    431: "Request Header Fields Too Large", 500: "Internal Server Error",
    501: "Not Implemented", 502: "Bad Gateway", 503: "Service Unavailable",
    504: "Gateway Timeout",
}

ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error",
    403: "permission_error", 404: "not_found_error", 405: "invalid_request_error",
    409: "conflict_error", 413: "invalid_request_error",
    422: "invalid_request_error", 429: "rate_limit_error",
}

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5,
                0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
E2E_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0,
               2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0)

# runtime options: name -> (type, default).  "int?" = int or None.
OPTIONS = {
    "model": ("str", "sim-model"),
    "replica": ("str", "sim-0"),
    "ttft_ms": ("float", 20.0),
    "tpot_ms": ("float", 2.0),
    "max_concurrency": ("int", 8),
    "max_queue": ("int", 256),
    "fail_status": ("int", 500),
    "fail_ratio": ("float", 0.0),
    "reset_after_chunks": ("int?", None),
    "stall_ms": ("float", 0.0),
    "split_writes": ("bool", False),
    "default_max_tokens": ("int", 16),
    "max_tokens_cap": ("int", 4096),
    "seed": ("int", 1),
    "kv_slot_tokens": ("int", 1024),
    # the engine model (off by default: a TTFT of ttft_ms, KV use from
    # kv_slot_tokens): prefill at this many tokens/s, one prompt after
    # another, and a KV cache of this many tokens with automatic prefix
    # caching (blocks of BLOCK_TOKENS, LRU) and preemption when full
    "prefill_tokens_per_s": ("float", 0.0),
    "kv_cache_tokens": ("int", 0),
    "prefix_caching": ("bool", True),
    "fake_running": ("int?", None),
    "fake_waiting": ("int?", None),
    "fake_kv_cache_usage": ("float?", None),
    "access_log": ("bool", False),
    # odd streams: usage chunks sent (with include_usage), the last one
    # as the final event without its blank line and no [DONE], and a
    # "pad" field of N bytes in every content chunk
    "usage_chunks": ("int", 1),
    "usage_unterminated": ("bool", False),
    "pad_bytes": ("int", 0),
    # the /metrics page: its flavor, and ways for it to fail
    "metrics_flavor": ("str", "vllm"),
    "metrics_status": ("int", 200),
    "metrics_stall_ms": ("float", 0.0),
    "metrics_garbage": ("bool", False),
    # LoRA adapters (vllm:lora_requests_info, vllm flavor; max_lora 0 = none)
    "lora_running": ("csv", ""),
    "lora_waiting": ("csv", ""),
    "max_lora": ("int", 0),
}

METRICS_FLAVORS = ("vllm", "sglang", "tgi")
BLOCK_TOKENS = 16                    # vLLM's default block size
BLOCK_BYTES = 4 * BLOCK_TOKENS       # a token is 4 bytes of prompt text
LORA_HISTORY = 8                     # label sets of lora_requests_info kept


def garbage_page():
    """A 200 answer to /metrics that is no Prometheus text at all: HTML,
    binary bytes with NULs, a long line without a newline, unbalanced braces,
    but no metric name any gateway looks for."""
    return (b"<!DOCTYPE html>\n<html><head><title>502 oops</title></head>\n"
            b"<body>{{{ not metrics } \"unterminated\n"
            b"# TYPE\n# HELP\n=== 1 2 3\n{le=\"+Inf\"} NaN NaN\n"
            + bytes(range(256)) + b"\x00\x00\xff\xfe\n"
            + b"x" * 70000 + b" 1e999999\n</body></html>")


def coerce(name, value):
    typ, _ = OPTIONS[name]
    if typ == "csv":
        # comma-separated names, spaces around them dropped; a JSON list too
        if value is None:
            return ""
        if isinstance(value, (list, tuple)):
            items = [str(x) for x in value]
        elif isinstance(value, str):
            items = value.split(",")
        else:
            raise ValueError("%s: not a list of names: %r" % (name, value))
        items = [x.strip() for x in items]
        if any(c in x for x in items for c in '"\\\n'):
            raise ValueError("%s: no quotes, backslashes or newlines in names" % name)
        return ",".join(x for x in items if x)
    nullable = typ.endswith("?")
    base = typ.rstrip("?")
    if value is None or (isinstance(value, str) and value.lower() in ("", "none", "null")):
        if nullable:
            return None
        raise ValueError("%s may not be null" % name)
    if base == "str":
        value = str(value)
        if name == "metrics_flavor" and value not in METRICS_FLAVORS:
            raise ValueError("metrics_flavor: one of %s" % ", ".join(METRICS_FLAVORS))
        return value
    if base == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)):
            return bool(value)
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError("%s: not a boolean: %r" % (name, value))
    if isinstance(value, bool):
        raise ValueError("%s: not a number: %r" % (name, value))
    if base == "int":
        f = float(value)
        if math.isnan(f) or math.isinf(f) or f != int(f):
            raise ValueError("%s: not an integer: %r" % (name, value))
        if name == "metrics_status" and not 200 <= f <= 599:
            raise ValueError("metrics_status: a status from 200 to 599")
        if name == "max_lora" and f < 0:
            raise ValueError("max_lora: not negative")
        return int(f)
    if base == "float":
        f = float(value)
        if math.isnan(f) or math.isinf(f):
            raise ValueError("%s: not finite" % name)
        return f
    raise ValueError(name)


def jdump(obj):
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def text_tokens(s):
    """Token estimate of one text: ceil(UTF-8 bytes / 4)."""
    if not isinstance(s, str):
        s = json.dumps(s, separators=(",", ":"), ensure_ascii=False)
    return (len(s.encode("utf-8")) + 3) // 4


def content_text(content):
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for p in content:
            if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str):
                parts.append(p["text"])
            else:
                parts.append(json.dumps(p, separators=(",", ":"), ensure_ascii=False))
        return "".join(parts)
    return json.dumps(content, separators=(",", ":"), ensure_ascii=False)


def chat_prompt_tokens(messages):
    """sum over messages of (ceil(bytes(content)/4) + 4), + 3."""
    total = 3
    for m in messages:
        c = m.get("content") if isinstance(m, dict) else m
        total += text_tokens(content_text(c)) + 4
    return total


def prompt_item_tokens(p):
    """string -> max(1, ceil(bytes/4)); list of ints -> its length."""
    if isinstance(p, str):
        return max(1, text_tokens(p))
    if isinstance(p, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in p):
        return len(p)
    return max(1, text_tokens(p))


def prompt_items(prompt):
    """Split a completions prompt / embeddings input into its items."""
    if isinstance(prompt, list) and prompt and not all(
            isinstance(x, int) and not isinstance(x, bool) for x in prompt):
        return prompt
    return [prompt]


# POST endpoints answered by inference(), by the kind of answer they get
INFERENCE_PATHS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
    "/api/infer": "api",
}

class ClientGone(Exception):
    """The client went away (or we reset the connection on purpose)."""


class BadRequest(Exception):
    def __init__(self, status, message, code=None, close=False):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.close = close


class Request:
    __slots__ = ("method", "target", "path", "query", "version", "headers",
                 "h", "body", "chunked", "keep_alive", "t0", "trailers")


class Conn:
    __slots__ = ("reader", "writer", "transport", "sock", "aborted")

    def __init__(self, reader, writer):
        self.reader = reader
        self.writer = writer
        self.transport = writer.transport
        self.sock = writer.get_extra_info("socket")
        self.aborted = False

    def gone(self):
        return self.transport.is_closing() or self.reader.at_eof()


class Histogram:
    def __init__(self, buckets):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, v):
        self.sum += v
        self.count += 1
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1


class Scheduler:
    """Concurrency slots with a FIFO wait queue."""

    def __init__(self, sim):
        self.sim = sim
        self.running = 0
        self.waiting = collections.deque()

    def try_acquire(self):
        """None = acquired; a future = queued; raises BadRequest(503) if full."""
        cfg = self.sim.cfg
        if self.running < cfg["max_concurrency"] and not self.waiting:
            self.running += 1
            return None
        if len(self.waiting) >= cfg["max_queue"]:
            raise BadRequest(503, "the server's request queue is full", "queue_full")
        fut = asyncio.get_running_loop().create_future()
        self.waiting.append(fut)
        return fut

    def abandon(self, fut):
        if fut.done() and not fut.cancelled():
            self.release()          # slot had been granted: give it back
        else:
            fut.cancel()
            try:
                self.waiting.remove(fut)
            except ValueError:
                pass

    def release(self):
        self.running -= 1
        self.wake()

    def wake(self):
        while self.waiting and self.running < self.sim.cfg["max_concurrency"]:
            fut = self.waiting.popleft()
            if fut.done():
                continue
            self.running += 1
            fut.set_result(True)


class Job:
    """One admitted inference request (for metrics: tokens in flight)."""
    __slots__ = ("prompt_tokens", "generated", "t_start", "ttft", "tpot", "n", "track",
                 "t_first", "hashes", "blocks", "kv", "cached_tokens")

    def tokens_now(self, now):
        if self.track:
            g = self.generated
        else:
            el = now - self.t_start - self.ttft
            if el < 0:
                g = 0
            elif self.tpot <= 0:
                g = self.n
            else:
                g = min(self.n, 1 + int(el / self.tpot))
        return self.prompt_tokens + g


class KVCache:
    """vLLM's paged KV cache with automatic prefix caching, in blocks of
    BLOCK_TOKENS tokens.  A full block of prompt is known by the hash of
    its text and of every block before it (so a block matches only at the
    same place after the same prefix); a request holds its prompt's
    blocks, shared with any other request that holds them, and private
    blocks for the rest and for what it generates.  A block no request
    holds stays cached, and is reused in LRU order when a new block is
    needed.  Usage, as vLLM's kv_cache_usage_perc, is the share of blocks
    held by requests."""

    def __init__(self, blocks, caching):
        self.capacity = max(1, blocks)
        self.caching = caching
        self.ref = {}                          # hash -> requests holding it
        self.free = collections.OrderedDict()  # hash -> None, LRU first
        self.private = 0                       # held blocks of no hash
        self.queries = 0                       # prompt tokens looked up
        self.hits = 0                          # of them, found cached
        self.preemptions = 0
        self.waiters = collections.deque()     # FIFO of requests waiting

    def held(self):
        return len(self.ref) + self.private

    def usage(self):
        return min(1.0, self.held() / self.capacity)

    def match(self, hashes):
        """How many leading blocks of hashes are cached."""
        n = 0
        if self.caching:
            for h in hashes:
                if h not in self.ref and h not in self.free:
                    break
                n += 1
        return n

    def acquire(self, hashes, private, force=False):
        """Hold the blocks of hashes and `private` more; False (nothing
        held) when they do not fit beside what requests hold.  `force`:
        past the capacity, for a request alone (a cache made smaller at
        run time, under a request admitted to the larger one)."""
        new = sum(1 for h in hashes if h not in self.ref)
        if new + private > self.capacity - self.held() and not force:
            return False
        for h in hashes:
            if h in self.ref:
                self.ref[h] += 1
                continue
            if h in self.free:
                del self.free[h]
            else:
                self.make_room()
            self.ref[h] = 1
        for _ in range(private):
            self.make_room()
            self.private += 1
        return True

    def make_room(self):
        """A block for new content: the LRU cached block goes when every
        block has content."""
        if self.held() + len(self.free) >= self.capacity and self.free:
            self.free.popitem(last=False)

    def grow(self, force=False):
        """One more private block; `force`: past the capacity, for a
        request alone in the cache (vLLM would have refused it as too
        long for the model)."""
        if self.held() >= self.capacity and not force:
            return False
        self.make_room()
        self.private += 1
        return True

    def release(self, hashes, private):
        # the tail of a prompt first: it goes before its start, which
        # others share, as in vLLM (a chain is matched from its start)
        for h in reversed(hashes):
            self.ref[h] -= 1
            if not self.ref[h]:
                del self.ref[h]
                if self.caching:
                    self.free[h] = None        # most recently used last
        self.private -= private


def prompt_text(kind, body):
    """The text a prompt's blocks are made of, in order: each chat message
    as its role and content, or a completions prompt's strings."""
    if kind == "chat":
        return "".join("%s\x00%s\x00" % (m.get("role", ""),
                                         content_text(m.get("content")))
                       if isinstance(m, dict) else jdump(m).decode("utf-8")
                       for m in body.get("messages") or [])
    if kind == "completions":
        items = prompt_items(body.get("prompt"))
        return "".join(x if isinstance(x, str) else jdump(x).decode("utf-8")
                       for x in items)
    return ""


def block_hashes(text, prompt_tokens):
    """The chained hashes of the prompt's full blocks, at most those of
    prompt_tokens - 1 tokens (the last token is always computed, as in
    vLLM)."""
    data = text.encode("utf-8")
    n = min(len(data) // BLOCK_BYTES, max(0, prompt_tokens - 1) // BLOCK_TOKENS)
    out, h = [], b""
    for i in range(n):
        h = hashlib.blake2b(h + data[i * BLOCK_BYTES:(i + 1) * BLOCK_BYTES],
                            digest_size=8).digest()
        out.append(h)
    return out


class Sim:
    def __init__(self, cfg):
        self.cfg = cfg
        self.rng = random.Random(cfg["seed"])
        self.split_rng = random.Random(cfg["seed"] * 7919 + 1)
        self.sched = Scheduler(self)
        self.jobs = set()
        self.kv = self.make_kv()
        self.kv_waiting = 0          # have a slot, wait for KV blocks
        self.prefill_free_at = 0.0   # loop time the prefill is done with
        self.records = collections.deque(maxlen=RECORD_KEEP)
        self.started = int(time.time())
        self.conns = set()
        # counters
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.success = {"stop": 0, "length": 0, "abort": 0}
        self.ttft_hist = Histogram(TTFT_BUCKETS)
        self.e2e_hist = Histogram(E2E_BUCKETS)
        self.requests_total = 0
        self.inference_total = 0
        self.status_counts = collections.Counter()
        self.connections_total = 0
        self.metrics_requests = 0
        # vllm:lora_requests_info: every label set seen, first seen first
        # (as prometheus_client keeps a gauge's children) -> the time it was
        # last current; the current one is written with the time of the page
        self.lora_sets = collections.OrderedDict()
        self.lora_current = self.lora_labels()
        if self.lora_current is not None:
            self.lora_sets[self.lora_current] = time.time()
        self.loop = None

    def make_kv(self):
        if self.cfg["kv_cache_tokens"] <= 0:
            return None
        return KVCache(self.cfg["kv_cache_tokens"] // BLOCK_TOKENS,
                       self.cfg["prefix_caching"])

    # ------------------------------------------------------------------ HTTP

    async def handle_conn(self, reader, writer):
        conn = Conn(reader, writer)
        self.connections_total += 1
        self.conns.add(conn)
        try:
            try:
                conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except (OSError, AttributeError):
                pass
            while True:
                try:
                    req = await self.read_request(conn)
                except BadRequest as e:
                    await self.send_error(conn, None, e.status, e.message, e.code, close=True)
                    await self.linger_close(conn)
                    return
                if req is None:
                    break
                keep = await self.dispatch(conn, req)
                if not keep:
                    break
        except (ClientGone, ConnectionError, OSError, asyncio.IncompleteReadError,
                asyncio.CancelledError, asyncio.LimitOverrunError):
            pass
        except Exception:
            traceback.print_exc()
        finally:
            self.conns.discard(conn)
            if not conn.aborted:
                try:
                    writer.close()
                except Exception:
                    pass

    async def read_request(self, conn):
        reader = conn.reader
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as e:
            if e.partial.strip():
                raise BadRequest(400, "incomplete request head", "bad_request", close=True)
            return None
        except asyncio.LimitOverrunError:
            raise BadRequest(431, "request head too large", "header_too_large", close=True)
        lines = head[:-4].decode("latin-1").split("\r\n")
        while lines and lines[0] == "":      # tolerate stray CRLF between requests
            lines.pop(0)
        if not lines:
            return None
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise BadRequest(400, "malformed request line", "bad_request", close=True)
        req = Request()
        req.t0 = time.monotonic()
        req.method, req.target, req.version = parts
        if req.version not in ("HTTP/1.0", "HTTP/1.1"):
            raise BadRequest(400, "unsupported HTTP version", "bad_request", close=True)
        path, _, query = req.target.partition("?")
        req.path = path
        req.query = query
        headers = []
        h = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                raise BadRequest(400, "malformed header line", "bad_request", close=True)
            value = value.strip(" \t")
            headers.append([name, value])
            lname = name.lower()
            if lname in h:
                h[lname] = h[lname] + ", " + value
            else:
                h[lname] = value
        req.headers = headers
        req.h = h
        req.trailers = []
        conn_tokens = [t.strip().lower() for t in h.get("connection", "").split(",")]
        if req.version == "HTTP/1.1":
            req.keep_alive = "close" not in conn_tokens
        else:
            req.keep_alive = "keep-alive" in conn_tokens

        te = h.get("transfer-encoding")
        cl = h.get("content-length")
        req.chunked = False
        if te is not None:
            if te.split(",")[-1].strip().lower() != "chunked":
                raise BadRequest(501, "unsupported transfer-encoding", "bad_request", close=True)
            req.chunked = True
        elif cl is not None:
            try:
                length = int(cl)
                if length < 0:
                    raise ValueError
            except ValueError:
                raise BadRequest(400, "bad content-length", "bad_request", close=True)
            if length > MAX_BODY:
                raise BadRequest(413, "request body too large", "request_too_large", close=True)
        else:
            length = 0
        expects_body = req.chunked or length > 0
        expect = h.get("expect")
        if expect is not None:
            if expect.lower() != "100-continue":
                raise BadRequest(417, "unsupported expectation", "bad_request", close=True)
            if expects_body and req.version == "HTTP/1.1":
                conn.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if req.chunked:
            req.body = await self.read_chunked(conn, req)
        elif length:
            req.body = await reader.readexactly(length)
        else:
            req.body = b""
        return req

    async def read_chunked(self, conn, req):
        reader = conn.reader
        parts = []
        total = 0
        while True:
            line = await reader.readuntil(b"\n")
            size_s = line.split(b";", 1)[0].strip()
            try:
                size = int(size_s, 16)
                if size < 0:
                    raise ValueError
            except ValueError:
                raise BadRequest(400, "bad chunk size", "bad_request", close=True)
            if size == 0:
                break
            total += size
            if total > MAX_BODY:
                raise BadRequest(413, "request body too large", "request_too_large", close=True)
            parts.append(await reader.readexactly(size))
            crlf = await reader.readuntil(b"\n")
            if crlf.strip():
                raise BadRequest(400, "bad chunk terminator", "bad_request", close=True)
        while True:    # trailers
            line = await reader.readuntil(b"\n")
            if not line.strip():
                break
            name, _, value = line.decode("latin-1").strip().partition(":")
            req.trailers.append([name, value.strip()])
        return b"".join(parts)

    async def linger_close(self, conn):
        """Close after an error while the client may still send: half-close and
        drain input a little so that our answer is not destroyed by an RST."""
        try:
            await conn.writer.drain()
            if conn.writer.can_write_eof():
                conn.writer.write_eof()
            deadline = time.monotonic() + 2.0
            got = 0
            while time.monotonic() < deadline and got < 128 * 1024 * 1024:
                data = await asyncio.wait_for(conn.reader.read(65536),
                                              max(0.01, deadline - time.monotonic()))
                if not data:
                    break
                got += len(data)
        except (asyncio.TimeoutError, ConnectionError, OSError):
            pass

    def head_bytes(self, req, status, headers, close):
        out = ["HTTP/1.1 %d %s" % (status, REASONS.get(status, "Status")),
               "x-sim-replica: " + self.cfg["replica"]]
        out.extend(headers)
        # x-sim-add-header: "Name: value", one header added to the answer
        add = req.h.get("x-sim-add-header") if req is not None else None
        if add and ":" in add and "\r" not in add and "\n" not in add:
            out.append(add)
        if close:
            out.append("connection: close")
        elif req is not None and req.version == "HTTP/1.0":
            out.append("connection: keep-alive")
        out.append("\r\n")
        return "\r\n".join(out).encode("latin-1")

    async def send(self, conn, req, status, body=b"", ctype="application/json",
                   extra=(), close=False):
        """Send a complete response.  Returns keep-alive."""
        close = close or req is None or not req.keep_alive
        hdrs = ["content-length: %d" % len(body)]
        if ctype and (body or status != 200 or ctype != "application/json"):
            hdrs.insert(0, "content-type: " + ctype)
        hdrs.extend(extra)
        head = self.head_bytes(req, status, hdrs, close)
        if conn.transport.is_closing():
            raise ClientGone()
        if req is not None and req.method == "HEAD":
            conn.writer.write(head)
        else:
            conn.writer.write(head + body)
        await conn.writer.drain()
        self.status_counts[status] += 1
        if self.cfg["access_log"] and req is not None:
            print("%s %s %d %d" % (req.method, req.target, status, len(body)), flush=True)
        return not close

    async def send_json(self, conn, req, status, obj, extra=(), close=False):
        return await self.send(conn, req, status, jdump(obj), extra=extra, close=close)

    def error_body(self, status, message, code=None, style="openai"):
        if style == "v2":
            return {"error": message}
        return {"error": {"message": message,
                          "type": ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
                          "param": None,
                          "code": code}}

    async def send_error(self, conn, req, status, message, code=None, style="openai",
                         close=False, extra=()):
        return await self.send_json(conn, req, status,
                                    self.error_body(status, message, code, style),
                                    extra=extra, close=close)

    # ------------------------------------------------------------- routing

    def record(self, req):
        body = req.body
        if len(body) < RECORD_BODY_TEXT_MAX:
            rec = (req, body, None)
        else:
            rec = (req, None, (len(body), hashlib.sha256(body).hexdigest()))
        self.records.append(rec)

    def record_json(self, rec):
        req, body, big = rec
        if body is not None:
            blen, sha, text = len(body), hashlib.sha256(body).hexdigest(), \
                body.decode("utf-8", errors="replace")
        else:
            blen, sha = big
            text = None
        out = {"method": req.method, "path": req.path, "query": req.query,
               "http_version": req.version, "headers": req.headers,
               "body_len": blen, "body_sha256": sha, "body": text,
               "chunked": req.chunked}
        if req.trailers:
            out["trailers"] = req.trailers
        return out

    async def dispatch(self, conn, req):
        path = req.path
        m = req.method
        try:
            if path.startswith("/_sim/"):
                return await self.control(conn, req)
            self.requests_total += 1
            self.record(req)
            kind = INFERENCE_PATHS.get(path)
            if kind is not None:
                if m != "POST":
                    return await self.method_not_allowed(conn, req, "POST")
                return await self.inference(conn, req, kind)
            if path in ("/health", "/v2/health/ready", "/v2/health/live"):
                if m not in ("GET", "HEAD"):
                    return await self.method_not_allowed(conn, req, "GET, HEAD")
                return await self.send(conn, req, 200, b"")
            if path == "/metrics":
                if m not in ("GET", "HEAD"):
                    return await self.method_not_allowed(conn, req, "GET, HEAD")
                return await self.metrics_page(conn, req)
            if path == "/v1/models" or path.startswith("/v1/models/"):
                if m not in ("GET", "HEAD"):
                    return await self.method_not_allowed(conn, req, "GET, HEAD")
                card = self.model_card()
                if path == "/v1/models":
                    return await self.send_json(conn, req, 200, {"object": "list", "data": [card]})
                if path[len("/v1/models/"):] == self.cfg["model"]:
                    return await self.send_json(conn, req, 200, card)
                return await self.send_error(conn, req, 404, "The model `%s` does not exist."
                                             % path[len("/v1/models/"):], "model_not_found")
            if path == "/v2" or path.startswith("/v2/"):
                return await self.v2_route(conn, req)
            return await self.send_error(conn, req, 404, "Not Found: %s" % path, "not_found")
        except BadRequest as e:
            style = "v2" if path.startswith("/v2/") else "openai"
            return await self.send_error(conn, req, e.status, e.message, e.code,
                                         style=style, close=e.close)

    async def method_not_allowed(self, conn, req, allow):
        style = "v2" if req.path.startswith("/v2/") else "openai"
        return await self.send_error(conn, req, 405, "Method Not Allowed", "method_not_allowed",
                                     style=style, extra=("allow: " + allow,))

    def model_card(self):
        return {"id": self.cfg["model"], "object": "model", "created": self.started,
                "owned_by": "sim", "root": self.cfg["model"], "parent": None,
                "max_model_len": self.cfg["max_tokens_cap"] + 4096, "permission": []}

    async def v2_route(self, conn, req):
        segs = [s for s in req.path.split("/") if s]   # ["v2", "models", name, ...]
        m = req.method
        if segs == ["v2"]:
            if m not in ("GET", "HEAD"):
                return await self.method_not_allowed(conn, req, "GET, HEAD")
            return await self.send_json(conn, req, 200, {"name": "infer_sim", "version": "1",
                                                         "extensions": []})
        if len(segs) >= 3 and segs[1] == "models":
            rest = segs[3:]
            version = None
            if len(rest) >= 2 and rest[0] == "versions":
                version = rest[1]
                rest = rest[2:]
            if rest == ["infer"]:
                if m != "POST":
                    return await self.method_not_allowed(conn, req, "POST")
                return await self.inference(conn, req, "v2", v2_version=version)
            if rest == ["ready"]:
                if m not in ("GET", "HEAD"):
                    return await self.method_not_allowed(conn, req, "GET, HEAD")
                return await self.send(conn, req, 200, b"")
            if rest == []:
                if m not in ("GET", "HEAD"):
                    return await self.method_not_allowed(conn, req, "GET, HEAD")
                return await self.send_json(conn, req, 200, {
                    "name": self.cfg["model"], "versions": ["1"], "platform": "infer_sim",
                    "inputs": [{"name": "input0", "datatype": "FP32", "shape": [-1]}],
                    "outputs": [{"name": "output0", "datatype": "FP32", "shape": [-1]}]})
        return await self.send_error(conn, req, 404, "Not Found: %s" % req.path, style="v2")

    # -------------------------------------------------------------- control

    async def control(self, conn, req):
        path, m = req.path, req.method
        if path == "/_sim/requests":
            if m == "GET":
                return await self.send_json(conn, req, 200,
                                            [self.record_json(r) for r in self.records])
            if m == "DELETE":
                self.records.clear()
                return await self.send_json(conn, req, 200, {"cleared": True})
            return await self.method_not_allowed(conn, req, "GET, DELETE")
        if path == "/_sim/config":
            if m == "GET":
                return await self.send_json(conn, req, 200, self.cfg)
            if m == "POST":
                try:
                    upd = json.loads(req.body or b"{}")
                    if not isinstance(upd, dict):
                        raise ValueError("config must be a JSON object")
                    new = {}
                    for k, v in upd.items():
                        if k not in OPTIONS:
                            raise ValueError("unknown option: %s" % k)
                        new[k] = coerce(k, v)
                except ValueError as e:
                    return await self.send_error(conn, req, 400, str(e), "bad_config")
                self.cfg.update(new)
                self.lora_changed()
                if "kv_cache_tokens" in new or "prefix_caching" in new:
                    self.kv = self.make_kv()    # requests held give back to theirs
                if "seed" in new:
                    self.rng.seed(new["seed"])
                    self.split_rng.seed(new["seed"] * 7919 + 1)
                self.sched.wake()
                return await self.send_json(conn, req, 200, self.cfg)
            return await self.method_not_allowed(conn, req, "GET, POST")
        if path == "/_sim/stats":
            if m != "GET":
                return await self.method_not_allowed(conn, req, "GET")
            return await self.send_json(conn, req, 200, {
                "running": self.sched.running, "waiting": len(self.sched.waiting),
                "requests_total": self.requests_total,
                "inference_total": self.inference_total,
                "status_counts": {str(k): v for k, v in sorted(self.status_counts.items())},
                "connections_total": self.connections_total,
                "connections_open": len(self.conns),
                "metrics_requests": self.metrics_requests,
                "prompt_tokens_total": self.prompt_tokens_total,
                "generation_tokens_total": self.generation_tokens_total,
                "prefix_cache_queries": self.kv.queries if self.kv else 0,
                "prefix_cache_hits": self.kv.hits if self.kv else 0,
                "preemptions": self.kv.preemptions if self.kv else 0,
                "kv_blocks_held": self.kv.held() if self.kv else 0,
                "success": self.success})
        return await self.send_error(conn, req, 404, "Not Found: %s" % path, "not_found")

    # ------------------------------------------------------------ inference

    def overrides(self, req):
        h = req.h
        o = {}
        for hname, key, conv in (("x-sim-status", "status", int),
                                 ("x-sim-ttft-ms", "ttft_ms", float),
                                 ("x-sim-tpot-ms", "tpot_ms", float),
                                 ("x-sim-stall-ms", "stall_ms", float),
                                 ("x-sim-reset-after-chunks", "reset_after_chunks", int),
                                 ("x-sim-completion-tokens", "completion_tokens", int),
                                 ("x-sim-usage-chunks", "usage_chunks", int),
                                 ("x-sim-pad-bytes", "pad_bytes", int)):
            v = h.get(hname)
            if v is not None:
                try:
                    x = conv(v)
                    if x < 0 or (isinstance(x, float) and not math.isfinite(x)):
                        raise ValueError
                except ValueError:
                    raise BadRequest(400, "invalid %s header: %r" % (hname, v), "bad_sim_header")
                o[key] = x
        v = h.get("x-sim-split-writes")
        if v is not None:
            o["split_writes"] = v.strip().lower() in ("1", "true", "yes", "on")
        v = h.get("x-sim-usage-unterminated")
        if v is not None:
            o["usage_unterminated"] = v.strip().lower() in ("1", "true", "yes", "on")
        return o

    async def pause_until(self, conn, deadline):
        loop = self.loop
        while True:
            rem = deadline - loop.time()
            if rem <= 0:
                return
            await asyncio.sleep(rem if rem < 0.05 else 0.05)
            if conn.gone():
                raise ClientGone()

    async def inference(self, conn, req, kind, v2_version=None):
        cfg = self.cfg
        style = "v2" if kind == "v2" else "openai"
        self.inference_total += 1
        ov = self.overrides(req)

        stall = ov.get("stall_ms", cfg["stall_ms"])
        if stall > 0:
            await self.pause_until(conn, self.loop.time() + stall / 1000.0)

        status = ov.get("status")
        if status is None and cfg["fail_ratio"] > 0 and self.rng.random() < cfg["fail_ratio"]:
            status = cfg["fail_status"]
        if status is not None and status != 200:
            if not 200 <= status <= 599:
                raise BadRequest(400, "invalid x-sim-status", "bad_sim_header")
            return await self.send_error(conn, req, status,
                                         "simulated failure (status %d)" % status,
                                         "sim_injected", style=style)

        try:
            body = json.loads(req.body) if req.body else None
        except (ValueError, UnicodeDecodeError) as e:
            raise BadRequest(400, "Invalid JSON body: %s" % e, "invalid_json")
        if not isinstance(body, dict):
            raise BadRequest(400, "The request body must be a JSON object", "invalid_json")

        plan = self.plan(kind, body, ov, req)
        hashes = []
        if self.kv is not None:
            blocks = -(-plan["prompt_tokens"] // BLOCK_TOKENS)
            if blocks > self.kv.capacity:
                raise BadRequest(400, "This model's KV cache holds %d tokens, the prompt has %d"
                                 % (self.kv.capacity * BLOCK_TOKENS, plan["prompt_tokens"]),
                                 "context_length_exceeded")
            if kind in ("chat", "completions") and self.kv.caching:
                hashes = block_hashes(prompt_text(kind, body), plan["prompt_tokens"])
        fut = self.sched.try_acquire()
        if fut is not None:
            try:
                while not fut.done():
                    await asyncio.wait((fut,), timeout=0.05)
                    if conn.gone():
                        raise ClientGone()
            except BaseException:
                self.sched.abandon(fut)
                raise
        job = Job()
        job.prompt_tokens = plan["prompt_tokens"]
        job.generated = 0
        job.t_start = self.loop.time()
        job.ttft = max(0.0, ov.get("ttft_ms", cfg["ttft_ms"])) / 1000.0
        job.tpot = max(0.0, ov.get("tpot_ms", cfg["tpot_ms"])) / 1000.0
        job.n = plan["n"]
        job.track = plan.get("stream", False)
        job.hashes, job.blocks, job.kv, job.cached_tokens = hashes, 0, None, 0
        self.jobs.add(job)
        try:
            if self.kv is not None or cfg["prefill_tokens_per_s"] > 0:
                await self.admit(conn, job)
                job.t_start = self.loop.time()
            job.t_first = job.t_start + job.ttft
            plan["cached_tokens"] = job.cached_tokens
            if plan.get("stream"):
                return await self.gen_stream(conn, req, kind, plan, job, ov)
            return await self.gen_full(conn, req, kind, plan, job, ov, v2_version)
        except (ClientGone, ConnectionError, OSError, asyncio.CancelledError):
            self.success["abort"] += 1
            raise
        finally:
            self.jobs.discard(job)
            if job.kv is not None:
                job.kv.release(job.hashes, job.blocks)
            self.sched.release()

    # The engine model (prefill_tokens_per_s, kv_cache_tokens): what makes
    # a replica's time to first token depend on the prompts before it and
    # on its prefix cache, as in vLLM.  Off, a request waits only for a
    # slot and its first token comes ttft_ms after.

    async def admit(self, conn, job):
        """KV blocks for the prompt (waiting, first come first served, for
        room), then its prefill, after the prefills before it, of the
        tokens the prefix cache does not have."""
        if self.kv is not None:
            job.cached_tokens = await self.kv_hold(conn, job, job.prompt_tokens)
        await self.prefill(conn, job.prompt_tokens - job.cached_tokens)

    async def kv_hold(self, conn, job, tokens, first=False):
        """Hold the blocks of `tokens` tokens, the prompt's hashed ones
        among them; returns how many of them were found cached.  A
        preempted request waits at the head of the line (`first`), as in
        vLLM; one that needs more than the whole cache (made smaller at
        run time) gets it alone."""
        kv = self.kv
        if not kv.caching:
            job.hashes = []
        private = max(0, -(-tokens // BLOCK_TOKENS) - len(job.hashes))
        me = object()
        if first:
            kv.waiters.appendleft(me)
        else:
            kv.waiters.append(me)
        self.kv_waiting += 1
        try:
            while True:
                if kv.waiters[0] is me:
                    hit = kv.match(job.hashes)
                    if kv.acquire(job.hashes, private, force=not kv.held()):
                        break
                await asyncio.sleep(0.002)
                if conn.gone():
                    raise ClientGone()
        finally:
            kv.waiters.remove(me)
            self.kv_waiting -= 1
        job.kv, job.blocks = kv, private
        kv.queries += tokens
        kv.hits += hit * BLOCK_TOKENS
        return hit * BLOCK_TOKENS

    async def prefill(self, conn, tokens):
        tps = self.cfg["prefill_tokens_per_s"]
        if tps <= 0 or tokens <= 0:
            return
        start = max(self.loop.time(), self.prefill_free_at)
        self.prefill_free_at = start + tokens / tps
        await self.pause_until(conn, self.prefill_free_at)

    async def decode_to(self, conn, job, i):
        """Wait for the i-th generated token (0 = the first); with the KV
        model, a new block every BLOCK_TOKENS tokens, and when none is
        left, preemption as vLLM's recompute: the request gives its
        blocks back, waits for room, and its prompt and what it generated
        are computed again, less what the prefix cache still has."""
        await self.pause_until(conn, job.t_first + i * job.tpot)
        kv = job.kv
        if kv is None or (job.prompt_tokens + i) % BLOCK_TOKENS:
            return
        alone = kv.held() <= len(job.hashes) + job.blocks
        if kv.grow(force=alone):
            job.blocks += 1
            return
        t0 = self.loop.time()
        kv.preemptions += 1
        kv.release(job.hashes, job.blocks)
        job.kv, job.blocks = None, 0
        tokens = job.prompt_tokens + i + 1
        if self.kv is None:              # the KV model was turned off
            return
        cached = await self.kv_hold(conn, job, tokens, first=True)
        await self.prefill(conn, tokens - cached)
        job.t_first += self.loop.time() - t0

    def max_tokens(self, body):
        mt = body.get("max_completion_tokens")
        if mt is None:
            mt = body.get("max_tokens")
        if mt is None:
            return None
        if isinstance(mt, bool) or not isinstance(mt, int) or mt < 0:
            raise BadRequest(400, "max_tokens must be a non-negative integer", "invalid_value")
        return mt

    def plan(self, kind, body, ov, req):
        cfg = self.cfg
        p = {"stream": False}
        if kind in ("chat", "completions"):
            if not isinstance(body.get("model"), str) or not body.get("model"):
                raise BadRequest(400, "you must provide a model parameter", "missing_model")
            if kind == "chat":
                msgs = body.get("messages")
                if not isinstance(msgs, list) or not msgs:
                    raise BadRequest(400, "messages must be a non-empty list", "invalid_value")
                p["prompt_tokens"] = chat_prompt_tokens(msgs)
                seed_src = msgs
            else:
                if "prompt" not in body:
                    raise BadRequest(400, "prompt is required", "invalid_value")
                p["prompt_tokens"] = sum(prompt_item_tokens(x) for x in prompt_items(body["prompt"]))
                seed_src = body["prompt"]
            mt = self.max_tokens(body)
            cap = cfg["max_tokens_cap"]
            forced = ov.get("completion_tokens")
            if forced is not None:
                n = min(forced, cap)
                finish = "length" if (mt is not None and n >= mt) or n >= cap else "stop"
            elif mt is not None:
                n = min(mt, cap)
                finish = "length"
            else:
                n = min(cfg["default_max_tokens"], cap)
                finish = "stop"
            p["n"] = n
            p["finish"] = finish
            h = zlib.crc32(jdump(seed_src)) ^ cfg["seed"]
            p["words"] = [WORDS[(h + i * 7) % 64] for i in range(n)]
            p["stream"] = body.get("stream") is True
            so = body.get("stream_options")
            p["include_usage"] = bool(isinstance(so, dict) and so.get("include_usage"))
            p["id"] = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        elif kind == "embeddings":
            if not isinstance(body.get("model"), str) or not body.get("model"):
                raise BadRequest(400, "you must provide a model parameter", "missing_model")
            if "input" not in body:
                raise BadRequest(400, "input is required", "invalid_value")
            items = prompt_items(body["input"])
            p["items"] = items
            p["prompt_tokens"] = sum(prompt_item_tokens(x) for x in items)
            dim = body.get("dimensions") or EMBED_DIM
            if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= 4096:
                raise BadRequest(400, "dimensions must be an integer in 1..4096", "invalid_value")
            p["dim"] = dim
            p["b64"] = body.get("encoding_format") == "base64"
            p["n"] = 0
        elif kind == "v2":
            inputs = body.get("inputs")
            if not isinstance(inputs, list) or not inputs or not isinstance(inputs[0], dict):
                raise BadRequest(400, "inputs must be a non-empty list of tensors")
            data = inputs[0].get("data", [])
            if not isinstance(data, list):
                data = [data]
            flat = []

            def walk(x):
                if isinstance(x, list):
                    for y in x:
                        walk(y)
                else:
                    flat.append(x)
            walk(data)
            p["v2_data"] = flat
            p["v2_id"] = body.get("id") if isinstance(body.get("id"), str) else uuid.uuid4().hex
            p["prompt_tokens"] = len(flat)
            p["n"] = 0
        else:  # api
            payload = body.get("payload")
            p["payload"] = payload
            p["prompt_tokens"] = max(1, text_tokens(payload if payload is not None else ""))
            n = ov.get("completion_tokens", cfg["default_max_tokens"])
            n = min(n, cfg["max_tokens_cap"])
            h = zlib.crc32(jdump(payload)) ^ cfg["seed"]
            p["words"] = [WORDS[(h + i * 7) % 64] for i in range(n)]
            p["n"] = n
        return p

    def usage(self, plan):
        u = {"prompt_tokens": plan["prompt_tokens"], "completion_tokens": plan["n"],
             "total_tokens": plan["prompt_tokens"] + plan["n"],
             "prompt_tokens_details": {"cached_tokens": plan.get("cached_tokens", 0)}}
        return u

    async def gen_full(self, conn, req, kind, plan, job, ov, v2_version):
        cfg = self.cfg
        n = plan["n"]
        await self.decode_to(conn, job, 0)
        self.ttft_hist.observe(time.monotonic() - req.t0)
        if job.kv is not None:
            for i in range(1, n):
                if (job.prompt_tokens + i) % BLOCK_TOKENS == 0:
                    await self.decode_to(conn, job, i)
        if n > 1:
            await self.pause_until(conn, job.t_first + (n - 1) * job.tpot)
        model = cfg["model"]
        now = int(time.time())
        if kind == "chat":
            obj = {"id": plan["id"], "object": "chat.completion", "created": now, "model": model,
                   "choices": [{"index": 0,
                                "message": {"role": "assistant", "content": " ".join(plan["words"])},
                                "logprobs": None, "finish_reason": plan["finish"]}],
                   "usage": self.usage(plan)}
        elif kind == "completions":
            obj = {"id": plan["id"], "object": "text_completion", "created": now, "model": model,
                   "choices": [{"index": 0, "text": " ".join(plan["words"]),
                                "logprobs": None, "finish_reason": plan["finish"]}],
                   "usage": self.usage(plan)}
        elif kind == "embeddings":
            data = []
            for i, item in enumerate(plan["items"]):
                vec = embedding(item, plan["dim"])
                if plan["b64"]:
                    emb = base64.b64encode(struct.pack("<%df" % len(vec), *vec)).decode("ascii")
                else:
                    emb = vec
                data.append({"object": "embedding", "index": i, "embedding": emb})
            obj = {"object": "list", "data": data, "model": model,
                   "usage": {"prompt_tokens": plan["prompt_tokens"],
                             "total_tokens": plan["prompt_tokens"]}}
        elif kind == "v2":
            out = []
            for x in plan["v2_data"]:
                if isinstance(x, (int, float)) and not isinstance(x, bool):
                    out.append(float(x) * 2.0)
                else:
                    out.append(embedding(x, 1)[0])
            obj = {"model_name": model, "model_version": v2_version or "1", "id": plan["v2_id"],
                   "outputs": [{"name": "output0", "shape": [len(out)], "datatype": "FP32",
                                "data": out}]}
        else:
            obj = {"model": model,
                   "output": {"echo": plan["payload"], "text": " ".join(plan["words"])},
                   "usage": {"prompt_tokens": plan["prompt_tokens"], "completion_tokens": n,
                             "total_tokens": plan["prompt_tokens"] + n}}
        body = jdump(obj)
        reset = ov.get("reset_after_chunks", cfg["reset_after_chunks"])
        if reset is not None:
            close = not req.keep_alive
            head = self.head_bytes(req, 200, ["content-type: application/json",
                                              "content-length: %d" % len(body)], close)
            conn.writer.write(head + (body[:len(body) // 2] if reset > 0 else b""))
            await self.reset_conn(conn)
        keep = await self.send(conn, req, 200, body)
        self.prompt_tokens_total += plan["prompt_tokens"]
        self.generation_tokens_total += n
        self.success[plan.get("finish", "stop")] += 1
        self.e2e_hist.observe(time.monotonic() - req.t0)
        return keep

    async def reset_conn(self, conn):
        """Abort the connection with an RST once what we wrote has left."""
        tr = conn.transport
        fd = conn.sock.fileno()
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline and not tr.is_closing():
            if tr.get_write_buffer_size() == 0:
                try:
                    outq = struct.unpack("i", fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0\0\0\0"))[0]
                except OSError:
                    outq = 0
                if outq == 0:
                    break
            await asyncio.sleep(0.002)
        try:
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        conn.aborted = True
        tr.abort()
        raise ClientGone()

    def fragments(self, data):
        L = len(data)
        if L < 3:
            return [data]
        r = self.split_rng
        pts = set()
        if r.random() < 0.5:
            pts.add(r.randint(1, min(5, L - 1)))   # inside "data: "
        if r.random() < 0.5:
            pts.add(L - 1)                         # between the two \n
        for _ in range(r.randint(1, 2)):
            pts.add(r.randint(1, L - 1))
        cuts = sorted(pts)
        out = []
        prev = 0
        for c in cuts:
            out.append(data[prev:c])
            prev = c
        out.append(data[prev:])
        return out

    async def gen_stream(self, conn, req, kind, plan, job, ov):
        cfg = self.cfg
        chunked = req.version == "HTTP/1.1"
        close = not req.keep_alive or not chunked
        hdrs = ["content-type: text/event-stream", "cache-control: no-cache"]
        if chunked:
            hdrs.append("transfer-encoding: chunked")
        if conn.transport.is_closing():
            raise ClientGone()
        conn.writer.write(self.head_bytes(req, 200, hdrs, close))
        await conn.writer.drain()
        self.status_counts[200] += 1
        if cfg["access_log"]:
            print("%s %s 200 stream" % (req.method, req.target), flush=True)

        split = ov.get("split_writes", cfg["split_writes"])
        reset = ov.get("reset_after_chunks", cfg["reset_after_chunks"])
        writer = conn.writer
        sent = [0]

        async def emit(data):
            if reset is not None and sent[0] >= reset:
                await self.reset_conn(conn)
            if conn.transport.is_closing():
                raise ClientGone()
            if split:
                for frag in self.fragments(data):
                    writer.write(b"%x\r\n%s\r\n" % (len(frag), frag) if chunked else frag)
                    await writer.drain()
                    await asyncio.sleep(0.001)
                    if conn.transport.is_closing():
                        raise ClientGone()
            else:
                writer.write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
                await writer.drain()
            sent[0] += 1

        model = cfg["model"]
        created = int(time.time())
        inc = plan["include_usage"]
        usage_chunks = ov.get("usage_chunks", cfg["usage_chunks"])
        unterminated = ov.get("usage_unterminated", cfg["usage_unterminated"])
        pad = ov.get("pad_bytes", cfg["pad_bytes"])
        n = plan["n"]
        words = plan["words"]
        finish = plan["finish"]

        def ev(choices):
            if kind == "chat":
                d = {"id": plan["id"], "object": "chat.completion.chunk", "created": created,
                     "model": model, "choices": choices}
            else:
                d = {"id": plan["id"], "object": "text_completion", "created": created,
                     "model": model, "choices": choices}
            if pad:
                d["pad"] = "p" * pad
            if inc:
                d["usage"] = None
            return b"data: " + jdump(d) + b"\n\n"

        def choice(text, fin, role=False):
            if kind == "chat":
                delta = {"role": "assistant", "content": text} if role else \
                    ({"content": text} if text is not None else {})
                return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": fin}]
            return [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": fin}]

        await self.decode_to(conn, job, 0)
        if kind == "chat":
            await emit(ev(choice("", None, role=True)))
        for i in range(n):
            if i:
                await self.decode_to(conn, job, i)
            text = words[i] if i == 0 else " " + words[i]
            await emit(ev(choice(text, finish if i == n - 1 else None)))
            job.generated += 1
            self.generation_tokens_total += 1
            if i == 0:
                self.ttft_hist.observe(time.monotonic() - req.t0)
        if n == 0:
            await emit(ev(choice(None, finish)))
            self.ttft_hist.observe(time.monotonic() - req.t0)
        if inc:
            d = {"id": plan["id"], "object": "chat.completion.chunk" if kind == "chat"
                 else "text_completion", "created": created, "model": model,
                 "choices": [], "usage": self.usage(plan)}
            for i in range(usage_chunks):
                last = unterminated and i == usage_chunks - 1
                await emit(b"data: " + jdump(d) + (b"" if last else b"\n\n"))
        if not (inc and unterminated and usage_chunks):
            await emit(b"data: [DONE]\n\n")
        if reset is not None:
            await self.reset_conn(conn)
        if chunked:
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        self.prompt_tokens_total += plan["prompt_tokens"]
        self.success[finish] += 1
        self.e2e_hist.observe(time.monotonic() - req.t0)
        if close:
            if writer.can_write_eof():
                writer.write_eof()
            return False
        return True

    # -------------------------------------------------------------- metrics

    async def metrics_page(self, conn, req):
        """GET /metrics: counted, then stalled, failed or garbled as configured."""
        cfg = self.cfg
        self.metrics_requests += 1
        if cfg["metrics_stall_ms"] > 0:
            await self.pause_until(conn, self.loop.time() + cfg["metrics_stall_ms"] / 1000.0)
        status = cfg["metrics_status"]
        if status != 200:
            return await self.send(conn, req, status,
                                   b"simulated /metrics failure (status %d)\n" % status,
                                   ctype="text/plain; charset=utf-8")
        if cfg["metrics_garbage"]:
            return await self.send(conn, req, 200, garbage_page(),
                                   ctype="text/plain; version=0.0.4; charset=utf-8")
        return await self.send(conn, req, 200, self.metrics_text(),
                               ctype="text/plain; version=0.0.4; charset=utf-8")

    def lora_labels(self):
        """The current label set of vllm:lora_requests_info, None without LoRA."""
        cfg = self.cfg
        if cfg["max_lora"] <= 0:
            return None
        return (str(cfg["max_lora"]), cfg["lora_running"], cfg["lora_waiting"])

    def lora_changed(self):
        """After a config change: a label set that is no longer current stays
        on the page with the time it was last current."""
        new = self.lora_labels()
        old = self.lora_current
        if new == old:
            return
        if old is not None:
            self.lora_sets[old] = time.time()
        if new is not None and new not in self.lora_sets:
            while len(self.lora_sets) >= LORA_HISTORY:
                oldest = next(k for k in self.lora_sets if k != old)
                del self.lora_sets[oldest]
            self.lora_sets[new] = time.time()
        self.lora_current = new

    def load_figures(self):
        """(running, waiting, kv fraction), the fake_* options winning."""
        running = self.cfg["fake_running"]
        if running is None:
            running = self.sched.running - self.kv_waiting
        waiting = self.cfg["fake_waiting"]
        if waiting is None:
            waiting = len(self.sched.waiting) + self.kv_waiting
        return running, waiting, self.kv_usage()

    def kv_usage(self):
        if self.cfg["fake_kv_cache_usage"] is not None:
            return self.cfg["fake_kv_cache_usage"]
        if self.kv is not None:
            return self.kv.usage()
        maxc = max(1, self.cfg["max_concurrency"])
        slot = max(1, self.cfg["kv_slot_tokens"])
        now = self.loop.time()
        tot = 0.0
        for j in self.jobs:
            tot += 0.5 + 0.5 * min(1.0, j.tokens_now(now) / slot)
        return min(1.0, tot / maxc)

    def metrics_text(self):
        flavor = self.cfg["metrics_flavor"]
        if flavor == "sglang":
            return self.metrics_text_sglang()
        if flavor == "tgi":
            return self.metrics_text_tgi()
        lbl = 'model_name="%s"' % self.cfg["model"].replace("\\", "\\\\").replace('"', '\\"')
        running, waiting, kv = self.load_figures()
        out = []

        def fam(name, typ, help_):
            out.append("# HELP %s %s" % (name, help_))
            out.append("# TYPE %s %s" % (name, typ))

        fam("vllm:num_requests_running", "gauge", "Number of requests in model execution batches.")
        out.append("vllm:num_requests_running{%s} %s" % (lbl, float(running)))
        fam("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.")
        out.append("vllm:num_requests_waiting{%s} %s" % (lbl, float(waiting)))
        fam("vllm:num_requests_swapped", "gauge", "Number of requests swapped to CPU.")
        out.append("vllm:num_requests_swapped{%s} 0.0" % lbl)
        fam("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.")
        out.append("vllm:kv_cache_usage_perc{%s} %r" % (lbl, float(kv)))
        fam("vllm:gpu_cache_usage_perc", "gauge", "GPU KV-cache usage. 1 means 100 percent usage.")
        out.append("vllm:gpu_cache_usage_perc{%s} %r" % (lbl, float(kv)))
        fam("vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed.")
        out.append("vllm:prompt_tokens_total{%s} %s" % (lbl, float(self.prompt_tokens_total)))
        fam("vllm:generation_tokens_total", "counter", "Number of generation tokens processed.")
        out.append("vllm:generation_tokens_total{%s} %s" % (lbl, float(self.generation_tokens_total)))
        kv = self.kv
        for name, value, help_ in (
                ("vllm:prefix_cache_queries", kv.queries if kv else 0,
                 "Prefix cache queries, in terms of number of queried tokens."),
                ("vllm:prefix_cache_hits", kv.hits if kv else 0,
                 "Prefix cache hits, in terms of number of cached tokens."),
                ("vllm:num_preemptions", kv.preemptions if kv else 0,
                 "Cumulative number of preemption from the engine.")):
            fam(name + "_total", "counter", help_)
            out.append("%s_total{%s} %s" % (name, lbl, float(value)))
        fam("vllm:request_success_total", "counter", "Count of successfully processed requests.")
        for reason in ("stop", "length", "abort"):
            out.append('vllm:request_success_total{finished_reason="%s",%s} %s'
                       % (reason, lbl, float(self.success[reason])))
        for name, hist, help_ in (
                ("vllm:time_to_first_token_seconds", self.ttft_hist,
                 "Histogram of time to first token in seconds."),
                ("vllm:e2e_request_latency_seconds", self.e2e_hist,
                 "Histogram of end to end request latency in seconds.")):
            fam(name, "histogram", help_)
            for b, c in zip(hist.buckets, hist.counts):
                out.append('%s_bucket{le="%r",%s} %s' % (name, float(b), lbl, float(c)))
            out.append('%s_bucket{le="+Inf",%s} %s' % (name, lbl, float(hist.count)))
            out.append("%s_count{%s} %s" % (name, lbl, float(hist.count)))
            out.append("%s_sum{%s} %r" % (name, lbl, float(hist.sum)))
        if self.lora_current is not None:
            # as vLLM: a gauge whose value is the time the label set was
            # last current; label sets seen before stay with older times
            fam("vllm:lora_requests_info", "gauge", "Running stats on lora requests.")
            now = time.time()
            for labels, t in self.lora_sets.items():
                if labels != self.lora_current:
                    now = max(now, t + 0.001)
            for labels, t in self.lora_sets.items():
                if labels == self.lora_current:
                    t = now
                out.append('vllm:lora_requests_info{max_lora="%s",running_lora_adapters="%s",'
                           'waiting_lora_adapters="%s"} %r' % (labels + (t,)))
        out.append("")
        return "\n".join(out).encode("utf-8")

    def metrics_text_sglang(self):
        """SGLang's page (sglang/srt/metrics/collector.py): gauges per
        scheduler with their engine/rank labels, counters with _total."""
        model = self.cfg["model"].replace("\\", "\\\\").replace('"', '\\"')
        lbl = 'engine_type="unified",model_name="%s",pp_rank="0",tp_rank="0"' % model
        running, waiting, kv = self.load_figures()
        slot = max(1, self.cfg["kv_slot_tokens"])
        total_tokens = slot * max(1, self.cfg["max_concurrency"])
        out = []

        def fam(name, typ, help_):
            out.append("# HELP %s %s" % (name, help_))
            out.append("# TYPE %s %s" % (name, typ))

        for name, help_, v in (
                ("sglang:num_running_reqs", "The number of running requests.", float(running)),
                ("sglang:num_used_tokens", "The number of used tokens.",
                 float(int(kv * total_tokens))),
                ("sglang:token_usage", "The token usage.", float(kv)),
                ("sglang:gen_throughput", "The generation throughput (token/s).", 0.0),
                ("sglang:num_queue_reqs", "The number of requests in the waiting queue.",
                 float(waiting)),
                ("sglang:cache_hit_rate", "The prefix cache hit rate.", 0.0)):
            fam(name, "gauge", help_)
            out.append("%s{%s} %r" % (name, lbl, v))
        lbl = 'model_name="%s"' % model
        for name, help_, v in (
                ("sglang:prompt_tokens_total", "Number of prefill tokens processed.",
                 self.prompt_tokens_total),
                ("sglang:generation_tokens_total", "Number of generation tokens processed.",
                 self.generation_tokens_total),
                ("sglang:num_requests_total", "Number of requests processed.",
                 sum(self.success.values()))):
            fam(name, "counter", help_)
            out.append("%s{%s} %r" % (name, lbl, float(v)))
        fam("sglang:time_to_first_token_seconds", "histogram",
            "Histogram of time to first token in seconds.")
        h = self.ttft_hist
        for b, c in zip(h.buckets, h.counts):
            out.append('sglang:time_to_first_token_seconds_bucket{le="%r",%s} %r'
                       % (float(b), lbl, float(c)))
        out.append('sglang:time_to_first_token_seconds_bucket{le="+Inf",%s} %r'
                   % (lbl, float(h.count)))
        out.append("sglang:time_to_first_token_seconds_count{%s} %r" % (lbl, float(h.count)))
        out.append("sglang:time_to_first_token_seconds_sum{%s} %r" % (lbl, float(h.sum)))
        out.append("")
        return "\n".join(out).encode("utf-8")

    def metrics_text_tgi(self):
        """TGI's page (the Rust metrics-exporter-prometheus): TYPE lines and
        no HELP, no labels on the gauges, integers without a decimal point,
        counters without _total; no KV-cache figure at all."""
        running, waiting, _ = self.load_figures()
        done = sum(self.success.values())
        out = []
        for name, typ, v in (
                ("tgi_queue_size", "gauge", waiting),
                ("tgi_batch_current_size", "gauge", running),
                ("tgi_batch_current_max_tokens", "gauge",
                 running * self.cfg["kv_slot_tokens"]),
                ("tgi_request_count", "counter", self.inference_total),
                ("tgi_request_success", "counter", done - self.success["abort"]),
                ("tgi_request_failure", "counter", self.success["abort"])):
            out.append("# TYPE %s %s" % (name, typ))
            out.append("%s %d" % (name, v))
        out.append("# TYPE tgi_batch_inference_count counter")
        for method in ("prefill", "decode"):
            out.append('tgi_batch_inference_count{method="%s"} %d' % (method, done))
        out.append("# TYPE tgi_request_duration histogram")
        h = self.e2e_hist
        for b, c in zip(h.buckets, h.counts):
            out.append('tgi_request_duration_bucket{le="%s"} %d' % (b, c))
        out.append('tgi_request_duration_bucket{le="+Inf"} %d' % h.count)
        out.append("tgi_request_duration_sum %r" % float(h.sum))
        out.append("tgi_request_duration_count %d" % h.count)
        out.append("")
        return "\n".join(out).encode("utf-8")


def embedding(item, dim):
    seed = hashlib.sha256(jdump(item)).digest()
    vals = []
    block = seed
    while len(vals) < dim:
        for i in range(0, len(block), 4):
            if len(vals) >= dim:
                break
            u = struct.unpack(">I", block[i:i + 4])[0]
            # exactly representable in float32: k/2^16 in [-1, 1)
            vals.append(((u >> 16) - 32768) / 32768.0)
        block = hashlib.sha256(block).digest()
    return vals


def parse_listen(s):
    if s.startswith("["):
        host, _, port = s[1:].partition("]:")
    else:
        host, _, port = s.rpartition(":")
    return host or "127.0.0.1", int(port)


async def amain(args, cfg):
    sim = Sim(cfg)
    loop = asyncio.get_running_loop()
    sim.loop = loop
    host, port = parse_listen(args.listen)
    server = await asyncio.start_server(sim.handle_conn, host, port, limit=MAX_HEAD,
                                        reuse_address=True, backlog=1024)
    sock = server.sockets[0]
    bound = sock.getsockname()[1]
    if args.port_file:
        tmp = "%s.tmp.%d" % (args.port_file, os.getpid())
        with open(tmp, "w") as f:
            f.write("%d\n" % bound)
        os.replace(tmp, args.port_file)
    hshow = "[%s]" % host if ":" in host else host
    print("infer_sim listening on %s:%d model=%s replica=%s"
          % (hshow, bound, cfg["model"], cfg["replica"]), flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    for c in list(sim.conns):
        c.aborted = True
        c.transport.abort()
    await asyncio.sleep(0)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Simulated vLLM-like model server")
    ap.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0 = any free one)")
    ap.add_argument("--port-file", help="write the bound port there once listening")
    ap.add_argument("--model", default=OPTIONS["model"][1])
    ap.add_argument("--replica", default=OPTIONS["replica"][1])
    ap.add_argument("--ttft-ms", type=float, default=OPTIONS["ttft_ms"][1])
    ap.add_argument("--tpot-ms", type=float, default=OPTIONS["tpot_ms"][1])
    ap.add_argument("--max-concurrency", type=int, default=OPTIONS["max_concurrency"][1])
    ap.add_argument("--max-queue", type=int, default=OPTIONS["max_queue"][1])
    ap.add_argument("--fail-status", type=int, default=OPTIONS["fail_status"][1])
    ap.add_argument("--fail-ratio", type=float, default=OPTIONS["fail_ratio"][1])
    ap.add_argument("--reset-after-chunks", type=int, default=None)
    ap.add_argument("--stall-ms", type=float, default=OPTIONS["stall_ms"][1])
    ap.add_argument("--split-writes", action="store_true")
    ap.add_argument("--default-max-tokens", type=int, default=OPTIONS["default_max_tokens"][1])
    ap.add_argument("--max-tokens-cap", type=int, default=OPTIONS["max_tokens_cap"][1])
    ap.add_argument("--seed", type=int, default=OPTIONS["seed"][1])
    ap.add_argument("--kv-slot-tokens", type=int, default=OPTIONS["kv_slot_tokens"][1])
    ap.add_argument("--prefill-tokens-per-s", type=float,
                    default=OPTIONS["prefill_tokens_per_s"][1])
    ap.add_argument("--kv-cache-tokens", type=int, default=OPTIONS["kv_cache_tokens"][1])
    ap.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false")
    ap.add_argument("--access-log", action="store_true")
    ap.add_argument("--usage-chunks", type=int, default=OPTIONS["usage_chunks"][1])
    ap.add_argument("--usage-unterminated", action="store_true")
    ap.add_argument("--pad-bytes", type=int, default=OPTIONS["pad_bytes"][1])
    ap.add_argument("--metrics-flavor", choices=METRICS_FLAVORS,
                    default=OPTIONS["metrics_flavor"][1])
    ap.add_argument("--metrics-status", type=int, default=OPTIONS["metrics_status"][1])
    ap.add_argument("--metrics-stall-ms", type=float, default=OPTIONS["metrics_stall_ms"][1])
    ap.add_argument("--metrics-garbage", action="store_true")
    ap.add_argument("--lora-running", default=OPTIONS["lora_running"][1])
    ap.add_argument("--lora-waiting", default=OPTIONS["lora_waiting"][1])
    ap.add_argument("--max-lora", type=int, default=OPTIONS["max_lora"][1])
    ap.add_argument("--fake-running", type=int, default=None)
    ap.add_argument("--fake-waiting", type=int, default=None)
    ap.add_argument("--fake-kv-cache-usage", type=float, default=None)
    args = ap.parse_args(argv)
    cfg = {k: d for k, (_, d) in OPTIONS.items()}
    for k in OPTIONS:
        v = getattr(args, k, None)
        if v is not None:
            cfg[k] = coerce(k, v)
    try:
        asyncio.run(amain(args, cfg))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
