"""Hosts of their own for the brokers: one network namespace each, on a bridge in the
root namespace, where the test process and the project's child processes run.

    root namespace: bridge tkc<pid>br 10.77.0.1/24
      ├─ veth tkc<pid>h1 ── [netns topology-cluster-<pid>-1] eth0 10.77.0.11
      ├─ veth tkc<pid>h2 ── [netns topology-cluster-<pid>-2] eth0 10.77.0.12
      └─ veth tkc<pid>h3 ── [netns topology-cluster-<pid>-3] eth0 10.77.0.13

``cut(n)`` takes host n's root-side veth down: its packets are dropped both ways (to
the other brokers and to every client), with no reset, as when a machine's link or
switch port fails; ``restore(n)`` brings it back. Everything is named after this
process's pid, so ``remove_stale()`` can tell the leftovers of a run that was killed
(its pid gone) from those of a run still going.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
from dataclasses import dataclass, field

NETNS_PREFIX = "topology-cluster-"
LINK_PREFIX = "tkc"  # + pid + "br" / "h<n>": at most 3 + 7 + 2 = 12 of the 15 characters a name may have


class NetworkError(RuntimeError):
    pass


def ip(*args: str, check: bool = True) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
                          check=False)
    if check and done.returncode != 0:
        raise NetworkError(f"ip {' '.join(args)}: exit {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def why_unavailable() -> str | None:
    """None when this process may make namespaces, veths and a bridge; else why not."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth pairs and a bridge)"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip`"
    name = f"{NETNS_PREFIX}probe-{os.getpid()}"
    try:
        ip("netns", "add", name)
    except (NetworkError, OSError, subprocess.SubprocessError) as exc:
        return f"`ip netns add` does not work here: {exc}"
    ip("netns", "del", name, check=False)
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> list[str]:
    """Remove the namespaces and links of earlier runs whose test process is gone (a run
    killed before its teardown), and end the brokers still running in them. Returns what
    was removed."""
    removed = []
    for line in ip("netns", "list").splitlines():
        name = line.split()[0] if line.split() else ""
        match = re.fullmatch(rf"{NETNS_PREFIX}(\d+)-\d+", name)
        if match is None or _pid_alive(int(match.group(1))):
            continue
        for pid in ip("netns", "pids", name, check=False).split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        ip("netns", "del", name, check=False)
        removed.append(name)
    for line in ip("-o", "link", "show").splitlines():
        match = re.match(rf"\d+: ({LINK_PREFIX}(\d+)(?:br|h\d))[@:]", line)
        if match is not None and not _pid_alive(int(match.group(2))):
            ip("link", "del", match.group(1), check=False)
            removed.append(match.group(1))
    return removed


@dataclass
class HostNetwork:
    """``count`` hosts 10.77.0.11, .12, ... (``subnet`` + 10 + n) in namespaces of their own."""

    count: int = 3
    subnet: str = "10.77.0"
    tag: str = field(default_factory=lambda: str(os.getpid()))
    created: bool = False

    @property
    def bridge(self) -> str:
        return f"{LINK_PREFIX}{self.tag}br"

    def namespace(self, n: int) -> str:
        return f"{NETNS_PREFIX}{self.tag}-{n}"

    def veth(self, n: int) -> str:
        return f"{LINK_PREFIX}{self.tag}h{n}"

    def address(self, n: int) -> str:
        return f"{self.subnet}.{10 + n}"

    def exec_prefix(self, n: int) -> tuple[str, ...]:
        """What runs a command on host n (``ip netns exec`` execs it: the pid is the command's)."""
        return ("ip", "netns", "exec", self.namespace(n))

    def create(self) -> HostNetwork:
        taken = ip("-o", "-4", "addr", "show", "to", f"{self.subnet}.0/24").strip()
        if taken:
            raise NetworkError(f"{self.subnet}.0/24 is in use here already (a run of another process?):\n{taken}")
        self.created = True  # from here on, destroy() has something to do
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        for n in range(1, self.count + 1):
            namespace = self.namespace(n)
            ip("netns", "add", namespace)
            ip("link", "add", self.veth(n), "type", "veth", "peer", "name", "eth0", "netns", namespace)
            ip("link", "set", self.veth(n), "master", self.bridge)
            ip("link", "set", self.veth(n), "up")
            ip("-n", namespace, "addr", "add", f"{self.address(n)}/24", "dev", "eth0")
            ip("-n", namespace, "link", "set", "eth0", "up")
            ip("-n", namespace, "link", "set", "lo", "up")
        return self

    def cut(self, n: int) -> None:
        ip("link", "set", self.veth(n), "down")

    def restore(self, n: int) -> None:
        ip("link", "set", self.veth(n), "up")

    def destroy(self) -> None:
        """Remove the namespaces (their eth0 ends go with them, and so the veths) and
        the bridge; whatever of it exists. Processes still in a namespace are killed."""
        if not self.created:
            return
        for n in range(1, self.count + 1):
            for pid in ip("netns", "pids", self.namespace(n), check=False).split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            ip("netns", "del", self.namespace(n), check=False)
            ip("link", "del", self.veth(n), check=False)
        ip("link", "del", self.bridge, check=False)
        self.created = False
