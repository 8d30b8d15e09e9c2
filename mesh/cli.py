"""`l7fp mesh up|status|exec|down|logs|audit`: the local mesh runner's command line.

Registered in xds_server/cli.py SUBCOMMANDS; translates arguments to calls of
`mesh.runner` and prints results. See docs/mesh.md.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HELP = """\
Run a mesh described in a compose-style YAML file on this machine, the way
Istio runs one in Kubernetes: each replica is a pod (network namespace with a
198.18.0.0/15 address, cgroup v2 dir, app, Envoy sidecar with istio-iptables
interception). Needs root. Examples:

  l7fp mesh up compose/demo/mesh.yaml --name my-demo   # start, return when ready
  l7fp mesh status --name my-demo                      # pods, processes, sidecar readiness
  l7fp mesh exec --name my-demo frontend -- curl -s http://frontend:8080/home
  l7fp mesh down --name my-demo                        # remove everything (also after a crash)

--name may be left out while a single mesh runs; on a machine others share, give it
(a bare `mesh down` takes down whichever one mesh is running).
"""


NAME_HELP = "mesh name (default: the only one running)"
START_WAIT = 10.0  # `mesh down` of a name being started: seconds to wait for its daemon


def register(subparsers: argparse._SubParsersAction) -> None:
    from xds_server.argtypes import positive

    p = subparsers.add_parser("mesh", help="run a local mesh (pods as namespaces, Envoy sidecars)",
                              description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mesh_command", metavar="ACTION")
    up = sub.add_parser("up", help="start a mesh from a mesh file")
    up.add_argument("file", help="mesh file (YAML), e.g. compose/demo/mesh.yaml")
    up.add_argument("--name", help="mesh name (default: the file's `name:`); use to run several")
    up.add_argument("--sidecars", choices=["envoy", "none"], default="envoy",
                    help="none: pods and apps only, no interception (baseline)")
    up.add_argument("--xds", choices=["file", "ads"], default="ads",
                    help="ads: run `l7fp serve` on the config dir (default); file: Envoy watches generated files, no control plane")
    up.add_argument("--fastpath", choices=["on", "off", "auto"], default="off",
                    help="passed to `l7fp serve --fastpath` (with --xds ads; default off)")
    up.add_argument("--timeout", type=positive, default=90.0,
                    help="seconds to wait for readiness (default 90)")
    up.add_argument("--backend", choices=["local", "docker"], default="local",
                    help="local: namespaces on this host (default); docker: containers through "
                         "the Docker SDK (needs a reachable engine)")
    up.add_argument("--foreground", action="store_true",
                    help="stay attached; Ctrl-C tears the mesh down")
    up.set_defaults(func=_quiet_pipe(cmd_up))
    st = sub.add_parser("status", help="pods, processes and sidecar readiness")
    st.add_argument("--name", help=NAME_HELP)
    st.add_argument("--json", action="store_true", help="print state.json")
    st.set_defaults(func=_quiet_pipe(cmd_status))
    ex = sub.add_parser("exec", help="run a command in a pod: exec SERVICE|POD -- CMD...")
    ex.add_argument("--name", help=NAME_HELP)
    ex.add_argument("target", help="service (its first pod) or pod name")
    ex.add_argument("argv", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    ex.set_defaults(func=_quiet_pipe(cmd_exec))
    dn = sub.add_parser("down", help="stop a mesh and remove all it made")
    dn.add_argument("--name", help=NAME_HELP)
    dn.add_argument("--backend", choices=["local", "docker"], default="local",
                    help="the backend the mesh was started with (`mesh up --backend`; default local)")
    dn.set_defaults(func=_quiet_pipe(cmd_down))
    co = sub.add_parser("compose", help="write a mesh file as a docker-compose project")
    co.add_argument("file", help="mesh file")
    co.add_argument("-o", "--out", required=True, help="directory for docker-compose.yml and docker/")
    co.set_defaults(func=_quiet_pipe(cmd_compose))
    _register_audit(sub)
    lg = sub.add_parser("logs", help="print a pod's logs (app and sidecar)")
    lg.add_argument("--name", help=NAME_HELP)
    lg.add_argument("pod", nargs="?", help="pod name, or a service (its first pod), or "
                                           "control-plane (default: the daemon's log)")
    lg.set_defaults(func=_quiet_pipe(cmd_logs))
    p.set_defaults(func=lambda _a: p.print_help() or 2)


AUDIT_HELP = """\
For every pod of a mesh running with `--fastpath on` and every route of its
KernelPlan whose verdict is KERNEL: derive one request the route matches first
(the reference model agrees; otherwise the route is listed as skipped, with
why), send it from the pod to the route's service, and show who served it:
the kernel, or Envoy and the fast path's reason (its counters in
/debug/fastpath). Only "kernel" is a success: "kernel (other route)" (the
kernel counted it on another route), "kernel (wrong status)" (not the reply
the reference model says the kernel gives), "kernel (no answer)" and
"ambiguous" (other traffic counted during it) are not. Ends with "KERNEL
routes served by the kernel: N / M".
A route of an inbound listener is sent from a caller pod (another service's
first) to the pod's service: the caller's kernel decides the destination's
inbound listener too; a route no caller's outbound route forwards to the pod
is listed as skipped, with why.

The audit sends REAL requests, one per route, one after another, each with a
timeout: the services see them; a rate-limited route spends one token; a route
with a fault delay waits for it; a fault abort may answer. Nothing else is
changed. --timeout bounds each whole request (a stuck one is stopped and
its row says so). A request the kernel handed to Envoy only because the
id it made was sampled (trace_sampled: Envoy reports the span) is sent again,
at most 8 requests per route in all. Who served a request is read from the sender's fast-path
counters, shared with the pod's other traffic: audit a mesh whose pods are
idle (no load generator running) or rows show "ambiguous".
Exit status: 0 every audited route served by the kernel, 3 some were
not, 4 nothing was audited (every route skipped or no KERNEL route), 1 the
audit could not run (mesh not running, fast path off).
"""


def _register_audit(sub: argparse._SubParsersAction) -> None:
    from xds_server.argtypes import non_negative, positive

    au = sub.add_parser("audit", help="show whether the kernel serves every KERNEL route "
                        "(sends one real request per route)", description=AUDIT_HELP,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    au.add_argument("--name", help=NAME_HELP)
    au.add_argument("--from", dest="sender", metavar="POD|SERVICE",
                    help="send only from this pod (a service: its pod whose datapath is loaded, "
                         "else its first with a plan): its outbound "
                         "routes and the inbound routes of the pods it reaches")
    au.add_argument("--json", action="store_true", help="one JSON object: rows and summary")
    au.add_argument("--wait", type=non_negative, default=180.0,
                    help="seconds to wait for the sending pods' datapaths to load their plans "
                         "and fill their pools (default 180: the agent compiles one pod after "
                         "another, 6-20 s each); stops early when only pools are empty and "
                         "stayed empty 5 s (a destination that is down)")
    au.add_argument("--timeout", type=positive, default=5.0,
                    help="seconds per request in all (default 5); a request still unanswered "
                         "2 s later (7 s: a new pod client's first) has its pod client "
                         "stopped and restarted")
    au.set_defaults(func=_quiet_pipe(cmd_audit))


def cmd_audit(args: argparse.Namespace) -> int:
    from mesh import audit
    from mesh.runner import MeshError, resolve_name
    from mesh.teardown import read_state
    try:
        name = resolve_name(args.name)
        state = audit.check_state(read_state(name), name)
        rows = audit.run(state, args.sender, wait_s=args.wait, timeout=args.timeout)
    except (MeshError, audit.AuditError) as exc:
        return _err(exc)
    s = audit.summary(rows)
    if args.json:
        print(json.dumps({"mesh": name, "rows": [r.to_json() for r in rows], "summary": s},
                         indent=1))
    else:
        print("\n".join(audit.format_rows(rows)))
    return audit_status(s)


def audit_status(summary: dict[str, Any]) -> int:
    """`mesh audit`'s exit status from its summary (AUDIT_HELP says what each means)."""
    if summary["audited"] == 0:
        return 4
    return 0 if summary["kernel"] == summary["audited"] else 3


def _quiet_pipe(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """`l7fp mesh status | head` must not end in a BrokenPipeError traceback."""
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
    return run


def _err(msg: object) -> int:
    print(f"l7fp mesh: {msg}", file=sys.stderr)
    return 1


def _interrupt(_sig: int, _frame: object) -> None:
    raise KeyboardInterrupt


def cmd_up(args: argparse.Namespace) -> int:
    from mesh.runner import Mesh, MeshError
    from mesh.spec import MeshFileError
    if args.backend == "docker":
        return _docker_up(args)
    signal.signal(signal.SIGTERM, _interrupt)  # cancel like Ctrl-C: Mesh.up removes what it made
    try:
        m = Mesh(args.file, args.name, sidecars=args.sidecars, xds=args.xds,
                 fastpath=args.fastpath, timeout=args.timeout)
        state = m.up(say=lambda line: print(line, flush=True))
    except (MeshFileError, MeshError) as exc:
        return _err(exc)
    except KeyboardInterrupt:
        _err("mesh up interrupted: the mesh was stopped and removed, nothing left running")
        return 130
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    gateways = f", {len(state['gateways'])} gateway(s)" if state.get("gateways") else ""
    print(f"mesh {state['name']} up: {len(state['pods'])} pods{gateways}, state {m.state_file}")
    for s in state["services"]:
        print(f"  {s['name']:<16} {s['vip']:<14} ports {s['ports']} pods {s['pod_ips']}")
    for line in gateway_lines(state):
        print(f"  {line}")
    if not args.foreground:
        return 0
    print("Ctrl-C to stop")
    def stop(_sig: int, _frame: object) -> None:
        raise KeyboardInterrupt
    # Explicit handlers: a shell may start us with SIGINT ignored (background job).
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        while m.state_file.exists():
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    removed = m.down()
    print(f"mesh {m.name} down: {len(removed)} object(s) removed")  # Ctrl-C said nothing
    return 0


def _not_running(name: str) -> str:
    """Why mesh `name` has no state: never started (a typo: say which run; a failed
    start: where its logs are), or its directory is there without state.json:
    being started (a live process holds its name: mesh.namelock), or crashed."""
    from mesh import namelock
    from mesh.teardown import running_meshes, state_dir
    if state_dir(name).exists() and namelock.is_held(name):
        return (f"mesh {name!r} is being started (pid {namelock.holder_pid(name)}): "
                "no state file yet")
    if state_dir(name).exists():
        return (f"mesh {name!r} was left by a crashed run (no state file, nothing holds it): "
                f"`l7fp mesh down --name {name}` removes what it left")
    others = running_meshes()
    why = f"mesh {name!r} is not running" + (f" (running: {', '.join(others)})" if others else "")
    failed = Path(f"/tmp/l7fp-mesh-{name}-failed")
    return why + (f"; the logs of its last failed start are in {failed}" if failed.is_dir() else "")


def cmd_status(args: argparse.Namespace) -> int:
    from mesh.runner import MeshError, resolve_name, status_rows
    from mesh.teardown import read_state
    try:
        name = resolve_name(args.name)
    except MeshError as exc:
        return _err(exc)
    state = read_state(name)
    if state is None:
        return _err(_not_running(name))
    if args.json:
        print(json.dumps(state, indent=1))
        return 0
    from mesh.supervisor import pid_alive
    starting = state.get("ready") is False  # the daemon's early state: nothing started yet
    daemon = ("DEAD (run `l7fp mesh down`)" if not pid_alive(int(state["pid"]))
              else "up, starting (not ready yet)" if starting else "up")
    print(f"mesh {name}: daemon pid {state['pid']} {daemon}, sidecars {state.get('sidecars')}, "
          f"fastpath {state.get('fastpath')}, logs {state.get('logs')}")
    cp = state.get("control_plane_pid")
    if cp:
        print(f"control plane: pid {cp} {'up' if pid_alive(int(cp)) else 'DEAD'}, "
              f"ADS {state.get('xds')}, admin http://{state.get('admin')}")
    elif starting and state.get("xds_mode") == "ads" and state.get("sidecars") == "envoy":
        print("control plane: not started yet")
    else:
        print(f"control plane: none (xds {state.get('xds_mode')})")
    if state.get("policy_error"):
        print(f"policy: last edit NOT applied, the previous policy serves: {state['policy_error']}")
    print(f"{'POD':<20} {'IP':<14} {'APP':<6} {'ENVOY':<6} SIDECAR")
    for r in status_rows(state):
        alive = r["alive"]
        fmt = {True: "up", False: "DEAD"}
        print(f"{r['pod']:<20} {r['ip']:<14} {fmt.get(alive.get('app'), '-'):<6} "
              f"{fmt.get(alive.get('envoy'), '-') if 'envoy' in alive else '-':<6} {r['sidecar']}")
    for line in gateway_lines(state):
        print(line)
    return 0


def gateway_lines(state: dict[str, Any]) -> list[str]:
    """One line per gateway of a mesh state: pod, address and ports (reachable
    from the host), node id, and whether its Envoy has its listeners."""
    out = []
    for g in state.get("gateways", []):
        ready = "ready" if g.get("ready") else f"NOT ready: {g.get('not_ready')}"
        out.append(f"gateway {g['service']}: pod {g['name']} {g['ip']} ports {g['ports']} "
                   f"labels {g['labels']} node {g['node_id']}: {ready}")
    return out


def cmd_exec(args: argparse.Namespace) -> int:
    from mesh.runner import MeshError, resolve_name, run_in_pod
    from mesh.teardown import read_state
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        return _err("exec needs a command: l7fp mesh exec SERVICE -- CMD ARGS...")
    try:
        name = resolve_name(args.name)
        state = read_state(name)
        if state is None:
            raise MeshError(_not_running(name))
        return run_in_pod(state, args.target, argv).returncode
    except (MeshError, FileNotFoundError) as exc:
        return _err(exc)
    except subprocess.SubprocessError as exc:
        return _err(exc)


def _docker_up(args: argparse.Namespace) -> int:
    from mesh import docker_backend, spec
    try:
        s = spec.load(args.file, args.name)
        out = docker_backend.up(s)
    except (spec.MeshFileError, docker_backend.DockerBackendError) as exc:
        return _err(exc)
    print(f"mesh {s.name} up in Docker (project files in {out}); "
          f"`l7fp mesh down --backend docker --name {s.name}` removes it")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from mesh.runner import MeshError, resolve_name
    from mesh.teardown import await_starter, down, running_meshes
    if args.backend == "docker":
        from mesh import docker_backend
        if not args.name:
            return _err("--backend docker needs --name")
        try:
            removed = docker_backend.down(args.name)
        except docker_backend.DockerBackendError as exc:
            return _err(exc)
        down(args.name)
        print(f"mesh {args.name} down in Docker: {len(removed)} object(s) removed")
        return 0
    try:
        name = resolve_name(args.name)
    except MeshError as exc:
        return _err(exc)
    starter = await_starter(name, START_WAIT)
    if starter is not None:  # down() now would find nothing, and the mesh come up anyway
        return _err(f"mesh {name} is being started by pid {starter} (no daemon after "
                    f"{START_WAIT:.0f}s); run `l7fp mesh down --name {name}` once it is up")
    removed = down(name)
    if not removed:  # idempotent on purpose, but a typo in --name must not look like success
        others = running_meshes()
        print(f"mesh {name} down: no mesh of that name here, nothing removed"
              + (f" (running: {', '.join(others)})" if others else ""))
        return 0
    stopped = [x for x in removed if x.startswith("stopped mesh daemon")]
    rest = [x for x in removed if x not in stopped]
    head = "daemon stopped, it removed its pods" if stopped else "no daemon running"
    print(f"mesh {name} down: {head}; {len(rest)} leftover object(s) removed")
    for line in rest:
        print(f"  {line}")
    return 0


def cmd_compose(args: argparse.Namespace) -> int:
    from mesh import compose, spec
    try:
        written = compose.write(spec.load(args.file), Path(args.out))
    except spec.MeshFileError as exc:
        return _err(exc)
    except OSError as exc:  # -o names a file, or a directory we may not write
        return _err(f"--out {args.out}: cannot write there: {exc.filename or args.out}: {exc.strerror}")
    print(f"wrote {written[0]} and {len(written) - 1} files under {Path(args.out) / 'docker'}; "
          f"run with: docker compose -f {written[0]} up --build")
    return 0


def _log_pod(name: str, target: str) -> str:
    """The pod whose logs `mesh logs TARGET` prints: TARGET's pod as `mesh exec`
    finds it (runner.find_pod: a pod, or a service's first pod) while the mesh's
    state exists; else, or for what is no pod (control-plane), TARGET as named
    by its log files."""
    from mesh.runner import MeshError, find_pod
    from mesh.teardown import read_state
    state = read_state(name)
    try:
        return str(find_pod(state, target)["name"]) if state is not None else target
    except MeshError:
        return target


def cmd_logs(args: argparse.Namespace) -> int:
    from mesh.runner import MeshError, resolve_name
    from mesh.teardown import state_dir
    try:
        name = resolve_name(args.name)
    except MeshError as exc:
        return _err(exc)
    d = state_dir(name)
    if not d.is_dir():  # a typo, or a mesh already down: not "no logs for the daemon"
        return _err(_not_running(name))
    logs = {f: f.name.split(".", 1)[0] for f in (d / "logs").glob("*.log")}  # POD.app.log, ...
    pods = sorted(set(logs.values()))
    pod = _log_pod(name, args.pod) if args.pod else None
    files = [d / "daemon.log"] if not pod else sorted(f for f, p in logs.items() if p == pod)
    if not files or not all(Path(f).exists() for f in files):
        known = f"; pods: {pods}" if pods and pod else ""  # a typo: show what there is
        return _err(f"no logs for {pod or 'the daemon'} under {d}{known}")
    for f in files:
        print(f"==> {f} <==")
        print(Path(f).read_text()[-20000:])
    return 0
