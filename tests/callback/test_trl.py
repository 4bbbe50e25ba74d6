"""A TRL user's flow (issue 23): `SFTTrainer` on conversational data with a ChatML-style template, full
fine-tuning with assistant-only loss and LoRA through `peft_config` with packing, then `save_model()` and
`push_to_hub()`. What `push_to_hub` would upload (transformers' own ignore patterns, read from the call)
holds the realigned model once, a card that says so and no absolute local path; calibration sees the
packed rows' sequences as training did (a packed run's calibration equals the unpacked run's)."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch


trl = pytest.importorskip("trl")

from irr_callback import IRRCallback, IRRConfig, realign  # noqa: E402
from irr_callback.inputs.data import calibration_examples  # noqa: E402
from irr_callback.peft_utils import REALIGNED_TAG  # noqa: E402
from tests.helpers import VOCAB, perturbed, tiny_model  # noqa: E402


pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

SPECIAL = ["<pad>", "<|im_start|>", "<|im_end|>", "system", "user", "assistant"]
CHATML = (
    "{% for message in messages %}{{ '<|im_start|> ' + message['role'] + ' ' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + ' <|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + ' <|im_end|>' }}{% endif %}{{ ' ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|> assistant ' }}{% endif %}"
)
HUB_ID = "irr-test/tiny-chat-irr"
NOTE = "<!-- irr-callback: realigned -->"  # the block IRR adds to the Trainer's / TRL's card


def chat_tokenizer():
    """A word-level tokenizer with ChatML markers and a chat template that marks the assistant's turns."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL)}
    vocab.update({f"w{i}": i for i in range(len(SPECIAL), VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w6"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="w6"
    )
    out.chat_template = CHATML
    return out


def conversations(n: int = 24, seed: int = 0):
    """`messages` rows of different lengths (packing joins several into one row)."""
    import datasets

    g = torch.Generator().manual_seed(seed)

    def words(k: int) -> str:
        return " ".join(f"w{int(i)}" for i in torch.randint(len(SPECIAL), VOCAB, (k,), generator=g))

    rows = []
    for k in range(n):
        turns = [{"role": "user", "content": words(3 + k % 5)}, {"role": "assistant", "content": words(2 + k % 4)}]
        if k % 3 == 0:
            turns.insert(0, {"role": "system", "content": words(2)})
        rows.append({"messages": turns})
    return datasets.Dataset.from_list(rows)


@pytest.fixture(scope="module")
def unaligned_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("unaligned")
    perturbed(tiny_model(), 0.05, seed=7).save_pretrained(path)
    return str(path)


def sft_config(output_dir: str, **overrides):
    values = dict(
        output_dir=output_dir,
        use_cpu=True,
        bf16=False,
        report_to=[],
        disable_tqdm=True,
        logging_strategy="no",
        save_strategy="no",
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        max_length=64,
        seed=0,
    )
    values.update(overrides)
    return trl.SFTConfig(**values)


def irr_config(tmp_path, unaligned_dir: str, **overrides) -> IRRConfig:
    return IRRConfig(unaligned_model=unaligned_dir, cache_dir=str(tmp_path / "cache"), **overrides)


def push_list(trainer, monkeypatch) -> tuple[list[str], str]:
    """Run `trainer.push_to_hub()` up to the upload (the model saved, the card written) and return what it
    would upload: `output_dir`'s files filtered by the ignore patterns the Trainer passes to `upload_folder`
    (and huggingface_hub's defaults), the way `HfApi.upload_folder` filters them."""
    import transformers.trainer
    from huggingface_hub.utils import filter_repo_objects
    from huggingface_hub.utils._paths import DEFAULT_IGNORE_PATTERNS

    calls = []

    class Api:
        def upload_folder(self, **kwargs):
            calls.append(kwargs)

    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: Api())
    trainer.hub_model_id = HUB_ID  # no create_repo: the repository "exists"
    trainer.push_to_hub()
    [call] = calls
    folder = call["folder_path"]
    files = sorted(
        os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
        for root, _, names in os.walk(folder)
        for name in names
    )
    ignore = list(call["ignore_patterns"]) + DEFAULT_IGNORE_PATTERNS
    return list(filter_repo_objects(files, ignore_patterns=ignore)), folder


def assert_no_local_path(folder: str, files: list[str], tmp_path) -> None:
    """No uploaded text file names a path of this machine (the run's directory, the cache, the home)."""
    local = [str(tmp_path), os.path.realpath(str(tmp_path)), os.path.expanduser("~") + os.sep]
    for name in files:
        try:
            text = open(os.path.join(folder, name), encoding="utf-8").read()
        except UnicodeDecodeError:
            continue  # weights, and the Trainer's pickled training_args.bin
        for path in local:
            assert path not in text, f"{name} holds the local path {path}"


def test_full_finetune_with_assistant_only_loss_uploads_the_realigned_model_once(tmp_path, unaligned_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    callback = IRRCallback(irr_config(tmp_path, unaligned_dir, num_calibration_samples=16))
    trainer = trl.SFTTrainer(
        model=tiny_model(),
        args=sft_config(str(out), assistant_only_loss=True),
        train_dataset=conversations(),
        processing_class=chat_tokenizer(),
        callbacks=[callback],  # no bind(): the callback finds its trainer for the card
    )
    trainer.train()
    trainer.save_model()
    report = callback.report
    assert report.status == "ok" and report.totals["removed"] > 0 and callback.output_path is None
    # every real token of the first 16 conversations entered H (the default), prompts included
    rows = calibration_examples(trainer.train_dataset, None, num_samples=16, max_length=512)
    assert "labels" in rows[0] and any(label == -100 for label in rows[0]["labels"])
    assert report.calibration_sequences == 16 and report.calibration_tokens == sum(len(r["input_ids"]) for r in rows)
    live = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}

    files, folder = push_list(trainer, monkeypatch)
    weights = [f for f in files if f.endswith((".safetensors", ".bin")) and f != "training_args.bin"]
    assert weights == ["model.safetensors"], files  # one model: the root weights, no copy under irr/
    assert {"irr_report.json", "README.md", "config.json", "tokenizer.json"} <= set(files)
    saved = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert all(torch.equal(saved[k], live[k]) for k in saved)  # the uploaded weights are the realigned ones
    card = (out / "README.md").read_text()
    assert "trained using [TRL]" in card and HUB_ID in card  # TRL's card, rewritten by push_to_hub ...
    assert card.count(NOTE) == 1 and "were safety-realigned after fine-tuning with **IRR**" in card  # ... + IRR
    assert REALIGNED_TAG in card.split("---")[1]  # the tag in the card's metadata
    assert json.loads((out / "irr_report.json").read_text())["status"] == "ok"
    assert_no_local_path(folder, files, tmp_path)


def test_lora_with_packing_uploads_one_adapter_and_calibrates_on_examples(tmp_path, unaligned_dir, monkeypatch):
    from peft import LoraConfig

    out = tmp_path / "out"
    data = conversations()
    callback = IRRCallback(irr_config(tmp_path, unaligned_dir, num_calibration_samples=20))
    trainer = trl.SFTTrainer(
        model=tiny_model(),
        args=sft_config(str(out), packing=True),
        train_dataset=data,
        processing_class=chat_tokenizer(),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        callbacks=[callback],
    )
    packed_rows = len(trainer.train_dataset)
    assert packed_rows < 20 and {"seq_lengths", "position_ids"} & set(trainer.train_dataset.column_names)
    trainer.train()
    trainer.save_model()
    report = callback.report
    assert report.status == "ok" and report.extra["lora_adapter"]
    assert report.calibration_sequences == 20  # examples, not the packed rows that hold them

    files, folder = push_list(trainer, monkeypatch)
    weights = [f for f in files if f.endswith((".safetensors", ".bin")) and f != "training_args.bin"]
    assert weights == ["adapter_model.safetensors"], files  # the adapter once; no merged model, no second adapter
    card = (out / "README.md").read_text()
    assert "trained using [TRL]" in card and card.count(NOTE) == 1 and "safety-realigned with IRR" in card
    assert_no_local_path(folder, files, tmp_path)


def test_packed_calibration_equals_unpacked(tmp_path, unaligned_dir):
    """A packed row's sequences attend only within themselves in training (padding-free packing); split
    into them, every sequence's tokens give the H of the unpacked data: the realigned weights match. Fed
    whole (attention across the joined conversations), they do not."""
    tok, data = chat_tokenizer(), conversations(12)

    def train_rows(**kw):
        trainer = trl.SFTTrainer(
            model=tiny_model(), args=sft_config(str(tmp_path / "x"), **kw), train_dataset=data, processing_class=tok
        )
        return trainer.train_dataset

    packed, unpacked = train_rows(packing=True), train_rows()
    assert len(packed) < len(unpacked) == 12
    base = tiny_model()
    finetuned = perturbed(base, 0.05, seed=1)
    signs = {
        n: torch.sign(p.detach() - q.detach())
        for (n, p), q in zip(base.named_parameters(), perturbed(base, 0.05, seed=7).parameters())
    }
    base_state = {n: p.detach().clone() for n, p in base.named_parameters()}
    config = IRRConfig(num_calibration_samples=12, calibration_batch_size=3)

    def realigned(rows):
        model = copy.deepcopy(finetuned)
        report = realign(model, base=base_state, safety_vector=signs, calibration=rows, config=config, progress=False)
        return report, {n: p.detach() for n, p in model.named_parameters()}

    split = calibration_examples(packed, None, num_samples=12, max_length=512)
    plain = calibration_examples(unpacked, None, num_samples=12, max_length=512)
    assert sorted(map(tuple, (r["input_ids"] for r in split))) == sorted(map(tuple, (r["input_ids"] for r in plain)))
    (report_p, packed_w), (report_u, unpacked_w) = realigned(split), realigned(plain)
    assert report_p.calibration_sequences == report_u.calibration_sequences == 12
    assert report_p.calibration_tokens == report_u.calibration_tokens
    for name, weight in unpacked_w.items():
        torch.testing.assert_close(packed_w[name], weight, rtol=1e-4, atol=1e-5, msg=name)
    # the packed rows fed whole: tokens attend across conversations, H differs, so do the weights
    _, whole = realigned([{"input_ids": r["input_ids"]} for r in packed])
    assert max((whole[n] - w).abs().max().item() for n, w in unpacked_w.items()) > 1e-3
