"""FSDP1 (`FullyShardedDataParallel`): per layer, the full parameters are summoned for the solve.

Why: FSDP1 flattens parameters, so there is no per-row view; `summon_full_params(writeback=True)`
materialises the whole model's parameters on every rank (use `use_orig_params=True`), then the
replicated owner/broadcast scheme runs and the writes are scattered back on exit. Peak: the full
model's weights on every rank during each layer's solve — prefer FSDP2 for large models.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from .base import Replicated, Swap, WriteView, swap_by_copy
from .shards import gathered


class FSDP1(Replicated):
    kind = "fsdp1"
    stop_capture_early = False  # its forward hooks gather/release parameters: let every pass complete

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def solve_layer(self, groups, solver) -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(self.model, writeback=True, rank0_only=False):
            super().solve_layer(groups, solver)

    def restore(self, backup) -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(self.model, writeback=True, rank0_only=False):
            backup.restore()

    def swapped(self, swaps: Sequence[Swap]) -> contextlib.AbstractContextManager:
        """W_A written into the units holding the layer (`summon_full_params(writeback=True)`, every rank the same
        values), the layer's weights written back the same way on exit (a forward cannot run inside a summon)."""
        return swap_by_copy(swaps, self.write_scope, lambda value, tensor, rows, param: value)

    @contextlib.contextmanager
    def write_scope(self, params) -> Iterator[WriteView]:
        with gathered(self.model, params, write=True):
            yield lambda param: (param, None)
