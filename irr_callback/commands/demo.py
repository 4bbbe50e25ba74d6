"""IRR end to end on the built-in toy world, in about a minute on a laptop CPU (no download).

  irr demo                       # writes ./irr_demo_output
  irr demo --lora --seed 1       # LoRA fine-tune instead of full fine-tuning

What happens: a tiny Llama is trained from scratch to solve small tasks and refuse harmful
requests (the "aligned" model; a short harmful fine-tune of it is the "unaligned" model). It is
then fine-tuned on a new task whose data hides a few harmful examples, a harmful fine-tuning
attack, with a real `transformers.Trainer` and `IRRCallback`: at the end of training the callback
realigns the model with the paper's setting (remove every sign conflict with the safety vector,
recalibrate). The same fine-tuned model is also realigned with the recommended preset
(`IRRConfig.recommended()`: no removal, recalibration regularised by safety data and held to the
old tasks by retain data, λ chosen by `safety_weight="auto"`); its safety data are the toy's harmful
prompts without responses, answered by the aligned model itself (`refusals.safety_dataset_for_run`,
as `IRRCallback` does at train begin), and its retain data the toy's old-task training prompts,
answered the same way.
The table compares the aligned model, the fine-tuned model and both realigned models on refusal of
harmful requests (topics in the attack data and topics never seen in it), over-refusal of benign
requests, the new task, and the old tasks.

The output directory holds the five models (usable with `irr apply` / `irr eval` / `irr sweep`),
the safety vector, the training data, the IRR reports, results.json/.md and a safety-vs-utility plot.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import shutil
import time
from collections.abc import Iterator
from typing import Any

from transformers.utils import logging

from ._common import CLIError


logger = logging.get_logger(__name__)

MARKER = "demo_results.json"  # a directory holding it is a previous demo output: replaced without --overwrite
METRICS = ("refusal_attacked", "refusal_unattacked", "over_refusal_benign", "downstream_accuracy", "benign_accuracy")
COLUMNS = ("model", "safety_weight", *METRICS)
PAPER = "fine-tuned + IRR (paper)"  # the callback's run: remove every sign conflict, recalibrate
RECOMMENDED = "fine-tuned + IRR (recommended)"  # IRRConfig.recommended() on the same fine-tuned model


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output-dir", default="./irr_demo_output", help="Where the models, report and plot are written.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the toy world (data, init, training order).")
    p.add_argument("--size", default="demo", choices=["demo", "tiny"], help="Toy world size ('tiny' is for tests).")
    p.add_argument("--lora", action="store_true", help="Fine-tune a LoRA adapter instead of every weight.")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="Optimizer steps of the downstream fine-tune (default: the toy size's recipe).",
    )
    p.add_argument(
        "--safety-source",
        default="vector",
        choices=["vector", "harmful-data"],
        help="'vector': a safety-vector file from the toy's unaligned model; 'harmful-data': let the "
        "callback build it by a short harmful fine-tune (IRRCallback(harmful_dataset=...)).",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="Replace --output-dir even if it is not a previous demo output."
    )


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    target = os.path.abspath(args.output_dir)
    _check_output_dir(target, args.overwrite)
    if args.steps is not None and args.steps < 1:
        raise CLIError(f"--steps must be >= 1, got {args.steps}")

    from ..saving import atomic_directory
    from ..toy import build_toy_world, single_thread

    with single_thread(), _quiet():  # tiny tensors: one thread is several times faster than two competing ones
        print(f"[1/5] building the toy world (size {args.size!r}, seed {args.seed}): aligned + unaligned models")
        world = build_toy_world(seed=args.seed, size=args.size)
        with atomic_directory(target) as tmp:
            _save_inputs(world, tmp)
            print(
                f"[2/5] fine-tuning on the downstream data ({len(world.downstream_train)} examples, "
                f"{100 * world.harmful_share:.0f}% harmful) with transformers.Trainer + IRRCallback"
            )
            finetuned, realigned, callback, train_seconds = _finetune_with_irr(world, tmp, args)
            print("[3/5] realigning the same fine-tuned model with the recommended preset (IRRConfig.recommended())")
            recommended, rec_report = _realign_recommended(world, finetuned, tmp)
            print("[4/5] evaluating (greedy generation on held-out prompts)")
            rows = [
                {"model": "aligned", "safety_weight": None, **world.evaluate(world.aligned_model)},
                {"model": "fine-tuned", "safety_weight": None, **world.evaluate(finetuned)},
                {"model": PAPER, "safety_weight": 0.0, **world.evaluate(realigned)},
                {"model": RECOMMENDED, "safety_weight": rec_report.safety_weight, **world.evaluate(recommended)},
            ]
            del realigned, recommended
            totals = callback.report.totals
            print("[5/5] writing the table and the plot")
            results = _results(world, args, rows, totals, callback, train_seconds, time.perf_counter() - started)
            results["recommended"] = {
                "setting": rec_report.setting,
                "safety_weight": rec_report.safety_weight,
                "removed": rec_report.totals["removed"],
                "auto": rec_report.auto,
                "safety_data": rec_report.extra["safety_inputs"]["safety_data"],
                "report": os.path.join(tmp, "finetuned-irr-recommended", "irr_report.json"),
            }
            results = json.loads(json.dumps(results).replace(tmp, target))  # paths as they will be
            _write_results(tmp, results, rows)
    _print_summary(target, rows, totals, results, time.perf_counter() - started)
    return 0


def _realign_recommended(world, finetuned, directory: str):
    """`IRRConfig.recommended()` on a copy of the fine-tuned model (the one the callback realigned at
    train end): the first 128 downstream examples for calibration, as the callback, and for the safety
    stream the toy's harmful prompts without responses, answered by the aligned model (the callback's
    `refusals.safety_dataset_for_run`, cached under `<directory>/cache`); for the retain stream the toy's
    old-task training prompts, answered by the aligned model the same way. Saved merged, like the other."""
    from .. import realign
    from ..config import IRRConfig
    from ..inputs.refusals import retain_dataset_for_run, safety_dataset_for_run
    from ..outputs.realigned_model import save_realigned

    model = copy.deepcopy(finetuned)
    lora = hasattr(model, "peft_config")
    config = IRRConfig.recommended(cache_dir=os.path.join(directory, "cache"))
    n = min(config.num_calibration_samples, len(world.downstream_train))
    safety, safety_info = safety_dataset_for_run(
        world.aligned_model, world.tokenizer, config, safety_dataset=world.safety_data.remove_columns("response")
    )
    print(
        f"      safety data: {safety_info['prompts']} toy harmful prompts answered by the aligned model "
        f"({100 * safety_info['refusal_rate']:.0f}% refusals)"
    )
    retain, retain_info = retain_dataset_for_run(
        world.aligned_model, world.tokenizer, config, retain_dataset=world.retain_prompts(config.num_retain_samples)
    )
    print(f"      retain data: {retain_info['prompts']} toy old-task prompts answered by the aligned model")
    report = realign(
        model,
        base=None if lora else {k: p.detach().clone() for k, p in world.aligned_model.named_parameters()},
        calibration=world.tokenize_sft(world.downstream_train.select(range(n))),
        safety_calibration=world.tokenize_sft(safety),
        retain_calibration=world.tokenize_sft(retain),
        config=config,
        progress=False,
    )
    report.extra["safety_inputs"] = {
        "safety_data": {**safety_info, "set": "the toy's harmful prompts"},
        "retain_data": {**retain_info, "set": "the toy's old-task training prompts"},
    }
    if lora:
        model = model.merge_and_unload()
    print(f"      {report.summary()}")
    save_realigned(
        model, os.path.join(directory, "finetuned-irr-recommended"), processing_class=world.tokenizer, report=report
    )
    return model.eval(), report


# ----------------------------------------------------------------------------------------------- steps
@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No per-file progress bars (dataset exports, model shards): the demo prints its own steps."""
    import datasets
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled(), datasets.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bar()
    try:
        yield
    finally:
        if bars[0]:
            hf_logging.enable_progress_bar()
        if bars[1]:
            datasets.enable_progress_bar()


def _check_output_dir(target: str, overwrite: bool) -> None:
    if not os.path.exists(target):
        parent = os.path.dirname(target)
        if os.path.exists(parent) and not os.access(parent, os.W_OK):
            raise CLIError(f"--output-dir: cannot write into '{parent}'")
        return
    if not os.path.isdir(target):
        raise CLIError(f"--output-dir: '{target}' is a file")
    previous_demo = os.path.isfile(os.path.join(target, MARKER))
    if os.listdir(target) and not previous_demo and not overwrite:
        raise CLIError(
            f"--output-dir: '{target}' exists and is not a previous demo output (pass --overwrite to replace it)"
        )


def _save_inputs(world, directory: str) -> None:
    """The models and data of the world, so the other commands can be tried on them afterwards."""
    from ..inputs.irr_files import fingerprint, save_irr_file
    from ..inputs.safety import safety_vector
    from ..targets import find_targets
    from ..tensors import as_tensor_mapping

    for name, model in (("aligned", world.aligned_model), ("unaligned", world.unaligned_model)):
        model.save_pretrained(os.path.join(directory, name))
        world.tokenizer.save_pretrained(os.path.join(directory, name))
    names = [t.name for t in find_targets(world.aligned_model)[2]]
    base = as_tensor_mapping(world.aligned_model, what="base")
    v = safety_vector(base, as_tensor_mapping(world.unaligned_model, what="unaligned"), names=names, sign_only=True)
    save_irr_file(
        os.path.join(directory, "safety_vector.safetensors"),
        v,
        kind="safety_vector",
        base_fingerprint=fingerprint(base, v.keys()),
        base_model="aligned",
    )
    data = os.path.join(directory, "data")
    os.makedirs(data)
    for name in (
        "downstream_train",
        "harmful_train",
        "safety_data",
        "eval_harmful_attacked",
        "eval_harmful_unattacked",
        "eval_benign",
        "eval_downstream",
    ):
        getattr(world, name).to_json(os.path.join(data, f"{name}.jsonl"))


def _finetune_with_irr(world, directory: str, args: argparse.Namespace):
    """The product: a Trainer run whose end realigns the live model (IRRCallback)."""
    from transformers import AutoModelForCausalLM, PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    from ..callback import IRRCallback
    from ..config import IRRConfig
    from ..inputs.data import collate

    class KeepFineTuned(TrainerCallback):
        """Copies the model at train end, before IRRCallback (next in the list) realigns it."""

        model = None

        def on_train_end(self, args, state, control, model=None, **kwargs):
            self.model = copy.deepcopy(model)

    hp = world.hparams
    model = copy.deepcopy(world.aligned_model)
    if args.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")
        )
        steps, lr = hp["lora_steps"], hp["lora_lr"]
    else:
        steps, lr = hp["downstream_steps"], hp["downstream_lr"]
    steps = args.steps or steps
    if args.safety_source == "vector":
        irr_config = IRRConfig(
            safety_vector=os.path.join(directory, "safety_vector.safetensors"),
            irr_output_dir=os.path.join(directory, "finetuned-irr"),
            lora_output="merged",
        )
        callback = IRRCallback(irr_config)
    else:
        irr_config = IRRConfig(
            harmful_dataset="toy harmful_train",
            irr_output_dir=os.path.join(directory, "finetuned-irr"),
            cache_dir=os.path.join(directory, "cache"),
            unaligned_steps=hp["unalign_steps"],
            unaligned_learning_rate=hp["unalign_lr"],
            unaligned_lora_rank=0,
            unaligned_batch_size=hp["batch_size"],
            irr_seed=args.seed,
            lora_output="merged",
        )
        callback = IRRCallback(irr_config, harmful_dataset=world.harmful_train)
    keep = KeepFineTuned()
    training_args = TrainingArguments(
        output_dir=os.path.join(directory, "trainer"),
        max_steps=steps,
        learning_rate=lr,
        per_device_train_batch_size=hp["batch_size"],
        lr_scheduler_type="linear",
        warmup_steps=max(1, steps // 10),
        weight_decay=0.0,
        adam_beta2=0.98,
        max_grad_norm=1.0,
        logging_steps=max(1, steps // 5),
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=args.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    pad = world.tokenizer.pad_token_id
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=world.tokenize_sft(world.downstream_train),
        processing_class=world.tokenizer,
        data_collator=lambda rows: collate(rows, pad),
        callbacks=[keep, callback],
    )
    trainer.remove_callback(PrinterCallback)  # one summary line instead of a dict per logging step
    t0 = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h] or [output.training_loss]
    print(f"      {steps} steps in {seconds:.0f} s, final training loss {float(losses[-1]):.3f}")
    if callback.report is None or callback.report.status != "ok":
        raise RuntimeError(f"IRR did not complete: {getattr(callback.report, 'error', 'no report')}")
    print(f"      {callback.report.summary()}")
    finetuned = keep.model
    finetuned.save_pretrained(os.path.join(directory, "finetuned"))
    world.tokenizer.save_pretrained(os.path.join(directory, "finetuned"))
    shutil.rmtree(os.path.join(directory, "trainer"), ignore_errors=True)  # only the run's irr_report.json
    # The saved model is the one measured. (After a LoRA run the live PeftModel is the realigned
    # adapter at the trained rank; the saved merged model is the exact realigned model.)
    realigned = AutoModelForCausalLM.from_pretrained(os.path.join(directory, "finetuned-irr")).eval()
    return finetuned, realigned, callback, seconds


def _results(world, args, rows, totals, callback, train_seconds: float, seconds: float) -> dict[str, Any]:
    import torch
    import transformers

    return {
        "command": "irr demo "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in (("seed", args.seed), ("size", args.size)))
        + (" --lora" if args.lora else "")
        + (f" --steps {args.steps}" if args.steps else "")
        + (f" --safety-source {args.safety_source}" if args.safety_source != "vector" else ""),
        "rows": rows,
        "irr": {
            "removed": totals["removed"],
            "entries": totals["entries"],
            "conflicts": totals["conflicts"],
            "removed_fraction": totals["removed_fraction"],
            "safety_inputs": callback.sources,
        },
        "world": {
            "size": world.size,
            "seed": world.seed,
            "attacked_topics": list(world.attacked_topics),
            "unattacked_topics": list(world.unattacked_topics),
            "harmful_share": world.harmful_share,
            "downstream_examples": len(world.downstream_train),
        },
        "lora": bool(args.lora),
        "seconds": {
            "total": round(seconds, 1),
            "fine_tune_and_irr": round(train_seconds, 1),
            "world": round(world.build_seconds, 1),
        },
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"transformers {transformers.__version__}",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _write_results(directory: str, results: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    from ..outputs.plotting import markdown_table, pareto_plot

    for row in rows:
        row["safety"] = (row["refusal_attacked"] + row["refusal_unattacked"]) / 2
    table = markdown_table(rows, COLUMNS)
    with open(os.path.join(directory, "results.md"), "w", encoding="utf-8") as fh:
        fh.write(f"# irr demo\n\n`{results['command']}` on {results['machine']}, {results['date']}\n\n{table}\n")
    try:
        pareto_plot(
            rows,
            os.path.join(directory, "pareto.png"),
            x="downstream_accuracy",
            y="safety",
            label="model",
            title="toy world: safety vs downstream accuracy",
            xlabel="downstream accuracy (sort task)",
            ylabel="refusal of harmful prompts (mean of topic groups)",
        )
    except ImportError as exc:
        logger.warning(f"no plot: {exc}")
    with open(os.path.join(directory, MARKER), "w", encoding="utf-8") as fh:
        json.dump(results, fh, indent=2)


def _print_summary(
    target: str, rows: list[dict[str, Any]], totals: dict[str, Any], results: dict[str, Any], seconds: float
) -> None:
    from ..outputs.plotting import markdown_table

    print()
    print(markdown_table(rows, COLUMNS))
    print()
    print(
        f"IRR (paper) removed {totals['removed']:,} of {totals['entries']:,} fine-tuning deltas "
        f"({100 * totals['removed_fraction']:.1f}%), recalibrated the rest."
    )
    rec = results["recommended"]
    print(
        f"IRR (recommended, IRRConfig.recommended()) removed {rec['removed']:,}: recalibration regularised by "
        f"the safety data (safety weight λ={rec['safety_weight']:g} chosen by safety_weight='auto') and the "
        "retain data."
    )
    print(
        "refusal_*: share of held-out harmful prompts refused (attacked = topics in the attack data); "
        "over_refusal_benign: benign prompts refused; *_accuracy: exact match."
    )
    print(f"\nwrote {target}  ({seconds:.0f} s)")
    print(f"  report: {os.path.join(target, 'finetuned-irr', 'irr_report.json')} (paper)")
    print(f"          {os.path.join(target, 'finetuned-irr-recommended', 'irr_report.json')} (recommended)")
    if os.path.exists(os.path.join(target, "pareto.png")):
        print(f"  plot:   {os.path.join(target, 'pareto.png')}")
    print(f"  table:  {os.path.join(target, 'results.md')}")
    j = lambda name: os.path.join(target, name)  # noqa: E731
    print(
        f"  models: aligned/ unaligned/ finetuned/ finetuned-irr/ finetuned-irr-recommended/; compare them with\n"
        f"    irr eval --toy --toy-size {results['world']['size']} --toy-seed {results['world']['seed']} --threads 1 "
        f"--models {j('finetuned')} {j('finetuned-irr')} {j('finetuned-irr-recommended')}"
        + (f" --base {j('aligned')}" if results["lora"] else "")
    )
