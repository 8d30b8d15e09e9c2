"""An LLVM abort while compiling a node's data path must not end the process.

LLVM's BPF backend ends the process on some errors (the 512-byte stack limit):
`fastpath.compile_check` compiles in a child first. These tests compile
programs that end a process that way and check that this one raises a clear
CompileError and keeps working (the agent then logs one line and falls back).

Run: .venv/bin/python -m pytest tests/kernel_datapath/test_compile_check.py -q   (root)
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fastpath import compile_check, loader

pytestmark = [pytest.mark.kernel]

# 1 kB on the stack: LLVM's BPF backend refuses it with a fatal error
STACK_BUSTER = """
int big(struct __sk_buff *skb) {
    volatile char buf[1024];
    for (int i = 0; i < 1024; i++) buf[i] = (char)i;
    return buf[skb->len & 1023];
}
"""
GOOD = "int small(struct __sk_buff *skb) { return skb->len & 1; }\n"


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(compile_check, "CACHE_DIR", tmp_path)
    monkeypatch.setattr(compile_check, "_OK", set())
    return tmp_path


def test_the_stack_buster_ends_a_process_that_compiles_it(kernel: None) -> None:
    """What the check protects against: compiled in-process, it exits the process."""
    code = ("import sys; from bcc import BPF; "
            "BPF(text=sys.stdin.read().encode()); print('survived')")
    r = subprocess.run([sys.executable, "-c", code], input=STACK_BUSTER, capture_output=True,
                       text=True, timeout=120)
    assert "survived" not in r.stdout and r.returncode != 0, (r.stdout, r.stderr)
    assert "stack limit" in r.stderr, r.stderr


def test_compile_error_instead_of_an_exit(kernel: None, cache_dir: Path) -> None:
    with pytest.raises(compile_check.CompileError, match="stack limit of 512 bytes"):
        loader.compile_module(STACK_BUSTER, instance="istiofit-bust", check=True)
    assert not list(cache_dir.iterdir())  # a failure is not remembered as a success
    b = loader.compile_module(GOOD, instance="istiofit-good", check=True)  # this process goes on
    assert b is not None
    assert len(list(cache_dir.iterdir())) == 1  # the success is remembered


def test_datapath_load_of_a_plan_that_aborts_llvm(kernel: None, cache_dir: Path) -> None:
    """The data path with strings too long for the stack (L7FP_MAX_STR=1024; before
    the stack fix, bookinfo's 64 did this): Datapath.load raises, no exit."""
    from fastpath.synth import synthesize
    from tests.kernel_decide.plans import parser_plan

    knobs = dict(c[2:].split("=", 1) for c in synthesize(parser_plan()).cflags)
    knobs.update({"L7FP_MAX_STR": "1024", "L7FP_F_HDR_MATCH": "1", "L7FP_MAX_HMATCH": "2"})
    cflags = tuple(f"-D{k}={v}" for k, v in knobs.items())
    with pytest.raises(compile_check.CompileError, match="error"):
        loader.Datapath.load(cflags=cflags, decide_header="dp_decide_l7fp.h",
                             instance="istiofit-long")


def test_reason_is_one_line() -> None:
    err = "x\n/virtual/main.c:3: error: boom\nmore\n"
    assert compile_check.reason(err, 1) == "/virtual/main.c:3: error: boom"
    assert compile_check.reason("", -6) == "compiler exited -6: no output"


@pytest.mark.envoy
def test_agent_falls_back_with_one_log_line(kernel, cgroup, envoy, upstream, tmp_path,  # type: ignore[no-untyped-def]
                                            monkeypatch, caplog):
    """A node whose synthesized program ends LLVM: the agent (as in `l7fp serve`)
    logs one line naming the node and the compiler's reason, serves the node
    with the built-in decision, and this process goes on."""
    import logging

    from test_agent import client_plan, wait_for, write_state

    from fastpath import agent as agent_mod

    real = agent_mod._cflags
    monkeypatch.setattr(agent_mod, "_cflags",
                        lambda plan: real(plan) + ("-DL7FP_MAX_STR=1024",
                                                   "-DL7FP_F_HDR_MATCH=1",
                                                   "-DL7FP_MAX_HMATCH=2"))
    monkeypatch.setattr(compile_check, "CACHE_DIR", tmp_path / "ok")
    state = tmp_path / "state.json"
    write_state(state, str(cgroup.path))
    a = agent_mod.Agent(state, decide="l7fp")
    caplog.set_level(logging.ERROR, logger="fastpath.agent")
    a.start()
    try:
        a.on_plan("up", agent_mod.KernelPlan("up", "u1"))
        a.on_plan("client", client_plan(envoy.port, upstream.port))
        wait_for(lambda: a.nodes.get("client") and a.nodes["client"].plan, timeout=120)
        assert a.nodes["client"].mode == "inline"
        lines = [r.getMessage() for r in caplog.records if "l7fp_decide program failed" in
                 r.getMessage()]
        print(lines)
        assert len(lines) == 1 and "node client" in lines[0], lines
        assert "stack limit of 512 bytes" in lines[0], lines
    finally:
        a.stop()


def test_rewrite_with_a_head_buffer_too_small_does_not_compile(kernel: None, cache_dir: Path) -> None:
    """dp_rewrite.h's _Static_assert: DP_REWRITE with L7FP_MAX_HDR=256 (its
    rewritten path would wrap onto the head's copy) is a compile error naming
    the limit, not a data path that corrupts the request line."""
    from fastpath.plan import (
        Cluster,
        ClusterAction,
        Direction,
        Endpoint,
        KernelPlan,
        LbPolicy,
        ListenerPlan,
        PathKind,
        Route,
        RouteMatch,
        Verdict,
        VirtualHost,
        WeightedCluster,
    )
    from fastpath.synth import synthesize

    route = Route("a", RouteMatch(PathKind.PREFIX, "/api"),
                  ClusterAction((WeightedCluster("c1", 1),), prefix_rewrite="/v2"), Verdict.KERNEL)
    plan = KernelPlan("n", "1", (ListenerPlan("l", "0.0.0.0", 80, Direction.OUTBOUND,
                                              (VirtualHost("v", ("*",), (route,)),)),),
                      (Cluster("c1", LbPolicy.ROUND_ROBIN, (Endpoint("198.18.0.2", 80),)),))
    cflags = tuple(f for f in synthesize(plan).cflags if not f.startswith("-DL7FP_MAX_HDR="))
    assert "-DDP_REWRITE=1" in cflags
    with pytest.raises(compile_check.CompileError, match="DP_REWRITE needs L7FP_MAX_HDR >= 512"):
        loader.compile_module(loader.module_text("dp_decide_l7fp.h"),
                              cflags + ("-DL7FP_MAX_HDR=256",), instance="auditfix-rw256", check=True)
