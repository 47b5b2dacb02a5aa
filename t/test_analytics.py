"""examples/analytics: the consumer of the gateway's usage events (a Redis
Stream read in a consumer group, written to PostgreSQL), its schema, the
billing query and the Grafana dashboard.

The events are written here with redis-py's XADD in schema version 1, as
the gateway writes them; each test has a real redis-server (the session's,
emptied), a fresh database in a private PostgreSQL cluster
(harness/postgres.py) with schema.sql applied, and runs consumer.py as a
process.  What a test checks is what a billing job would see: the rows,
the daily sums psql prints for daily.sql, the Grafana panel's SQL, and
what is left pending in the group.  Every wait is bounded.

The last test is end to end: a real nginx with the four modules writes
the events for requests sent through it to simulated model servers, and
the consumer, stopped and started again in the middle, stores them; each
row is checked against what the client saw."""

import csv
import datetime
import hashlib
import io
import json
import re
import signal
import socket
import subprocess
import time
import uuid
from collections import defaultdict
from decimal import Decimal

import pytest
import requests

from harness.nginx import REPO
from harness.postgres import PostgresServer, bindir

ANALYTICS = REPO / "examples" / "analytics"
CONSUMER = ANALYTICS / "consumer.py"
PYTHON = "/usr/bin/python3"
STREAM = "infer:usage"
GROUP = "analytics"

UTC = datetime.timezone.utc
EPOCH = datetime.datetime(1970, 1, 1, tzinfo=UTC)
DAY_MS = 86400 * 1000


# ------------------------------------------------------------------ fixtures

@pytest.fixture(scope="session")
def pg_server(tmp_path_factory):
    if bindir() is None:
        pytest.skip("PostgreSQL is not installed (apt-get install "
                    "postgresql, or make deps)")
    pytest.importorskip("psycopg2", reason="python3-psycopg2 is not "
                        "installed (apt-get install python3-psycopg2, or "
                        "make deps)")
    s = PostgresServer(tmp_path_factory.mktemp("postgres"))
    try:
        s.start()
        yield s
    finally:
        s.stop()


class Db:
    """A test's own database, schema.sql applied."""

    def __init__(self, server, name):
        import psycopg2
        self.server = server
        self.name = name
        self.dsn = server.dsn(name)
        self.conn = psycopg2.connect(self.dsn)
        self.conn.autocommit = True

    def query(self, sql, params=None):
        import psycopg2.extras
        with self.conn.cursor(
                cursor_factory=psycopg2.extras.RealDictCursor) as cur:
            cur.execute(sql, params)
            return [dict(r) for r in cur.fetchall()] if cur.description \
                else []

    def rows(self):
        """infer_usage as {request_id: row}."""
        return {r["request_id"]: r
                for r in self.query("SELECT * FROM infer_usage")}

    def count(self):
        return self.query("SELECT count(*) AS n FROM infer_usage")[0]["n"]

    def rejected(self):
        """infer_usage_rejected as {entry_id: row}."""
        return {r["entry_id"]: r
                for r in self.query("SELECT * FROM infer_usage_rejected")}

    def psql(self, **kw):
        return self.server.psql(dbname=self.name, **kw)


@pytest.fixture
def pg(pg_server, request):
    name = "t_" + re.sub(r"\W+", "_", request.node.name).lower()[:40]
    pg_server.create_database(name)
    pg_server.psql(file=ANALYTICS / "schema.sql", dbname=name)
    db = Db(pg_server, name)
    yield db
    db.conn.close()


class Consumers:
    """consumer.py against the test's redis and database: once() runs
    --once to the end, start() runs it in the background."""

    def __init__(self, redis, pg, workdir):
        self.redis = redis
        self.pg = pg
        self.workdir = workdir
        self.procs = []

    def argv(self, name, extra):
        # --from-start: the tests write before the group exists
        return [PYTHON, str(CONSUMER), "--redis", self.redis.addr,
                "--dsn", self.pg.dsn, "--consumer", name, "--from-start",
                *extra]

    def once(self, *extra, name="c1", env=None, timeout=30):
        r = subprocess.run(self.argv(name, ["--once", *extra]),
                           capture_output=True, text=True, timeout=timeout,
                           env=env)
        assert "Traceback" not in r.stderr, r.stderr
        return r

    def start(self, *extra, name="c1"):
        log = self.workdir / f"consumer-{name}-{len(self.procs)}.log"
        with open(log, "wb") as f:
            p = subprocess.Popen(self.argv(name, extra), stdout=f,
                                 stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL)
        p.log_path = log
        self.procs.append(p)
        return p

    def stop_all(self):
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


@pytest.fixture
def consumer(redis, pg, tmp_path):
    c = Consumers(redis, pg, tmp_path)
    yield c
    c.stop_all()


# -------------------------------------------------------------------- events

def now_ms():
    return int(time.time() * 1000)


def today_ms():
    """Today's UTC midnight, in ms."""
    return now_ms() // DAY_MS * DAY_MS


def event(**over):
    """A version 1 event: every field, all strings."""
    ev = {"v": "1", "time": str(now_ms()),
          "request_id": uuid.uuid4().hex, "trace_id": uuid.uuid4().hex,
          "gateway": "gw-1", "tenant": "acme", "key_id": "k-acme-1",
          "subject": "svc-billing", "model": "llama3",
          "model_served": "llama-3-8b", "pool": "llama",
          "endpoint": "127.0.0.1:8001", "status": "200", "stream": "0",
          "prompt_tokens": "12", "completion_tokens": "30",
          "cached_tokens": "0", "reasoning_tokens": "",
          "estimated": "0", "ttft_ms": "85", "duration_ms": "820",
          "request_bytes": "301", "response_bytes": "1422",
          "cost": "0.000123"}
    ev.update({k: str(v) for k, v in over.items()})
    return ev


def mixed(n, start_ms=None, step_ms=997):
    """n events of every kind, step_ms apart from start_ms."""
    start_ms = now_ms() - n * step_ms if start_ms is None else start_ms
    kinds = [
        # answered, not streamed, priced
        {},
        # streamed, with cached and reasoning tokens, another tenant
        {"tenant": "globex", "key_id": "k-globex", "subject": "",
         "model": "mistral-7b", "model_served": "mistral-7b",
         "pool": "mistral", "stream": "1", "cached_tokens": "8",
         "reasoning_tokens": "5", "cost": "0.0000457"},
        # refused by the rate limit: no backend, no tokens, no cost
        {"status": "429", "endpoint": "", "stream": "", "model_served": "",
         "prompt_tokens": "", "completion_tokens": "", "cached_tokens": "",
         "estimated": "", "ttft_ms": "", "cost": "", "trace_id": ""},
        # no tenant (unauthenticated), the backend failed
        {"tenant": "", "key_id": "", "subject": "", "status": "502",
         "prompt_tokens": "", "completion_tokens": "", "cached_tokens": "",
         "estimated": "", "ttft_ms": "", "cost": ""},
        # a stream cut before its usage: the gateway's estimate, no price
        {"stream": "1", "estimated": "1", "model": "phi-3",
         "model_served": "phi-3-mini", "cost": "", "prompt_tokens": "40",
         "completion_tokens": "17"},
    ]
    return [event(time=start_ms + i * step_ms, **kinds[i % len(kinds)])
            for i in range(n)]


def expected(ev):
    """The row an event must become (the test's own reading of v1)."""
    def num(s):
        return int(s) if s != "" else None

    def flag(s):
        return {"1": True, "0": False, "": None}[s]

    row = {"ts": EPOCH + datetime.timedelta(milliseconds=int(ev["time"])),
           "request_id": ev["request_id"], "v": 1,
           "stream": flag(ev["stream"]), "estimated": flag(ev["estimated"]),
           "cost": Decimal(ev["cost"]) if ev["cost"] else None}
    for k in ("trace_id", "gateway", "tenant", "key_id", "subject", "model",
              "model_served", "pool", "endpoint"):
        row[k] = ev[k] or None
    for k in ("status", "prompt_tokens", "completion_tokens",
              "cached_tokens", "reasoning_tokens", "ttft_ms", "duration_ms",
              "request_bytes", "response_bytes"):
        row[k] = num(ev[k])
    return row


def xadd(redis, events):
    """XADD as the gateway does; the entry ids."""
    c = redis.client()
    return [c.xadd(STREAM, ev, maxlen=100000, approximate=True)
            for ev in events]


def pending(redis):
    return redis.client().xpending(STREAM, GROUP)["pending"]


def wait_for(cond, timeout=10, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout}s")


def partitions(pg):
    return {r["name"]: r["bound"] for r in pg.query(
        "SELECT c.relname AS name,"
        " pg_get_expr(c.relpartbound, c.oid) AS bound"
        " FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = 'infer_usage'::regclass")}


def stats(stderr):
    """The numbers of the consumer's last 'stopped:' line."""
    m = re.findall(r"stopped: read (\d+), inserted (\d+), duplicate (\d+), "
                   r"kept aside (\d+) \(version (\d+), malformed (\d+)\), "
                   r"trimmed (\d+)", stderr)
    assert m, stderr
    keys = ("read", "inserted", "duplicate", "kept_aside", "version",
            "malformed", "trimmed")
    return dict(zip(keys, map(int, m[-1])))


# --------------------------------------------------------------------- tests

def test_events_become_rows(redis, pg, consumer):
    yesterday = today_ms() - DAY_MS + 3600 * 1000
    events = mixed(25, start_ms=yesterday) + mixed(15)
    xadd(redis, events)
    r = consumer.once("--batch", "7")
    assert r.returncode == 0, r.stderr
    rows = pg.rows()
    assert len(rows) == len(events) == pg.count()
    for ev in events:
        assert rows[ev["request_id"]] == expected(ev), ev
    assert pending(redis) == 0
    assert stats(r.stderr) == {"read": 40, "inserted": 40, "duplicate": 0,
                               "kept_aside": 0, "version": 0,
                               "malformed": 0, "trimmed": 0}
    # a partition per UTC day the events fell on, and tomorrow's, made
    # ahead; no default partition
    days = {(EPOCH + datetime.timedelta(milliseconds=int(e["time"]))).date()
            for e in events}
    days.add(datetime.datetime.now(UTC).date() + datetime.timedelta(days=1))
    parts = partitions(pg)
    assert set(parts) == {"infer_usage_p" + d.strftime("%Y%m%d")
                          for d in days}
    assert not any("DEFAULT" in b for b in parts.values())


def test_crash_after_commit_before_ack(redis, pg, consumer):
    """Killed between its commit and its XACK: the batch is in the table
    and still pending; the restarted consumer reads its pending entries
    first, and the primary key makes them count once."""
    events = mixed(20)
    xadd(redis, events)
    r = consumer.once("--batch", "6",
                      env={"INFER_ANALYTICS_CRASH": "after-commit"})
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert pg.count() == 6
    assert pending(redis) == 6
    owners = redis.client().xpending(STREAM, GROUP)["consumers"]
    assert owners == [{"name": "c1", "pending": 6}]

    r = consumer.once("--batch", "6")
    assert r.returncode == 0, r.stderr
    assert "pending 6 entries" in r.stderr
    s = stats(r.stderr)
    assert (s["read"], s["inserted"], s["duplicate"]) == (20, 14, 6)
    rows = pg.rows()
    assert len(rows) == 20
    for ev in events:
        assert rows[ev["request_id"]] == expected(ev)
    assert pending(redis) == 0


def test_dead_consumers_entries_claimed(redis, pg, consumer):
    """Entries another consumer read and never acknowledged are taken over
    once they have been idle --claim-idle-ms, not before."""
    events = mixed(12)
    xadd(redis, events)
    c = redis.client()
    c.xgroup_create(STREAM, GROUP, id="0")
    got = c.xreadgroup(GROUP, "ghost", {STREAM: ">"}, count=5)
    assert len(got[0][1]) == 5                       # and then it died

    r = consumer.once()                              # idle 60 s: not yet
    assert r.returncode == 0, r.stderr
    assert pg.count() == 7
    assert pending(redis) == 5

    time.sleep(0.3)
    r = consumer.once("--claim-idle-ms", "200")
    assert r.returncode == 0, r.stderr
    assert "claimed 5 entries" in r.stderr
    rows = pg.rows()
    assert len(rows) == 12
    for ev in events:
        assert rows[ev["request_id"]] == expected(ev)
    assert pending(redis) == 0


def test_redelivered_event_counts_once(redis, pg, consumer):
    ev, other = event(), event(status=500, cost="")
    xadd(redis, [ev, other, ev])                     # one batch
    r = consumer.once()
    assert r.returncode == 0, r.stderr
    assert stats(r.stderr)["duplicate"] == 1
    xadd(redis, [ev])                                # a later batch
    r = consumer.once()
    assert r.returncode == 0, r.stderr
    assert stats(r.stderr)["duplicate"] == 1
    assert pg.rows() == {ev["request_id"]: expected(ev),
                         other["request_id"]: expected(other)}
    assert pending(redis) == 0
    # the same request id at another time is another request
    later = dict(ev, time=str(int(ev["time"]) + 1))
    xadd(redis, [later])
    assert consumer.once().returncode == 0
    assert pg.count() == 3


def test_other_version_and_malformed_kept_aside(redis, pg, consumer):
    """Each bad event is stored in infer_usage_rejected with its reason
    and acknowledged; the good ones around it are inserted."""
    raw = redis.client().__class__(host=redis.host, port=redis.port)
    good = []
    bad = {}                # entry id -> what the reason must say

    def add_good(**over):
        ev = event(**over)
        good.append(ev)
        xadd(redis, [ev])

    def add_bad(reason, ev):
        bad[raw.xadd(STREAM, ev).decode()] = reason

    def without(name):
        ev = event()
        del ev[name]
        return ev

    add_good()
    add_bad("version: '2'", {**event(v=2), "region": "eu"})
    add_good(region="eu")                # a field v1 does not know: ignored
    add_bad("prompt_tokens 'abc' is not an integer",
            event(prompt_tokens="abc"))
    add_good(stream="1")
    add_bad("no v", without("v"))
    add_bad("no endpoint", without("endpoint"))
    add_bad("time 'abc'", event(time="abc"))
    add_bad("between 2020 and tomorrow", event(time=now_ms() // 1000))
    add_bad("between 2020 and tomorrow", event(time=now_ms() * 1000))
    add_bad("request_id is empty", event(request_id=""))
    add_bad("status '2OO'", event(status="2OO"))
    add_bad("status '1000'", event(status="1000"))
    add_bad("completion_tokens '-5'", event(completion_tokens="-5"))
    add_bad("prompt_tokens '99999999999999999999'",
            event(prompt_tokens="99999999999999999999"))
    add_bad("cost '1e-3'", event(cost="1e-3"))
    add_bad("cost '0.0000000001'", event(cost="0.0000000001"))
    add_bad("stream 'yes'", event(stream="yes"))
    add_bad("trace_id 'xyz'", event(trace_id="xyz"))
    add_bad("tenant has a NUL byte", event(tenant="ac\0me"))
    add_bad("model is not UTF-8", {**event(), "model": b"llama\xff\xfe"})
    add_bad("gateway is longer than 1024", event(gateway="g" * 1025))
    add_good(status=499, cost="")

    r = consumer.once()
    assert r.returncode == 0, r.stderr
    assert pg.rows() == {ev["request_id"]: expected(ev) for ev in good}
    rejected = pg.rejected()
    assert set(rejected) == set(bad)
    for eid, reason in bad.items():
        row = rejected[eid]
        assert reason in row["reason"], row
        assert row["stream"] == STREAM
        assert f"kept aside {eid}: " in r.stderr
    assert rejected[next(iter(bad))]["fields"]["region"] == "eu"
    assert pending(redis) == 0
    s = stats(r.stderr)
    assert (s["inserted"], s["version"], s["malformed"]) == \
        (len(good), 1, len(bad) - 1)


def test_row_the_database_refuses_kept_aside(redis, pg, consumer):
    """A row that passes the consumer's checks but not the database's (a
    constraint an operator added) is kept aside with the database's
    reason; the batch around it goes in."""
    pg.query("ALTER TABLE infer_usage ADD CONSTRAINT no_teapots"
             " CHECK (status <> 418)")
    events = mixed(6)
    teapot = event(status=418)
    ids = xadd(redis, events[:3] + [teapot] + events[3:])
    r = consumer.once()
    assert r.returncode == 0, r.stderr
    assert pg.rows() == {ev["request_id"]: expected(ev) for ev in events}
    rejected = pg.rejected()
    assert list(rejected) == [ids[3]]
    assert "no_teapots" in rejected[ids[3]]["reason"]
    assert pending(redis) == 0


def test_trimmed_while_pending(redis, pg, consumer):
    """An entry trimmed away (MAXLEN) while it was pending: acknowledged,
    counted and logged, the others stored."""
    events = mixed(5)
    ids = xadd(redis, events)
    c = redis.client()
    c.xgroup_create(STREAM, GROUP, id="0")
    c.xreadgroup(GROUP, "c1", {STREAM: ">"}, count=5)  # c1 read, then died
    c.xdel(STREAM, ids[2])
    r = consumer.once()
    assert r.returncode == 0, r.stderr
    assert "trimmed from infer:usage before they were stored" in r.stderr
    assert stats(r.stderr)["trimmed"] == 1
    assert set(pg.rows()) == {ev["request_id"] for i, ev in enumerate(events)
                              if i != 2}
    assert pending(redis) == 0


def test_group_starts_at_the_end(redis, pg, consumer):
    """Without --from-start a new group starts at the stream's end: what
    was written before it existed is not read."""
    xadd(redis, mixed(3))
    argv = consumer.argv("c1", ["--once"])
    argv.remove("--from-start")
    r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "created group analytics on infer:usage" in r.stderr
    assert pg.count() == 0
    events = mixed(2)
    xadd(redis, events)
    assert consumer.once().returncode == 0
    assert set(pg.rows()) == {ev["request_id"] for ev in events}


def daily_expectation(events, day_from, day_to):
    """daily.sql's rows, computed here: {(day, tenant, model): sums}."""
    out = defaultdict(lambda: {"requests": 0, "errors": 0,
                               "prompt_tokens": 0, "completion_tokens": 0,
                               "cached_tokens": 0, "cost": Decimal(0),
                               "unpriced": 0, "estimated": 0})
    for ev in events:
        ts = EPOCH + datetime.timedelta(milliseconds=int(ev["time"]))
        if not day_from <= ts.date() < day_to:
            continue
        s = out[(ts.date().isoformat(), ev["tenant"], ev["model"])]
        s["requests"] += 1
        s["errors"] += int(ev["status"]) >= 400
        for k in ("prompt_tokens", "completion_tokens", "cached_tokens"):
            s[k] += int(ev[k] or 0)
        s["cost"] += Decimal(ev["cost"] or 0)
        s["unpriced"] += ev["cost"] == ""
        s["estimated"] += ev["estimated"] == "1"
    return dict(out)


def as_daily(rows):
    """CSV rows (psql) or dict rows (psycopg2) in daily_expectation's
    form; NULL tenant is ''."""
    out = {}
    for r in rows:
        key = (str(r["day"]), r["tenant"] or "", r["model"])
        out[key] = {k: (Decimal(r[k]) if k == "cost" else int(r[k]))
                    for k in ("requests", "errors", "prompt_tokens",
                              "completion_tokens", "cached_tokens", "cost",
                              "unpriced", "estimated")}
    return out


def test_daily_sql(redis, pg, consumer):
    today = today_ms()
    events = (mixed(13, start_ms=today - 3 * DAY_MS)     # outside the range
              + mixed(31, start_ms=today - DAY_MS + 60000, step_ms=60000)
              + mixed(17, start_ms=today, step_ms=1000)
              + [event(time=today - 1, tenant="initech", status=503,
                       cost="1.000000001"),
                 event(time=today, tenant="initech", cost="2.5")])
    xadd(redis, events)
    assert consumer.once().returncode == 0
    assert pg.count() == len(events)

    d_today = datetime.datetime.fromtimestamp(today / 1000, UTC).date()
    d_from = d_today - datetime.timedelta(days=1)
    d_to = d_today + datetime.timedelta(days=1)
    r = pg.psql(file=ANALYTICS / "daily.sql", csv=True,
                variables={"from": d_from, "to": d_to})
    got = list(csv.DictReader(io.StringIO(r.stdout)))
    want = daily_expectation(events, d_from, d_to)
    assert len(want) >= 8          # two days, several tenants and models
    assert as_daily(got) == want
    # ordered by day, tenant (none first), model
    keys = [(g["day"], g["tenant"] != "", g["tenant"], g["model"])
            for g in got]
    assert keys == sorted(keys)
    assert sum(w["cost"] for w in want.values()) == sum(
        Decimal(e["cost"] or 0) for e in events[13:])


GRAFANA_MACRO = re.compile(r"\$__(\w+)\(([^)]*)\)")


def expand_grafana(sql, t_from, t_to):
    """The PostgreSQL data source's macros as Grafana expands them."""
    def one(m):
        name, args = m.group(1), [a.strip() for a in m.group(2).split(",")]
        if name == "timeFilter":
            return (f"{args[0]} BETWEEN '{t_from:%Y-%m-%dT%H:%M:%S.%fZ}' "
                    f"AND '{t_to:%Y-%m-%dT%H:%M:%S.%fZ}'")
        if name == "timeGroupAlias":
            secs = {"'1d'": 86400, "'1h'": 3600}[args[1]]
            return (f"floor(extract(epoch from {args[0]})/{secs})*{secs}"
                    f' AS "time"')
        raise AssertionError(f"macro $__{name} not expanded by this test")
    out = GRAFANA_MACRO.sub(one, sql)
    assert "$" not in out, out
    return out


def test_grafana_dashboard(redis, pg, consumer):
    dash = json.loads((ANALYTICS / "grafana-dashboard.json").read_text())
    targets = [(p, t) for p in dash["panels"] for t in p.get("targets", [])]
    assert targets
    for p, t in targets:
        assert p["datasource"]["type"] == "grafana-postgresql-datasource"
        assert t["rawQuery"] and t["format"] in ("table", "time_series")

    today = today_ms()
    events = (mixed(20, start_ms=today - DAY_MS + 60000, step_ms=60000)
              + mixed(9, start_ms=today))
    xadd(redis, events + [event(v=2)])
    assert consumer.once().returncode == 0

    d_today = datetime.datetime.fromtimestamp(today / 1000, UTC).date()
    t_from = datetime.datetime.combine(d_today, datetime.time(), UTC) \
        - datetime.timedelta(days=1)
    t_to = t_from + datetime.timedelta(days=2, microseconds=-1000)
    results = {}
    for p, t in targets:
        rows = pg.query(expand_grafana(t["rawSql"], t_from, t_to))
        assert rows, p["title"]
        results[p["title"]] = rows

    # the table panel is daily.sql over the dashboard's range
    table = [p for p, t in targets if p["type"] == "table"]
    assert len(table) == 1
    want = daily_expectation(events, t_from.date(),
                             d_today + datetime.timedelta(days=1))
    assert as_daily(results[table[0]["title"]]) == want
    spend = results["Spend per tenant per day (USD)"]
    assert sum(r["value"] for r in spend) == sum(
        Decimal(e["cost"] or 0) for e in events)
    assert results["Events kept aside"] == [{"kept_aside": 1}]


def test_follows_the_stream_and_stops_on_sigterm(redis, pg, consumer):
    """In the background: new entries are stored as they come (a blocking
    read, not a poll); SIGTERM ends a read blocked for 10 s at once."""
    redis.client().config_resetstat()
    p = consumer.start("--block-ms", "10000")
    wait_for(lambda: redis.client().exists(STREAM), what="group created")
    first = mixed(5)
    xadd(redis, first)
    wait_for(lambda: pg.count() == 5, what="5 rows")
    xadd(redis, mixed(3))
    wait_for(lambda: pg.count() == 8, what="8 rows")
    time.sleep(0.2)                       # in its blocking read again
    t0 = time.monotonic()
    p.send_signal(signal.SIGTERM)
    assert p.wait(5) == 0
    assert time.monotonic() - t0 < 2
    log = p.log_path.read_text()
    assert "Traceback" not in log, log
    assert stats(log)["inserted"] == 8
    assert pending(redis) == 0
    calls = redis.client().info("commandstats")["cmdstat_xreadgroup"]["calls"]
    assert calls < 20, calls              # not a busy loop


def test_reconnects_after_losing_redis_and_postgres(redis, pg, consumer):
    """Both connections cut under a running consumer: it reconnects, what
    it had read is read again, nothing is lost or counted twice."""
    p = consumer.start("--block-ms", "500")
    wait_for(lambda: redis.client().exists(STREAM), what="group created")
    events = mixed(4)
    xadd(redis, events[:2])
    wait_for(lambda: pg.count() == 2, what="2 rows")

    killed = pg.query("SELECT pg_terminate_backend(pid) AS ok"
                      " FROM pg_stat_activity"
                      " WHERE application_name = 'infer-analytics'")
    assert killed == [{"ok": True}]
    xadd(redis, events[2:3])
    wait_for(lambda: pg.count() == 3, what="3 rows after postgres")

    c = redis.client()
    c.client_kill_filter(_type="normal", skipme=True)
    xadd(redis, events[3:])
    wait_for(lambda: pg.count() == 4, what="4 rows after redis")
    wait_for(lambda: pending(redis) == 0, what="nothing pending")
    assert pg.rows() == {ev["request_id"]: expected(ev) for ev in events}
    p.send_signal(signal.SIGTERM)
    assert p.wait(5) == 0
    log = p.log_path.read_text()
    assert "retrying in" in log, log
    assert "Traceback" not in log, log


# ------------------------------------------------- end to end: a real nginx

# per million tokens: input, cached input (None: at input), output
PRICES = {"llama-3-8b": ("2.5", "1.25", "10"),
          "mistral-7b": None}                     # no price: no cost
KEYS = {"acme": ("sk-e2e-acme-0123456789abcdef", "acme-1"),
        "globex": ("sk-e2e-globex-0123456789abcdef", "globex-1")}
HELLO_E2E = [{"role": "user", "content": "Hello there"}]
LONG = [{"role": "user", "content": " ".join(
    f"word{i:04d}" for i in range(300))}]          # ~750 tokens, cacheable


def micro(price):
    return int(Decimal(price) * 10**6)


def cost_of(model, prompt, completion, cached):
    """What the gateway's $infer_cost must say, as text (None: unpriced):
    nano-dollars rounded down per part, then dollars without trailing
    zeros."""
    if PRICES.get(model) is None or (prompt is None and completion is None):
        return None
    inp, cached_inp, out = (micro(p) if p else None
                            for p in PRICES[model])
    cached_inp = inp if cached_inp is None else cached_inp

    def part(tokens, m):
        return tokens * (m // 1000) + tokens * (m % 1000) // 1000

    prompt, completion, cached = prompt or 0, completion or 0, cached or 0
    nano = (part(prompt - cached, inp) + part(cached, cached_inp)
            + part(completion, out))
    return f"{nano // 10**9}.{nano % 10**9:09d}".rstrip("0").rstrip(".")


def e2e_conf(redis, sims, keyfile):
    llama, mistral = sims
    inp, cached, out = PRICES["llama-3-8b"]
    return f"""
    infer_ratelimit_redis {redis.addr} timeout=500ms;
    infer_usage_events_stream {STREAM} flush=20ms;
    infer_metrics_zone m 1m;
    upstream llama {{ server {llama.addr}; keepalive 8; }}
    upstream mistral {{ server {mistral.addr}; keepalive 8; }}
    infer_model llama-3-8b upstream=llama model=llama-served
                input_price={inp} cached_input_price={cached}
                output_price={out};
    infer_model mistral-7b upstream=mistral;
    infer_auth_api_keys {keyfile};
    server {{
        listen 127.0.0.1:{{port}};
        location /v1/ {{
            infer_route on;
            infer_trace on;
            infer_auth on;
            infer_usage_events on;
            proxy_pass http://$infer_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
        location = /metrics {{ infer_metrics off; infer_metrics_export; }}
    }}"""


class Gateway:
    """Sends requests through the gateway and notes, for each, the row it
    must become from what the client saw: its x-request-id, its status,
    the usage in the answer (or in the stream's last chunk)."""

    def __init__(self, nginx, sims):
        self.nginx = nginx
        self.endpoints = {"llama-3-8b": ("llama", "llama-served",
                                         sims[0].addr),
                          "mistral-7b": ("mistral", "mistral-7b",
                                         sims[1].addr)}
        self.gateway = socket.gethostname().lower()
        self.sent = []                  # the rows, in order
        self.stream_text = {}           # request_id -> the cost text

    def send(self, tenant="acme", model="llama-3-8b", stream=False,
             messages=HELLO_E2E, completion=5, body=None, headers=None):
        trace = uuid.uuid4().hex
        h = {"content-type": "application/json",
             "traceparent": f"00-{trace}-{uuid.uuid4().hex[:16]}-01",
             "x-sim-completion-tokens": str(completion), **(headers or {})}
        if tenant:
            h["x-api-key"] = KEYS[tenant][0]
        if body is None:
            doc = {"model": model, "messages": messages}
            if stream:
                doc.update(stream=True,
                           stream_options={"include_usage": True})
            body = json.dumps(doc)
        t0 = now_ms()
        r = requests.post(self.nginx.url + "/v1/chat/completions",
                          data=body, headers=h, timeout=10, stream=True)
        content, cut = b"", False
        try:
            for piece in r.iter_content(None):
                content += piece
        except requests.exceptions.ChunkedEncodingError:
            cut = True                          # the backend reset it
        r.close()
        usage, estimated = None, None
        if r.status_code == 200 and stream:
            text = content.decode()
            chunks = [json.loads(line[6:]) for line in text.splitlines()
                      if line.startswith("data: {")]
            assert cut or text.rstrip().endswith("data: [DONE]"), text
            if chunks[-1].get("usage"):
                assert chunks[-1]["choices"] == [], chunks[-1]
                usage, estimated = chunks[-1]["usage"], False
            else:
                # no usage: the gateway's estimate (docs/route.md), one
                # completion token per event with content; the prompt,
                # one per 4 bytes of its text and 4 per message
                usage = {"prompt_tokens": sum(
                             (len(m["content"].encode()) + 3) // 4 + 4
                             for m in messages),
                         "completion_tokens": sum(
                             1 for c in chunks if c["choices"]
                             and c["choices"][0]["delta"].get("content")),
                         "prompt_tokens_details": {"cached_tokens": None}}
                estimated = True
        elif r.status_code == 200:
            usage, estimated = json.loads(content)["usage"], False
        else:
            assert json.loads(content)["error"]["message"], content
        assert cut == ("x-sim-reset-after-chunks" in h)

        routed = r.status_code not in (400, 404)
        pool, served, endpoint = self.endpoints[model] if routed \
            else (None, None, None)
        prompt = usage["prompt_tokens"] if usage else None
        answered = usage["completion_tokens"] if usage else None
        cached = usage["prompt_tokens_details"]["cached_tokens"] \
            if usage else None
        cost = cost_of(model, prompt, answered, cached) if usage else None
        rid = r.headers["x-request-id"]
        # the tenant is known for what the route refuses too (a 404, a
        # 400): the key was checked
        authed = tenant and r.status_code != 401
        row = {"request_id": rid, "v": 1, "trace_id": trace,
               "gateway": self.gateway,
               "tenant": tenant if authed else None,
               "key_id": KEYS[tenant][1] if authed else None,
               "subject": KEYS[tenant][1] if authed else None,
               "model": model if routed else None,
               "model_served": served, "pool": pool,
               "endpoint": endpoint if r.status_code != 401 else None,
               "status": r.status_code,
               "stream": stream if routed else None,
               "prompt_tokens": prompt, "completion_tokens": answered,
               "cached_tokens": cached, "reasoning_tokens": None,
               "estimated": estimated,
               "cost": Decimal(cost) if cost else None}
        # a cut answer ends with nginx's lingering close: the request (its
        # log phase, the event) ends when the client has closed too
        row["_window"] = (t0, now_ms() + (500 if cut else 1))
        row["_sizes"] = (len(body), len(content))
        self.sent.append(row)
        self.stream_text[rid] = cost or ""
        return r


def test_end_to_end_with_nginx(nginx_factory, sim_factory, redis, pg,
                               consumer, tmp_path):
    """Requests through a real gateway, the consumer stopped and started
    again in the middle: one row per request, as the client saw it."""
    sims = (sim_factory("llama-served", "llama-a", ttft_ms=0, tpot_ms=0,
                        kv_cache_tokens=8192),
            sim_factory("mistral-7b", "mistral-a", ttft_ms=0, tpot_ms=0))
    keyfile = tmp_path / "keys.json"
    keyfile.write_text(json.dumps({"keys": [
        {"id": kid, "tenant": tenant,
         "hash": "sha256:" + hashlib.sha256(key.encode()).hexdigest()}
        for tenant, (key, kid) in KEYS.items()]}))
    n = nginx_factory(e2e_conf(redis, sims, keyfile))
    gw = Gateway(n, sims)

    def round_of_requests():
        gw.send(completion=7)
        gw.send(stream=True, completion=4)
        gw.send(messages=LONG, completion=3)          # cached the 2nd time
        gw.send(messages=LONG, stream=True, completion=2)
        gw.send(tenant="globex", model="mistral-7b", completion=6)
        gw.send(tenant="globex", model="mistral-7b", stream=True)
        gw.send(model="gpt-nope")                                   # 404
        gw.send(body='{"model": "llama-3-8b", "messages": [')       # 400
        gw.send(tenant=None)                                        # 401
        gw.send(headers={"x-sim-status": "500"})                    # 500
        gw.send(stream=True, headers={"x-sim-status": "503"})       # 503
        gw.send(stream=True, headers={"x-sim-usage-chunks": "0"})   # no usage
        gw.send(stream=True, completion=9,
                headers={"x-sim-reset-after-chunks": "4"})          # cut

    c = consumer.start("--block-ms", "1000")
    round_of_requests()
    wait_for(lambda: pg.count() == len(gw.sent), what="first round's rows")

    c.send_signal(signal.SIGTERM)
    assert c.wait(5) == 0
    before = len(gw.sent)
    round_of_requests()                                # nobody reading
    wait_for(lambda: redis.client().xlen(STREAM) == len(gw.sent),
             what="second round's events in the stream")
    assert pg.count() == before

    c = consumer.start("--block-ms", "1000")
    round_of_requests()
    wait_for(lambda: pg.count() == len(gw.sent) and pending(redis) == 0,
             what="every row, nothing pending")
    c.send_signal(signal.SIGTERM)
    assert c.wait(5) == 0
    read = 0
    for p in consumer.procs:
        log = p.log_path.read_text()
        assert "Traceback" not in log, log
        s = stats(log)
        assert s["kept_aside"] == s["duplicate"] == s["trimmed"] == 0, log
        read += s["read"]
    assert read == len(gw.sent)

    rows = pg.rows()
    assert len(rows) == pg.count() == len(gw.sent) == 39
    assert pg.rejected() == {}
    stream = {f["request_id"]: f
              for _, f in redis.client().xrange(STREAM)}
    for want in gw.sent:
        row = dict(rows[want["request_id"]])
        t0, t1 = want.pop("_window")
        sent, received = want.pop("_sizes")
        ts = int((row.pop("ts") - EPOCH).total_seconds() * 1000)
        assert t0 <= ts <= t1, (want, ts)
        ttft, duration = row.pop("ttft_ms"), row.pop("duration_ms")
        assert 0 <= duration <= t1 - t0
        assert ttft is None or ttft <= duration + 1
        assert row.pop("request_bytes") > sent
        assert row.pop("response_bytes") > received
        assert row == want, (want["status"], want["model"])
        assert stream[want["request_id"]]["cost"] == \
            gw.stream_text[want["request_id"]]
    # the long prompt, cached from its second sight on, billed so
    assert sum(1 for w in gw.sent if w["cached_tokens"]) == 5
    # what a billing job reads: daily.sql's sums, computed here from what
    # the client saw
    want = defaultdict(lambda: defaultdict(int))
    for w in gw.sent:
        s = want[(w["tenant"] or "", w["model"] or "")]
        s["requests"] += 1
        s["errors"] += w["status"] >= 400
        for k in ("prompt_tokens", "completion_tokens", "cached_tokens"):
            s[k] += w[k] or 0
        s["cost"] += w["cost"] or 0
        s["unpriced"] += w["cost"] is None
        s["estimated"] += bool(w["estimated"])
    today = datetime.datetime.now(UTC).date()
    r = pg.psql(file=ANALYTICS / "daily.sql", csv=True, variables={
        "from": today - datetime.timedelta(days=1),
        "to": today + datetime.timedelta(days=1)})
    got = defaultdict(lambda: defaultdict(int))
    for g in csv.DictReader(io.StringIO(r.stdout)):   # days summed
        s = got[(g["tenant"], g["model"])]
        for k in ("requests", "errors", "prompt_tokens",
                  "completion_tokens", "cached_tokens", "unpriced",
                  "estimated"):
            s[k] += int(g[k])
        s["cost"] += Decimal(g["cost"])
    assert got == want
    # acme's llama-3-8b, globex's mistral-7b, acme's 404s and 400s (no
    # model), the 401s (no tenant)
    assert len(want) == 4
    # nothing lost on the way: as many written as sent
    m = requests.get(n.url + "/metrics", timeout=5).text
    written = {o: int(float(v)) for o, v in re.findall(
        r'^infer_usage_events_total\{outcome="(\w+)"\} (\S+)$', m, re.M)}
    assert written == {"written": 39, "dropped": 0, "failed": 0}, m
