"""`realign` on a 7B-shaped Llama on one GPU: time and peak GPU memory (target: < 5 minutes, H100/H200).

Random weights from a `LlamaConfig` (Llama-2-7B shapes: hidden 4096, intermediate 11008, 32 layers,
vocab 32000), bfloat16, all seven linears of every layer targeted, the "fine-tune" = base + small
noise, a sign-only int8 safety vector, 128 calibration sequences of 512 tokens. Base and safety
vector live on the GPU as name → tensor mappings. Writes benchmarks/results/gpu_realign_7b.json/.md.

    python benchmarks/gpu_realign_7b.py                # on a GPU
    python benchmarks/gpu_realign_7b.py --small        # smoke test on CPU (tiny shapes), writes *_small
"""

from __future__ import annotations

import argparse
import time

import _common  # noqa: F401
import torch
from _common import gib, peak_rss_bytes, write_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny shapes, runs on CPU in seconds")
    parser.add_argument("--seqs", type=int, default=None, help="calibration sequences (default 128; --small: 8)")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per sequence (default 512; --small: 64)")
    parser.add_argument("--batch", type=int, default=16, help="calibration batch size")
    parser.add_argument("--backup", default="disk", choices=["disk", "cpu"], help="IRRConfig.backup")
    parser.add_argument("--layers", type=int, default=None, help="override the number of layers (default 32)")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, LlamaConfig

    from irr_callback import IRRConfig, realign

    if args.small:
        shape = dict(
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=1000,
        )
        seqs, tokens = args.seqs or 8, args.tokens or 64
    else:
        shape = dict(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=32000,
        )
        seqs, tokens = args.seqs or 128, args.tokens or 512
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.small:
        raise SystemExit("no GPU: run with --small for the CPU smoke test")
    cfg = LlamaConfig(**shape, max_position_embeddings=4096, pad_token_id=0)

    setup_start = time.perf_counter()
    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    base, safety = {}, {}
    g = torch.Generator(device=device).manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".layers." in name and p.dim() == 2:
                base[name] = p.detach().clone()
                safety[name] = (torch.randn(p.shape, generator=g, device=device) > 0).to(torch.int8) * 2 - 1
                p.add_((0.002 * torch.randn(p.shape, generator=g, device=device)).to(p.dtype))
    ids = torch.randint(3, cfg.vocab_size, (seqs, tokens), generator=g, device=device)
    batches = [
        {"input_ids": ids[i : i + args.batch], "attention_mask": torch.ones_like(ids[i : i + args.batch])}
        for i in range(0, seqs, args.batch)
    ]
    setup_seconds = time.perf_counter() - setup_start
    target_params = sum(t.numel() for t in base.values())
    config = IRRConfig(
        num_calibration_samples=seqs,
        calibration_max_length=tokens,
        calibration_batch_size=args.batch,
        backup=args.backup,
    )

    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    report = realign(model, base=base, safety_vector=safety, calibration=batches, config=config, progress=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    result = {
        "shape": shape,
        "dtype": "bfloat16",
        "calibration": {"sequences": seqs, "tokens": tokens, "batch": args.batch},
        "backup": args.backup,
        "device": str(device),
        "target_params": target_params,
        "setup_seconds": setup_seconds,
        "seconds": seconds,
        "target_seconds": 300,
        "met_target": seconds < 300 if not args.small else None,
        "peak_rss": peak_rss_bytes(),
        "totals": report.totals,
    }
    if device.type == "cuda":
        result["gpu_memory_before"] = before
        result["gpu_peak"] = torch.cuda.max_memory_allocated()
        result["gpu_peak_above_model_inputs"] = torch.cuda.max_memory_allocated() - before
    print(
        f"realign: {seconds:.1f}s for {target_params / 1e9:.2f}B target parameters on {device}"
        + (
            f", GPU peak {gib(result['gpu_peak'])} ({gib(result['gpu_peak_above_model_inputs'])} above model + "
            f"base + safety)"
            if device.type == "cuda"
            else ""
        )
    )
    md = (
        f"7B-shaped Llama ({shape['num_hidden_layers']} layers, hidden {shape['hidden_size']}), bf16, all linears, "
        f"{seqs} × {tokens} calibration tokens, backup={args.backup}, device {device}.\n\n"
        f"| realign wall time | target | GPU peak | GPU peak above model + base + safety |\n|---|---|---|---|\n"
        f"| {seconds:.1f} s | < 300 s | {gib(result.get('gpu_peak', 0))} | "
        f"{gib(result.get('gpu_peak_above_model_inputs', 0))} |\n"
    )
    write_results("gpu_realign_7b_small" if args.small else "gpu_realign_7b", result, md)


if __name__ == "__main__":
    main()
