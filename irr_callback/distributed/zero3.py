"""DeepSpeed ZeRO-3: parameters are flat partitions (`p.ds_id`, `p.ds_shape`); read and write per group.

Why per group: gathering one module group at a time keeps the peak at one group's full weights per
rank (plus the layer's Hessians). All ranks enter `GatheredParameters(params, modifier_rank=owner)`
(a collective); inside, every rank backs up the gathered weights and the owner solves and writes in
place; on exit DeepSpeed broadcasts the owner's values and re-partitions. DeepSpeed is imported
lazily: it is an optional extra.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from .base import Replicated, Swap, WriteView, swap_by_copy
from .collectives import assign_owners, raise_if_any_failed
from .shards import gathered


class Zero3(Replicated):
    kind = "zero3"
    stop_capture_early = False  # its forward hooks gather/release parameters: let every pass complete

    def solve_layer(self, groups, solver) -> None:
        import deepspeed

        owners = self.owners(groups)
        error: BaseException | None = None
        backup = solver.backup
        for (group, hessians), owner in zip(groups, owners):
            if any(t.kind == "lora" for t in group):
                raise ValueError(
                    f"{group[0].name}: LoRA layers under ZeRO-3 are not supported by IRR; merge "
                    "the adapter or run IRR on the saved model"
                )
            params = [t.weight for t in group]
            # a base held in partitions (the callback's snapshot) is gathered for the group, like its weights
            with self.whole_base([(group, hessians)], solver):
                with deepspeed.zero.GatheredParameters(params, modifier_rank=owner):
                    for p in params:  # every rank: restore() needs the same list everywhere
                        backup.save(p)
                    if owner == self.rank and error is None:
                        try:
                            solver(group, hessians)
                        except Exception as exc:
                            error = exc
        raise_if_any_failed(error)

    def swapped(self, swaps: Sequence[Swap]) -> contextlib.AbstractContextManager:
        """W_A written into the layer through a gather (rank 0's values broadcast and re-partitioned), and the
        layer's weights written back the same way on exit: every forward inside gathers W_A by DeepSpeed's hooks."""
        return swap_by_copy(swaps, self.write_scope, lambda value, tensor, rows, param: value)

    @contextlib.contextmanager
    def write_scope(self, params) -> Iterator[WriteView]:
        with gathered(None, params, write=True):
            yield lambda param: (param, None)

    def owners(self, groups):
        return assign_owners([sum(_numel(t.weight) for t in g) for g, _ in groups], self.world_size)

    def restore(self, backup) -> None:
        """Write the saved full weights back through a gather (rank 0 modifies, all ranks take part)."""
        import deepspeed

        for param, original in backup.originals():
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                if self.rank == 0:
                    param.data.copy_(original.to(param.device))
        backup.close()


def _numel(param) -> int:
    shape = getattr(param, "ds_shape", param.shape)
    n = 1
    for s in shape:
        n *= int(s)
    return n
