"""A real Redis Cluster on loopback, made as an operator makes one.

RedisCluster(workdir, masters=3, replicas=0, node_timeout_ms=1000,
password=None, hostnames=False).start()
starts masters * (1 + replicas) redis-servers with cluster-enabled (each
its own directory, cluster-config-file and bus port, nothing saved to
disk), joins them with `redis-cli --cluster create ... --cluster-replicas
N --cluster-yes`, and waits until every node says cluster_state:ok and
all agree on which master serves each of the 16384 slots.

What the tests need of it, every wait bounded:

- seeds(): the masters' "127.0.0.1:port", as a gateway is configured;
- node_for_slot(slot) / master_for(key): the master serving it now, as
  the cluster itself says (CLUSTER NODES); key_slot(key) is redis-py's
  (redis.crc), the slot rule computed independently of the gateway;
- count(key): a key's integer value read on the master that owns it,
  following MOVED and ASK as a client must;
- move_slot(slot, dst): a resharding done step by step (SETSLOT
  IMPORTING on the destination, MIGRATING on the source, MIGRATE of the
  keys GETKEYSINSLOT lists, SETSLOT NODE on every master), with a pause
  between the steps if asked, or in parts (begin_move, migrate_keys,
  finish_move) so that a test can hold a slot half moved, where clients
  are sent ASK;
- kill_master(port) (SIGKILL) and wait_promoted(): a replica took over
  and the cluster is ok again; failover(replica): a graceful one
  (CLUSTER FAILOVER); kill_all() and restart_all(): every node down,
  then the same nodes back with their config files;
- calls(command), errors(code): INFO commandstats and errorstats of
  each master (EVALSHA run, ASKING, MOVED and ASK answered...);
- stop(): every process ended, whatever state the cluster is in.
"""

import shutil
import signal
import subprocess
import time
from pathlib import Path

from .ports import free_port, wait_port
from .process import Served, stop_process
from .redis import REDIS_BIN

REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"
SLOTS = 16384


def key_slot(key):
    """The slot of key by Redis's rule (its hash tag if it has one), as
    redis-py computes it: an oracle independent of the gateway's C."""
    from redis.crc import key_slot as crc_slot
    return crc_slot(key.encode() if isinstance(key, str) else key)


class ClusterNode(Served):
    """One redis-server of the cluster: a port, a bus port, a directory
    holding its nodes.conf, so that it can be killed and started again
    as the same node."""

    def __init__(self, workdir, port, bus_port, node_timeout_ms,
                 password=None, extra_args=()):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port
        self.bus_port = bus_port
        self.node_timeout_ms = node_timeout_ms
        self.password = password
        self.extra_args = list(extra_args)
        self.proc = None
        self.id = None

    def start(self, timeout=10):
        self.proc = subprocess.Popen(
            [REDIS_BIN, "--bind", self.host, "--port", str(self.port),
             "--cluster-enabled", "yes",
             "--cluster-config-file", str(self.workdir / "nodes.conf"),
             "--cluster-node-timeout", str(self.node_timeout_ms),
             "--cluster-port", str(self.bus_port),
             "--save", "", "--appendonly", "no", "--daemonize", "no",
             # a replica syncs at once (the default waits 5 s for others)
             "--repl-diskless-sync-delay", "0",
             "--dir", str(self.workdir),
             "--logfile", str(self.workdir / "redis.log"),
             *(["--requirepass", self.password, "--masterauth",
                self.password] if self.password else []),
             *self.extra_args],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        if not wait_port(self.host, self.port, timeout,
                         alive=lambda: self.proc.poll() is None):
            self.stop()
            raise RuntimeError(f"redis-server {self.addr} did not start: "
                               + self.log_tail())
        self.id = self.client().execute_command("CLUSTER", "MYID")
        return self

    @property
    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self):
        stop_process(self.proc)

    def kill(self):
        """An outage as it comes: SIGKILL, nothing flushed or closed."""
        stop_process(self.proc, signal.SIGKILL)

    def client(self, **kw):
        import redis
        return redis.Redis(host=self.host, port=self.port,
                           password=self.password, decode_responses=True,
                           socket_timeout=5, socket_connect_timeout=2, **kw)

    def nodes(self):
        """This node's view of the cluster (CLUSTER NODES), parsed:
        {id: {"port", "flags", "master", "slots", "open"}}, slots a set
        of the slots it is said to serve, open its slots being moved
        ("[slot->-id]" migrating, "[slot-<-id]" importing)."""
        text = self.client().execute_command("CLUSTER", "NODES")
        out = {}
        for line in text.splitlines():
            f = line.split()
            if len(f) < 8:
                continue
            addr = f[1].split("@")[0].split(",")[0]
            port = int(addr.rsplit(":", 1)[1]) if ":" in addr and \
                addr.rsplit(":", 1)[1].isdigit() else None
            slots, opened = set(), []
            for s in f[8:]:
                if s.startswith("["):
                    opened.append(s)
                elif "-" in s:
                    a, b = s.split("-")
                    slots.update(range(int(a), int(b) + 1))
                else:
                    slots.add(int(s))
            out[f[0]] = {"port": port, "flags": set(f[2].split(",")),
                         "master": None if f[3] == "-" else f[3],
                         "slots": slots, "open": opened}
        return out

    def info(self, section):
        return self.client().info(section)

    def log_tail(self, chars=2000):
        try:
            return (self.workdir / "redis.log").read_text(
                errors="replace")[-chars:]
        except OSError:
            return ""


class RedisCluster:
    def __init__(self, workdir, masters=3, replicas=0, node_timeout_ms=1000,
                 password=None, hostnames=False):
        assert masters >= 3, "redis-cli --cluster create needs 3 masters"
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.n_masters = masters
        self.n_replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.password = password        # requirepass and masterauth
        self.hostnames = hostnames      # cluster-announce-hostname
        self.nodes = []
        self.killed = []
        self._used = set()
        for i in range(masters * (1 + replicas)):
            self.nodes.append(self._new_node())

    def _new_node(self):
        def port():
            for _ in range(100):
                p = free_port()
                if p not in self._used:
                    self._used.add(p)
                    return p
            raise RuntimeError("no free port")

        p = port()
        extra = ["--cluster-announce-hostname", f"node-{p}.test"] \
            if self.hostnames else []
        return ClusterNode(self.workdir / f"node-{p}", p, port(),
                           self.node_timeout_ms, self.password, extra)

    # ------------------------------------------------------------ life

    def start(self, timeout=60):
        try:
            for n in self.nodes:
                n.start()
            # the first `masters` addresses become the masters, the others
            # their replicas (redis-cli picks which replica goes where)
            r = subprocess.run(
                [REDIS_CLI, *(["-a", self.password, "--no-auth-warning"]
                               if self.password else []),
                 "--cluster", "create",
                 *(n.addr for n in self.nodes),
                 "--cluster-replicas", str(self.n_replicas),
                 "--cluster-yes"],
                capture_output=True, text=True, timeout=timeout)
            (self.workdir / "create.log").write_text(r.stdout + r.stderr)
            if r.returncode != 0:
                raise RuntimeError("redis-cli --cluster create failed:\n"
                                   + r.stdout[-2000:] + r.stderr[-2000:])
            self.wait_ok(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def add_master(self, timeout=30):
        """A new, empty master joins (CLUSTER MEET), serving no slot until
        one is moved to it (move_slot).  Returns it."""
        node = self._new_node()
        self.nodes.append(node)
        node.start()
        # every node meets it, rather than wait for the gossip to spread
        for n in self.live():
            if n is not node:
                n.client().execute_command("CLUSTER", "MEET", node.host,
                                           node.port, node.bus_port)
        self.wait_ok(timeout)
        return node

    def stop(self):
        """Every node stopped, whatever it was doing (never raises)."""
        for n in self.nodes:
            try:
                n.stop()
            except Exception:
                try:
                    n.kill()
                except Exception:
                    pass

    def live(self):
        return [n for n in self.nodes if n.alive]

    def by_port(self, port):
        port = int(port.port if isinstance(port, ClusterNode) else port)
        for n in self.nodes:
            if n.port == port:
                return n
        raise KeyError(port)

    def by_id(self, node_id):
        for n in self.nodes:
            if n.id == node_id:
                return n
        raise KeyError(node_id)

    # ------------------------------------------------------------ state

    def _owners(self, node):
        """node's view: a list of 16384 ports (None: a slot unserved, or
        served by a node marked failed)."""
        owners = [None] * SLOTS
        for nid, v in node.nodes().items():
            if "master" not in v["flags"] or "fail" in v["flags"]:
                continue
            for s in v["slots"]:
                owners[s] = v["port"]
        return owners

    def _state(self):
        """(ok, why): every live node's cluster_state is ok, they agree
        on the owner of every slot, every slot is served by a live
        master, and every live replica's link to its master is up."""
        views = []
        live_ports = {n.port for n in self.live()}
        for n in self.live():
            try:
                info = n.client().execute_command("CLUSTER", "INFO")
                if "cluster_state:ok" not in info:
                    return False, f"{n.addr}: cluster_state not ok"
                known = int(info.split("cluster_known_nodes:")[1].split()[0])
                if known != len(self.nodes):
                    return False, f"{n.addr}: knows {known} nodes"
                views.append((n, self._owners(n)))
                repl = n.info("replication")
                if repl["role"] == "slave" and \
                        repl.get("master_link_status") != "up":
                    return False, f"{n.addr}: replica link down"
            except Exception as e:      # a node busy or starting
                return False, f"{n.addr}: {e}"
        if not views:
            return False, "no node is up"
        first = views[0][1]
        for n, owners in views[1:]:
            if owners != first:
                return False, f"{n.addr} disagrees on the slots"
        missing = [s for s, p in enumerate(first) if p not in live_ports]
        if missing:
            return False, f"{len(missing)} slots unserved, e.g. {missing[0]}"
        return True, ""

    def wait_ok(self, timeout=30):
        deadline = time.monotonic() + timeout
        ok, why = self._state()
        while not ok and time.monotonic() < deadline:
            time.sleep(0.05)
            ok, why = self._state()
        if not ok:
            raise RuntimeError(f"the cluster is not ok after {timeout}s: "
                               + why)

    def masters(self):
        """The live masters serving slots, as the cluster says now."""
        view = self.live()[0].nodes()
        return [self.by_id(nid) for nid, v in view.items()
                if "master" in v["flags"] and "fail" not in v["flags"]
                and v["slots"] and self.by_id(nid).alive]

    def replicas_of(self, master):
        view = self.live()[0].nodes()
        return [self.by_id(nid) for nid, v in view.items()
                if v["master"] == master.id]

    def seeds(self):
        """The masters' addresses, as infer_ratelimit_redis cluster:
        lists its seeds."""
        return [m.addr for m in self.masters()]

    def slots_of(self, master):
        me = master.nodes()[master.id]
        return me["slots"]

    def slot_map(self):
        """A list of 16384 ports: the master serving each slot now."""
        for n in self.live():
            try:
                return self._owners(n)
            except Exception:
                continue
        raise RuntimeError("no node of the cluster answers")

    def node_for_slot(self, slot):
        """The master serving slot, as a live node of the cluster says."""
        for n in self.live():
            try:
                owners = self._owners(n)
            except Exception:
                continue
            port = owners[slot]
            if port is not None:
                return self.by_port(port)
        raise RuntimeError(f"no live node says who serves slot {slot}")

    def master_for(self, key):
        return self.node_for_slot(key_slot(key))

    def client_for(self, port):
        return self.by_port(port).client()

    def cluster_client(self):
        """redis-py's own cluster client (it follows MOVED and ASK)."""
        from redis.cluster import RedisCluster as PyCluster
        n = self.live()[0]
        return PyCluster(host=n.host, port=n.port, decode_responses=True,
                         password=self.password, socket_timeout=5,
                         socket_connect_timeout=2)

    def get(self, key):
        """key's value read where it lives: on the master that serves its
        slot, or, while the slot is being moved and the key already went,
        on the destination (ASKING, as Redis tells a client to)."""
        import redis
        node = self.master_for(key)
        for _ in range(3):
            c = node.client(single_connection_client=True)
            try:
                return c.get(key)
            except redis.exceptions.ResponseError as e:
                words = str(e).split()
                if not words or words[0] not in ("ASK", "MOVED"):
                    raise
                target = self.by_port(words[2].rsplit(":", 1)[1])
                if words[0] == "MOVED":
                    node = target
                    continue
                c2 = target.client(single_connection_client=True)
                try:
                    c2.execute_command("ASKING")
                    return c2.get(key)
                finally:
                    c2.close()
            finally:
                c.close()
        raise RuntimeError(f"{key}: redirected too many times")

    def count(self, key):
        """An integer key (a calendar window's count) where it lives; 0
        when it does not exist."""
        return int(self.get(key) or 0)

    def keys_everywhere(self, pattern="*"):
        """{port: [keys]} of every live master (SCAN each)."""
        return {m.port: sorted(m.client().scan_iter(pattern))
                for m in self.masters()}

    def calls(self, command):
        """{port: calls of command} per live master (INFO commandstats)."""
        out = {}
        for m in self.masters():
            stats = m.client().info("commandstats")
            out[m.port] = stats.get(f"cmdstat_{command}", {}).get("calls", 0)
        return out

    def errors(self, prefix):
        """{port: errors answered whose code is prefix} per live master
        (INFO errorstats: MOVED, ASK, TRYAGAIN, CLUSTERDOWN...)."""
        out = {}
        for m in self.masters():
            v = m.client().info("errorstats").get(f"errorstat_{prefix}", {})
            if isinstance(v, str):          # redis-py 4.3: "count=N"
                v = dict(kv.split("=") for kv in v.split(","))
            out[m.port] = int(v.get("count", 0))
        return out

    def reset_stats(self):
        for n in self.live():
            n.client().config_resetstat()

    def flushall(self):
        for m in self.masters():
            m.client().flushall()

    # ------------------------------------------------------------ resharding

    def begin_move(self, slot, dst):
        """The first two steps of a resharding: dst IMPORTING the slot,
        its master MIGRATING it.  Until finish_move, the source serves
        the keys it still holds and answers ASK for the others."""
        dst = self.by_port(dst)
        src = self.node_for_slot(slot)
        if src is dst:
            raise ValueError(f"slot {slot} is already on {dst.addr}")
        dst.client().execute_command("CLUSTER", "SETSLOT", slot,
                                     "IMPORTING", src.id)
        src.client().execute_command("CLUSTER", "SETSLOT", slot,
                                     "MIGRATING", dst.id)
        return src, dst

    def migrate_keys(self, slot, src, dst, batch=10, pause=0.0,
                     timeout=30):
        """MIGRATE the slot's keys from src to dst, batch keys a call,
        until src holds none of them; pause between the batches.  The
        number of keys moved."""
        c = src.client()
        moved = 0
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            keys = c.execute_command("CLUSTER", "GETKEYSINSLOT", slot, batch)
            if not keys:
                return moved
            auth = ["AUTH", self.password] if self.password else []
            c.execute_command("MIGRATE", dst.host, dst.port, "", 0, 5000,
                              *auth, "KEYS", *keys)
            moved += len(keys)
            if pause:
                time.sleep(pause)
        raise RuntimeError(f"slot {slot}: keys still on {src.addr} after "
                           f"{timeout}s")

    def finish_move(self, slot, dst, timeout=30):
        """The last step: SETSLOT NODE on the destination first, then the
        source, then every other master; then wait until every node
        agrees."""
        dst = self.by_port(dst)
        src = self.node_for_slot(slot)
        order = [dst] + [src] * (src is not dst) + \
            [m for m in self.masters() if m is not dst and m is not src]
        for m in order:
            m.client().execute_command("CLUSTER", "SETSLOT", slot, "NODE",
                                       dst.id)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self._owners(n)[slot] == dst.port for n in self.live()):
                break
            time.sleep(0.05)
        self.wait_ok(max(1, deadline - time.monotonic()))

    def move_slot(self, slot, dst, pause=0.0):
        """A whole resharding of slot to dst, with its keys; pause seconds
        between the steps (and between batches of keys), so that load
        meets each state.  Returns the source node."""
        src, dst = self.begin_move(slot, dst)
        time.sleep(pause)
        self.migrate_keys(slot, src, dst, pause=pause)
        time.sleep(pause)
        self.finish_move(slot, dst)
        return src

    def stabilize(self):
        """Any slot left half moved (a test that failed midway) is closed:
        keys moved back to the owner, SETSLOT STABLE everywhere."""
        for n in self.live():
            try:
                me = n.nodes()[n.id]
            except Exception:
                continue
            for s in me["open"]:
                slot = int(s[1:].split("-")[0])
                n.client().execute_command("CLUSTER", "SETSLOT", slot,
                                           "STABLE")

    # ------------------------------------------------------------ outages

    def kill_master(self, port):
        """SIGKILL a master (it had better have a replica to take over,
        or its slots stay unserved).  Returns the node."""
        node = self.by_port(port)
        assert node in self.masters(), f"{node.addr} is not a master"
        self._waiting_for = (node, self.replicas_of(node))
        node.kill()
        self.killed.append(node)
        return node

    def wait_promoted(self, timeout=30):
        """After kill_master: wait until one of its replicas is a master
        serving its slots and the cluster is ok again (every live node
        agrees).  Returns the new master."""
        old, replicas = self._waiting_for
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for r in replicas:
                try:
                    if r.info("replication")["role"] == "master" and \
                            self._state()[0]:
                        return r
                except Exception:
                    pass
            time.sleep(0.05)
        raise RuntimeError(f"no replica of {old.addr} took over in "
                           f"{timeout}s: " + self._state()[1])

    def failover(self, replica, timeout=30):
        """A graceful failover (CLUSTER FAILOVER on replica): its master
        stops taking writes, the replica catches up, takes the slots over,
        and the old master becomes its replica.  Waits until the cluster
        agrees; returns the old master."""
        replica = self.by_port(replica)
        view = replica.nodes()
        old = self.by_id(view[replica.id]["master"])
        replica.client().execute_command("CLUSTER", "FAILOVER")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if replica.info("replication")["role"] == "master" and \
                        old.info("replication")["role"] == "slave" and \
                        self._state()[0]:
                    return old
            except Exception:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{replica.addr} did not take over in {timeout}s:"
                           " " + self._state()[1])

    def kill_all(self):
        for n in self.nodes:
            n.kill()

    def restart_all(self, timeout=30):
        """The same nodes again (same ports, same nodes.conf), empty of
        data; wait until the cluster is ok."""
        for n in self.nodes:
            if not n.alive:
                n.start()
        self.wait_ok(timeout)
