"""fastpath.bpf_instance.relocate (the map fds of an instance's code) and the
loader's cache: the compiled code lives as long as one instance uses it."""

from __future__ import annotations

import struct
from types import SimpleNamespace
from typing import Any

import pytest

from fastpath import loader

bpf_instance = pytest.importorskip("fastpath.bpf_instance")


def ld_imm64(src: int, imm: int, dst: int = 1) -> bytes:
    """`ld_imm64 r<dst>, imm` with pseudo kind `src` (two instruction slots)."""
    return struct.pack("<BBhi", 0x18, (src << 4) | dst, 0, imm) + struct.pack("<BBhi", 0, 0, 0, 0)


EXIT = struct.pack("<BBhi", 0x95, 0, 0, 0)
MOV = struct.pack("<BBhi", 0xB7, 0, 0, 7)  # r0 = 7


def test_relocate_swaps_map_fds_only() -> None:
    code = MOV + ld_imm64(1, 11) + ld_imm64(0, 11) + ld_imm64(4, 3) + ld_imm64(2, 12) + EXIT
    out = bpf_instance.relocate(code, {11: 41, 12: 42})
    assert out == MOV + ld_imm64(1, 41) + ld_imm64(0, 11) + ld_imm64(4, 3) + ld_imm64(2, 42) + EXIT


def test_relocate_refuses_what_it_cannot_reproduce() -> None:
    with pytest.raises(bpf_instance.CloneError, match="fd 13"):
        bpf_instance.relocate(ld_imm64(1, 13) + EXIT, {11: 41})
    with pytest.raises(bpf_instance.CloneError, match="kind 3"):  # BPF_PSEUDO_BTF_ID
        bpf_instance.relocate(ld_imm64(3, 5) + EXIT, {})


def test_inner_maps_from_bcc_declarations() -> None:
    text = ('BPF_QUEUE(tmpl, u64, 8);\nBPF_ARRAY_OF_MAPS(outer, "tmpl", 64);\n'
            'BPF_HASH_OF_MAPS(by_key, struct k, "tmpl2", 16);\n')
    assert bpf_instance.inner_maps(text) == {"outer": "tmpl", "by_key": "tmpl2"}


class _Module:
    def __init__(self, template: Any = None) -> None:
        self.template, self.cleaned = template, False

    def cleanup(self) -> None:
        self.cleaned = True


def test_unload_frees_the_compiled_code_with_its_last_instance(
        monkeypatch: pytest.MonkeyPatch) -> None:
    compiled = _Module()
    a, b = _Module(compiled), _Module(compiled)
    monkeypatch.setattr(loader, "_COMPILED", {("text", ()): compiled})
    monkeypatch.setattr(loader, "_CACHE", {("text", (), "a"): a, ("text", (), "b"): b})
    loader.Datapath(bpf=a).unload()
    assert a.cleaned and not compiled.cleaned and loader._COMPILED == {("text", ()): compiled}
    loader.Datapath(bpf=b).unload()
    assert b.cleaned and compiled.cleaned and loader._COMPILED == {} and loader._CACHE == {}


def test_unload_of_a_module_compiled_for_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    """A module compiled again for one instance (CloneError) has no template."""
    own = SimpleNamespace(cleaned=False)
    own.cleanup = lambda: setattr(own, "cleaned", True)
    monkeypatch.setattr(loader, "_COMPILED", {})
    monkeypatch.setattr(loader, "_CACHE", {("text", (), "a"): own})
    loader.Datapath(bpf=own).unload()
    assert own.cleaned and loader._CACHE == {}


@pytest.mark.parametrize("decl", [
    'BPF_TABLE_PINNED("hash", u32, u64, pinned, 16, "/sys/fs/bpf/x");',
    'BPF_TABLE_PINNED("hash", u32, u64, pinned, 16, "/sys/fs/bpf/x", BPF_F_NO_PREALLOC);',
    'BPF_TABLE_SHARED("array", int, u64, shared, 4);',
    'BPF_TABLE_PUBLIC("hash", u32, u64, public, 16);',
    'BPF_TABLE("extern", int, u64, theirs, 4);',
    'BPF_F_TABLE("hash:/sys/fs/bpf/y", u32, u64, pinned2, 16, 0);',
    'BPF_QUEUESTACK_SHARED("queue", q, u64, 8, 0);',
])
def test_tables_not_private_to_the_module_are_refused(decl: str) -> None:
    text = f"BPF_HASH(own, u32, u64, 16);\n{decl}\nint f(void *c) {{ return 0; }}\n"
    assert bpf_instance.not_private(text)
    with pytest.raises(bpf_instance.CloneError, match="not private"):
        bpf_instance.Instance(SimpleNamespace(module=None), text)


def test_the_data_path_tables_are_all_private() -> None:
    for header in (None, "dp_decide_l7fp.h"):
        assert bpf_instance.not_private(loader.module_text(header)) == []
    assert bpf_instance.not_private('BPF_HASH(h, u32, u64, 16);\nBPF_ARRAY(a, u64, 4);\n'
                                    'BPF_QUEUE(q, u64, 8);\nBPF_ARRAY_OF_MAPS(o, "q", 4);\n') == []


def test_a_module_that_cannot_be_cloned_is_an_instance_and_compiled_for_each_later(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """CloneError: the compiled module becomes the instance's own (not a template left
    in _COMPILED), and later instances of its code compile without trying again."""
    import bcc

    compiled: list[_Module] = []
    tries: list[Any] = []

    def compile_(text: bytes, cflags: list[str]) -> _Module:
        compiled.append(_Module())
        return compiled[-1]

    def instance(template: Any, text: str) -> Any:
        tries.append(template)
        raise bpf_instance.CloneError("fake")

    monkeypatch.setattr(bcc, "BPF", compile_)
    monkeypatch.setattr(bpf_instance, "Instance", instance)
    monkeypatch.setattr(loader, "_COMPILED", {})
    monkeypatch.setattr(loader, "_CACHE", {})
    monkeypatch.setattr(loader, "_UNCLONABLE", set())
    timing: loader.Timing = {}
    a = loader.compile_module("int f;", instance="a", timing=timing)
    assert a is compiled[0] and tries == [a] and loader._COMPILED == {}
    assert set(timing) == {"compile", "maps"}
    b = loader.compile_module("int f;", instance="b")
    assert b is compiled[1] and len(compiled) == 2 and tries == [a]  # no clone tried again
    assert loader.compile_module("int f;", instance="b") is b
    other = loader.compile_module("int g;", instance="a")
    assert len(tries) == 2 and other is compiled[2]  # other code: tried
    for module in (a, b, other):
        loader.Datapath(bpf=module).unload()
    assert all(m.cleaned for m in compiled) and loader._CACHE == {} and loader._COMPILED == {}


@pytest.mark.parametrize("env, added", [
    ({}, ()),
    ({"L7FP_DP_RETURN": "0"}, ("-DDP_RETURN=0",)),
    ({"L7FP_DP_XRID": "0"}, ("-DDP_XRID=0",)),
    ({"L7FP_DP_RETURN": "0", "L7FP_DP_XRID": "0"}, ("-DDP_RETURN=0", "-DDP_XRID=0")),
])
def test_the_cflags_the_environment_adds(monkeypatch: pytest.MonkeyPatch, env: dict[str, str],
                                         added: tuple[str, ...]) -> None:
    """Datapath.load and benchmarks.startup_cost compile with the same cflags."""
    for var in ("L7FP_DP_RETURN", "L7FP_DP_XRID"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert loader.env_cflags(("-DL7FP_X=1",)) == ("-DL7FP_X=1", *added)
