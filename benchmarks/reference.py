"""A straightforward re-implementation of the IRR reference pipeline, written from the method
document (/docs: irr-method.md), for benchmarking only.

What makes it "reference style": one H and one Cholesky chain per module (cholesky →
cholesky_inverse → cholesky(upper)), a Python loop over every input column with a rank-1 update
of the rest of the 128-column block (SparseGPT's lazy batch update after each block), and whole-model
float32 dictionaries of the base, the safety vector (and the Fisher when used). Padding is masked
out of H exactly as ours does, so that both produce the same weights and can be compared.
"""

from __future__ import annotations

import torch
from torch import nn


def reference_matrix(
    delta: torch.Tensor,
    safety: torch.Tensor,
    hessian: torch.Tensor,
    *,
    blocksize: int = 128,
    percdamp: float = 0.01,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """IRR (remove every sign conflict) + OBS recalibration of one (out, in) delta, column by column."""
    w = delta.clone().to(dtype)
    h = hessian.clone().to(dtype)
    rows, cols = w.shape
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    damp = percdamp * torch.mean(torch.diag(h))
    idx = torch.arange(cols)
    h[idx, idx] += damp
    hinv = torch.linalg.cholesky(h)
    hinv = torch.cholesky_inverse(hinv)
    hinv = torch.linalg.cholesky(hinv, upper=True)
    losses = torch.zeros(rows, dtype=dtype)
    sign_v = torch.sign(safety.to(dtype))
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        losses1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        mask1 = torch.sign(w1) != sign_v[:, i1:i2]  # the adaptive mask: decided on the updated block
        for i in range(count):
            col = w1[:, i]
            d = hinv1[i, i]
            q = col.clone()
            q[mask1[:, i]] = 0
            q1[:, i] = q
            losses1[:, i] = (col - q) ** 2 / d**2
            e = (col - q) / d
            w1[:, i:] -= e.unsqueeze(1).matmul(hinv1[i, i:].unsqueeze(0))
            err1[:, i] = e
        w[:, i1:i2] = q1
        losses += torch.sum(losses1, 1) / 2
        w[:, i2:] -= err1.matmul(hinv[i1:i2, i2:])
    return w


def reference_realign(
    model: nn.Module, base: dict, safety: dict, batches: list[dict], *, blocksize: int = 128, percdamp: float = 0.01
) -> None:
    """The reference pipeline on a Llama-style model, in place: layer-0 capture, per layer one pass with
    per-module H hooks, per-module Cholesky + per-column loop, then a propagation pass."""
    layers = model.model.layers
    # whole-model float32 dictionaries, as the reference loads them
    base32 = {k: v.float() for k, v in base.items()}
    safety32 = {k: v.float() for k, v in safety.items()}
    captured: list[tuple[torch.Tensor, dict]] = []

    class Stop(Exception):
        pass

    def capture(module, args, kwargs):
        x = kwargs["hidden_states"] if not args else args[0]
        captured.append((x, {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise Stop

    handle = layers[0].register_forward_pre_hook(capture, with_kwargs=True)
    with torch.no_grad():
        for b in batches:
            try:
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
            except Stop:
                pass
    handle.remove()
    hidden = [x for x, _ in captured]
    kwargs = [k for _, k in captured]
    masks = [b["attention_mask"] for b in batches]
    with torch.no_grad():
        for index, layer in enumerate(layers):
            linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
            sums = {n: torch.zeros(m.in_features, m.in_features) for n, m in linears.items()}
            counts = {n: 0 for n in linears}
            state = {"b": 0}

            def make_hook(name):
                def hook(module, inputs, output):
                    x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
                    x = x[masks[state["b"]].reshape(-1).bool()]  # noqa: B023 (called within this iteration)
                    sums[name].addmm_(x.t(), x)  # noqa: B023
                    counts[name] += x.shape[0]  # noqa: B023

                return hook

            handles = [m.register_forward_hook(make_hook(n)) for n, m in linears.items()]
            for b, x in enumerate(hidden):
                state["b"] = b
                layer(x, **kwargs[b])
            for h in handles:
                h.remove()
            for n, m in linears.items():
                key = f"model.layers.{index}.{n}.weight"
                hessian = sums[n] * (2.0 / counts[n])
                delta = m.weight.float() - base32[key]
                new_delta = reference_matrix(delta, safety32[key], hessian, blocksize=blocksize, percdamp=percdamp)
                m.weight.copy_((base32[key] + new_delta).to(m.weight.dtype))
            hidden = [_first(layer(x, **kwargs[b])) for b, x in enumerate(hidden)]


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out
