"""Backend adapters for sharded weights: FSDP2 (`fsdp2.RowSharded`), ZeRO-3 (`zero3.Zero3`), FSDP1
(`fsdp1.FSDP1`). Each is a realign context (see `irr_callback.distributed.SingleProcess`)."""
