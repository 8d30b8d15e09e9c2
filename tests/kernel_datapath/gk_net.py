"""The real sockets, namespace, cgroup and Envoy of the gateway sk_skb reproducer
(skskb_gateway_repro.py); nothing here loads BPF.

Owner: gwkernel. Everything runs inside one network namespace `gk<pid>` whose
loopback holds 198.18.77.1 (the gateway, the server, Envoy) and 198.18.77.2 (the
client), so the peer address an edge rewrite writes is a 198.18.0.0/15 one and no
port can clash with another engineer's. The gateway's listener is created by a
child process placed in the scoped cgroup `gk-<pid>` (a socket belongs to the
cgroup of the task that creates it; accepted sockets inherit the listener's), so
sock_ops sees the gateway's accepted sockets and nothing else of this process.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import errno
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from fastpath.loader import cgroup2_root

GW_IP, CLIENT_IP = "198.18.77.1", "198.18.77.2"
GW_PORT, OTHER_PORT, SERVER_PORT, ENVOY_PORT = 8080, 8081, 9000, 8090
_CLONE_NEWNET = 0x40000000


def split_messages(buf: bytes) -> tuple[list[bytes], bytes]:
    """The complete HTTP/1.1 messages (head + Content-Length body) at the start
    of `buf`, and the rest."""
    out = []
    while b"\r\n\r\n" in buf:
        head, _, rest = buf.partition(b"\r\n\r\n")
        n = 0
        for ln in head.split(b"\r\n")[1:]:
            k, _, v = ln.partition(b":")
            if k.strip().lower() == b"content-length":
                n = int(v.strip())
        if len(rest) < n:
            break
        out.append(head + b"\r\n\r\n" + rest[:n])
        buf = rest[n:]
    return out, buf


def response(body: bytes, extra: str = "") -> bytes:
    return (f"HTTP/1.1 200 OK\r\ncontent-length: {len(body)}\r\n{extra}\r\n").encode() + body


class Peer:
    """A thread reading `sock` into `.got` (all bytes, in order); with `answer`,
    it writes `answer(request)` for each complete request, once `hold()` is
    false (5 s at most: a slow gateway that answers after something else happened)."""

    def __init__(self, sock: socket.socket, answer: Callable[[bytes], bytes] | None = None,
                 hold: Callable[[], bool] | None = None) -> None:
        self.sock, self.answer, self.hold = sock, answer, hold
        self.got = b""
        self.err = ""  # how reading ended: "eof" or the exception's errno name
        self.eagain = 0  # EAGAIN returned to this blocking reader (it reads on)
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        rest = b""
        while True:
            try:
                d = self.sock.recv(65536)
            except BlockingIOError:
                # seen on a blocking socket with a psock, once the skb that woke
                # the reader was redirected elsewhere (and after strparser's abort)
                self.eagain += 1
                if self.eagain > 10000:
                    self.err = "EAGAIN"
                    return
                continue
            except OSError as exc:
                self.err = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
                return
            if not d:
                self.err = "eof"
                return
            self.got += d
            if self.answer is None:
                continue
            reqs, rest = split_messages(rest + d)
            for r in reqs:
                deadline = time.monotonic() + 5
                while self.hold and self.hold() and time.monotonic() < deadline:
                    time.sleep(0.005)
                with contextlib.suppress(OSError):
                    self.sock.sendall(self.answer(r))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._t.join(2)


class AcceptLoop:
    """Accepts every connection on `lsn` and serves it with Peer(conn, answer)."""

    def __init__(self, lsn: socket.socket, answer: Callable[[bytes], bytes]) -> None:
        self.lsn, self.answer = lsn, answer
        self.peers: list[Peer] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        self.lsn.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self.lsn.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.peers.append(Peer(conn, self.answer))

    def close(self) -> None:
        self._stop.set()
        self._t.join(2)
        self.lsn.settimeout(5)
        for p in self.peers:
            p.close()


class Netns:
    """Network namespace gk<pid> (lo up, GW_IP and CLIENT_IP on it); `inside()`
    moves the calling thread in for socket creation (setns is per thread)."""

    def __init__(self) -> None:
        self.name = f"gk{os.getpid()}"
        self._libc = ct.CDLL(None, use_errno=True)
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        try:
            subprocess.run(["ip", "-n", self.name, "link", "set", "lo", "up"], check=True)
            for ip in (GW_IP, CLIENT_IP):
                subprocess.run(["ip", "-n", self.name, "addr", "add", f"{ip}/32", "dev", "lo"],
                               check=True)
        except Exception:
            self.close()
            raise

    @contextlib.contextmanager
    def inside(self) -> Iterator[None]:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
        try:
            if self._libc.setns(target, _CLONE_NEWNET) != 0:
                raise OSError(ct.get_errno(), f"setns {self.name}")
            try:
                yield
            finally:
                if self._libc.setns(home, _CLONE_NEWNET) != 0:
                    raise OSError(ct.get_errno(), "setns back to the test's netns")
        finally:
            os.close(home)
            os.close(target)

    def connect(self, port: int, host: str = GW_IP) -> socket.socket:
        """A client socket from CLIENT_IP to host:port, TCP_NODELAY (each write a segment)."""
        with self.inside():
            s = socket.socket()
        s.bind((CLIENT_IP, 0))
        s.settimeout(5)
        s.connect((host, port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s

    def listen(self, port: int) -> socket.socket:
        with self.inside():
            s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((GW_IP, port))
        s.listen(64)
        s.settimeout(5)
        return s

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], check=False, capture_output=True)


def remove_stale() -> None:
    """Remove the netns gk<PID> and cgroup gk-<PID> of reproducer processes that
    died without their cleanup (SIGKILL): PID no longer running."""
    def dead(pid: str) -> bool:
        return pid.isdigit() and not Path(f"/proc/{pid}").exists()

    for ns in Path("/run/netns").glob("gk*"):
        if dead(ns.name[2:]):
            subprocess.run(["ip", "netns", "del", ns.name], check=False, capture_output=True)
    for cg in cgroup2_root().glob("gk-*"):
        if dead(cg.name[3:]):
            with contextlib.suppress(OSError):
                cg.rmdir()


_MAKE_SOCKETS = ("import socket, sys; u = socket.socket(fileno=int(sys.argv[1])); "
                 "ss = [socket.socket() for _ in range(2)]; "
                 "socket.send_fds(u, [b'x'], [s.fileno() for s in ss])")


class Cgroup:
    """cgroup v2 directory gk-<pid>, and the gateway's two listeners created by
    a child process inside it (and inside the netns): GW_PORT and OTHER_PORT."""

    def __init__(self) -> None:
        self.path = cgroup2_root() / f"gk-{os.getpid()}"
        self.path.mkdir(exist_ok=True)
        self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)

    def listeners(self, netns: Netns) -> list[socket.socket]:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        procs = self.path / "cgroup.procs"
        script = f'echo $$ > "{procs}" && exec ip netns exec {netns.name} "$@"'
        with mine, theirs:
            child = subprocess.run(
                ["sh", "-c", script, "sh", sys.executable, "-c", _MAKE_SOCKETS,
                 str(theirs.fileno())], pass_fds=[theirs.fileno()], timeout=30,
                capture_output=True, text=True, check=False)
            if child.returncode != 0:
                raise RuntimeError(f"socket maker failed: {child.stderr[-500:]}")
            _, fds, _, _ = socket.recv_fds(mine, 16, 2)
        out = []
        for fd, port in zip(fds, (GW_PORT, OTHER_PORT), strict=True):
            s = socket.socket(fileno=fd)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((GW_IP, port))
            s.listen(64)
            s.settimeout(5)
            out.append(s)
        return out

    def close(self) -> None:
        os.close(self.fd)
        with contextlib.suppress(FileNotFoundError):
            self.path.rmdir()


def envoy_config(workdir: Path) -> Path:
    """A gateway-like Envoy (the HCM xds_server/istio/gateway.py gives a router
    node: use_remote_address: true, then the router) on GW_IP:ENVOY_PORT, every
    path to the server; admin on GW_IP:ENVOY_PORT+1."""
    def addr(port: int) -> dict[str, object]:
        return {"socket_address": {"address": GW_IP, "port_value": port}}

    hcm = {"@type": "type.googleapis.com/envoy.extensions.filters.network."
                    "http_connection_manager.v3.HttpConnectionManager",
           "stat_prefix": "gw", "use_remote_address": True,
           "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
               "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
           "route_config": {"name": "http.8090", "virtual_hosts": [{
               "name": "all", "domains": ["*"],
               "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "server"}}]}]}}
    cfg = {"admin": {"address": addr(ENVOY_PORT + 1)},
           "static_resources": {
               "listeners": [{"name": "gw", "address": addr(ENVOY_PORT), "filter_chains": [
                   {"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                 "typed_config": hcm}]}]}],
               "clusters": [{"name": "server", "type": "STATIC", "connect_timeout": "1s",
                             "load_assignment": {"cluster_name": "server", "endpoints": [
                                 {"lb_endpoints": [{"endpoint": {"address": addr(SERVER_PORT)}}]}]}}]}}
    path = workdir / "gk-envoy.json"
    path.write_text(json.dumps(cfg))
    return path


class NetnsEnvoy:
    """The real Envoy (`binary`) on envoy_config(), in the netns, a child of this process."""

    def __init__(self, binary: str, netns: Netns, workdir: Path) -> None:
        from tests.support.procs import stop_process

        self._stop = stop_process
        self.log = workdir / "gk-envoy.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", netns.name, binary, "-c", str(envoy_config(workdir)),
                 "--disable-hot-restart", "--concurrency", "1", "-l", "warning",
                 "--base-id", str(100000 + os.getpid())],
                stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + 30
        while True:
            try:
                netns.connect(ENVOY_PORT).close()
                return
            except OSError as exc:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.close()
                    raise RuntimeError(f"envoy not listening: {self.log.read_text()[-1500:]}") \
                        from exc
                time.sleep(0.05)

    def close(self) -> None:
        self._stop(self.proc)


def exchange(s: socket.socket, req: bytes, buf: bytes = b"") -> tuple[bytes, bytes]:
    """Send `req` on `s`, read one whole response: (response, bytes after it)."""
    s.sendall(req)
    while True:
        got, rest = split_messages(buf)
        if got:
            return got[0], rest + b"".join(got[1:])
        d = s.recv(65536)
        if not d:
            raise ConnectionError(f"closed after {buf!r}")
        buf += d
