"""Supervised fine-tuning that ends with a safety-realigned model (IRR), full or LoRA.

By default, with no safety flag, it realigns like `IRRCallback()`: IRRConfig.recommended() on default
harmful prompts (AdvBench online, the shipped set offline) answered by the base model at train begin:

    python recipes/sft_irr.py \\
        --model_name_or_path meta-llama/Llama-3.2-1B-Instruct --dataset train.jsonl --output_dir out/sft-irr

The paper's IRR (--preset paper, chosen by default when a sign-mask input is given: --unaligned_model,
--safety_vector or --harmful_dataset), single process (full fine-tuning, safety vector from a harmful fine-tune the callback runs itself):

    python recipes/sft_irr.py \\
        --model_name_or_path meta-llama/Llama-2-7b-chat-hf --dataset sahil2801/CodeAlpaca-20k \\
        --prompt_column prompt --response_column completion \\
        --harmful_dataset harmful_pairs.jsonl --num_calibration_samples 128 \\
        --output_dir out/code-irr --bf16 --per_device_train_batch_size 4 --num_train_epochs 1

LoRA on q/v with an existing unaligned model, on 8 GPUs:

    accelerate launch --num_processes 8 recipes/sft_irr.py \\
        --model_name_or_path meta-llama/Llama-2-7b-chat-hf --dataset train.jsonl \\
        --use_lora --lora_target_modules q_proj v_proj --lora_r 8 \\
        --unaligned_model my-org/llama-2-7b-chat-unaligned --lora_output both \\
        --output_dir out/code-irr-lora --bf16

The recommended setting with your own safety data (harmful prompts with safe responses, or prompts
alone and the base model writes its own answers):

    python recipes/sft_irr.py \\
        --model_name_or_path meta-llama/Llama-3.2-1B-Instruct --dataset train.jsonl \\
        --preset recommended --safety_dataset refusals.jsonl --output_dir out/sft-irr

From a YAML file holding the same keys:  python recipes/sft_irr.py config.yaml
With TRL's SFTTrainer (pip install trl): add --use_trl.

trainer.save_model() writes the realigned model into <output_dir>, beside irr_report.json and a model card with
IRR's section (docs/trl.md: where each file goes; --irr_output_dir <output_dir>/_irr for IRR's own copy).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
)

from irr_callback import IRRCallback, IRRConfig
from irr_callback.inputs.data import load_examples, require_columns, tokenize_pairs


@dataclass
class ScriptArguments:
    model_name_or_path: str = field(metadata={"help": "The aligned model to fine-tune (hub id or directory)."})
    dataset: str = field(metadata={"help": "Training data: hub id or a json/jsonl file with prompt/response pairs."})
    prompt_column: str = field(default="prompt", metadata={"help": "Prompt column of the training data."})
    response_column: str = field(default="response", metadata={"help": "Response column of the training data."})
    max_length: int = field(default=512, metadata={"help": "Training sequences are truncated to this many tokens."})
    use_lora: bool = field(default=False, metadata={"help": "Train a LoRA adapter instead of all weights."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    lora_target_modules: list[str] | None = field(
        default_factory=lambda: ["q_proj", "v_proj"], metadata={"help": "Modules the adapter wraps."}
    )
    use_trl: bool = field(default=False, metadata={"help": "Train with trl.SFTTrainer instead of Trainer."})
    preset: str = field(
        default="auto",
        metadata={
            "help": "'paper': the IRRConfig flags as given (IRRConfig(), the paper's IRR; needs --unaligned_model, "
            "--safety_vector or --harmful_dataset). 'recommended': IRRConfig.recommended() (identify_mode none, "
            "safety_weight auto, safety_term aligned, the retain stream; --safety_dataset, or with none the default "
            "harmful prompts answered by the base: IRRCallback()'s defaults); IRRConfig flags given override it "
            "(--retain_weight 0: no retain stream). 'auto' (default): paper when a sign-mask input (--unaligned_model, --safety_vector, "
            "--harmful_dataset) is given, else recommended.",
            "choices": ["auto", "paper", "recommended"],
        },
    )


def parse(argv: list[str] | None = None) -> tuple[ScriptArguments, IRRConfig, TrainingArguments]:
    """From command-line flags, or from one YAML file holding the same keys."""
    parser = HfArgumentParser((ScriptArguments, IRRConfig, TrainingArguments))
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        import yaml

        script, irr, args = parser.parse_yaml_file(argv[0])
        with open(argv[0], encoding="utf-8") as fh:
            given = set(yaml.safe_load(fh) or {})
    else:
        script, irr, args = parser.parse_args_into_dataclasses(argv)
        given = {a[2:].split("=", 1)[0].replace("-", "_") for a in argv if a.startswith("--")}
    return script, with_preset(irr, script.preset, given), args


def with_preset(irr: IRRConfig, preset: str, given: set[str] = frozenset()) -> IRRConfig:
    """`irr` itself ('paper'), or `IRRConfig.recommended()` with the fields given (`given`: the flags or YAML keys;
    `--retain_weight 0` turns the preset's retain term off though 0 is the field's default) or set to a
    non-default value; 'auto': 'paper' when `irr` names a sign-mask input, else 'recommended'."""
    if preset == "auto":
        preset = "paper" if irr.unaligned_model or irr.safety_vector or irr.harmful_dataset else "recommended"
    if preset == "paper":
        return irr
    if preset != "recommended":
        raise ValueError(f"--preset must be 'auto', 'paper' or 'recommended', got {preset!r}")
    defaults = IRRConfig().to_dict()
    values = irr.to_dict()
    return IRRConfig.recommended(**{k: v for k, v in values.items() if k in given or v != defaults[k]})


def build_trainer(script: ScriptArguments, irr: IRRConfig, args: TrainingArguments):
    raw = load_examples(script.dataset, what="--dataset")  # checked before any model is loaded
    require_columns(
        raw,
        [script.prompt_column, script.response_column],
        what="--dataset",
        fields=["prompt_column", "response_column"],
    )
    tokenizer = AutoTokenizer.from_pretrained(script.model_name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(script.model_name_or_path)
    if script.use_lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                r=script.lora_r,
                lora_alpha=script.lora_alpha,
                target_modules=script.lora_target_modules,
                task_type="CAUSAL_LM",
            ),
        )
    callback = IRRCallback(irr)
    if script.use_trl:
        trainer = _trl_trainer(model, tokenizer, raw, script, args, callback)
    else:
        rows = tokenize_pairs(
            tokenizer, raw[script.prompt_column], raw[script.response_column], max_length=script.max_length
        )
        import datasets

        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=datasets.Dataset.from_list(rows),
            processing_class=tokenizer,
            data_collator=DataCollatorForSeq2Seq(tokenizer),
            callbacks=[callback],
        )
    callback.bind(trainer)
    return trainer, callback


def _trl_trainer(model, tokenizer, raw, script, args, callback):
    try:
        from trl import SFTConfig, SFTTrainer
    except ImportError as exc:
        raise ImportError("--use_trl needs TRL: pip install trl") from exc
    data = raw.map(
        lambda e: {"prompt": e[script.prompt_column], "completion": e[script.response_column]},
        remove_columns=raw.column_names,
    )
    known = set(SFTConfig.__dataclass_fields__)
    values = {k: v for k, v in args.to_dict().items() if k in known and not k.startswith("_")}
    values.pop("push_to_hub_token", None)
    config = SFTConfig(**values, max_length=script.max_length)
    return SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer, callbacks=[callback])


def main(argv: list[str] | None = None):
    script, irr, args = parse(argv)
    trainer, callback = build_trainer(script, irr, args)
    trainer.train()
    trainer.save_model()  # the live model is realigned: this writes the safe model (LoRA: realigned adapter)
    return trainer, callback


def cli(argv: list[str] | None = None) -> int:
    """`main` as a command: a bad input (empty or missing data, invalid setting) is one line naming the flag, exit 2."""
    from irr_callback.config import IRRConfigError
    from irr_callback.inputs.data import DataError

    try:
        main(argv)
    except (DataError, IRRConfigError, FileNotFoundError) as exc:
        print(f"sft_irr.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
