"""Compile a BCC module in a child process first, so an LLVM abort cannot kill us.

Owner: istiofit. Called by `fastpath.loader.compile_module` before it compiles
in-process. LLVM's BPF backend reports some errors (the 512-byte BPF stack
limit, for one) with `report_fatal_error`, which ends the whole process: in
`l7fp serve` that was the control plane, restarted by the mesh daemon into the
same crash. A child `python -m fastpath.compile_check` compiles the same text
with the same cflags; only when it exits 0 does the caller compile for real.

The check costs one compile (about 1-3 s here) per distinct (text, cflags,
libbcc); a success is remembered in the process and as an empty marker file
under CACHE_DIR, so later processes (and the agent's rebuilds) pay nothing.
`L7FP_COMPILE_CHECK=0` skips the check.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

CACHE_DIR = Path(os.environ.get("L7FP_COMPILE_CACHE", "/var/tmp/l7fp-compile-ok"))
TIMEOUT_S = 600.0

_OK: set[str] = set()
_LOCK = threading.Lock()


class CompileError(RuntimeError):
    """The module does not compile; the message is the compiler's reason."""


def _libbcc_id() -> str:
    """Which libbcc (LLVM) compiles: part of the cache key."""
    try:
        import bcc.libbcc

        path = Path(bcc.libbcc.lib._name)
        st = path.resolve().stat()
        return f"{path.resolve()}:{st.st_size}:{int(st.st_mtime)}"
    except Exception:
        return "unknown"


def digest(text: str, flags: tuple[str, ...]) -> str:
    """sha256 of what decides the compile's outcome."""
    h = hashlib.sha256()
    h.update(json.dumps([text, list(flags), _libbcc_id(), os.uname().release]).encode())
    return h.hexdigest()


def reason(stderr: str, returncode: int) -> str:
    """The compiler's reason in one line: its first `error:` line, else the last line."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for ln in lines:
        if "error:" in ln:
            return ln[:400]
    tail = lines[-1][:400] if lines else "no output"
    return f"compiler exited {returncode}: {tail}"


def check(text: str, flags: tuple[str, ...]) -> None:
    """Raise CompileError when `text` with `flags` does not compile in a child process."""
    if os.environ.get("L7FP_COMPILE_CHECK", "1") == "0":
        return
    key = digest(text, flags)
    marker = CACHE_DIR / key
    with _LOCK:
        if key in _OK or marker.exists():
            _OK.add(key)
            return
    try:
        r = subprocess.run([sys.executable, "-m", "fastpath.compile_check", *flags],
                           input=text, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise CompileError(f"compile check timed out after {TIMEOUT_S:.0f} s") from exc
    if r.returncode != 0:
        raise CompileError(reason(r.stderr, r.returncode))
    with _LOCK:
        _OK.add(key)
    try:
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        marker.touch()
    except OSError:
        pass  # the in-process memory still saves the next check


def main() -> int:
    """Child side: compile stdin's text with argv's cflags; exit 0 when it compiles."""
    from bcc import BPF

    text = sys.stdin.read()
    BPF(text=text.encode(), cflags=sys.argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
