"""Peak memory of a `transformers.Trainer` run with `IRRCallback` against the same run without it.

Each run is a fresh process (clean peak): a Llama built from a config (bench_end_to_end's shape by
default: hidden 1024, 8 layers, vocabulary 8000, ~119 M parameters, float32), two optimizer steps on
CPU, the safety inputs given in-process (a small safety dataset with responses, so nothing is
generated; a tiny harmful dataset for the paper setting), no network. Configurations:

  full_cpu      full fine-tuning, realign_checkpoints=True (a checkpoint at step 2), snapshot="cpu"
  full_disk     the same with snapshot="disk"
  lora          a PeftModel (LoRA r=16 on the 7 linears), lora_output default ("both")
  harmful       the paper setting (identify by sign) with harmful_dataset: the harmful fine-tune
                (LoRA, unaligned_lora_rank=16) at train begin, full fine-tuning
  harmful_full  the same with unaligned_lora_rank=0 (a full harmful fine-tune)
  harmful_lora  harmful, but the run trains a PeftModel (as lora): its peak is not the optimizer
                step of a full fine-tune, so a copy made by the harmful fine-tune would show
  lora_unaligned  the paper's setting on a LoRA run (issue 22): a PeftModel (r=8 on q/v/up/down),
                `IRRConfig(unaligned_model=DIR, num_calibration_samples=16)`, no checkpoint (DIR: a
                perturbed copy of the model saved by the parent process before the runs)

full_* and lora use `IRRConfig.recommended(safety_weight=λ)` (no safety vector needed; λ fixed by
--safety-weight, default 0.3, so checkpoints realign on any branch; "auto" works too). The run
without the callback uses the same TrainingArguments (checkpoint included). Reported per
configuration: peak RSS (kernel VmHWM) without and with, the difference in MiB, and that difference in
units of one decoder layer's parameter bytes and of the CPU snapshot's bytes (the base values of the
dense targets); peak anonymous memory (RssAnon sampled every 5 ms: excludes the mapped safetensors
pages of a disk snapshot) the same way; `torch.cuda.max_memory_allocated` with --device cuda. The
target: the callback adds no more than one layer's working set plus the CPU snapshot.

    python benchmarks/bench_memory.py                                   # every configuration, ~100 M model
    python benchmarks/bench_memory.py --configs harmful,lora --hidden 512 --layers 4   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import _common  # noqa: F401
import torch
from _common import AnonPeak, peak_rss_bytes, rss_bytes, run_worker, write_results


HERE = os.path.abspath(__file__)
CONFIGS = ("full_cpu", "full_disk", "lora", "harmful", "harmful_full", "harmful_lora", "lora_unaligned")
LORA_SMALL = ["q_proj", "v_proj", "up_proj", "down_proj"]  # lora_unaligned's adapter (r=8)
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MIB = 2**20


def baseline_of(config: str) -> str:
    """Runs that train the same way share one baseline (the callback is the only difference)."""
    return {
        "full_cpu": "full_save",
        "full_disk": "full_save",
        "lora": "lora",
        "harmful_lora": "lora",
        "lora_unaligned": "lora_small",
    }.get(config, "full")


def _tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tk = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def _datasets(args):
    """Training rows (token ids), safety pairs with responses, harmful pairs: all random words, seeded."""
    import datasets

    g = torch.Generator().manual_seed(1)

    def words(n: int) -> str:
        return " ".join(f"w{int(i)}" for i in torch.randint(3, args.vocab, (n,), generator=g))

    rows = []
    for _ in range(args.seqs):
        ids = torch.randint(3, args.vocab, (args.tokens,), generator=g).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": ids})
    half = args.pair_tokens // 2
    safety = [{"prompt": words(half), "response": words(half)} for _ in range(args.safety_rows)]
    harmful = [{"prompt": words(half), "response": words(half)} for _ in range(args.harmful_rows)]
    return datasets.Dataset.from_list(rows), datasets.Dataset.from_list(safety), datasets.Dataset.from_list(harmful)


def _model(args, lora: bool, small: bool = False):
    from _models import llama_config
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    inter = args.inter or int(args.hidden * 2.75) // 64 * 64  # bench_end_to_end's shape
    cfg = llama_config(args.hidden, args.layers, inter=inter, vocab=args.vocab, max_tokens=args.tokens)
    model = LlamaForCausalLM(cfg)
    if lora:
        from peft import LoraConfig, get_peft_model

        shape = (
            dict(r=8, lora_alpha=16, target_modules=LORA_SMALL)
            if small
            else dict(r=16, lora_alpha=32, target_modules=LINEARS)
        )
        model = get_peft_model(model, LoraConfig(**shape))
    return model


def _unaligned_model(args):
    """The model every run starts from, moved by a small seeded perturbation: a stand-in for its unaligned twin."""
    model = _model(args, lora=False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g), alpha=0.01)
    return model


def _irr_config(config: str, args, cache: str):
    from irr_callback import IRRConfig

    common = dict(
        num_calibration_samples=args.seqs,
        calibration_max_length=args.tokens,
        num_safety_samples=args.safety_rows,
        cache_dir=cache,
    )
    if config == "lora_unaligned":
        return IRRConfig(unaligned_model=args.unaligned_dir, num_calibration_samples=16, cache_dir=cache)
    if config.startswith("harmful"):
        return IRRConfig(
            harmful_dataset="in-process",  # the Dataset passed to IRRCallback wins
            unaligned_steps=args.unaligned_steps,
            unaligned_batch_size=4,
            unaligned_lora_rank=0 if config == "harmful_full" else 16,
            **common,
        )
    extra = (
        {"realign_checkpoints": True, "snapshot": config.removeprefix("full_")} if config.startswith("full") else {}
    )
    return IRRConfig.recommended(safety_weight=args.safety_weight, **extra, **common)


def worker(config: str, with_irr: bool, args) -> dict:
    """One Trainer run in this process; peak memory of the whole process."""
    import peft  # noqa: F401
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    import irr_callback  # noqa: F401  imported with or without the callback: the same code pages
    from irr_callback import IRRCallback

    kind = config if with_irr else baseline_of(config)
    lora = kind in ("lora", "harmful_lora", "lora_unaligned", "lora_small")
    cuda = args.device == "cuda"
    tokenizer = _tokenizer(args.vocab)
    train, safety, harmful = _datasets(args)
    model = _model(args, lora, small=kind in ("lora_unaligned", "lora_small"))
    base = model.get_base_model() if lora else model
    layer = sum(p.numel() * p.element_size() for p in base.model.layers[0].parameters())
    dense = 0
    if not lora:  # the CPU snapshot: base values of every dense target (the 7 linears of every layer)
        dense = sum(
            m.weight.numel() * m.weight.element_size()
            for n, m in base.model.layers.named_modules()
            if isinstance(m, torch.nn.Linear)
        )
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    work = tempfile.mkdtemp(prefix="irr-bench-mem-")

    class Begin(TrainerCallback):  # after IRR's: the peak of train begin (the safety inputs, the snapshot)
        peak = 0

        def on_train_begin(self, *a, **k):
            Begin.peak = peak_rss_bytes()

    callbacks = []
    if with_irr:
        cb = IRRCallback(_irr_config(config, args, os.path.join(work, "cache")), safety_dataset=safety)
        if config.startswith("harmful"):
            cb.harmful_dataset = harmful
        callbacks.append(cb)
    callbacks.append(Begin())
    saves = kind in ("full_save", "full_cpu", "full_disk")
    targs = TrainingArguments(
        os.path.join(work, "run"),
        report_to=[],
        use_cpu=not cuda,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        learning_rate=1e-4,
        save_strategy="steps" if saves else "no",
        save_steps=args.steps,
        disable_tqdm=True,
        logging_strategy="no",
        seed=0,
    )
    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=train,
        processing_class=tokenizer,
        data_collator=DataCollatorForSeq2Seq(tokenizer),
        callbacks=callbacks,
    )
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    before = rss_bytes()
    start = time.perf_counter()
    try:
        with AnonPeak() as anon:
            trainer.train()
        seconds = time.perf_counter() - start
        out = {
            "config": config,
            "kind": kind,
            "with_irr": with_irr,
            "seconds": seconds,
            "rss_before_train": before,
            "peak_rss": peak_rss_bytes(),
            "peak_anon": anon.peak,
            "peak_begin": Begin.peak,
            "layer_bytes": layer,
            "snapshot_bytes": dense,
            "model_bytes": model_bytes,
            "params": sum(p.numel() for p in model.parameters()),
        }
        if cuda:
            out["cuda_peak"] = torch.cuda.max_memory_allocated()
        if with_irr:
            out["irr_status"] = getattr(cb.report, "status", None)
            out["sources"] = cb.sources
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _row(config: str, base: dict, irr: dict, key: str) -> dict:
    diff = irr[key] - base[key]
    layer, snap = irr["layer_bytes"], irr["snapshot_bytes"]
    allowed = layer + (0 if config == "full_disk" else snap)  # a LoRA run has no snapshot (snap = 0)
    if config == "lora_unaligned":  # issue 22: one decoder layer + 10% of the model
        allowed = layer + irr["model_bytes"] // 10
    return {
        "without": base[key],
        "with": irr[key],
        "diff": diff,
        "diff_layers": diff / layer,
        "diff_snapshots": diff / snap if snap else None,
        "allowed": allowed,
        "within_target": diff <= allowed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--inter", type=int, default=None, help="default: 2.75 x hidden (rounded to 64)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps (the checkpoint is saved at the last)")
    parser.add_argument("--batch", type=int, default=4, help="training sequences per step")
    parser.add_argument("--seqs", type=int, default=8, help="training rows (also the calibration samples)")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per training row")
    parser.add_argument("--safety-rows", type=int, default=8)
    parser.add_argument("--harmful-rows", type=int, default=8)
    parser.add_argument("--pair-tokens", type=int, default=32, help="words per safety/harmful pair")
    parser.add_argument("--unaligned-steps", type=int, default=4, help="steps of the harmful fine-tune")
    parser.add_argument("--safety-weight", default="0.3", help="λ of full_*/lora (a number or 'auto')")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--name", default="bench_memory")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--irr", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--unaligned-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, bool(args.irr), args)))
        return
    configs = [c for c in args.configs.split(",") if c]
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown:
        parser.error(f"--configs: unknown {unknown}; choose from {', '.join(CONFIGS)}")
    passthrough = sys.argv[1:]
    unaligned = None
    if "lora_unaligned" in configs:  # the unaligned model's directory, written here, outside the measured runs
        unaligned = tempfile.mkdtemp(prefix="irr-bench-unaligned-")
        _unaligned_model(args).save_pretrained(unaligned)
        passthrough += ["--unaligned-dir", unaligned]
    baselines: dict[str, dict] = {}
    results, irr_runs = [], []
    for config in configs:
        kind = baseline_of(config)
        if kind not in baselines:
            baselines[kind] = run_worker(HERE, [*passthrough, "--worker", config, "--irr", "0"])
            print(f"baseline {kind}: peak RSS {baselines[kind]['peak_rss'] / MIB:.0f} MiB", flush=True)
        irr = run_worker(HERE, [*passthrough, "--worker", config, "--irr", "1"])
        irr_runs.append(irr)
        base = baselines[kind]
        row = {
            "config": config,
            "baseline": kind,
            "seconds": {"without": base["seconds"], "with": irr["seconds"]},
            "rss": _row(config, base, irr, "peak_rss"),
            "anon": _row(config, base, irr, "peak_anon"),
            "begin": _row(config, base, irr, "peak_begin") if "peak_begin" in base else None,
            "irr_status": irr.get("irr_status"),
        }
        if "cuda_peak" in irr:
            row["cuda"] = _row(config, base, irr, "cuda_peak")
        results.append(row)
        r = row["rss"]
        print(
            f"{config}: peak RSS {r['without'] / MIB:.0f} -> {r['with'] / MIB:.0f} MiB (+{r['diff'] / MIB:.0f} MiB, "
            f"{r['diff_layers']:.1f} layers), anonymous +{row['anon']['diff'] / MIB:.0f} MiB, "
            f"IRR {row['irr_status']}",
            flush=True,
        )
    if unaligned is not None:
        shutil.rmtree(unaligned, ignore_errors=True)
    runs = [*baselines.values(), *irr_runs]
    dense_run = next((r for r in runs if r["kind"] != "lora"), runs[0])  # sizes of the model without an adapter
    sizes = {k: dense_run[k] for k in ("layer_bytes", "snapshot_bytes", "model_bytes", "params")}
    write_results(args.name, {"args": vars(args), "sizes": sizes, "results": results}, _markdown(args, sizes, results))


def _markdown(args, sizes: dict, results: list[dict]) -> str:
    layer, snap = sizes["layer_bytes"], sizes["snapshot_bytes"]
    md = [
        f"Llama from a config: hidden {args.hidden}, {args.layers} layers, vocabulary {args.vocab}, "
        f"{sizes['params'] / 1e6:.1f} M parameters ({sizes['model_bytes'] / MIB:.0f} MiB fp32); one decoder layer "
        f"{layer / MIB:.1f} MiB, CPU snapshot (every layer's 7 linears) {snap / MIB:.0f} MiB. {args.steps} optimizer "
        f"steps on {args.device}, batch {args.batch} × {args.tokens} tokens; {args.seqs} calibration rows, "
        f"{args.safety_rows} safety pairs, {args.harmful_rows} harmful pairs ({args.unaligned_steps} steps).\n",
    ]
    titles = (
        ("rss", "Peak RSS (VmHWM)"),
        ("anon", "Peak anonymous memory (RssAnon)"),
        ("begin", "Peak RSS by the end of train begin (safety inputs: the harmful fine-tune; the snapshot)"),
        ("cuda", "CUDA"),
    )
    for key, title in titles:
        rows = [r for r in results if r.get(key)]
        if not rows:
            continue
        md += [
            f"### {title}\n",
            "| config | without | with | difference | in layers | in CPU snapshots | ≤ one layer + CPU snapshot? |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            v = r[key]
            snaps = f"{v['diff_snapshots']:.2f}" if v["diff_snapshots"] is not None else "-"
            md.append(
                f"| {r['config']} | {v['without'] / MIB:.0f} MiB | {v['with'] / MIB:.0f} MiB | "
                f"{v['diff'] / MIB:+.0f} MiB | {v['diff_layers']:.1f} | {snaps} | "
                f"{'yes' if v['within_target'] else 'no'} (≤ {v['allowed'] / MIB:.0f} MiB) |"
            )
        md.append("")
    md.append(
        "Baselines: the same Trainer run without the callback (full_cpu and full_disk share one, with the same "
        "checkpoint; harmful and harmful_full share one; harmful_lora uses lora's). Allowed: one layer's parameter "
        "bytes plus the CPU snapshot (the dense targets' base values), except full_disk (its snapshot is on disk) "
        "and the LoRA runs (no dense target: no snapshot). In CPU snapshots: the difference over those bytes."
    )
    return "\n".join(md)


if __name__ == "__main__":
    main()
