"""Every synthesized program for every config of the wild corpus passes the
verifier: plans are read and split as `l7fp split` does, synthesized, deduped by
their flag set (one compile per distinct set), compiled and loaded into the
kernel. Also checks that every plan's tables fit the knobs synthesized for it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fastpath import bpf_structs as bs
from fastpath.synth import SynthesizedProgram, synthesize
from kernel_decide.decide_prog import DecideProgram

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

CORPUS = Path(os.environ.get("L7FP_CORPUS", "/work/shared/corpus/wild"))


def corpus_programs() -> dict[tuple[str, ...], list[tuple[str, SynthesizedProgram]]]:
    from fastpath import inputs
    from fastpath.split import plan_of, resources_json

    by_flags: dict[tuple[str, ...], list[tuple[str, SynthesizedProgram]]] = {}
    for path in inputs.files([str(CORPUS)]):
        for doc in inputs.read(path):
            if doc.error:
                continue
            plan = plan_of(str(path), resources_json(doc.resources), orphans=True)
            if plan.listeners:
                sp = synthesize(plan)
                by_flags.setdefault(sp.cflags, []).append((str(path), sp))
    return by_flags


@pytest.mark.skipif(not CORPUS.is_dir(), reason=f"no corpus at {CORPUS}")
def test_every_corpus_program_loads(decide_prog: object) -> None:
    by_flags = corpus_programs()
    assert sum(len(v) for v in by_flags.values()) >= 50, "corpus read gave too few plans"
    for cflags, plans in by_flags.items():
        prog = DecideProgram.get(cflags)  # compile + BPF_PROG_LOAD: the verifier
        assert prog.fd > 0
        for path, sp in plans:
            prog.load(sp)  # every row fits its map
            lid = next(iter(sp.listener_ids.values()))
            d = prog.run(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", listener=lid)
            assert d.verdict in (bs.FORWARD, bs.REPLY, bs.PASS), path
