"""Thin ctypes layer over libbpf for what BCC 0.26 cannot do.

Owner: K2. Used by `fastpath.loader`: SOCKHASH/QUEUE map operations, BPF links
(detached automatically when the owning process dies), legacy attach/detach,
and a query of the programs attached to a cgroup (to prove nothing is left).
Every function raises OSError naming the operation when the kernel refuses.
"""

from __future__ import annotations

import ctypes as ct
import ctypes.util
import os
from typing import Any

CGROUP_SOCK_OPS = 3
SK_MSG_VERDICT = 7
SK_SKB_VERDICT = 38
BPF_MAP_TYPE_QUEUE = 22

_lib: Any = None


def lib() -> Any:
    """libbpf, loaded once (the one BCC itself links against)."""
    global _lib
    if _lib is None:
        name = ctypes.util.find_library("bpf") or "libbpf.so.1"
        _lib = ct.CDLL(name, use_errno=True)
        _lib.bpf_map_update_elem.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_uint64]
        _lib.bpf_map_delete_elem.argtypes = [ct.c_int, ct.c_void_p]
        _lib.bpf_map_lookup_and_delete_elem.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p]
        _lib.bpf_map_lookup_elem.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p]
        _lib.bpf_link_create.argtypes = [ct.c_int, ct.c_int, ct.c_int, ct.c_void_p]
        _lib.bpf_prog_attach.argtypes = [ct.c_int, ct.c_int, ct.c_int, ct.c_uint]
        _lib.bpf_prog_detach2.argtypes = [ct.c_int, ct.c_int, ct.c_int]
        _lib.bpf_map_create.argtypes = [ct.c_int, ct.c_char_p, ct.c_uint32, ct.c_uint32,
                                        ct.c_uint32, ct.c_void_p]
        _lib.bpf_prog_query.argtypes = [ct.c_int, ct.c_int, ct.c_uint32,
                                        ct.POINTER(ct.c_uint32), ct.POINTER(ct.c_uint32),
                                        ct.POINTER(ct.c_uint32)]
    return _lib


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ct.get_errno() or -ret
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def table_fd(bpf: Any, name: str) -> int:
    """The fd of BCC table `name` of module `bpf` (works for SOCKHASH too); of
    a `fastpath.bpf_instance.Instance`, its own map's."""
    from bcc import libbcc

    own = getattr(bpf, "fds", None)
    if own is not None:
        fd = own.get(name.encode(), -1)
    else:
        fd = int(libbcc.lib.bpf_table_fd(bpf.module, name.encode()))
    if fd < 0:
        raise OSError(0, f"no BPF table {name!r} in the module")
    return fd


def map_update(fd: int, key: Any, value: Any, flags: int = 0) -> None:
    _check(lib().bpf_map_update_elem(fd, ct.byref(key), ct.byref(value), flags),
           f"map update (fd {fd})")


def map_has(fd: int, key: Any, value_size: int) -> bool:
    """True when `key` is in the map (one syscall; BCC's table wrapper costs more)."""
    buf = (ct.c_uint8 * value_size)()
    return bool(lib().bpf_map_lookup_elem(fd, ct.byref(key), ct.byref(buf)) == 0)


def map_delete(fd: int, key: Any) -> bool:
    """Delete `key`; False when it was not there."""
    ret = lib().bpf_map_delete_elem(fd, ct.byref(key))
    return ret == 0


def table_get(table: Any, key: int) -> Any | None:
    """`table[key]` of a BCC table keyed by one integer (an upstream's cookie),
    None when absent: the agents' record lookups (retry, delay, reset, timers)."""
    try:
        return table[table.Key(key)]
    except KeyError:
        return None


def table_delete(table: Any, key: int) -> None:
    """Delete `key` from a BCC table keyed by one integer; absent is fine."""
    try:
        del table[table.Key(key)]
    except KeyError:
        pass


def map_key_count(fd: int, key_size: int, limit: int = 1 << 20) -> int:
    """Number of keys in a map (works for SOCKHASH, which BCC cannot wrap)."""
    lib().bpf_map_get_next_key.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p]
    cur = (ct.c_uint8 * key_size)()
    nxt = (ct.c_uint8 * key_size)()
    n = 0
    if lib().bpf_map_get_next_key(fd, None, ct.byref(nxt)) != 0:
        return 0
    while n < limit:
        n += 1
        ct.memmove(cur, nxt, key_size)
        if lib().bpf_map_get_next_key(fd, ct.byref(cur), ct.byref(nxt)) != 0:
            break
    return n


def queue_create(name: str, value_size: int, depth: int) -> int:
    return _check(lib().bpf_map_create(BPF_MAP_TYPE_QUEUE, name.encode()[:15], 0, value_size,
                                       depth, None), f"create queue map {name}")


def queue_push(fd: int, value: Any) -> None:
    _check(lib().bpf_map_update_elem(fd, None, ct.byref(value), 0), f"queue push (fd {fd})")


def queue_pop(fd: int) -> int | None:
    v = ct.c_uint64()
    if lib().bpf_map_lookup_and_delete_elem(fd, None, ct.byref(v)) != 0:
        return None
    return int(v.value)


def link_create(prog_fd: int, target_fd: int, attach_type: int) -> int:
    """A BPF link fd, or -1 when the kernel has no link for this attach type."""
    ret = lib().bpf_link_create(prog_fd, target_fd, attach_type, None)
    return ret if ret >= 0 else -1


def prog_attach(prog_fd: int, target_fd: int, attach_type: int) -> None:
    _check(lib().bpf_prog_attach(prog_fd, target_fd, attach_type, 0),
           f"attach prog (type {attach_type})")


def prog_detach(prog_fd: int, target_fd: int, attach_type: int) -> None:
    _check(lib().bpf_prog_detach2(prog_fd, target_fd, attach_type),
           f"detach prog (type {attach_type})")


def attached_prog_ids(cgroup_path: str, attach_type: int = CGROUP_SOCK_OPS) -> list[int]:
    """Ids of the programs attached to a cgroup for `attach_type` (links included)."""
    fd = os.open(cgroup_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        ids = (ct.c_uint32 * 64)()
        cnt = ct.c_uint32(64)
        flags = ct.c_uint32(0)
        _check(lib().bpf_prog_query(fd, attach_type, 0, ct.byref(flags), ids, ct.byref(cnt)),
               f"query programs of {cgroup_path}")
        return [int(ids[i]) for i in range(cnt.value)]
    finally:
        os.close(fd)


class _ProgInfo(ct.Structure):
    _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32), ("tag", ct.c_uint8 * 8),
                ("jited_prog_len", ct.c_uint32), ("xlated_prog_len", ct.c_uint32),
                ("jited_prog_insns", ct.c_uint64), ("xlated_prog_insns", ct.c_uint64),
                ("load_time", ct.c_uint64), ("created_by_uid", ct.c_uint32),
                ("nr_map_ids", ct.c_uint32), ("map_ids", ct.c_uint64),
                ("name", ct.c_char * 16), ("_rest", ct.c_uint8 * 160)]


def _obj_info(fd: int, info: Any, what: str) -> Any:
    """`info` (a bpf_*_info struct) filled by BPF_OBJ_GET_INFO_BY_FD for `fd`."""
    size = ct.c_uint32(ct.sizeof(info))
    lib().bpf_obj_get_info_by_fd.argtypes = [ct.c_int, ct.c_void_p, ct.POINTER(ct.c_uint32)]
    _check(lib().bpf_obj_get_info_by_fd(fd, ct.byref(info), ct.byref(size)), what)
    return info


def prog_id(prog_fd: int) -> int:
    """The kernel id of a loaded program."""
    return int(_obj_info(prog_fd, _ProgInfo(), "program info").id)


class MapInfo(ct.Structure):
    """struct bpf_map_info (uapi/linux/bpf.h)."""

    _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32), ("key_size", ct.c_uint32),
                ("value_size", ct.c_uint32), ("max_entries", ct.c_uint32),
                ("map_flags", ct.c_uint32), ("name", ct.c_char * 16), ("ifindex", ct.c_uint32),
                ("btf_vmlinux_value_type_id", ct.c_uint32), ("netns_dev", ct.c_uint64),
                ("netns_ino", ct.c_uint64), ("btf_id", ct.c_uint32),
                ("btf_key_type_id", ct.c_uint32), ("btf_value_type_id", ct.c_uint32),
                ("_pad", ct.c_uint32), ("map_extra", ct.c_uint64)]


class _MapCreateOpts(ct.Structure):
    """struct bpf_map_create_opts (libbpf 1.x)."""

    _fields_ = [("sz", ct.c_size_t), ("btf_fd", ct.c_uint32), ("btf_key_type_id", ct.c_uint32),
                ("btf_value_type_id", ct.c_uint32), ("btf_vmlinux_value_type_id", ct.c_uint32),
                ("inner_map_fd", ct.c_uint32), ("map_flags", ct.c_uint32),
                ("map_extra", ct.c_uint64), ("numa_node", ct.c_uint32),
                ("map_ifindex", ct.c_uint32)]


def map_info(map_fd: int) -> MapInfo:
    """The kernel's description of a map (type, sizes, flags, name, BTF ids)."""
    info: MapInfo = _obj_info(map_fd, MapInfo(), f"map info (fd {map_fd})")
    return info


def btf_fd_by_id(btf_id: int) -> int:
    """A new fd of the BTF object `btf_id` (the caller closes it)."""
    lib().bpf_btf_get_fd_by_id.argtypes = [ct.c_uint32]
    return _check(lib().bpf_btf_get_fd_by_id(btf_id), f"BTF fd of id {btf_id}")


def map_create_like(info: MapInfo, btf_fd: int = 0, inner_map_fd: int = 0) -> int:
    """A new, empty map as `info` describes (with `btf_fd` when `info` has BTF
    ids; `inner_map_fd` the template of a map-in-map's values)."""
    opts = _MapCreateOpts(sz=ct.sizeof(_MapCreateOpts), inner_map_fd=inner_map_fd,
                          map_flags=info.map_flags, map_extra=info.map_extra)
    if info.btf_id:
        opts.btf_fd = btf_fd
        opts.btf_key_type_id = info.btf_key_type_id
        opts.btf_value_type_id = info.btf_value_type_id
        opts.btf_vmlinux_value_type_id = info.btf_vmlinux_value_type_id
    return _check(lib().bpf_map_create(info.type, info.name, info.key_size, info.value_size,
                                       info.max_entries, ct.addressof(opts)),
                  f"create map {info.name.decode(errors='replace')}")


def prog_map_ids(prog_fd: int) -> list[int]:
    """The kernel ids of the maps a loaded program uses."""
    count = _obj_info(prog_fd, _ProgInfo(), "program info").nr_map_ids
    ids = (ct.c_uint32 * count)()
    _obj_info(prog_fd, _ProgInfo(nr_map_ids=count, map_ids=ct.addressof(ids)), "program maps")
    return [int(i) for i in ids]


class _TestRunOpts(ct.Structure):
    """struct bpf_test_run_opts (libbpf 1.x)."""

    _fields_ = [("sz", ct.c_size_t), ("data_in", ct.c_void_p), ("data_out", ct.c_void_p),
                ("data_size_in", ct.c_uint32), ("data_size_out", ct.c_uint32),
                ("ctx_in", ct.c_void_p), ("ctx_out", ct.c_void_p),
                ("ctx_size_in", ct.c_uint32), ("ctx_size_out", ct.c_uint32),
                ("retval", ct.c_uint32), ("repeat", ct.c_int), ("duration", ct.c_uint32),
                ("flags", ct.c_uint32), ("cpu", ct.c_uint32), ("batch_size", ct.c_uint32)]


def prog_test_run(prog_fd: int, data: Any) -> int:
    """Run a loaded program once over `data` (a ctypes object) with
    BPF_PROG_TEST_RUN; its return value (fastpath.agent_outlier's op program)."""
    opts = _TestRunOpts(sz=ct.sizeof(_TestRunOpts), data_in=ct.addressof(data),
                        data_size_in=ct.sizeof(data))
    fn = lib().bpf_prog_test_run_opts
    fn.argtypes = [ct.c_int, ct.POINTER(_TestRunOpts)]
    _check(fn(prog_fd, ct.byref(opts)), f"test run of prog fd {prog_fd}")
    return int(opts.retval)
