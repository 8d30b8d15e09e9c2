"""ctypes mirrors of the data path's C structs match the C layout (K2)."""

from __future__ import annotations

import ctypes as ct

import pytest

from fastpath.agent_mirror import MirrorEv
from fastpath.agent_reset import PeerVal
from fastpath.counters import DpEvent
from fastpath.loader import BPF_SRC, PairKey, module_text

pytestmark = [pytest.mark.kernel]


def test_dp_event_layout(kernel) -> None:  # type: ignore[no-untyped-def]
    from bcc import BPF

    text = module_text() + ("\nBPF_ARRAY(layout, struct dp_event, 1);\n"
                             "BPF_ARRAY(layout_pair, struct dp_pair_key, 1);\n"
                             "BPF_ARRAY(layout_mirror, struct dp_mirror_ev, 1);\n"
                             "BPF_ARRAY(layout_peer, struct dp_peer_val, 1);\n")
    b = BPF(text=text.encode(), cflags=[f"-I{BPF_SRC}"])
    for table, mirror in (("layout", DpEvent), ("layout_pair", PairKey),
                          ("layout_mirror", MirrorEv), ("layout_peer", PeerVal)):
        leaf = b[table].Leaf
        assert ct.sizeof(leaf) == ct.sizeof(mirror)
        c_fields = [(name, getattr(leaf, name).offset) for name, *_ in leaf._fields_]
        py_fields = [(name, getattr(mirror, name).offset) for name, *_ in mirror._fields_]
        assert c_fields == py_fields
