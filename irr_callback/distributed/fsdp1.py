"""FSDP1 (`FullyShardedDataParallel`): per layer, the full parameters are summoned for the solve.

Why: FSDP1 flattens parameters, so there is no per-row view; `summon_full_params(writeback=True)`
materialises the whole model's parameters on every rank (use `use_orig_params=True`), then the
replicated owner/broadcast scheme runs and the writes are scattered back on exit. Peak: the full
model's weights on every rank during each layer's solve — prefer FSDP2 for large models.
"""

from __future__ import annotations

from .base import Replicated


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
