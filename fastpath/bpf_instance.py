"""More instances of one compiled BCC module: the compile once, the maps per node.

Owner: K2. Used by `fastpath.loader.compile_module` only. BCC compiles a
module and creates its maps in one step (`BPF(text=...)`), and it has no
object cache: two nodes with byte-identical C text and cflags (the usual case
in a mesh: same plan version, same knobs) paid the whole clang/LLVM compile
twice (measured in docs/fastpath.md, "Bring-up time").

BCC's relocation is simple: after the compile, each function's code holds its
maps as `ld_imm64` instructions with `src_reg` BPF_PSEUDO_MAP_FD and the map's
fd in `imm` (bcc's BPFModule::load_maps). An `Instance` makes a new map for
every map of the compiled module (the kernel's own description of it: type,
sizes, flags, name, BTF ids; a map-in-map gets the instance's inner map as its
template), and loads each program from the module's code with those fds
swapped for its own. What BCC reads from the module (table layouts for the
`Table` wrappers, the license, BTF func/line info for the load) is the same
for every instance, so the module itself serves as the template; it is never
attached and must outlive its instances (the loader's cache keeps it).

An `Instance` is a `bcc.BPF` whose table, program and cleanup methods work
on its own maps and programs (the rest, ring buffers and the program-type
constants, is BCC's). Anything it cannot reproduce exactly (an unknown pseudo
load, a map-in-map whose inner map it cannot name, a table declared pinned,
shared, public or extern, which a private copy would silently split) raises
`CloneError`: the caller compiles. Imports bcc: import this module only where
BCC is needed.
"""

from __future__ import annotations

import ctypes as ct
import errno
import json
import os
import re
import struct
from typing import Any

from bcc import BPF
from bcc.libbcc import lib
from bcc.table import Table

from fastpath import bpfsys

_LD_IMM64 = 0x18
_PSEUDO_MAP_FD, _PSEUDO_MAP_VALUE, _PSEUDO_FUNC = 1, 2, 4  # src_reg of an ld_imm64
_MAP_IN_MAP = (12, 13)  # BPF_MAP_TYPE_ARRAY_OF_MAPS, _HASH_OF_MAPS
_QUEUE_STACK = (22, 23)
_INNER = re.compile(r'\bBPF_(?:ARRAY|HASH)_OF_MAPS\(\s*(\w+)\s*,[^;]*?"(\w+)"')
# BCC's tables that are not the module's own: BPF_TABLE_PINNED, _PUBLIC, _SHARED (and
# BPF_QUEUESTACK_'s), a table type "extern" or "TYPE:/pin/path", their map sections
_NOT_PRIVATE = re.compile(r'\bBPF_\w+_(?:PINNED\d?|PUBLIC|SHARED)\s*\('
                          r'|\bBPF_(?:F_)?TABLE\s*\(\s*"(?:extern"|[^"]*:)'
                          r'|\bsection\(\s*"maps/(?:export|shared|extern)"')


class CloneError(RuntimeError):
    """The compiled module cannot be instantiated again exactly: compile it instead."""


def inner_maps(text: str) -> dict[str, str]:
    """Map-in-map name -> the name of its inner map, from BCC's declarations in `text`."""
    return {outer: inner for outer, inner in _INNER.findall(text)}


def not_private(text: str) -> list[str]:
    """The declarations in `text` of tables that are not the module's own (pinned,
    shared, public, extern): an instance's private copy of one would split it."""
    return [m.group(0) for m in _NOT_PRIVATE.finditer(text)]


def relocate(code: bytes, fds: dict[int, int]) -> bytes:
    """`code` (BPF instructions) with the map fd of every map load swapped by
    `fds`; CloneError for a map fd not in `fds` or a pseudo load of another
    kind than a map, a callback (BPF_PSEUDO_FUNC) or a plain constant."""
    ins = bytearray(code)
    i = 0
    while i + 16 <= len(ins):
        if ins[i] != _LD_IMM64:
            i += 8
            continue
        src = ins[i + 1] >> 4
        if src in (_PSEUDO_MAP_FD, _PSEUDO_MAP_VALUE):
            (fd,) = struct.unpack_from("<i", ins, i + 4)
            if fd not in fds:
                raise CloneError(f"code loads fd {fd}, not one of the module's maps")
            struct.pack_into("<i", ins, i + 4, fds[fd])
        elif src not in (0, _PSEUDO_FUNC):
            raise CloneError(f"code has an ld_imm64 of kind {src}")
        i += 16  # ld_imm64 takes two slots
    return bytes(ins)


def table_fds(module: Any) -> dict[bytes, int]:
    """Table name -> map fd of a compiled BCC module (its own maps)."""
    lib.bpf_num_tables.restype = ct.c_size_t  # python-bcc declares no types for these two
    lib.bpf_num_tables.argtypes = [ct.c_void_p]
    lib.bpf_table_name.restype = ct.c_char_p
    lib.bpf_table_name.argtypes = [ct.c_void_p, ct.c_size_t]
    names = [lib.bpf_table_name(module, i) for i in range(lib.bpf_num_tables(module))]
    return {n: int(lib.bpf_table_fd(module, n)) for n in names}


class Instance(BPF):
    """Maps and programs of their own over the code of `template` (a compiled
    `bcc.BPF`, which the caller keeps alive while this instance lives).
    `text` is the module's C text (for the inner map of each map-in-map)."""

    def __init__(self, template: Any, text: str) -> None:  # no BPF.__init__: no compile
        shared = not_private(text)
        if shared:
            raise CloneError(f"tables not private to the module: {shared}")
        self.template = template
        self.module = template.module  # table layouts, code, license, BTF info
        self.debug = 0
        self.funcs: dict[bytes, Any] = {}
        self.tables: dict[Any, Any] = {}
        self.perf_buffers: dict[Any, Any] = {}
        self._ringbuf_manager: Any = None
        self.fds: dict[bytes, int] = {}  # table name -> this instance's map fd
        self._own_fd: dict[int, int] = {}  # the template's map fd -> ours
        try:
            self._make_maps(table_fds(self.module), inner_maps(text))
            for i in range(lib.bpf_num_functions(self.module)):
                self.dump_func(lib.bpf_function_name(self.module, i))  # CloneError now, not later
        except BaseException:
            self._close_maps()
            raise

    def _make_maps(self, theirs: dict[bytes, int], inner: dict[str, str]) -> None:
        inner_names = {n.encode() for n in inner.values()}
        btf_fds: dict[int, int] = {}
        try:  # inner maps first: a map-in-map is created with its inner map as template
            for name in sorted(theirs, key=lambda n: n not in inner_names):
                info = bpfsys.map_info(theirs[name])
                inner_fd = 0
                if info.type in _MAP_IN_MAP:
                    inner_name = inner.get(name.decode(), "").encode()
                    if inner_name not in self.fds:
                        raise CloneError(f"map-in-map {name.decode()}: inner map not known")
                    inner_fd = self.fds[inner_name]
                if info.btf_id and info.btf_id not in btf_fds:
                    btf_fds[info.btf_id] = bpfsys.btf_fd_by_id(info.btf_id)
                fd = bpfsys.map_create_like(info, btf_fds.get(info.btf_id, 0), inner_fd)
                self.fds[name] = fd
                self._own_fd[theirs[name]] = fd
        finally:
            for fd in btf_fds.values():
                os.close(fd)

    def dump_func(self, func_name: str | bytes) -> bytes:
        """The code of function `func_name` with this instance's map fds."""
        return relocate(self.template.dump_func(func_name), self._own_fd)

    def load_func(self, func_name: str | bytes, prog_type: int, device: Any = None,
                  attach_type: int = -1) -> Any:
        """As `bcc.BPF.load_func`: the module's function, loaded with our maps."""
        name = func_name.encode() if isinstance(func_name, str) else func_name
        if name in self.funcs:
            return self.funcs[name]
        code = self.dump_func(name)
        buf = ct.create_string_buffer(code, len(code))
        fd = lib.bcc_func_load(self.module, prog_type, name, buf, len(code),
                               lib.bpf_module_license(self.module),
                               lib.bpf_module_kern_version(self.module),
                               0, None, 0, device, attach_type)
        if fd < 0:
            err = ct.get_errno() or errno.EINVAL
            raise Exception(f"Failed to load BPF program {name!r}: {os.strerror(err)}")
        fn = self.Function(self, name, fd)
        self.funcs[name] = fn
        return fn

    def get_table(self, name: str | bytes, keytype: Any = None, leaftype: Any = None,
                  reducer: Any = None) -> Any:
        """As `bcc.BPF.get_table`: the module's layout, this instance's map."""
        key = name.encode() if isinstance(name, str) else name
        if key not in self.fds:
            raise KeyError(name)
        map_id = lib.bpf_table_id(self.module, key)
        if not keytype and lib.bpf_table_type_id(self.module, map_id) not in _QUEUE_STACK:
            keytype = BPF._decode_table_type(json.loads(lib.bpf_table_key_desc(self.module, key)))
        if not leaftype:
            leaftype = BPF._decode_table_type(
                json.loads(lib.bpf_table_leaf_desc(self.module, key)))
        return Table(self, map_id, self.fds[key], keytype, leaftype, key, reducer=reducer)

    def close(self) -> None:
        """Close this instance's programs and maps (BPF.close would free the template)."""
        for fn in self.funcs.values():
            os.close(fn.fd)
        self.funcs.clear()
        self.tables.clear()
        self._close_maps()

    def cleanup(self) -> None:
        """`close`, and the ring buffers' reader."""
        if self._ringbuf_manager:
            lib.bpf_free_ringbuf(self._ringbuf_manager)
            self._ringbuf_manager = None
        self.close()

    def _close_maps(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
        self._own_fd.clear()
