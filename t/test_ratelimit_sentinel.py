"""ngx_infer_ratelimit with Redis Sentinel: a master, a replica and three
sentinels, real redis-servers on loopback.

The gateway asks the sentinels who the master is, counts there, and
follows a failover (forced with SENTINEL FAILOVER, and the master killed):
no request waits past the timeout, the outage policy decides while there
is no master, and the counts are exact on the new master once the
topology settled.  redis-py asks the sentinels and reads the counts; a
calendar-day limit's key is a plain count, so exactness is an equality."""

import datetime
import subprocess
import time

import pytest
import requests

from harness.ports import free_port, wait_port
from harness.process import Served, stop_process
from harness.redis import REDIS_BIN, RedisServer

NAME = "mymaster"


class Sentinel(Served):
    def __init__(self, workdir, master_port):
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.conf = self.workdir / "sentinel.conf"
        self.conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndaemonize no\n"
            f"dir {self.workdir}\nlogfile {self.workdir / 'sentinel.log'}\n"
            f"sentinel monitor {NAME} 127.0.0.1 {master_port} 2\n"
            f"sentinel down-after-milliseconds {NAME} 400\n"
            f"sentinel failover-timeout {NAME} 2000\n"
            f"sentinel parallel-syncs {NAME} 1\n")
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen([REDIS_BIN, str(self.conf), "--sentinel"],
                                     stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT)
        if not wait_port(self.host, self.port, 10,
                         alive=lambda: self.proc.poll() is None):
            raise RuntimeError("sentinel did not start")
        return self

    def stop(self):
        stop_process(self.proc)

    def client(self):
        import redis
        return redis.Redis(host=self.host, port=self.port,
                           decode_responses=True)


@pytest.fixture
def topology(tmp_path):
    """master, replica, three sentinels that know them both."""
    made = []
    master = RedisServer(tmp_path / "master").start()
    made.append(master)
    replica = RedisServer(tmp_path / "replica", extra_args=[
        "--replicaof", "127.0.0.1", str(master.port)]).start()
    made.append(replica)
    sentinels = [Sentinel(tmp_path / f"s{i}", master.port).start()
                 for i in range(3)]
    made += sentinels
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            s = sentinels[0].client()
            if s.sentinel_slaves(NAME) and \
                    len(s.sentinel_sentinels(NAME)) == 2:
                break
        except Exception:
            pass
        time.sleep(0.1)
    else:
        pytest.fail("the sentinels did not find each other and the replica")
    yield {"master": master, "replica": replica, "sentinels": sentinels,
           "servers": {master.port: master, replica.port: replica}}
    for m in reversed(made):
        m.stop()


def master_now(top):
    host, port = top["sentinels"][0].client().sentinel_get_master_addr_by_name(
        NAME)
    return top["servers"][int(port)]


def conf(top, limits="infer_ratelimit_limit rpd global "
         "requests=1000000/day on_error=fail_open;"):
    sentinels = ",".join(s.addr for s in top["sentinels"])
    return f"""
    infer_ratelimit_redis sentinel:{NAME} sentinels={sentinels}
                          timeout=300ms connect_timeout=200ms backoff=400ms;
    server {{
        listen 127.0.0.1:{{port}};
        infer_ratelimit on;
        {limits}
        location / {{
            add_header X-RL-Status $infer_ratelimit_status always;
        }}
    }}"""


def key():
    day = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d")
    return f"infer:rl:{{global}}:rpd:{day}"


def status(n, session):
    r = session.get(n.url + "/ok.txt", timeout=5)
    assert r.status_code == 200
    return r.headers["X-RL-Status"]


def until_passed(n, session, seconds=15):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if status(n, session) == "passed":
            return True
        time.sleep(0.05)
    return False


def test_the_master_is_asked_of_the_sentinels(nginx_factory, topology):
    n = nginx_factory(conf(topology))
    s = requests.Session()
    assert until_passed(n, s)
    m = topology["master"].client()
    before = int(m.get(key()))
    for _ in range(20):
        assert status(n, s) == "passed"
    assert int(m.get(key())) == before + 20
    # and the replica has it, copied (asynchronously)
    r = topology["replica"].client()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and r.get(key()) != m.get(key()):
        time.sleep(0.05)
    assert r.get(key()) == m.get(key())


@pytest.mark.parametrize("how", ["failover", "kill"])
def test_a_failover_is_followed(nginx_factory, topology, how):
    n = nginx_factory(conf(topology))
    s = requests.Session()
    assert until_passed(n, s)
    old = topology["master"]
    if how == "failover":
        topology["sentinels"][0].client().execute_command(
            "SENTINEL", "FAILOVER", NAME)
    else:
        old.kill()
    # requests go on while there is no master: none waits past the
    # timeout (the client's 5 s bound), the policy (fail_open) decides
    seen = set()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        seen.add(status(n, s))
        try:
            new = master_now(topology)
        except Exception:
            new = old
        if new is not old and "passed" in seen and \
                status(n, s) == "passed":
            break
        time.sleep(0.05)
    new = master_now(topology)
    assert new is not old
    if how == "failover":
        # the old master is made a replica after the new one is promoted:
        # until then both take writes; the topology has settled after
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and \
                old.client().info("replication")["role"] != "slave":
            time.sleep(0.05)
        assert old.client().info("replication")["role"] == "slave"
    assert until_passed(n, s)
    # both workers: each finds the new master on its next call
    for _ in range(20):
        status(n, s)
    assert until_passed(n, s)
    c = new.client()
    before = int(c.get(key()) or 0)
    for _ in range(30):
        assert status(n, s) == "passed"
    assert int(c.get(key())) == before + 30
    n.forget_log()    # the failover's warnings were expected


def test_all_sentinels_down_is_an_outage(nginx_factory, topology):
    n = nginx_factory(conf(topology))
    s = requests.Session()
    assert until_passed(n, s)
    for sn in topology["sentinels"]:
        sn.stop()
    topology["master"].kill()
    t0 = time.monotonic()
    for _ in range(20):
        assert status(n, s) in ("passed", "degraded")
    assert status(n, s) == "degraded"
    assert time.monotonic() - t0 < 20
    n.forget_log()


@pytest.mark.parametrize("opts, message", [
    (f"sentinel:{NAME}", "without sentinels="),
    ("127.0.0.1:6379 sentinels=127.0.0.1:26379", "without sentinel:NAME"),
    (f"sentinel:{NAME} sentinels=localhost:26379", "invalid sentinel"),
    (f"sentinel:{NAME} sentinels=127.0.0.1", "invalid sentinel"),
    ("sentinel: sentinels=127.0.0.1:26379", "invalid redis address"),
])
def test_nginx_t_names_sentinel_mistakes(nginx_factory, opts, message):
    n = nginx_factory(f"""
        infer_ratelimit_redis {opts};
        server {{ listen 127.0.0.1:{{port}}; }}""", start=False)
    ok, out = n.check_config()
    assert not ok
    assert message in out, out
