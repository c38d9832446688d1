"""A lab of test hosts: Linux network namespaces on one bridge, links that can be cut.

Topology (every name starts with a per-run tag ``rwt<pid>``, so parallel runs and the
leftovers of crashed runs never clash)::

      rwt<pid>-brk      rwt<pid>-wa      rwt<pid>-wb      rwt<pid>-cli     root namespace
      broker  .1        workers-a .2     workers-b .3     client .4        test controller .254
        eth0              eth0             eth0             eth0             rwt<pid>c
         |                 |                |                |                  |
       p-brk             p-wa             p-wb             p-cli              p-ctl
      +------------------------ br0 in rwt<pid>-sw (the switch) -------------------+

Each host has its own address in a /24 of 10.200.0.0/12 picked so that it overlaps no route
of the root namespace. The controller link lets the test process (in the root namespace)
read the broker's status directly. :meth:`Lab.cut` unplugs a host at the switch
(``ip link set p-X down``: no carrier, every packet to or from it is lost, TCP
connections are not reset); :meth:`Lab.restore` plugs it back in.

Latency and loss: with ``tc netem`` (detected at start) :meth:`Lab.shape` delays the
broker's link in both directions; without it (this kind of VM) the tests send traffic
through ``relay.py``, a delaying TCP relay of our own, in the broker's namespace.

Cleanup whatever happens: :meth:`Lab.destroy` kills every process left in the lab's
namespaces (by pid, from ``ip netns pids``) and deletes the namespaces and the controller
link; it runs from the fixture's finalizer, from ``atexit`` and from a SIGTERM/SIGHUP
handler. :func:`sweep_stale` deletes the namespaces of earlier runs whose creating process
(the pid in their name) is dead, so even a ``kill -9`` of pytest leaves nothing behind for
long.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Optional, Union

PREFIX = "rwt"
#: Namespace names this module creates: rwt<creator pid>-<role>.
NS_RE = re.compile(rf"^{PREFIX}(\d+)-(sw|brk|wa|wb|cli|probe)$")
#: The controller link in the root namespace: rwt<creator pid>c.
LINK_RE = re.compile(rf"^{PREFIX}(\d+)c$")

#: role -> (namespace suffix, last byte of the host's address)
HOSTS = {"broker": ("brk", 1), "workers-a": ("wa", 2), "workers-b": ("wb", 3), "client": ("cli", 4)}
CONTROLLER = 254


class LabError(RuntimeError):
    pass


def ip(*args: str, check: bool = True, timeout: float = 15.0) -> subprocess.CompletedProcess:
    """Run ``ip ARGS`` (iproute2); raise LabError with its stderr if it fails and ``check``."""
    cmd = ["ip", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise LabError(f"{' '.join(cmd)}: {r.stderr.strip() or f'exit code {r.returncode}'}")
    return r


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def netns_names() -> list[str]:
    r = ip("netns", "list", check=False)
    return [line.split()[0] for line in r.stdout.splitlines() if line.strip()]


def netns_pids(name: str) -> list[int]:
    r = ip("netns", "pids", name, check=False)
    return [int(p) for p in r.stdout.split() if p.isdigit()]


def kill_pids(pids: list[int]) -> None:
    for pid in pids:
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _delete_netns(name: str) -> None:
    """Kill what runs in it (a namespace with processes in it outlives its name), delete it."""
    for _ in range(3):
        pids = netns_pids(name)
        if not pids:
            break
        kill_pids(pids)
        time.sleep(0.05)
    ip("netns", "del", name, check=False)


def root_links() -> list[str]:
    r = ip("-o", "link", "show", check=False)
    names = []
    for line in r.stdout.splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2:
            names.append(parts[1].strip().split("@", 1)[0])
    return names


def lab_namespaces() -> list[str]:
    """Namespaces that this module (in any process) created and that still exist."""
    return [n for n in netns_names() if NS_RE.match(n)]


_LIVE_TAGS: set[str] = set()  # tags of labs this process is running now


def sweep_stale() -> list[str]:
    """Delete the namespaces and controller links of earlier runs whose creator is dead.

    A name carries its creator's pid; a live creator's lab is left alone (another run, in
    parallel). Names with this process's own pid are stale too (an earlier process had the
    same pid), unless this process is running that lab right now. Returns what was removed.
    """
    removed = []
    me = os.getpid()
    for name in lab_namespaces():
        m = NS_RE.match(name)
        assert m is not None
        pid = int(m.group(1))
        if f"{PREFIX}{pid}" in _LIVE_TAGS or (pid != me and pid_alive(pid)):
            continue
        _delete_netns(name)
        removed.append(name)
    for link in root_links():
        m = LINK_RE.match(link)
        if m is None:
            continue
        pid = int(m.group(1))
        if f"{PREFIX}{pid}" in _LIVE_TAGS or (pid != me and pid_alive(pid)):
            continue
        ip("link", "del", link, check=False)
        removed.append(link)
    return removed


def probe() -> Optional[str]:
    """Why this machine cannot run the lab, or None if it can (root, iproute2, namespaces,
    veth pairs, ``ip netns exec``)."""
    if sys.platform != "linux":
        return f"multihost tests need Linux network namespaces (this is {sys.platform})"
    if os.geteuid() != 0:
        return (f"multihost tests need root to create network namespaces "
                f"(running as uid {os.geteuid()})")
    if shutil.which("ip") is None:
        return "multihost tests need iproute2 (`ip` is not installed; .ci/run installs it)"
    name = f"{PREFIX}{os.getpid()}-probe"
    try:
        if name in netns_names():
            _delete_netns(name)
        ip("netns", "add", name)
        try:
            ip("-n", name, "link", "add", "pa", "type", "veth", "peer", "name", "pb")
            ip("-n", name, "link", "set", "pa", "up")
            r = subprocess.run(["ip", "netns", "exec", name, "true"], capture_output=True,
                               text=True, timeout=15)
            if r.returncode != 0:
                raise LabError(f"ip netns exec: {r.stderr.strip()}")
        finally:
            _delete_netns(name)
    except (LabError, OSError, subprocess.SubprocessError) as exc:
        return f"multihost tests cannot create network namespaces here: {exc}"
    return None


def _used_networks() -> list[ipaddress.IPv4Network]:
    used = []
    for args in (("-j", "-4", "route", "show", "table", "all"), ("-j", "-4", "addr", "show")):
        try:
            data = json.loads(ip(*args, check=False).stdout or "[]")
        except ValueError:
            continue
        for entry in data:
            cands = [entry.get("dst")]
            for a in entry.get("addr_info", []):
                cands.append(f"{a.get('local')}/{a.get('prefixlen')}")
            for c in cands:
                if not c or c == "default":
                    continue
                try:
                    used.append(ipaddress.IPv4Network(c, strict=False))
                except ValueError:
                    pass
    return used


def pick_subnet(seed: int) -> ipaddress.IPv4Network:
    """A /24 in 10.200.0.0/12 that overlaps nothing the root namespace routes."""
    used = _used_networks()
    for i in range(4096):
        k = (seed * 7 + i) % 4096
        net = ipaddress.IPv4Network(f"10.{200 + k // 256}.{k % 256}.0/24")
        if not any(net.overlaps(u) for u in used):
            return net
    raise LabError("no free /24 in 10.200.0.0/12 for the lab")


@dataclass
class Host:
    role: str
    ns: str
    addr: str
    port: str  # its port on the switch, in the switch namespace


def netem_available(switch_ns: str, port: str) -> bool:
    """Whether ``tc qdisc ... netem`` works here (kernel module present, tc installed)."""
    if shutil.which("tc") is None:
        return False
    r = subprocess.run(["tc", "-n", switch_ns, "qdisc", "add", "dev", port, "root", "netem",
                        "delay", "1ms"], capture_output=True, text=True, timeout=15)
    if r.returncode != 0:
        return False
    subprocess.run(["tc", "-n", switch_ns, "qdisc", "del", "dev", port, "root"],
                   capture_output=True, timeout=15)
    return True


class Lab:
    """Four test hosts and a switch; create(), cut()/restore(), spawn(), destroy()."""

    def __init__(self, tag: str | None = None) -> None:
        self.tag = tag or f"{PREFIX}{os.getpid()}"
        self.switch = f"{self.tag}-sw"
        self.ctl_link = f"{self.tag}c"
        self.subnet: ipaddress.IPv4Network | None = None
        self.hosts: dict[str, Host] = {}
        self.controller_addr = ""
        self.netem = False
        self.shaped: dict[str, Any] | None = None
        self.procs: list[subprocess.Popen] = []
        self.created = False
        self.destroyed = False
        self.owner = os.getpid()  # a process forked from this one must not tear the lab down
        self._prev_handlers: dict[int, Any] = {}

    # ------------------------------------------------------------------ life cycle
    def create(self) -> Lab:
        _LIVE_TAGS.add(self.tag)
        atexit.register(self.destroy)
        sweep_stale()
        self.created = True
        try:
            self._build()
        except BaseException:
            self.destroy()
            raise
        return self

    def _build(self) -> None:
        self.subnet = pick_subnet(os.getpid())
        base = str(self.subnet.network_address).rsplit(".", 1)[0]
        sw = self.switch
        ip("netns", "add", sw)
        ip("-n", sw, "link", "set", "lo", "up")
        ip("-n", sw, "link", "add", "br0", "type", "bridge")  # no STP: ports forward at once
        ip("-n", sw, "link", "set", "br0", "up")
        for role, (short, last) in HOSTS.items():
            host = Host(role, f"{self.tag}-{short}", f"{base}.{last}", f"p-{short}")
            ip("netns", "add", host.ns)
            ip("-n", host.ns, "link", "set", "lo", "up")
            ip("-n", sw, "link", "add", host.port, "type", "veth", "peer", "name", "eth0",
               "netns", host.ns)
            ip("-n", sw, "link", "set", host.port, "master", "br0")
            ip("-n", sw, "link", "set", host.port, "up")
            ip("-n", host.ns, "addr", "add", f"{host.addr}/24", "dev", "eth0")
            ip("-n", host.ns, "link", "set", "eth0", "up")
            self.hosts[role] = host
        # The test controller (this process, root namespace) on the switch too.
        self.controller_addr = f"{base}.{CONTROLLER}"
        ip("link", "add", self.ctl_link, "type", "veth", "peer", "name", "p-ctl", "netns", sw)
        ip("-n", sw, "link", "set", "p-ctl", "master", "br0")
        ip("-n", sw, "link", "set", "p-ctl", "up")
        ip("addr", "add", f"{self.controller_addr}/24", "dev", self.ctl_link)
        ip("link", "set", self.ctl_link, "up")
        self.netem = netem_available(sw, "p-ctl")

    def destroy(self) -> None:
        """Kill every process of the lab and delete its namespaces; safe to call again."""
        if self.destroyed or not self.created or os.getpid() != self.owner:
            return
        self.destroyed = True
        for p in self.procs:
            if p.poll() is None:
                kill_pids([p.pid])
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass
        ip("link", "del", self.ctl_link, check=False)
        for host in self.hosts.values():
            _delete_netns(host.ns)
        for name in netns_names():  # also a host whose creation was cut short
            if name.startswith(f"{self.tag}-"):
                _delete_netns(name)
        _LIVE_TAGS.discard(self.tag)
        self.uninstall_signal_handlers()

    def install_signal_handlers(self) -> None:
        """SIGTERM or SIGHUP (a CI job cancelled) destroy the lab, then act as before."""
        for signum in (signal.SIGTERM, signal.SIGHUP):
            self._prev_handlers[signum] = signal.signal(signum, self._on_signal)

    def uninstall_signal_handlers(self) -> None:
        while self._prev_handlers:
            signum, prev = self._prev_handlers.popitem()
            try:
                signal.signal(signum, prev)
            except (ValueError, TypeError):  # not the main thread, or no Python handler
                pass

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        prev = self._prev_handlers.get(signum, signal.SIG_DFL)
        self.destroy()  # only in the process that built the lab
        if callable(prev):
            prev(signum, frame)
        else:
            signal.signal(signum, signal.SIG_DFL if prev is None else prev)
            os.kill(os.getpid(), signum)

    # ------------------------------------------------------------------ links
    def addr(self, role: str) -> str:
        return self.hosts[role].addr

    def cut(self, role: str) -> float:
        """Unplug a host at the switch; returns the time (time.time()) the link was down."""
        ip("-n", self.switch, "link", "set", self.hosts[role].port, "down")
        return time.time()

    def restore(self, role: str) -> float:
        ip("-n", self.switch, "link", "set", self.hosts[role].port, "up")
        return time.time()

    def link_up(self, role: str) -> bool:
        r = ip("-n", self.switch, "-o", "link", "show", self.hosts[role].port, check=False)
        return ",UP" in r.stdout or "<UP" in r.stdout

    def restore_all(self) -> None:
        for role in self.hosts:
            if not self.link_up(role):
                self.restore(role)
        self.unshape()

    def shape(self, delay: float, loss: float) -> None:
        """netem on the broker's link, both ways: ``delay`` seconds and ``loss`` (0..1) each way."""
        if not self.netem:
            raise LabError("no netem here: use the relay")
        host = self.hosts["broker"]
        for ns, dev in ((self.switch, host.port), (host.ns, "eth0")):
            subprocess.run(["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "netem", "delay",
                            f"{delay * 1000:g}ms", "loss", f"{loss * 100:g}%"], check=True,
                           capture_output=True, timeout=15)
        self.shaped = {"delay": delay, "loss": loss}

    def netem_drops(self) -> int:
        """Packets netem dropped on the broker's link so far (both directions)."""
        host = self.hosts["broker"]
        dropped = 0
        for ns, dev in ((self.switch, host.port), (host.ns, "eth0")):
            r = subprocess.run(["tc", "-s", "-n", ns, "qdisc", "show", "dev", dev],
                               capture_output=True, text=True, timeout=15)
            dropped += sum(int(n) for n in re.findall(r"dropped (\d+)", r.stdout))
        return dropped

    def unshape(self) -> None:
        if not self.shaped:
            return
        host = self.hosts["broker"]
        for ns, dev in ((self.switch, host.port), (host.ns, "eth0")):
            subprocess.run(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"],
                           capture_output=True, timeout=15)
        self.shaped = None

    # ------------------------------------------------------------------ processes
    def argv(self, role: str, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.hosts[role].ns, *cmd]

    def spawn(self, role: str, cmd: list[str], log: Path, env: dict[str, str],
              cwd: Union[str, Path, None] = None) -> subprocess.Popen:
        """Start ``cmd`` on a host (``ip netns exec`` execs it: the pid is the command's)."""
        with open(log, "ab") as fh:
            popen = subprocess.Popen(self.argv(role, *cmd), stdout=fh, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, cwd=cwd)
        self.procs.append(popen)
        return popen

    def kill_host_processes(self) -> list[int]:
        """Kill whatever still runs on the hosts (by pid); the lab's own processes only."""
        killed = []
        for host in self.hosts.values():
            pids = [p for p in netns_pids(host.ns) if p != os.getpid()]
            kill_pids(pids)
            killed += pids
        return killed



@contextlib.contextmanager
def lab_session() -> Iterator[Lab]:
    """A lab for a whole test session, destroyed however the session ends (the finalizer,
    atexit, SIGTERM/SIGHUP; after a SIGKILL, the next run's :func:`sweep_stale`)."""
    lab = Lab().create()
    lab.install_signal_handlers()
    try:
        yield lab
    finally:
        lab.destroy()


def main(argv: list[str]) -> int:
    """``hold``: build a lab, print its tag, wait to be killed (the cleanup tests signal or
    kill it); ``hold --crash``: build one outside any ``with`` and die of an exception
    (atexit must clean up); ``sweep``: delete stale labs; ``list``: list every lab."""
    cmd = argv[0] if argv else "list"
    if cmd == "hold" and "--crash" in argv:
        lab = Lab().create()
        print(lab.tag, flush=True)
        raise RuntimeError(f"crashing on purpose with lab {lab.tag} up")
    if cmd == "hold":
        with lab_session() as lab:
            print(lab.tag, flush=True)
            while True:
                time.sleep(1)
    if cmd == "sweep":
        for name in sweep_stale():
            print("removed", name)
        return 0
    for name in lab_namespaces():
        print(name)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
