"""Ceiling of the agent's mirror senders (fastpath.agent_mirror), measured alone.

Run: PYTHONPATH=. .venv/bin/python -m benchmarks.mirror_senders [--seconds 3]
     [--rate 30000] [--rounds 2] [--configs 4x1 4x16]

No kernel, no mesh: one `Mirrorer` of this process (no network namespace, no
uid switch) gets DP_EV_MIRROR records through `on_event`, as the agent's
event thread does, at `--rate` records/s for `--seconds` (a 190-byte GET, one
policy, every record sampled), and its senders send the shadows to a real
Envoy on loopback that answers every request itself (direct_response, one
worker), as the destination's inbound sidecar would take them. Per run it
prints one JSON line: shadows offered, queued, sent by the agent and received
by Envoy (its `downstream_rq_total`) per second of feeding, the drops
(`dropped_queue_full`: the queue of 256 was full), and this process's CPU
time per shadow sent (event thread + senders: on a loaded node the CPU, not
the round trips, sets the ceiling). `--configs` SENDERSxBATCH are run in turn
each round (ABAB): BATCH 1 is the senders before batching (one shadow per
wake-up and thread), 16 the default (fastpath.mirror_send). Owner: the
mirror part of K2.
"""

from __future__ import annotations

import argparse
import ctypes as ct
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from fastpath.agent_mirror import HEAD_SIZE, Mirrorer, MirrorEv, RoutePolicies
from fastpath.plan import MirrorPolicy
from xds_server.ports import free_ports

REQ = (b"GET /api/items?id=42 HTTP/1.1\r\nhost: web:9000\r\nuser-agent: wrk\r\n"
       b"x-request-id: 0f8e4c1a-5b7d-4e2a-9c3f-123456789abc\r\naccept: */*\r\n"
       b"x-envoy-expected-rq-timeout-ms: 15000\r\n\r\n")


def envoy_bootstrap(port: int, admin: int) -> dict[str, Any]:
    hcm = {"@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager."
                    "v3.HttpConnectionManager",
           "stat_prefix": "shadow",
           "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
               {"match": {"prefix": "/"}, "direct_response": {"status": 200,
                                                              "body": {"inline_string": "ok\n"}}}]}]},
           "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
               "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}
    return {"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
            "static_resources": {"listeners": [{
                "name": "shadow", "address": {"socket_address": {"address": "127.0.0.1",
                                                                 "port_value": port}},
                "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                "typed_config": hcm}]}]}]}}


def envoy_received(admin: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats?filter=^http.shadow.downstream_rq_total$",
                                timeout=5) as r:
        return int(r.read().decode().split(":")[1])


def record() -> ct.Array[ct.c_char]:
    ev = MirrorEv(kind=6, route=1, gen=0, mask=1, len=len(REQ))
    ct.memmove(ev.req, REQ, len(REQ))
    return ct.create_string_buffer(bytes(ev)[:HEAD_SIZE + len(REQ)])


def one_run(port: int, admin: int, rate: float, seconds: float, senders: int, batch: int) -> dict[str, Any]:
    mi = Mirrorer(dp=None, netns=None, ip="198.18.0.2", uid=None, senders=senders, batch=batch)
    mi.routes[(0, 1)] = RoutePolicies((MirrorPolicy("m"),), ((("127.0.0.1", port),),), 15.0)
    mi._start()
    rec = record()
    addr, size = ct.addressof(rec), HEAD_SIZE + len(REQ)
    before = envoy_received(admin)
    cpu0 = time.process_time()
    t0 = time.monotonic()
    offered = 0
    try:
        while (now := time.monotonic()) < t0 + seconds:  # bounded by time and by the rate
            due = int((now - t0) * rate)
            for _ in range(min(due - offered, 1000)):
                mi.on_event(addr, size)
                offered += 1
            time.sleep(0.001)
        elapsed = time.monotonic() - t0
        sent = mi.debug().get("sent", 0)
        cpu = time.process_time() - cpu0
        received = envoy_received(admin) - before
    finally:
        mi.close()
    st = mi.debug()
    return {"senders": senders, "batch": batch, "seconds": round(elapsed, 2), "cpu_us_per_shadow": round(cpu * 1e6 / max(sent, 1), 1), "offered_per_s": round(offered / elapsed),
            "sent_per_s": round(sent / elapsed), "received_per_s": round(received / elapsed),
            "dropped_queue_full": st.get("dropped_queue_full", 0), "queued": st.get("queued", 0),
            "send_failed": st.get("send_failed", 0) + st.get("timeout", 0)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--rate", type=float, default=30000.0, help="records offered per second")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--configs", nargs="+", default=["4x1", "4x16"], help="SENDERSxBATCH")
    a = p.parse_args(argv)
    envoy = shutil.which("envoy") or str(Path(sys.executable).parent / "envoy")
    port, admin = free_ports(2)
    d = tempfile.mkdtemp(prefix="l7fp-mirrorbench-")
    cfg = Path(d) / "envoy.json"
    cfg.write_text(json.dumps(envoy_bootstrap(port, admin)))
    log = open(Path(d) / "envoy.log", "w")
    proc = subprocess.Popen([envoy, "-c", str(cfg), "--concurrency", "1", "--base-id", str(port),
                             "--disable-hot-restart", "-l", "warning"], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                envoy_received(admin)
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"envoy did not start, see {log.name}") from None
                time.sleep(0.1)
        configs = [tuple(int(x) for x in c.split("x")) for c in a.configs]
        runs = []
        for _ in range(a.rounds):
            for senders, batch in configs:
                r = one_run(port, admin, a.rate, a.seconds, senders, batch)
                print(json.dumps(r), flush=True)
                runs.append(r)
        for senders, batch in configs:
            mine = [r for r in runs if (r["senders"], r["batch"]) == (senders, batch)]
            print(json.dumps({"senders": senders, "batch": batch, "runs": len(mine),
                              **{k: statistics.median(r[k] for r in mine)
                                 for k in ("received_per_s", "cpu_us_per_shadow")}}))
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
