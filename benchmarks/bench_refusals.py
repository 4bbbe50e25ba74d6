"""Cost of the refusals the base writes at train begin (`IRRCallback()` with no safety data, issue 14):
`irr_callback.inputs.refusals.write_refusals` on `bench_end_to_end.py`'s model (a Llama with hidden 1024,
8 layers, vocabulary 8000, random init), 128 shipped harmful prompts x 64 new tokens, greedy, batches
of 8, no cache. A random model never emits EOS, so every prompt gets all 64 tokens (the worst case).

Reports wall time, tokens per second, the model's size, and the peak RSS above the loaded model during
generation (the check that generating keeps no second copy of the model: the extra peak must stay well
below the model's size). The tokenizer is a word-level one over the prompts' words (the model has none).

    python benchmarks/bench_refusals.py                      # 128 prompts x 64 tokens, batches of 8
    python benchmarks/bench_refusals.py --prompts 16 --new-tokens 8   # quick
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import _common  # noqa: F401
import torch
from _common import gib, peak_rss_bytes, reset_peak_rss, rss_bytes, write_results


def word_tokenizer(prompts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for p in prompts for w in p.split()})[: vocab_size - 3]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the 2 cores are shared)")
    parser.add_argument("--cpu", action="store_true", help="stay on CPU even with a GPU")
    parser.add_argument("--name", default="bench_refusals")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"

    from transformers import LlamaConfig, LlamaForCausalLM

    from irr_callback.inputs.refusals import write_refusals
    from irr_callback.inputs.safety_prompts import shipped_prompts

    torch.manual_seed(0)
    cfg = LlamaConfig(  # as benchmarks/bench_end_to_end.py builds it
        hidden_size=args.hidden,
        intermediate_size=int(args.hidden * 2.75) // 64 * 64,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 64),
        vocab_size=args.vocab,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        max_position_embeddings=2048,
    )
    model = LlamaForCausalLM(cfg).eval().to(device)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    prompts = shipped_prompts(args.prompts).prompts
    tokenizer = word_tokenizer(prompts, args.vocab)
    write_refusals(model, tokenizer, prompts[:2], max_new_tokens=2, batch_size=2)  # warm-up (kernels, imports)
    rss_before = rss_bytes()
    reset_peak_rss()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_before = torch.cuda.memory_allocated()
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        out = write_refusals(
            model, tokenizer, prompts, max_new_tokens=args.new_tokens, batch_size=args.batch_size, cache_dir=cache
        )
        wall = time.perf_counter() - start
        start = time.perf_counter()
        again = write_refusals(
            model, tokenizer, prompts, max_new_tokens=args.new_tokens, batch_size=args.batch_size, cache_dir=cache
        )
        cached_wall = time.perf_counter() - start
        cache_bytes = os.path.getsize(out.path)
    peak = peak_rss_bytes()
    cuda = {}
    if device == "cuda":
        cuda_peak = torch.cuda.max_memory_allocated()
        cuda = {
            "cuda_before_bytes": cuda_before,
            "cuda_peak_bytes": cuda_peak,
            "cuda_peak_above_model": cuda_peak - cuda_before,
        }
    assert again.cached and again.responses == out.responses
    new_tokens = sum(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in out.responses)
    result = {
        "model": {
            "hidden": args.hidden,
            "layers": args.layers,
            "vocab": args.vocab,
            "params": sum(p.numel() for p in model.parameters()),
            "bytes": model_bytes,
        },
        "prompts": len(prompts),
        "max_new_tokens": args.new_tokens,
        "batch_size": args.batch_size,
        "generation_seconds": round(out.seconds, 2),
        "wall_seconds": round(wall, 2),
        "cached_call_seconds": round(cached_wall, 3),
        "new_tokens_decoded": new_tokens,
        "tokens_per_second": round(len(prompts) * args.new_tokens / out.seconds, 1),
        "rss_before_bytes": rss_before,
        "peak_rss_bytes": peak,
        "peak_above_loaded_model_bytes": peak - rss_before,
        "peak_above_over_model_size": round((peak - rss_before) / model_bytes, 3),
        "cache_file_bytes": cache_bytes,
        "refusal_rate": out.refusal_rate,
        "device": device,
        **cuda,
    }
    table = (
        "| prompts x new tokens | batch | generation | tokens/s | cached call | model (fp32) | RSS before | "
        "peak RSS | peak above loaded model |\n|---|---|---|---|---|---|---|---|---|\n"
        f"| {len(prompts)} x {args.new_tokens} | {args.batch_size} | {out.seconds:.1f} s | "
        f"{result['tokens_per_second']} | {cached_wall * 1000:.0f} ms | {gib(model_bytes)} | {gib(rss_before)} | "
        f"{gib(peak)} | {gib(peak - rss_before)} ({result['peak_above_over_model_size']:.2f}x the model) |\n"
    )
    if cuda:
        table += f"\nGPU: allocated before {gib(cuda_before)}, peak {gib(cuda_peak)} ({gib(cuda_peak - cuda_before)} above the model).\n"
    notes = (
        f"\nDevice: {device}. `irr_callback.inputs.refusals.write_refusals` on the live model (no copy), greedy, KV cache on, "
        f"torch threads: {torch.get_num_threads()}. A random model never emits EOS: every prompt gets all "
        f"{args.new_tokens} tokens. The cached call reads the JSON cache file ({cache_bytes:,} bytes) instead of "
        "generating. The word-level tokenizer knows only the prompts' words, so most generated ids decode to "
        f"nothing ({new_tokens} words decoded); the generation cost does not depend on it. Load average at the "
        f"end: {' / '.join(f'{x:.1f}' for x in os.getloadavg())} (a number above the cores means other jobs "
        "shared them: the time is then an upper bound).\n"
    )
    print(table + notes)
    write_results(args.name, result, table + notes)


if __name__ == "__main__":
    main()
