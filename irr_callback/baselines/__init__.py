"""Comparison baselines used by the IRR paper: DARE, RESTA and Safe LoRA.

All three are written from the papers' descriptions:

* **DARE** -- Yu et al. 2024, "Language Models are Super Mario: Absorbing Abilities from
  Homologous Models as a Free Lunch": drop each entry of a fine-tuning delta with
  probability ``p`` and rescale the survivors by ``1 / (1 - p)`` (unbiased in expectation).
* **RESTA** -- Bhardwaj et al. 2024, "Language Models are Homer Simpson! Safety Re-Alignment of
  Fine-tuned Language Models through Task Arithmetic": add the safety vector
  ``v = W_A - W_U`` to the fine-tuned weights, optionally after DARE on the fine-tuning delta:
  ``W' = W_A + DARE(Delta) + s * v``.
* **Safe LoRA** -- Hsu et al. 2024, "Safe LoRA: the Silver Lining of Reducing Safety Risks when
  Finetuning Large Language Models": per layer, ``C = V V^T / ||V||_F`` with
  ``V = W_A - W_U`` (rows = outputs); the delta is replaced by ``C Delta`` when the cosine
  similarity between ``C Delta`` and ``Delta`` is below a threshold. For LoRA
  (``Delta = scaling * B A``) this is ``B' = C B``.

The tensor functions are pure (they never modify their inputs). The model-level wrappers
(:func:`apply_resta`, :func:`apply_safe_lora`) modify a model in place, all-or-nothing: every
new weight is computed and validated in float32 first, and only then written (cast once to
the parameter's dtype). Errors name the offending parameter.

Orientation: weight matrices are handled as (out, in), like ``nn.Linear.weight``.
``transformers.pytorch_utils.Conv1D`` weights (GPT-2) are stored (in, out) and are transposed
internally; LoRA layers with ``fan_in_fan_out`` likewise.

Files: `dare`, `resta`, `safe_lora` (one per method), `common` (the report, and reading / writing a
model's weights by plain name).
"""

from .common import BaselineEntry, BaselineReport
from .dare import dare
from .resta import apply_resta, resta_delta
from .safe_lora import apply_safe_lora, flat_cosine, safe_lora_delta, safe_lora_lora_b, safe_lora_projection


__all__ = [
    "BaselineEntry",
    "BaselineReport",
    "apply_resta",
    "apply_safe_lora",
    "dare",
    "flat_cosine",
    "resta_delta",
    "safe_lora_delta",
    "safe_lora_lora_b",
    "safe_lora_projection",
]
