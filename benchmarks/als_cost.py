"""Cost of the outlier access log (ALS) on Envoy's path: wrk through one Envoy, with and without.

Owner: NAME=odown. `python -m benchmarks.als_cost [--seconds 3] [--rounds 2]`:
a leaf Envoy answering 200 (direct_response), a "sidecar" Envoy routing to it
with or without the access logger that fastpath.residual_outlier adds for
clusters the kernel owns (http_grpc on the router's upstream_log, batched:
--buffer-bytes, --flush), and fastpath.als.AccessLogService receiving in this
process (as `l7fp serve` does). `--hcm` adds a third sidecar with the same
logger on the HCM's access_log (the placement before the router's, for a
side-by-side comparison). `--timeout-log` adds a sidecar with the router's
logger only, without the HCM's route-timeout logger (UT-filtered,
residual_outlier.timeout_logger) that the residual and the `als` sidecar
have: its cost side by side. wrk at 1 and 16 connections, ABBA rounds (the
variants' order reversed every other round, `round_order`); prints
one JSON line per measurement (p50 in µs, req/s, the entries the service got
per request served, the receiver's CPU per entry, the sidecar Envoy's CPU
per request), a summary (medians of p50, req/s, Envoy CPU per request),
the medians of each round's ratio to that round's run without the logger,
and the best round of each (BEST).

`sidecar_bootstrap` is also used by tests/xds/test_als.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import threading
import time
from typing import Any

from fastpath import residual_outlier as ro
from fastpath.als import AccessLogService
from xds_server.envoyproc import Envoy
from xds_server.ports import pick_free_port

HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
H2 = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
    "explicit_http_config": {"http2_protocol_options": {}}}}


def _static(name: str, port: int) -> dict[str, Any]:
    return {"name": name, "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1",
                                                             "port_value": port}}}}]}]}}


def als_config(buffer_bytes: int | None = None, flush: str | None = None) -> dict[str, Any]:
    """residual_outlier.als_logger() (a bootstrap takes its proto JSON too),
    with other batching than the residual's to compare: `buffer_bytes`, `flush`."""
    log = ro.als_logger()
    cfg = log["typedConfig"]["commonConfig"]
    if buffer_bytes is not None:
        cfg["bufferSizeBytes"] = buffer_bytes
    if flush is not None:
        cfg["bufferFlushInterval"] = flush
    return log


def sidecar_bootstrap(als_port: int, app_port: int, lport: int, admin: int,
                      als: bool = True, hcm_log: bool = False, timeout_log: bool = True,
                      **batching: Any) -> dict[str, Any]:
    """One Envoy: listener `lport` -> cluster `c` (127.0.0.1:app_port); `/none`
    -> cluster `empty` (no host: Envoy's own 503); with `als` the router logs
    every upstream attempt to the ALS at 127.0.0.1:als_port (cluster ALS_CLUSTER)
    and, with `timeout_log`, the HCM the requests flagged UT, as the residual
    has them; with `hcm_log` the HCM's access_log logs every request instead."""
    routes = [{"match": {"prefix": "/none"}, "route": {"cluster": "empty"}},
              {"match": {"prefix": "/"}, "route": {"cluster": "c"}}]
    hcm: dict[str, Any] = {
        "@type": HCM, "stat_prefix": "l",
        "route_config": {"virtual_hosts": [{"name": "a", "domains": ["*"], "routes": routes}]},
        "http_filters": [{"name": "router", "typed_config": {"@type": ROUTER}}]}
    if als and hcm_log:  # the earlier placement: one entry per downstream request
        hcm["access_log"] = [als_config(**batching)]
    elif als:  # on the router, as the residual has it (upstream_log: one entry per attempt)
        hcm["http_filters"][0]["typed_config"]["upstream_log"] = [als_config(**batching)]
        if timeout_log:  # and the route timeouts (fastpath.als.RouteTimeouts)
            hcm["access_log"] = [ro.timeout_logger(als_config(**batching))]
    empty = {"name": "empty", "type": "STATIC", "connect_timeout": "1s",
             "load_assignment": {"cluster_name": "empty", "endpoints": []}}
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "node": {"id": "sidecar~127.0.0.1~als-0.t~t.svc.cluster.local", "cluster": "t"},
        "static_resources": {
            "clusters": [{**_static(ro.ALS_CLUSTER, als_port), "typed_extension_protocol_options": H2},
                         _static("c", app_port), empty],
            "listeners": [{"name": "l", "address": {"socket_address": {"address": "127.0.0.1",
                                                                      "port_value": lport}},
                           "filter_chains": [{"filters": [{"name": "hcm",
                                                           "typed_config": hcm}]}]}]}}


class Receiver:
    """AccessLogService on its own loop in a thread; counts observations."""

    def __init__(self) -> None:
        self.port = pick_free_port()
        self.count = 0
        self.loop = asyncio.new_event_loop()
        self.svc = AccessLogService(self._sink)
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _sink(self, _node: str, obs: list[Any]) -> None:
        self.count += len(obs)

    def _run(self) -> None:
        from grpclib.server import Server

        asyncio.set_event_loop(self.loop)
        self.server = Server([self.svc])
        self.loop.run_until_complete(self.server.start("127.0.0.1", self.port))
        self._ready.set()
        self.loop.run_forever()

    def start(self) -> Receiver:
        self.thread.start()
        self._ready.wait(10)
        return self

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def _wait_http(port: int, path: str = "/", timeout: float = 20) -> None:
    import urllib.request

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=1).read()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing answers on 127.0.0.1:{port}")


def _cpu_s() -> float:
    """CPU seconds of this process (the receiver: wrk and the Envoys are children
    not waited for during a run, so not in RUSAGE_SELF)."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _proc_cpu_s(envoy: Envoy) -> float:
    """CPU seconds (user + system) of `envoy`'s process so far: its cost per
    request moves far less with the machine's load than its latency does."""
    assert envoy.proc is not None
    with open(f"/proc/{envoy.proc.pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _run(rx: Receiver, sidecar: Envoy, port: int, conns: int, seconds: float) -> dict[str, Any]:
    """One wrk run through `sidecar`: latency, req/s, the entries the receiver
    got per request, its CPU per entry and the sidecar's CPU per request."""
    from benchmarks.load import run_wrk

    before, cpu0, env0 = rx.count, _cpu_s(), _proc_cpu_s(sidecar)
    r = run_wrk(f"http://127.0.0.1:{port}/", conns, seconds)
    entries, cpu, env = rx.count - before, _cpu_s() - cpu0, _proc_cpu_s(sidecar) - env0
    return {"p50_us": r.p50_us, "p99_us": r.p99_us, "rps": round(r.rps), "errors": r.errors,
            "als_entries_per_request": round(entries / r.requests, 3),
            "receiver_cpu_us_per_entry": round(cpu * 1e6 / entries, 1) if entries else None,
            "envoy_cpu_us_per_request": round(env * 1e6 / r.requests, 1)}


SUMMED = ("p50_us", "rps", "envoy_cpu_us_per_request")


def round_order(variants: list[str], n: int) -> list[str]:
    """The variants in round `n`'s order: as given, then reversed (ABBA), so a
    drift of the machine within a round (the one that goes first gets a
    different share of the CPU) does not favour the same variant every round."""
    return list(variants) if n % 2 == 0 else list(reversed(variants))


def ratios(got: dict[tuple[str, int], list[dict[str, Any]]]) -> dict[str, dict[str, float | None]]:
    """Per variant and connection count, the medians over rounds of p50,
    req/s and Envoy's CPU per request divided by the same round's no-logger
    run (side by side: less exposed to the machine's load changing between
    rounds than the medians)."""
    out = {}
    for (v, c), rs in got.items():
        base = got.get(("no_als", c), [])
        if v == "no_als" or len(base) != len(rs):
            continue
        pairs = list(zip(rs, base, strict=True))
        out[f"{v}_c{c}"] = {k: _median_ratio([(r[k], b[k]) for r, b in pairs]) for k in SUMMED}
    return out


def _median_ratio(pairs: list[tuple[float, float]]) -> float | None:
    """Median of a / b over the pairs with b (None: none has)."""
    q = [a / b for a, b in pairs if b]
    return round(statistics.median(q), 2) if q else None


def best(got: dict[tuple[str, int], list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """Per variant and connection count, the best round: lowest p50 and
    Envoy CPU per request, highest req/s (the rounds least disturbed by
    other load on the machine)."""
    return {f"{v}_c{c}": {"p50_us": min(x["p50_us"] for x in rs), "rps": max(x["rps"] for x in rs),
                          "envoy_cpu_us_per_request": min(x["envoy_cpu_us_per_request"] for x in rs)}
            for (v, c), rs in got.items()}


def main(argv: list[str] | None = None) -> int:
    from mesh.envoyconf import direct_response_bootstrap

    p = argparse.ArgumentParser(prog="python -m benchmarks.als_cost", description=__doc__)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--buffer-bytes", type=int, default=None,
                   help=f"ALS buffer_size_bytes (default: the residual's, {ro.ALS_BUFFER_BYTES})")
    p.add_argument("--flush", default=None,
                   help=f"ALS buffer_flush_interval (default: the residual's, {ro.ALS_FLUSH})")
    p.add_argument("--hcm", action="store_true",
                   help="also measure the logger on the HCM's access_log (side by side)")
    p.add_argument("--timeout-log", action="store_true",
                   help="also measure the router's logger without the HCM's route-timeout one")
    args = p.parse_args(argv)
    variants = ["no_als", "als", *(["als_hcm"] if args.hcm else []),
                *(["als_router_only"] if args.timeout_log else [])]
    rx = Receiver().start()
    app_port = pick_free_port()
    leaf_boot = direct_response_bootstrap("leaf", (app_port,))
    leaf_boot["admin"] = {"address": {"socket_address": {"address": "127.0.0.1",
                                                         "port_value": pick_free_port()}}}
    envoys = [Envoy(leaf_boot, leaf_boot["admin"]["address"]["socket_address"]["port_value"]).start()]
    sidecars: dict[str, tuple[Envoy, int]] = {}
    try:
        for v in variants:
            lport, admin = pick_free_port(), pick_free_port()
            envoys.append(Envoy(sidecar_bootstrap(rx.port, app_port, lport, admin, als=v != "no_als",
                                                  hcm_log=v == "als_hcm",
                                                  timeout_log=v != "als_router_only",
                                                  buffer_bytes=args.buffer_bytes,
                                                  flush=args.flush), admin).start())
            sidecars[v] = (envoys[-1], lport)
        for _e, lp in sidecars.values():
            _wait_http(lp)
        got: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for n in range(args.rounds):
            for v in round_order(variants, n):
                for conns in (1, 16):
                    row = _run(rx, *sidecars[v], conns, args.seconds)
                    got.setdefault((v, conns), []).append(row)
                    print(json.dumps({"als": v, "connections": conns, **row}))
        summary = {f"{v}_c{c}": {k: statistics.median(x[k] for x in rs) for k in SUMMED}
                   for (v, c), rs in got.items()}
        print("SUMMARY " + json.dumps(summary))
        print("RATIOS " + json.dumps(ratios(got)))
        print("BEST " + json.dumps(best(got)))
    finally:
        for e in envoys:
            e.stop()
        rx.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
