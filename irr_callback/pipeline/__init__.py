"""The data path of IRR, one file per step (see docs/architecture.md):

1. `streams` / `capture`: named input streams (calibration; safety next), their layer-0 inputs and
   every layer's arguments, captured once;
2. `hessians`: per layer, one H per distinct target input and per stream (padding masked, summed over
   processes);
3. `inputs` + `solve`: the safety inputs per target, and the group solve (`core.realign_group`)
   that every backend calls;
4. `writing`: writes of realigned weights and the all-or-nothing backups; `offload`: a layer's
   load from and write to a checkpoint;
5. `loop`: the one layer loop, used by `in_memory.realign` and `checkpoint.realign_checkpoint`.
"""

from .checkpoint import realign_checkpoint
from .in_memory import realign


__all__ = ["realign", "realign_checkpoint"]
