"""ADS scale benchmark: N concurrent ADS clients against `l7fp serve`, 1,000 routes per node.

Run: .venv/bin/python -m benchmarks.ads_scale --clients 10,100,1000 [--delta] [--fastpath off]

For each N: a fresh config directory (one listener, 10 clusters, one EDS
cluster, one RouteConfiguration with --routes routes), `l7fp serve` as a
child process, N clients in this process, each on its own TCP connection
(as N Envoys would be), subscribed to CDS, EDS, LDS and RDS and ACKing every
response. Then --changes times: rewrite the routes file and time, per client,
from the write to the arrival of the new RDS version (the client ACKs at
once). Prints p50/p99/max convergence, the median spread from the first to
the last client receiving a change (the distribution part, without the
parsing of the change), the server's CPU seconds per change (user+sys, which
a busy machine does not inflate like wall time) and its RSS (VmHWM: the peak).

The clients never decode resources (a top-level field scan reads type_url,
version and nonce only), so the client process measures the server, not
betterproto2. Not a test: numbers go to docs/control-plane.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpclib
import grpclib.const
import grpclib.exceptions
import yaml
from envoy_data_plane.envoy.config.core.v3 import Node
from envoy_data_plane.envoy.service.discovery.v3 import DeltaDiscoveryRequest, DiscoveryRequest
from grpclib.client import Channel
from grpclib.encoding.proto import ProtoCodec

from xds_server.ports import free_ports
from xds_server.protocol.requests import fields

REPO = Path(__file__).resolve().parent.parent
LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"
RDS = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
SUBS = [(CDS, []), (EDS, ["eds0"]), (LDS, []), (RDS, ["rc"])]
BASE = "/envoy.service.discovery.v3.AggregatedDiscoveryService/"


# -- a decode-nothing client ------------------------------------------------------
@dataclass
class Raw:
    type_url: str = ""
    version: str = ""
    nonce: str = ""


def scan(data: bytes) -> Raw:
    """Top-level fields of a (Delta)DiscoveryResponse: 1 version, 4 type_url, 5 nonce."""
    out = Raw()
    for num, value in fields(data):
        if isinstance(value, bytes) and num in (1, 4, 5):
            s = value.decode()
            if num == 1:
                out.version = s
            elif num == 4:
                out.type_url = s
            else:
                out.nonce = s
    return out


class RawCodec(ProtoCodec):
    def decode(self, data: bytes, message_type: Any) -> Any:
        return scan(data)


@dataclass
class Client:
    idx: int
    delta: bool
    arrivals: list[tuple[float, str, str]] = field(default_factory=list)  # (t, type, version)
    synced: asyncio.Event = field(default_factory=asyncio.Event)
    errors: list[str] = field(default_factory=list)

    async def run(self, port: int, stop: asyncio.Event) -> None:
        """Connect (retrying: 1,000 simultaneous connects can overflow the accept queue)."""
        for attempt in range(5):
            try:
                await self._run(port, stop)
                return
            except (OSError, grpclib.exceptions.StreamTerminatedError, grpclib.GRPCError) as exc:
                self.errors.append(repr(exc))
                if self.synced.is_set() or stop.is_set():
                    return
                await asyncio.sleep(0.5 * (attempt + 1))

    async def _run(self, port: int, stop: asyncio.Event) -> None:
        ch = Channel("127.0.0.1", port, codec=RawCodec())
        method = "DeltaAggregatedResources" if self.delta else "StreamAggregatedResources"
        req_t = DeltaDiscoveryRequest if self.delta else DiscoveryRequest
        try:
            async with ch.request(BASE + method, grpclib.const.Cardinality.STREAM_STREAM, req_t, Raw) as st:
                node = Node(id=f"bench-{self.idx}", cluster="bench")
                for n, (t, names) in enumerate(SUBS):
                    await st.send_message(self._req(t, names, node if n == 0 else None))
                seen: set[str] = set()
                reader = asyncio.ensure_future(self._loop(st, seen))
                await stop.wait()
                reader.cancel()
        finally:
            ch.close()

    def _req(self, t: str, names: list[str], node: Any = None, nonce: str = "", version: str = "") -> Any:
        if self.delta:
            return DeltaDiscoveryRequest(node=node, type_url=t, resource_names_subscribe=names,
                                         response_nonce=nonce)
        return DiscoveryRequest(node=node, type_url=t, resource_names=names, response_nonce=nonce,
                                version_info=version)

    async def _loop(self, st: Any, seen: set[str]) -> None:
        names = dict(SUBS)
        while True:
            r = await st.recv_message()
            if r is None:
                return
            self.arrivals.append((time.monotonic(), r.type_url, r.version))
            await st.send_message(self._req(r.type_url, [] if self.delta else names[r.type_url],
                                            nonce=r.nonce, version=r.version))
            seen.add(r.type_url)
            if len(seen) == len(SUBS):
                self.synced.set()


# -- config and server ----------------------------------------------------------------
def write_config(d: Path, routes: int, gen: int) -> None:
    clusters = [{"@type": CDS, "name": f"c{i}", "type": "STATIC", "connect_timeout": "1s",
                 "load_assignment": {"cluster_name": f"c{i}", "endpoints": [{"lb_endpoints": [{"endpoint": {
                     "address": {"socket_address": {"address": "127.0.0.1", "port_value": 18100 + i}}}}]}]}}
                for i in range(10)]
    clusters.append({"@type": CDS, "name": "eds0", "type": "EDS", "connect_timeout": "1s",
                     "eds_cluster_config": {"eds_config": {"ads": {}, "resource_api_version": "V3"}}})
    cla = {"@type": EDS, "cluster_name": "eds0", "endpoints": [{"lb_endpoints": [{"endpoint": {
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 18200}}}}]}]}
    hcm = {"@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
                    "HttpConnectionManager", "stat_prefix": "b",
           "rds": {"route_config_name": "rc", "config_source": {"ads": {}, "resource_api_version": "V3"}},
           "http_filters": [{"name": "router", "typed_config": {
               "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}
    lst = {"@type": LDS, "name": "l", "address": {"socket_address": {"address": "127.0.0.1", "port_value": 18000}},
           "filter_chains": [{"filters": [{"name": "hcm", "typed_config": hcm}]}]}
    _write(d / "base.yaml", {"resources": [*clusters, cla, lst]})
    rts = [{"name": f"r{i}", "match": {"prefix": f"/svc{i}/g{gen}"},
            "route": {"cluster": f"c{(i + gen) % 10}", "timeout": "3s"}} for i in range(routes)]
    _write(d / "routes.yaml", {"resources": [{"@type": RDS, "name": "rc", "virtual_hosts": [
        {"name": "all", "domains": ["*"], "routes": rts}]}]})


FORMAT = "yaml"


def _write(path: Path, doc: Any) -> None:
    if FORMAT == "json":
        path = path.with_suffix(".json")
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(json.dumps(doc) if FORMAT == "json" else yaml.safe_dump(doc, sort_keys=False))
    os.replace(tmp, path)


def cpu_s(pid: int) -> float:
    """user + system CPU seconds of a process (load-independent, unlike wall time)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            out[k] = int(v.split()[0])
    return out


async def wait_http(url: str, timeout: float = 120) -> None:
    import aiohttp

    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            try:
                async with s.get(url) as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} not ready")


async def run_one(n: int, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="l7fp-adsbench-") as tmp:
        d = Path(tmp)
        write_config(d, args.routes, 0)
        xds, admin = free_ports(2)
        log = open(d / "serve.log", "wb")
        proc = subprocess.Popen(
            [sys.executable, *(["-m", "cProfile", "-o", args.profile] if args.profile else []),
             "-m", "xds_server", "--log-level", "warning", "serve", "--config", str(d),
             "--xds-address", "127.0.0.1", "--xds-port", str(xds), "--admin-port", str(admin),
             "--fastpath", args.fastpath], stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        stop = asyncio.Event()
        tasks: list[asyncio.Task[None]] = []
        try:
            await wait_http(f"http://127.0.0.1:{admin}/healthz/ready")
            clients = [Client(i, args.delta) for i in range(n)]
            t0 = time.monotonic()
            for c in clients:
                tasks.append(asyncio.create_task(c.run(xds, stop)))
                if len(tasks) % 50 == 0:
                    await asyncio.sleep(0)
            await asyncio.wait_for(asyncio.gather(*(c.synced.wait() for c in clients)), args.timeout)
            initial = time.monotonic() - t0
            await asyncio.sleep(1)
            lat: list[float] = []
            spread: list[float] = []
            cpu0 = cpu_s(proc.pid)
            for gen in range(1, args.changes + 1):
                marks = [len(c.arrivals) for c in clients]
                t0 = time.monotonic()
                write_config(d, args.routes, gen)
                per = await converge(clients, marks, t0, args.timeout)
                lat.extend(per)
                spread.append(max(per) - min(per))
                await asyncio.sleep(0.5)
            mem = rss_kib(proc.pid)
            cpu_change = (cpu_s(proc.pid) - cpu0) / args.changes
            load = os.getloadavg()[0]
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
    lat.sort()
    return {
        "clients": n, "routes": args.routes, "format": args.format, "delta": args.delta, "fastpath": args.fastpath,
        "changes": args.changes, "initial_sync_s": round(initial, 3),
        "reconnects": sum(len(c.errors) for c in clients),
        "p50_s": round(statistics.median(lat), 3), "p99_s": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))], 3),
        "max_s": round(lat[-1], 3), "first_to_last_s": round(statistics.median(spread), 3),
        "server_cpu_per_change_s": round(cpu_change, 3), "loadavg": round(load, 1), "rss_mib": round(mem["VmRSS"] / 1024, 1), "peak_rss_mib": round(mem["VmHWM"] / 1024, 1),
    }


async def converge(clients: list[Client], marks: list[int], t0: float, timeout: float) -> list[float]:
    """Per client: seconds from t0 to its first new RDS version after marks."""
    deadline = t0 + timeout
    while True:
        out = []
        for c, m in zip(clients, marks, strict=True):
            old = next((v for _, t, v in reversed(c.arrivals[:m]) if t == RDS), None)
            hit = next((ts for ts, t, v in c.arrivals[m:] if t == RDS and v != old), None)
            if hit is None:
                break
            out.append(hit - t0)
        else:
            return out
        if time.monotonic() > deadline:
            raise RuntimeError(f"not converged after {timeout}s")
        await asyncio.sleep(0.02)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", default="10,100,1000", help="comma-separated client counts")
    p.add_argument("--routes", type=int, default=1000, help="routes per node (default 1000)")
    p.add_argument("--changes", type=int, default=5, help="config changes timed per run (default 5)")
    p.add_argument("--delta", action="store_true", help="clients use Delta xDS")
    p.add_argument("--fastpath", default="off", choices=["on", "off", "auto"], help="server --fastpath")
    p.add_argument("--timeout", type=float, default=120, help="give up after this many seconds")
    p.add_argument("--json", help="also write results to this file")
    p.add_argument("--format", choices=["yaml", "json"], default="yaml",
                   help="config file format (YAML parsing is ~0.5 s of a 1,000-route change)")
    p.add_argument("--profile", help="run the server under cProfile, stats to this file")
    args = p.parse_args()
    global FORMAT
    FORMAT = args.format
    results = []
    for n in (int(x) for x in args.clients.split(",")):
        r = asyncio.run(run_one(n, args))
        print(json.dumps(r), flush=True)
        results.append(r)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
