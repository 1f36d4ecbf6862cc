"""Pod networking: one Linux network namespace per pod, joined to the host by a veth pair.

Pod IPs must be real, non-loopback addresses (EndpointSlice validation rejects 127.0.0.0/8), and
traffic may only go to loopback or to addresses inside namespaces we create. For a pod with IP P:

    host ns:  veth `dsv4h<id>` with the gateway address G/32 (the same G on every host-side veth),
              route  P/32 dev dsv4h<id> src G
    pod ns:   `lo` up; veth `eth0` with P/32, route G dev eth0 scope link, default via G

So the host reaches P directly (source address G), and the pod reaches the host's sockets at G
(e.g. a service bound to 0.0.0.0 on the host). No forwarding, NAT or proxy ARP is switched on, so
pod-to-pod traffic through the host is not routed. Needs root (CAP_NET_ADMIN + CAP_SYS_ADMIN).

While a cluster is up the host also has `unreachable 10.244.0.0/16` (the whole pod range, tagged
`proto 244` so a route someone added by hand is never removed): the per-pod /32 routes win by longest
prefix, and a packet for a stale or unknown pod IP fails on the host with EHOSTUNREACH instead of
leaving through the default route.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import subprocess
from dataclasses import dataclass

POD_RANGE = "10.244.0.0/16"  # every pod IP of every local cluster; node podCIDRs are /24s inside it
GATEWAY = "10.244.0.1"
NETNS_DIR = "/run/netns"
RANGE_ROUTE_PROTO = "244"  # marks the pod-range route as installed by us
UNROUTABLE_TYPES = ("unreachable", "blackhole", "prohibit")


class NetError(RuntimeError):
    """An `ip` command failed; the message carries the command and its error."""


@dataclass(frozen=True)
class PodNet:
    netns: str
    host_veth: str
    ip: str
    gateway: str = GATEWAY

    @property
    def netns_path(self) -> str:
        return f"{NETNS_DIR}/{self.netns}"

    def to_dict(self) -> dict:
        return {"netns": self.netns, "host_veth": self.host_veth, "ip": self.ip, "gateway": self.gateway}


def _ip(*args: str, check: bool = True, netns: str | None = None) -> subprocess.CompletedProcess:
    exe = shutil.which("ip") or "/usr/sbin/ip"
    proc = subprocess.run([exe, *(("-n", netns) if netns else ()), *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise NetError(f"ip {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


def available() -> str | None:
    """None when pod networking can be set up here, else the reason it cannot."""
    if os.geteuid() != 0:
        return "pod networking needs root (network namespaces and veth pairs)"
    if shutil.which("ip") is None and not os.path.exists("/usr/sbin/ip"):
        return "the `ip` command (iproute2) is not installed"
    if shutil.which("nsenter") is None:
        return "the `nsenter` command (util-linux) is not installed"
    return None


def names_for(pod_uid: str) -> tuple[str, str]:
    """(netns name, host veth name) for a pod; interface names must stay within 15 characters."""
    short = pod_uid.replace("-", "")[:8]
    return f"dsv4p-{short}", f"dsv4h{short}"


def create(pod_uid: str, ip: str, gateway: str = GATEWAY) -> PodNet:
    """Create the namespace, the veth pair, the addresses and the routes; idempotent per pod."""
    ipaddress.IPv4Address(ip)  # raises ValueError on a bad address
    netns, veth = names_for(pod_uid)
    net = PodNet(netns=netns, host_veth=veth, ip=ip, gateway=gateway)
    destroy(net)
    try:
        _ip("netns", "add", netns)
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
        _ip("-n", netns, "link", "set", "lo", "up")
        _ip("-n", netns, "addr", "add", f"{ip}/32", "dev", "eth0")
        _ip("-n", netns, "link", "set", "eth0", "up")
        _ip("addr", "add", f"{gateway}/32", "dev", veth)
        _ip("link", "set", veth, "up")
        _ip("-n", netns, "route", "add", gateway, "dev", "eth0", "scope", "link")
        _ip("-n", netns, "route", "add", "default", "via", gateway, "dev", "eth0")
        _ip("route", "replace", f"{ip}/32", "dev", veth, "src", gateway)
    except NetError:
        destroy(net)
        raise
    return net


def destroy(net: PodNet) -> None:
    """Remove the route, the veth pair (both ends) and the namespace; missing pieces are fine."""
    _ip("route", "del", f"{net.ip}/32", "dev", net.host_veth, check=False)
    _ip("link", "del", net.host_veth, check=False)
    _ip("netns", "del", net.netns, check=False)


def exists(net: PodNet) -> bool:
    return os.path.exists(net.netns_path)


def enter_argv(net: PodNet) -> list[str]:
    """Prefix that runs a command inside the pod's namespace (nsenter execs, so the PID is the command's)."""
    return ["nsenter", f"--net={net.netns_path}", "--"]


def from_dict(d: dict) -> PodNet:
    return PodNet(**d)


def leftover_namespaces() -> list[str]:
    with contextlib.suppress(FileNotFoundError):
        return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith("dsv4p-"))
    return []


# ---------------------------------------------------------------------------------------------------------
# the pod-range route: no packet for a pod IP leaves the host


@dataclass(frozen=True)
class RangeRoute:
    type: str       # "unicast", "unreachable", "blackhole", ...
    protocol: str   # "244" when we installed it; "boot", "static", ... otherwise

    @property
    def ours(self) -> bool:
        return self.protocol == RANGE_ROUTE_PROTO

    @property
    def unroutable(self) -> bool:
        return self.type in UNROUTABLE_TYPES


def range_route(netns: str | None = None) -> RangeRoute | None:
    """The host's route for exactly POD_RANGE, or None."""
    out = _ip("-j", "route", "show", "exact", POD_RANGE, netns=netns).stdout.strip()
    routes = json.loads(out) if out else []
    if not routes:
        return None
    r = routes[0]
    return RangeRoute(type=r.get("type", "unicast"), protocol=str(r.get("protocol", "boot")))


def ensure_range_route(netns: str | None = None) -> RangeRoute:
    """Install `unreachable POD_RANGE proto 244` unless an unroutable route for the range is already there.
    A route that would forward the range somewhere (e.g. via a gateway) is an error: pod traffic would leave."""
    r = range_route(netns)
    if r is None:
        _ip("route", "add", "unreachable", POD_RANGE, "proto", RANGE_ROUTE_PROTO, netns=netns)
        r = range_route(netns)
        assert r is not None
    if not r.unroutable:
        raise NetError(f"the host routes the pod range {POD_RANGE} ({r.type} route): pod traffic would leave this "
                       f"machine; remove that route (`ip route del {POD_RANGE}`) first")
    return r


def remove_range_route(netns: str | None = None) -> bool:
    """Remove the pod-range route if we installed it (a hand-added one stays); True when removed."""
    r = range_route(netns)
    if r is None or not r.ours:
        return False
    _ip("route", "del", r.type, POD_RANGE, "proto", RANGE_ROUTE_PROTO, netns=netns)
    return True


def route_get(ip: str, netns: str | None = None) -> str:
    """`ip route get IP` as the kernel would route a packet now (the error text when it is unroutable)."""
    proc = _ip("route", "get", ip, check=False, netns=netns)
    return (proc.stdout or proc.stderr).strip()
