"""A KernelPlan back from its JSON form (`KernelPlan.to_json`), for tools outside the server.

Owned by the split. `l7fp mesh audit` (mesh/audit.py) reads each node's plan
from the control plane's `/debug/fastpath/plans` and needs the real dataclasses
again to derive requests and ask the reference model (fastpath.reference).
Generic over the dataclasses of fastpath.plan: field types come from their
annotations, so a field added to the plan needs no change here.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import types
import typing
from typing import Any

from fastpath import plan as P

# Which member of the Action union a JSON object is (plan._jsonable writes "type").
_ACTIONS = {c.__name__: c for c in (P.ClusterAction, P.DirectResponse, P.Redirect)}


class PlanJsonError(ValueError):
    """The JSON is not a KernelPlan as `KernelPlan.to_json` writes it; says where."""


def plan_from_json(d: Any) -> P.KernelPlan:
    """The KernelPlan whose `to_json()` is `d`. Raises PlanJsonError naming the bad place."""
    out = _value(P.KernelPlan, d, "plan")
    assert isinstance(out, P.KernelPlan)
    return out


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, vars(P))


def _value(tp: Any, v: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _union(typing.get_args(tp), v, where)
    if origin is tuple:
        return _tuple(typing.get_args(tp), v, where)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(v)
        except ValueError:
            raise PlanJsonError(f"{where}: {v!r} is no {tp.__name__}") from None
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return _dataclass(tp, v, where)
    return v  # str, int, bool, float, Any


def _union(args: tuple[Any, ...], v: Any, where: str) -> Any:
    if v is None and type(None) in args:
        return None
    real = [a for a in args if a is not type(None)]
    if len(real) == 1:
        return _value(real[0], v, where)
    if isinstance(v, dict) and v.get("type") in _ACTIONS:  # the Action union
        return _dataclass(_ACTIONS[v["type"]], v, where)
    raise PlanJsonError(f"{where}: cannot tell which of {real} {v!r} is")


def _tuple(args: tuple[Any, ...], v: Any, where: str) -> tuple[Any, ...]:
    if not isinstance(v, list):
        raise PlanJsonError(f"{where}: expected a list, got {type(v).__name__}")
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_value(args[0], x, f"{where}[{i}]") for i, x in enumerate(v))
    if len(v) != len(args):
        raise PlanJsonError(f"{where}: expected {len(args)} items, got {len(v)}")
    return tuple(_value(a, x, f"{where}[{i}]") for i, (a, x) in enumerate(zip(args, v, strict=True)))


def _dataclass(cls: type, v: Any, where: str) -> Any:
    if not isinstance(v, dict):
        raise PlanJsonError(f"{where}: expected an object for {cls.__name__}, got {type(v).__name__}")
    hints = _hints(cls)
    kw = {f.name: _value(hints[f.name], v[f.name], f"{where}.{f.name}")
          for f in dataclasses.fields(cls) if f.name in v}
    try:
        return cls(**kw)
    except TypeError as exc:
        raise PlanJsonError(f"{where}: {cls.__name__}: {exc}") from None
