"""A small deterministic training loop (AdamW, warm-up / decay, seeded batch order) for CPU."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Sequence

import torch


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------
def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch ops on one CPU thread. At these tensor sizes extra threads only add overhead (5x
    slower when other processes compete for the cores), and a fixed thread count makes CPU
    results reproducible whatever the machine's default."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def pad_batch(rows: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(r["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def train_loop(
    model: torch.nn.Module,
    rows: Sequence[dict[str, list[int]]],
    *,
    steps: int,
    lr: float,
    batch_size: int,
    pad_id: int,
    seed: int = 0,
    warmup_ratio: float = 0.1,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
) -> list[float]:
    """Plain AdamW loop over ``steps`` batches drawn with a seeded permutation (epochs reshuffle).
    Linear warm-up then linear decay to 10% of ``lr``. Returns the loss per step."""
    if not rows:
        raise ValueError("No training rows.")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    warm = max(1, int(steps * warmup_ratio))

    def schedule(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.1, 1.0 - 0.9 * (step - warm) / max(1, steps - warm))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    losses: list[float] = []
    model.train()
    with single_thread():
        for _ in range(steps):
            if len(order) < batch_size:
                order += torch.randperm(len(rows), generator=gen).tolist()
            idx, order = order[:batch_size], order[batch_size:]
            loss = model(**pad_batch([rows[i] for i in idx], pad_id)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
    model.eval()
    return losses
