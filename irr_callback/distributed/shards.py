"""Full weights of sharded parameters, one group at a time, and the base weights kept in shards.

Why: the aligned twin, `safety_weight="auto"` and the callback's base snapshot need W_A of one
layer at a time, never the whole model on one rank. Every function here is collective (every rank
calls it with the same parameters in the same order), except `ShardedSnapshot.local_rows`:

- `gathered(model, params)`: the parameters whole on every rank, read only (ZeRO-3:
  `GatheredParameters(modifier_rank=None)`; FSDP1: `summon_full_params` of the units holding them);
- `writable(model, params)`: the same, and what rank 0 writes is kept on every rank on exit
  (ZeRO-3: `modifier_rank=0`; FSDP1: `writeback=True`, every rank writing the same values);
- `ShardedSnapshot`: the base weights as each rank's part (FSDP2: its rows of the DTensor; ZeRO-3 and
  FSDP1: its contiguous chunk of the flattened weight); `full(name)` gathers one weight.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from .collectives import device_of_group, rank_and_world


def is_dtensor(tensor: Any) -> bool:
    return type(tensor).__name__ == "DTensor" or type(getattr(tensor, "data", None)).__name__ == "DTensor"


def is_zero3(tensor: Any) -> bool:
    return hasattr(tensor, "ds_id")


def global_shape(param: Any) -> tuple[int, ...]:
    return tuple(getattr(param, "ds_shape", param.shape))


def fsdp1_units(model: torch.nn.Module, params: Sequence[torch.Tensor]) -> list[torch.nn.Module]:
    """The FSDP1 units whose own (not a nested unit's) parameters include one of `params`, outermost first."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    wanted = {id(p) for p in params}
    units = []
    for unit in FSDP.fsdp_modules(model):
        nested = {id(p) for sub in FSDP.fsdp_modules(unit) if sub is not unit for p in sub.parameters()}
        if any(id(p) in wanted and id(p) not in nested for p in unit.parameters()):
            units.append(unit)
    return units


@contextlib.contextmanager
def gathered(model: torch.nn.Module, params: Sequence[torch.Tensor], *, write: bool = False) -> Iterator[None]:
    """`params` whole (their full shape, `.data` readable) on every rank inside; `write`: rank 0's values
    are kept on exit (ZeRO-3 broadcasts them; FSDP1 writes back each rank's, so every rank must write the same)."""
    if any(is_zero3(p) for p in params) or model is None:  # DeepSpeed skips parameters it does not partition
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params), modifier_rank=0 if write else None):
            yield
        return
    from .collectives import is_fsdp1

    if is_fsdp1(model):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        initialise_fsdp1(model)
        with contextlib.ExitStack() as stack:
            for unit in fsdp1_units(model, params):
                stack.enter_context(FSDP.summon_full_params(unit, recurse=False, writeback=write))
            yield
        return
    yield


def initialise_fsdp1(model: torch.nn.Module) -> None:
    """FSDP1 initialises lazily from the first unit used, which becomes the root: make it the real root (a summon
    of its own parameters) before any inner unit is summoned or run on its own."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if isinstance(model, FSDP) and getattr(model, "_is_root", None) is None:
        with FSDP.summon_full_params(model, recurse=False, writeback=False):
            pass


def writable(model: torch.nn.Module, params: Sequence[torch.Tensor]) -> contextlib.AbstractContextManager:
    return gathered(model, params, write=True)


def local_rows(weight: Any) -> tuple[torch.Tensor, slice]:
    """An FSDP2 weight's local shard (a plain tensor aliasing the parameter's storage) and its global rows."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    placements = tuple(weight.placements)
    if any(not isinstance(p, Shard) or p.dim != 0 for p in placements if not p.is_replicate()):
        raise ValueError(f"FSDP2 weight with placements {placements}: only Shard(0) is supported")
    shape, offset = compute_local_shape_and_global_offset(weight.shape, weight.device_mesh, placements)
    return weight.to_local(), slice(offset[0], offset[0] + shape[0])


def full_weight(model: torch.nn.Module, param: torch.Tensor) -> torch.Tensor:
    """A CPU copy of one whole parameter on every rank (collective)."""
    if is_dtensor(param):
        return param.full_tensor().detach().to("cpu", copy=True)
    with gathered(model, [param]):
        return param.detach().to("cpu", copy=True)


class GatheredWeights(Mapping):
    """name → the whole parameter, gathered on access (collective: every rank reads the same names in the
    same order, e.g. the base fingerprint's sorted names)."""

    def __init__(self, model: torch.nn.Module, named: Mapping[str, torch.Tensor]) -> None:
        self.model, self.named = model, dict(named)

    def __getitem__(self, name: str) -> torch.Tensor:
        return full_weight(self.model, self.named[name])

    def __iter__(self):
        return iter(self.named)

    def __len__(self) -> int:
        return len(self.named)

    def shape(self, name: str) -> tuple[int, ...]:
        return global_shape(self.named[name])


class ShardedSnapshot(Mapping):
    """The base weights of the targets, each rank holding its part only (CPU, the weights' dtype).

    `layout` "rows" (FSDP2): the rank's rows of each weight, as its DTensor shard holds them;
    "flat" (ZeRO-3, FSDP1): chunk `rank` of `world` equal chunks of the flattened weight.
    Reading an entry gives this rank's part; `shape(name)` the whole weight's; `local_rows(name, rows)` the
    part as the row-local solve asks for it; `full(name)` the whole weight (collective)."""

    def __init__(self, layout: str, parts: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]], spans=None):
        self.layout, self.parts, self.shapes, self.spans = layout, parts, shapes, spans or {}
        self.rank, self.world = rank_and_world()

    @classmethod
    def take(cls, model: torch.nn.Module, named: Mapping[str, torch.Tensor]) -> ShardedSnapshot:
        """Every rank keeps its part of each weight (collective for ZeRO-3 / FSDP1: one weight gathered at a time)."""
        parts, shapes, spans = {}, {}, {}
        rank, world = rank_and_world()
        for name, param in named.items():
            if is_dtensor(param):
                shard, rows = local_rows(param)
                parts[name], spans[name], shapes[name] = shard.detach().to("cpu", copy=True), rows, global_shape(param)
                continue
            whole = full_weight(model, param)
            shapes[name], flat = tuple(whole.shape), whole.reshape(-1)
            chunk = math.ceil(flat.numel() / world)
            parts[name] = flat[rank * chunk : (rank + 1) * chunk].clone()
        return cls("rows" if spans else "flat", parts, shapes, spans)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.parts[name]

    def __iter__(self):
        return iter(self.parts)

    def __len__(self) -> int:
        return len(self.parts)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def local_rows(self, name: str, rows: slice | None) -> torch.Tensor:
        """This rank's rows of the base (FSDP2's row-local solve asks for exactly the rows it holds)."""
        if self.layout == "rows" and rows is not None and self.spans[name] == rows:
            return self.parts[name]
        raise RuntimeError(
            f"base '{name}' is held in shards; rows {rows} are not this rank's ({self.spans.get(name)}): "
            "gather it first (ShardedSnapshot.full, a collective)"
        )

    def full(self, name: str) -> torch.Tensor:
        """The whole base weight on every rank (collective)."""
        part, shape = self.parts[name], self.shapes[name]
        if self.layout == "rows":
            rows = math.ceil(shape[0] / self.world)
            padded = part.new_zeros((rows, *shape[1:]))
            padded[: part.shape[0]] = part
        else:
            padded = part.new_zeros(math.ceil(math.prod(shape) / self.world))
            padded[: part.numel()] = part
        device = device_of_group(padded)
        pieces = [torch.empty_like(padded, device=device) for _ in range(self.world)]
        dist.all_gather(pieces, padded.to(device))
        whole = torch.cat([p.cpu() for p in pieces])
        return whole[: shape[0]] if self.layout == "rows" else whole[: math.prod(shape)].view(shape)


class Overlay(Mapping):
    """`base` with some entries replaced by whole tensors (a sharded snapshot's gathered group)."""

    def __init__(self, whole: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> None:
        self.whole, self.base = whole, base

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.whole[name] if name in self.whole else self.base[name]

    def __iter__(self):
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)


def whole_base(base: Any, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The base weights `names` whole on every rank: gathered from a `ShardedSnapshot` (collective), else read."""
    if isinstance(base, ShardedSnapshot):
        return {n: base.full(n) for n in names}
    return {}


@contextlib.contextmanager
def generation_scope(model: torch.nn.Module) -> Iterator[None]:
    """`model.generate` under FSDP1 calls the wrapped model, not the root unit, so the root's own parameters
    (embedding, final norm, LM head) are summoned for it (the layer units gather their own in their forward).
    Other backends: nothing to do."""
    from .collectives import is_fsdp1

    if not is_fsdp1(model):
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(model, recurse=False, writeback=False):  # initialises from the root too
        yield
