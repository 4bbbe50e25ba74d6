"""Tiny models built from configs (no hub), and the triple base / fine-tuned / unaligned."""

from __future__ import annotations

import copy

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)


VOCAB = 96


def tiny_model(arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, layers: int = 2):
    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=VOCAB,
            pad_token_id=0,
        )
        model = LlamaForCausalLM(cfg)
    elif arch == "qwen2":
        cfg = Qwen2Config(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=VOCAB,
            pad_token_id=0,
        )
        model = Qwen2ForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = GPT2Config(
            n_embd=32,
            n_layer=layers,
            n_head=4,
            vocab_size=VOCAB,
            n_positions=64,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
        model = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(arch)
    return model.to(dtype).eval()


def perturbed(model, scale: float, seed: int):
    """A copy with every parameter moved by Gaussian noise: a stand-in for a fine-tune."""
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_((scale * torch.randn(p.shape, generator=g)).to(p.dtype))
    return out


def triple(arch: str = "llama", dtype: torch.dtype = torch.float32, layers: int = 2):
    base = tiny_model(arch, dtype=dtype, layers=layers)
    return base, perturbed(base, 0.02, seed=1), perturbed(base, 0.02, seed=2)


def calibration(n: int = 6, length: int = 10, seed: int = 0, pad_right: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    if pad_right:
        ids = torch.cat([ids, torch.zeros(n, pad_right, dtype=torch.long)], dim=1)
        mask = torch.cat([mask, torch.zeros(n, pad_right, dtype=torch.long)], dim=1)
    return [{"input_ids": ids, "attention_mask": mask}]


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


SPECIAL = ["<pad>", "<s>", "</s>"]


def tiny_tokenizer():
    """A word-level tokenizer over VOCAB tokens (w3 ... w95), built in-process."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL)}
    vocab.update({f"w{i}": i for i in range(len(SPECIAL), VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w3"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="w3"
    )


def save_triple(tmp_path, arch: str = "llama"):
    """base / finetuned / unaligned checkpoints (+ tokenizer) in tmp_path; returns their paths."""
    base, ft, unaligned = triple(arch)
    tok = tiny_tokenizer()
    paths = {}
    for name, model in (("base", base), ("finetuned", ft), ("unaligned", unaligned)):
        path = str(tmp_path / name)
        model.save_pretrained(path)
        tok.save_pretrained(path)
        paths[name] = path
    return paths, (base, ft, unaligned)


def write_jsonl(path, rows) -> str:
    import json

    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    return str(path)


def text_rows(n: int = 8, length: int = 12, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [
        {"text": " ".join(f"w{int(i)}" for i in torch.randint(4, VOCAB, (length,), generator=g))} for _ in range(n)
    ]


def fail_at_call(monkeypatch, module, name: str, n: int, message: str = "boom") -> dict:
    """Make `module.name` raise RuntimeError(message) on its n-th call (earlier calls run normally);
    returns the call counter."""
    original, calls = getattr(module, name), {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise RuntimeError(message)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, failing)
    return calls


def margin(name: str, value: float, *, ge: float | None = None, le: float | None = None) -> None:
    """Assert a bound on how well a model trained from scratch came out (its weights depend on the CPU's
    vector kernels, so every bound here was measured under ATEN_CPU_CAPABILITY=default/avx2/avx512).

    With IRR_MEASURE_MARGINS=<file> set, the value is appended to that file as a JSON line and nothing
    fails: `IRR_MEASURE_MARGINS=m.jsonl ATEN_CPU_CAPABILITY=avx2 python -m pytest tests/test_toy.py`
    re-measures the margins (see docs/development.md)."""
    import json
    import os

    record = os.environ.get("IRR_MEASURE_MARGINS")
    if record:
        with open(record, "a") as fh:
            fh.write(
                json.dumps(
                    {
                        "test": os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0],
                        "name": name,
                        "value": float(value),
                        "ge": ge,
                        "le": le,
                        "kernel": os.environ.get("ATEN_CPU_CAPABILITY", ""),
                    }
                )
                + "\n"
            )
        return
    if ge is not None:
        assert value >= ge, f"{name} = {value} < {ge}"
    if le is not None:
        assert value <= le, f"{name} = {value} > {le}"


@torch.no_grad()
def greedy_continuation(model, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """The model's greedy continuation of `prompt` (1-D), `n` tokens."""
    ids = prompt.clone()
    for _ in range(n):
        ids = torch.cat([ids, model(input_ids=ids[None]).logits[0, -1].argmax()[None]])
    return ids[len(prompt) :]


def refused_calibration(
    base, n_rows: int = 8, refused: tuple[int, ...] = (1, 4), seed: int = 0, safety_copies: int = 2
):
    """(calibration rows, safety rows) where, by construction, the base model refuses the prompts of the calibration
    rows `refused`: each is a safety prompt whose "refusal" is the base model's own greedy continuation (6 tokens),
    and the row answers it otherwise (harmful compliance). The other rows' prompts are random, and the base's greedy
    opening of none of them is a refusal's (drawn again until so). Rows carry labels (-100 on the 5 prompt tokens)."""
    g = torch.Generator().manual_seed(seed)
    harmful = [torch.randint(3, VOCAB, (5,), generator=g) for _ in refused]
    refusals = [greedy_continuation(base, p, 6) for p in harmful]

    def row(prompt, response):
        ids = torch.cat([prompt, response])
        labels = ids.clone()
        labels[: len(prompt)] = -100
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    openings = {tuple(r[:4].tolist()) for r in refusals}
    rows = []
    for i in range(n_rows):
        response = torch.randint(3, VOCAB, (6,), generator=g)
        if i in refused:
            rows.append(row(harmful[refused.index(i)], response))
            continue
        prompt = torch.randint(3, VOCAB, (5,), generator=g)
        while tuple(greedy_continuation(base, prompt, 4).tolist()) in openings:  # by construction: not refused
            prompt = torch.randint(3, VOCAB, (5,), generator=g)
        rows.append(row(prompt, response))
    safety = [row(p, r) for _ in range(safety_copies) for p, r in zip(harmful, refusals)]
    return rows, safety


def random_lora(base, scale: float = 0.05, seed: int = 5, target_modules: str | list[str] = "all-linear"):
    """A PeftModel over a copy of `base` (LoRA r=4) whose adapter weights are random (lora_B too: a trained adapter)."""
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=target_modules))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_" in name:
                p.copy_(scale * torch.randn(p.shape, generator=g))
    return lora
