"""The benchmark's applications: a leaf HTTP/1.1 service and a frontend that calls it.

Run inside a pod by `benchmarks.topology` as
`python -m benchmarks.apps leaf --port 8080` or
`python -m benchmarks.apps frontend --port 8080 --backend 198.18.201.4:8080`.

They are deliberately small asyncio Protocols (no framework) so the app's own
cost stays low and equal across configurations: what differs between
configurations is only the path between the processes. Keep-alive HTTP/1.1,
one request at a time per connection (what wrk and Envoy's pools send).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket

MAX_HEAD = 64 * 1024


def parse_head(buf: bytes) -> tuple[int, bytes, int] | None:
    """(end of head, request path, content length) of the first request, or None if partial."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > MAX_HEAD:
            raise ValueError("request head larger than 64 KiB")
        return None
    lines = buf[:end].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise ValueError(f"bad request line {lines[0][:80]!r}")
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    return end + 4, parts[1], length


def response(body: bytes, status: bytes = b"200 OK", close: bool = False) -> bytes:
    return (b"HTTP/1.1 " + status + b"\r\ncontent-type: text/plain\r\ncontent-length: "
            + str(len(body)).encode() + (b"\r\nconnection: close" if close else b"")
            + b"\r\n\r\n" + body)


def wants_close(head: bytes) -> bool:
    """The request head asks to close the connection after the response
    (`Connection: close`, as `wrk -H 'Connection: close'` sends)."""
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"connection" and b"close" in value.lower():
            return True
    return False


class Leaf(asyncio.Protocol):
    """Answers every request with a short body naming the pod and the path."""

    def __init__(self, name: bytes) -> None:
        self.name = name
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buf += data
        out = []
        while True:
            try:
                head = parse_head(self.buf)
            except ValueError:
                self.transport.write(response(b"bad request\n", b"400 Bad Request"))
                self.transport.close()
                return
            if head is None or len(self.buf) < head[0] + head[2]:
                break
            end, path, length = head
            close = wants_close(self.buf[:end])
            self.buf = self.buf[end + length:]
            out.append(response(self.name + b" " + path + b"\n", close=close))
            if close:  # one request per connection: answer, then close (HTTP/1.1)
                self.transport.write(b"".join(out))
                self.transport.close()
                return
        if out:
            self.transport.write(b"".join(out))


class Upstream:
    """One keep-alive connection to the backend, used by one downstream connection."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def get(self, path: bytes) -> bytes:
        if self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            self.writer.get_extra_info("socket").setsockopt(
                socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        assert self.reader is not None
        self.writer.write(b"GET " + path + b" HTTP/1.1\r\nhost: backend\r\n\r\n")
        head = await self.reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        return await self.reader.readexactly(length)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def serve_frontend_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                              name: bytes, backend: tuple[str, int]) -> None:
    """Each request to the frontend makes one request to the backend (the second hop)."""
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    up = Upstream(*backend)
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            parsed = parse_head(head)
            if parsed is None:
                return
            _, path, length = parsed
            if length:
                await reader.readexactly(length)
            try:
                body = await up.get(path)
            except (OSError, asyncio.IncompleteReadError) as exc:
                up.close()
                up = Upstream(*backend)
                writer.write(response(f"backend: {exc}\n".encode(), b"502 Bad Gateway"))
                continue
            writer.write(response(name + b" -> " + body))
    except (asyncio.IncompleteReadError, ConnectionError, ValueError):
        pass
    finally:
        up.close()
        writer.close()


async def main_async(args: argparse.Namespace) -> None:
    name = (args.name or os.uname().nodename).encode()
    loop = asyncio.get_running_loop()
    if args.role == "leaf":
        server = await loop.create_server(lambda: Leaf(name), args.host, args.port,
                                          backlog=1024, reuse_address=True)
    else:
        host, _, port = args.backend.rpartition(":")
        backend = (host, int(port))
        server = await asyncio.start_server(
            lambda r, w: serve_frontend_conn(r, w, name, backend), args.host, args.port,
            backlog=1024, reuse_address=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.apps",
                                     description="benchmark leaf/frontend HTTP/1.1 apps")
    parser.add_argument("role", choices=["leaf", "frontend"])
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--name", default="", help="name put in every response body")
    parser.add_argument("--backend", default="", help="HOST:PORT the frontend calls")
    args = parser.parse_args(argv)
    if args.role == "frontend" and ":" not in args.backend:
        parser.error("frontend needs --backend HOST:PORT")
    try:
        asyncio.run(main_async(args))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
