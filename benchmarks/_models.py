"""Llama-shaped test checkpoints for the benchmarks: base, "fine-tuned" (base + noise), sign-only
safety vector and calibration tokens, all written as safetensors."""

from __future__ import annotations

import os

import torch


def llama_config(hidden: int, layers: int, inter: int | None = None, vocab: int = 8000, max_tokens: int = 2048):
    from transformers import LlamaConfig

    heads = max(1, hidden // 64)
    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter or int(hidden * 2.6875) // 64 * 64,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        vocab_size=vocab,
        pad_token_id=0,
        max_position_embeddings=max(2048, max_tokens),
        tie_word_embeddings=False,
    )


def build_checkpoints(
    workdir: str, cfg, *, seqs: int, tokens: int, dtype: torch.dtype = torch.float32, seed: int = 0
) -> dict:
    """Write workdir/{base,ft}/ (save_pretrained), workdir/safety.safetensors, workdir/calibration.safetensors."""
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    model.save_pretrained(os.path.join(workdir, "base"), max_shard_size="1GB")
    g = torch.Generator().manual_seed(seed + 1)
    safety = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".layers." in name and p.dim() == 2:
                safety[name] = torch.sign(torch.randn(p.shape, generator=g)).to(torch.int8)
            p.add_((0.002 * torch.randn(p.shape, generator=g)).to(dtype))
    model.save_pretrained(os.path.join(workdir, "ft"), max_shard_size="1GB")
    save_file(safety, os.path.join(workdir, "safety.safetensors"))
    ids = torch.randint(3, cfg.vocab_size, (seqs, tokens), generator=g)
    save_file({"input_ids": ids}, os.path.join(workdir, "calibration.safetensors"))
    info = {
        "target_params": sum(t.numel() for t in safety.values()),
        "model_params": sum(p.numel() for p in model.parameters()),
        "checkpoint_bytes": dir_bytes(os.path.join(workdir, "ft")),
    }
    del model, safety
    return info


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def calibration_batches(workdir: str, batch: int, device: str = "cpu") -> list[dict]:
    from safetensors.torch import load_file

    ids = load_file(os.path.join(workdir, "calibration.safetensors"))["input_ids"]
    return [
        {"input_ids": ids[i : i + batch].to(device), "attention_mask": torch.ones_like(ids[i : i + batch]).to(device)}
        for i in range(0, len(ids), batch)
    ]


def warm_up(kind: str) -> None:
    """Run the pipeline once on a 1-layer toy model so that one-time costs (code pages of torch's
    LAPACK/BLAS kernels, lazy imports, thread pools) are paid before the peak-memory baseline."""
    import copy

    from transformers import LlamaForCausalLM

    cfg = llama_config(64, 1, inter=128, vocab=256)
    base = LlamaForCausalLM(cfg).eval()
    ft = copy.deepcopy(base)
    safety = {
        n: torch.sign(torch.randn(p.shape)).to(torch.int8)
        for n, p in base.named_parameters()
        if ".layers." in n and p.dim() == 2
    }
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(0.01 * torch.randn(p.shape))
    ids = torch.randint(3, 256, (2, 32))
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    if kind == "reference":
        from reference import reference_realign

        reference_realign(ft, dict(base.state_dict()), safety, batches)
    elif kind == "offline":
        import tempfile

        from irr_callback import realign_checkpoint

        with tempfile.TemporaryDirectory() as tmp:
            ft.save_pretrained(tmp + "/ft")
            realign_checkpoint(
                tmp + "/ft",
                base=base,
                safety_vector=safety,
                calibration=batches,
                output_dir=tmp + "/out",
                progress=False,
            )
    else:
        from irr_callback import realign

        realign(ft, base=base, safety_vector=safety, calibration=batches, progress=False)


def materialise(model) -> None:
    """Copy every weight into anonymous memory. `from_pretrained` leaves CPU weights as copy-on-write
    pages of the memory-mapped checkpoint: the first write to a weight (which realignment does to all
    of them) would otherwise count the model itself as memory used by the pipeline."""
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()
