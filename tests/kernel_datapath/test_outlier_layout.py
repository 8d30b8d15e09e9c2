"""ctypes mirrors of dp_outlier.h's structs match the C layout (NAME=outlier)."""

from __future__ import annotations

import ctypes as ct

import pytest

from fastpath.agent_outlier import OdCluster, OdDet, OdHost
from fastpath.loader import BPF_SRC, module_text

pytestmark = [pytest.mark.kernel]


def test_outlier_struct_layouts(kernel) -> None:  # type: ignore[no-untyped-def]
    from bcc import BPF

    b = BPF(text=module_text().encode(), cflags=[f"-I{BPF_SRC}"])
    for table, mirror in (("dp_odc", OdCluster), ("dp_odd", OdDet), ("dp_odh", OdHost)):
        leaf = b[table].Leaf
        assert ct.sizeof(leaf) == ct.sizeof(mirror), table
        c_fields = [(name, getattr(leaf, name).offset) for name, *_ in leaf._fields_]
        py_fields = [(name, getattr(mirror, name).offset) for name, *_ in mirror._fields_]
        assert c_fields == py_fields, table
