#!/usr/bin/python3
"""Reads ngx_infer's usage events from a Redis Stream into PostgreSQL.

The gateway appends one entry per finished request (schema version 1, see
README.md).  This consumer reads them in a consumer group, inserts each
batch into the table of schema.sql in one transaction, commits, and only
then acknowledges the batch with XACK: at least once into PostgreSQL, and
the table's primary key (ts, request_id) with ON CONFLICT DO NOTHING makes
a redelivered event count once.

On start it first reads its own pending entries (the batch it read but did
not acknowledge before it died), then takes over entries left pending
longer than --claim-idle-ms by other consumers (XAUTOCLAIM), then follows
the stream with XREADGROUP ... BLOCK; the claim pass runs again every
--claim-every seconds.  An event of another schema version, or one whose
fields are not what version 1 says, is kept aside in infer_usage_rejected
with its reason and acknowledged: it never stops the events after it.

    consumer.py --redis 127.0.0.1:6379 --dsn 'dbname=infer_usage' [--once]

Needs Debian's python3-redis and python3-psycopg2.  SIGTERM or SIGINT: the
batch in hand is finished, then it exits 0.
"""

import argparse
import collections
import datetime
import json
import logging
import os
import re
import signal
import socket
import sys
import time
from decimal import Decimal
from pathlib import Path

import psycopg2
import psycopg2.extras
import redis

log = logging.getLogger("infer-analytics")

HERE = Path(__file__).resolve().parent

# Version 1's fields, every one always present.  Unknown fields are
# ignored: a later version may add some without breaking this consumer.
TEXT = ("gateway", "tenant", "key_id", "subject", "model", "model_served",
        "pool", "endpoint")
INTS = ("status", "prompt_tokens", "completion_tokens", "cached_tokens",
        "reasoning_tokens", "ttft_ms", "duration_ms", "request_bytes",
        "response_bytes")
FLAGS = ("stream", "estimated")
V1 = ("v", "time", "request_id", "trace_id", *TEXT, *INTS, *FLAGS, "cost")

# infer_usage's columns, in the order parse() returns them
COLUMNS = ("ts", "request_id", "v", "trace_id", "gateway", "tenant", "key_id",
           "subject", "model", "model_served", "pool", "endpoint", "status",
           "stream", "prompt_tokens", "completion_tokens", "cached_tokens",
           "reasoning_tokens", "estimated", "ttft_ms", "duration_ms",
           "request_bytes", "response_bytes", "cost")

INSERT = ("INSERT INTO infer_usage (" + ", ".join(COLUMNS) + ") VALUES %s"
          " ON CONFLICT DO NOTHING")
INSERT_REJECTED = ("INSERT INTO infer_usage_rejected"
                   " (stream, entry_id, reason, fields) VALUES %s"
                   " ON CONFLICT DO NOTHING")

INT_RE = re.compile(r"[0-9]{1,18}")              # < 2^63: a bigint
COST_RE = re.compile(r"[0-9]{1,11}(\.[0-9]{1,9})?")  # numeric(20,9)
HEX32_RE = re.compile(r"[0-9a-fA-F]{32}")
MAX_TEXT = 1024

EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
# time is ms since the epoch: before 2020 it was most likely written in
# seconds; more than a day ahead, in microseconds or by a broken clock.
# Either would make a partition for a day that never was.
TIME_MIN = 1577836800000                          # 2020-01-01
TIME_AHEAD = 86400 * 1000

# test hook: die with SIGKILL after the first commit, before XACK
CRASH = os.environ.get("INFER_ANALYTICS_CRASH", "")

RETRY_MAX = 30.0


class Rejected(Exception):
    """An entry kept aside; the message is the reason stored with it."""


class Stopping(BaseException):
    """SIGTERM during a wait (not an Exception: nothing may catch it)."""


# ------------------------------------------------------------------ parsing

def parse(fields, now_ms):
    """The row of infer_usage for an entry's fields ({bytes: bytes}), or
    Rejected.  An empty value is NULL."""
    f = {}
    for k, val in fields.items():
        name = k.decode("utf-8", "replace")
        if name not in V1:
            continue                                 # a later version's
        try:
            f[name] = val.decode("utf-8")
        except UnicodeDecodeError:
            raise Rejected(f"malformed: {name} is not UTF-8")
    if "v" not in f:
        raise Rejected("malformed: no v (schema version)")
    if f["v"] != "1":
        raise Rejected(f"version: {short(f['v'])}, this consumer reads 1")
    missing = [n for n in V1 if n not in f]
    if missing:
        raise Rejected("malformed: no " + ", ".join(missing))
    for name, s in f.items():
        if "\0" in s:
            raise Rejected(f"malformed: {name} has a NUL byte")
        if len(s) > MAX_TEXT:
            raise Rejected(f"malformed: {name} is longer than {MAX_TEXT}")

    def integer(name, top=None):
        s = f[name]
        if s == "":
            return None
        if not INT_RE.fullmatch(s) or (top is not None and int(s) > top):
            raise Rejected(f"malformed: {name} {short(s)} is not an integer"
                           + (f" up to {top}" if top is not None else ""))
        return int(s)

    def flag(name):
        s = f[name]
        if s not in ("1", "0", ""):
            raise Rejected(f"malformed: {name} {short(s)} is not 1, 0 or ''")
        return None if s == "" else s == "1"

    def text(name):
        return f[name] or None

    if not INT_RE.fullmatch(f["time"]):
        raise Rejected(f"malformed: time {short(f['time'])} is not an "
                       f"integer")
    ms = int(f["time"])
    if not TIME_MIN <= ms <= now_ms + TIME_AHEAD:
        raise Rejected(f"malformed: time {ms} is not ms since the epoch "
                       f"between 2020 and tomorrow")
    if f["request_id"] == "":
        raise Rejected("malformed: request_id is empty")
    if f["trace_id"] and not HEX32_RE.fullmatch(f["trace_id"]):
        raise Rejected(f"malformed: trace_id {short(f['trace_id'])} is not "
                       f"32 hex digits")
    cost = f["cost"]
    if cost and not COST_RE.fullmatch(cost):
        raise Rejected(f"malformed: cost {short(cost)} is not a decimal "
                       f"with up to 9 decimals")

    ts = EPOCH + datetime.timedelta(milliseconds=ms)
    return (ts, f["request_id"], 1, text("trace_id"),
            *(text(n) for n in TEXT),
            integer("status", 999), flag("stream"),
            integer("prompt_tokens"), integer("completion_tokens"),
            integer("cached_tokens"), integer("reasoning_tokens"),
            flag("estimated"), integer("ttft_ms"), integer("duration_ms"),
            integer("request_bytes"), integer("response_bytes"),
            Decimal(cost) if cost else None)


def short(s, n=60):
    r = repr(s)
    return r if len(r) <= n else r[:n] + "..."


def raw_json(fields):
    """An entry's fields as JSON text for jsonb (which takes no NUL)."""
    def text(b):
        return b.decode("utf-8", "backslashreplace")[:4096] \
            .replace("\0", "\\x00")
    return json.dumps({text(k): text(v) for k, v in fields.items()})


# ----------------------------------------------------------------- consumer

class Consumer:
    def __init__(self, args):
        self.args = args
        self.stream = args.stream
        self.group = args.group
        self.name = args.consumer
        self.r = None
        self.db = None
        self.days = set()           # partitions known to exist
        self.stats = collections.Counter()
        self.stopping = False
        self.waiting = False        # in a wait SIGTERM may interrupt
        self.delay = 0.5
        self.crash = CRASH == "after-commit"

    # --------------------------------------------------------- connections
    def connect(self):
        if self.r is None:
            self.r = redis_client(self.args.redis,
                                  self.args.block_ms / 1000 + 10)
            try:
                self.r.xgroup_create(self.stream, self.group,
                                     id="0" if self.args.from_start else "$",
                                     mkstream=True)
                log.info("created group %s on %s", self.group, self.stream)
            except redis.ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise
        if self.db is None:
            kw = {"application_name": "infer-analytics"}
            if "connect_timeout" not in self.args.dsn:
                kw["connect_timeout"] = 10
            self.db = psycopg2.connect(self.args.dsn, **kw)
            cur = self.db.cursor()
            if self.args.init_schema:
                cur.execute((HERE / "schema.sql").read_text())
            cur.execute("SELECT to_regclass('infer_usage'),"
                        " to_regclass('infer_usage_rejected'),"
                        " to_regprocedure('infer_usage_partition(date)')")
            if None in cur.fetchone():
                raise Fatal("infer_usage is not there: psql -f schema.sql, "
                            "or --init-schema")
            self.db.commit()
            self.days.clear()

    def close(self):
        for c in (self.r, self.db):
            try:
                if c is not None:
                    c.close()
            except Exception:
                pass
        self.r = self.db = None

    # ---------------------------------------------------------------- loop
    def run(self):
        while not self.stopping:
            try:
                self.connect()
                self.catch_up()
                if self.args.once:
                    while not self.stopping and self.handle(self.read(">")):
                        pass
                    break
                self.follow()
                continue
            except Stopping:
                break
            except Fatal as e:
                log.error("%s", e)
                return 2
            except redis.ResponseError as e:
                if "NOGROUP" not in str(e):         # not a stream, ...
                    log.error("redis: %s", e)
                    return 2
                error = e                           # the stream was deleted
            except (redis.ConnectionError, redis.TimeoutError,
                    psycopg2.Error) as e:
                error = e
            log.error("%s: %s", type(error).__name__, str(error).strip())
            self.close()
            if self.args.once:
                return 1
            log.info("retrying in %.1fs", self.delay)
            try:
                self.wait(lambda: time.sleep(self.delay))
            except Stopping:
                break
            self.delay = min(self.delay * 2, RETRY_MAX)
        self.report("stopped")
        self.close()
        return 0

    def catch_up(self):
        """Our own pending entries (read, not acknowledged: we died or lost
        a connection), then the entries dead consumers left."""
        cursor = "0"
        while not self.stopping:
            entries = self.read(cursor)
            if not entries:
                break
            cursor = entries[-1][0]
            self.handle(entries, "pending")
        self.claim()

    def claim(self):
        cursor = "0-0"
        while not self.stopping:
            res = self.r.xautoclaim(self.stream, self.group, self.name,
                                    self.args.claim_idle_ms,
                                    start_id=cursor, count=self.args.batch)
            cursor, entries = res[0], res[1]
            gone = res[2] if len(res) > 2 else []   # Redis 7: trimmed
            if gone:
                self.lost(gone)
            self.handle(entries, "claimed")
            if cursor in (b"0-0", "0-0"):
                break

    def follow(self):
        last_claim = time.monotonic()
        last_report = last_claim
        while not self.stopping:
            now = time.monotonic()
            if now - last_claim >= self.args.claim_every:
                self.claim()
                last_claim = now
            if now - last_report >= 60:
                self.report("running")
                last_report = now
            self.handle(self.wait(
                lambda: self.read(">", block=self.args.block_ms)))

    def wait(self, fn):
        """fn() where SIGTERM ends it at once (a blocked read: what it
        was delivered stays pending and is read again on the next start)."""
        if self.stopping:
            raise Stopping()
        self.waiting = True
        try:
            return fn()
        finally:
            self.waiting = False

    def read(self, cursor, block=None):
        res = self.r.xreadgroup(self.group, self.name, {self.stream: cursor},
                                count=self.args.batch, block=block)
        return res[0][1] if res else []

    # --------------------------------------------------------------- batch
    def handle(self, entries, how="read"):
        """Insert, commit, then XACK.  Returns how many entries it took."""
        rows, rejects, ids, gone = [], [], [], []
        now_ms = int(time.time() * 1000)
        for eid, fields in entries:
            if eid is None:
                continue                    # Redis 6.2: claimed, trimmed
            ids.append(eid)
            if not fields:
                gone.append(eid)            # pending, then trimmed
                continue
            try:
                rows.append((eid, parse(fields, now_ms), fields))
            except Rejected as e:
                rejects.append((eid, str(e), fields))
        if not ids:
            return 0
        kept_aside = len(rejects)
        inserted = self.store(rows, rejects)
        if self.crash:
            log.warning("INFER_ANALYTICS_CRASH: killed after the commit, "
                        "before XACK")
            os.kill(os.getpid(), signal.SIGKILL)
        self.r.xack(self.stream, self.group, *ids)
        if gone:
            self.lost(gone)
        for eid, reason, _ in rejects:
            log.warning("kept aside %s: %s", eid.decode(), reason)
            self.stats["version" if reason.startswith("version")
                       else "malformed"] += 1
        self.stats["read"] += len(ids)
        self.stats["inserted"] += inserted
        refused = len(rejects) - kept_aside       # by the database
        self.stats["duplicate"] += len(rows) - inserted - refused
        if how != "read":
            log.info("%s %d entries", how, len(ids))
        log.debug("batch of %d: %d inserted, %d kept aside", len(ids),
                  inserted, len(rejects))
        self.delay = 0.5
        return len(ids)

    def store(self, rows, rejects):
        """One transaction: the rows, the rejects, commit.  Returns the
        number of rows inserted (the rest were there already).  A row the
        database refuses (a check parse() does not make) is kept aside
        with the database's reason, one row at a time."""
        try:
            return self._store(rows, rejects, False)
        except (psycopg2.DataError, psycopg2.IntegrityError) as e:
            self.db.rollback()
            log.warning("batch refused (%s): one row at a time",
                        str(e).strip().splitlines()[0])
            self.days.clear()
            return self._store(rows, rejects, True)

    def _store(self, rows, rejects, one_by_one):
        self.partitions({r[1][0].date() for r in rows})
        cur = self.db.cursor()
        try:
            inserted = 0
            if rows and not one_by_one:
                psycopg2.extras.execute_values(
                    cur, INSERT, [r[1] for r in rows], page_size=len(rows))
                inserted = cur.rowcount
            elif rows:
                one = INSERT.replace("%s", "(" + ", ".join(
                    ["%s"] * len(COLUMNS)) + ")")
                for eid, row, fields in rows:
                    cur.execute("SAVEPOINT row")
                    try:
                        cur.execute(one, row)
                        inserted += cur.rowcount
                        cur.execute("RELEASE SAVEPOINT row")
                    except (psycopg2.DataError,
                            psycopg2.IntegrityError) as e:
                        cur.execute("ROLLBACK TO SAVEPOINT row")
                        why = str(e).strip().splitlines()[0]
                        rejects.append((eid, f"malformed: {why}", fields))
            if rejects:
                psycopg2.extras.execute_values(
                    cur, INSERT_REJECTED,
                    [(self.stream, eid.decode(), reason, raw_json(fields))
                     for eid, reason, fields in rejects],
                    page_size=len(rejects))
            self.db.commit()
            return inserted
        except BaseException:
            if not self.db.closed:
                self.db.rollback()
            raise

    def partitions(self, days):
        """Each day's partition made if missing, tomorrow's too (made
        ahead, the first rows of a day never wait for theirs); each in a
        short transaction of its own."""
        tomorrow = datetime.datetime.now(datetime.timezone.utc).date() + \
            datetime.timedelta(days=1)
        missing = (days | {tomorrow}) - self.days
        if not missing:
            return
        cur = self.db.cursor()
        for day in sorted(missing):
            cur.execute("SELECT infer_usage_partition(%s)", (day,))
            self.db.commit()
        if len(self.days) > 1000:           # a long backlog: stay bounded
            self.days.clear()
        self.days |= missing

    def lost(self, ids):
        """Entries trimmed from the stream (MAXLEN) before they were
        stored: their events are gone."""
        self.stats["trimmed"] += len(ids)
        log.warning("%d pending entries were trimmed from %s before they "
                    "were stored (MAXLEN too small for the consumers' lag?)",
                    len(ids), self.stream)

    def report(self, what):
        s = self.stats
        log.info("%s: read %d, inserted %d, duplicate %d, kept aside %d "
                 "(version %d, malformed %d), trimmed %d", what, s["read"],
                 s["inserted"], s["duplicate"], s["version"] + s["malformed"],
                 s["version"], s["malformed"], s["trimmed"])


class Fatal(Exception):
    """A configuration error: retrying would not help."""


def redis_client(spec, timeout):
    """host:port, a unix socket path, or a redis:// URL."""
    kw = {"socket_timeout": timeout, "socket_connect_timeout": 5,
          "health_check_interval": 30}
    if "://" in spec:
        return redis.Redis.from_url(spec, **kw)
    if spec.startswith("/"):
        return redis.Redis(unix_socket_path=spec, **kw)
    host, _, port = spec.rpartition(":")
    return redis.Redis(host=host or spec, port=int(port) if host else 6379,
                       **kw)


def options(argv=None):
    p = argparse.ArgumentParser(
        description="ngx_infer usage events: Redis Stream -> PostgreSQL")
    p.add_argument("--redis", default="127.0.0.1:6379",
                   help="host:port, a unix socket path or a redis:// URL "
                   "(default %(default)s)")
    p.add_argument("--stream", default="infer:usage",
                   help="the stream the gateway writes (%(default)s)")
    p.add_argument("--group", default="analytics",
                   help="consumer group (%(default)s)")
    p.add_argument("--consumer", default=socket.gethostname(),
                   help="this consumer's name in the group, the same across "
                   "restarts (default: the host name, %(default)s)")
    p.add_argument("--dsn", default="",
                   help="libpq connection string (default: PG* variables)")
    p.add_argument("--batch", type=int, default=500,
                   help="entries per read and per transaction "
                   "(%(default)s)")
    p.add_argument("--block-ms", type=int, default=5000,
                   help="how long one read waits for new entries "
                   "(%(default)s)")
    p.add_argument("--claim-idle-ms", type=int, default=60000,
                   help="take over another consumer's entries pending this "
                   "long (%(default)s)")
    p.add_argument("--claim-every", type=float, default=30,
                   help="seconds between two claim passes (%(default)s)")
    p.add_argument("--from-start", action="store_true",
                   help="a group created now starts at the stream's first "
                   "entry (0), not at its end ($)")
    p.add_argument("--init-schema", action="store_true",
                   help="apply schema.sql (idempotent) before starting")
    p.add_argument("--once", action="store_true",
                   help="store what is in the stream now, then exit")
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"])
    a = p.parse_args(argv)
    if a.batch < 1 or a.block_ms < 1 or a.claim_idle_ms < 0 \
            or a.claim_every <= 0:
        p.error("--batch, --block-ms and --claim-every must be positive, "
                "--claim-idle-ms not negative")
    return a


def main(argv=None):
    args = options(argv)
    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr,
        format="%(asctime)s infer-analytics %(levelname)s %(message)s")
    c = Consumer(args)

    def stop(signum, frame):
        c.stopping = True
        if c.waiting:
            raise Stopping()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("consumer %s, group %s, stream %s", c.name, c.group, c.stream)
    return c.run()


if __name__ == "__main__":
    sys.exit(main())
