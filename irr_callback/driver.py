"""The layer-by-layer IRR driver: `realign(model, base=..., safety_vector=..., calibration=...)`.

Capture the inputs of every decoder layer once, then for each layer: one calibration pass through
the unmodified layer with hooks that accumulate H (real tokens only), identify/remove/recalibrate
every target, and one pass through the modified layer to produce the next layer's inputs. Only
one layer's Hessians live on the compute device at a time.
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
import time
import weakref
from typing import Any, Mapping, Optional

import torch
from torch import nn
from transformers.utils import logging

from .calibration import calibration_batches
from .config import IRRConfig
from .core import HessianAccumulator, realign_group
from .core.hessian import CrossAccumulator
from .core.realign import row_spans
from .core.obs import NumericalError, all_finite
from .distributed import SingleProcess, context_for, raise_if_any_failed
from .report import IRRReport
from .targets import Target, TargetError, find_targets
from .tensors import as_tensor_mapping, tensor_shape

logger = logging.get_logger(__name__)


class _StopForward(Exception):
    """Ends a forward pass early once everything it was run for is recorded."""


def realign(
    model: nn.Module,
    *,
    base: Any = None,
    safety_vector: Any = None,
    calibration: Any,
    safety_calibration: Any = None,
    importance: Any = None,
    config: Optional[IRRConfig] = None,
    progress: bool = True,
) -> IRRReport:
    """Realign a fine-tuned causal LM in place and return what was done.

    `base`: the aligned model (`PreTrainedModel`), a name → tensor mapping or a safetensors path;
    optional only when every target is a LoRA layer (its frozen weight is the base).
    `safety_vector` / `importance`: name → tensor mappings (or safetensors paths), keyed like
    `model.named_parameters()`; entries for non-targets are ignored. `calibration`: batches with
    `input_ids` (+ `attention_mask`), e.g. a DataLoader, or a `datasets.Dataset` with `input_ids`.
    `safety_calibration`: harmful prompts with safe responses in the same forms (plus optional
    `labels`, -100 on prompt tokens); needed when `config.safety_weight != 0`, ignored otherwise.
    The safety vector is needed unless `config.identify_mode == "none"`.

    All or nothing: on any error every weight is restored before the error propagates.
    """
    config = config or IRRConfig()
    started = time.perf_counter()
    prefix, layers, targets = find_targets(model, config.target_modules)
    base_map, safety_map, importance_map = resolve_inputs(config, base, safety_vector, importance)
    validate_inputs(targets, base_map, safety_map, importance_map if config.needs_importance else None)
    auto = config.safety_weight == "auto"
    batches, report = prepare_calibration(calibration, config, getattr(model, "config", None), len(layers),
                                          loss_mask=auto)
    safety_batches = prepare_safety_stream(safety_calibration, config, getattr(model, "config", None), report)
    dist_ctx = context_for(model, targets)  # SingleProcess without a process group: no collectives
    twins = config.uses_safety_stream and config.safety_term == "aligned"
    if twins and dist_ctx.kind not in ("single", "replicated"):
        raise ValueError(f"IRRConfig.safety_term='aligned' is not supported under {dist_ctx.kind} yet; use "
                         "safety_term='delta' there")
    batches, streams, held = arrange_streams(batches, safety_batches, dist_ctx, auto, twins=twins)
    by_layer: dict[int, list[Target]] = {}
    for t in targets:
        by_layer.setdefault(t.layer, []).append(t)

    backup = make_backup(config.backup)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if dist_ctx.stop_capture_early:  # one process: layers stubbed out, the capture costs the embedding only
                hidden, layer_args = capture_with_stub_layers(model, layers, batches)
            else:
                hidden, layer_args = _capture_layer_inputs(model, layers, batches, stop_early=False)
            if twins:  # the aligned safety stream starts from the aligned model's embedding (when base has it)
                _recapture_with_aligned_embedding(model, layers, batches, streams, hidden, base_map)
            aligned_of = {index: AlignedWeights(layers[index], f"{prefix}.{index}", by_layer.get(index, []), base_map)
                          for index in range(len(layers))} if twins else {}
            masks = [b.get("irr_token_mask", b["attention_mask"]) for b in batches]  # padding batches: 0
            _check_finite(hidden, masks, f"the input of decoder layer '{prefix}.0' (the embedding output)", dist_ctx)
            if auto:  # choose λ on the held-out batches, then realign with every batch
                config = _choose_safety_weight(model, layers, by_layer, hidden, layer_args, masks, streams, held,
                                               batches, base_map, safety_map, importance_map, config, report,
                                               dist_ctx, progress, aligned_of)
                streams = [s.replace("held_", "") for s in streams]
            stop_plan: dict = {}  # which target each layer shape calls last (shared across layers)
            for index in logging.tqdm(range(len(layers)), desc="IRR layers", disable=not progress):
                layer = layers[index]
                realign_layer(layer, by_layer.get(index, []), hidden, layer_args[index], masks, base_map, safety_map,
                              importance_map, config, backup, report, dist_ctx, stop_plan=stop_plan, streams=streams,
                              aligned=aligned_of.get(index))
                if index + 1 < len(layers):
                    hidden = propagate_streams(layer, hidden, layer_args[index], streams, aligned_of.get(index))
                    _check_finite(hidden, masks, f"the output of decoder layer '{prefix}.{index}'"
                                  + (" after realignment" if index in by_layer else ""), dist_ctx)
                release_free_memory()
    except BaseException as exc:
        dist_ctx.restore(backup)
        report.status, report.error = "failed", f"{type(exc).__name__}: {exc}"
        raise
    finally:
        backup.close()
        model.train(was_training)
    report.modules = dist_ctx.merge_stats(report.modules, [t.name for t in targets])
    report.seconds = time.perf_counter() - started
    logger.info(report.summary())
    return report


# ------------------------------------------------------------------------------------------------
def resolve_inputs(config: IRRConfig, base: Any, safety_vector: Any, importance: Any):
    """(base, safety vector, importance) as name → tensor mappings; importance required when ranking,
    the safety vector unless nothing is removed by sign (identify_mode 'none')."""
    base_map = as_tensor_mapping(base, what="base") if base is not None else None
    if config.needs_safety_vector and safety_vector is None:
        raise ValueError(f"IRRConfig.identify_mode={config.identify_mode!r} removes deltas by the safety vector's "
                         "signs, but no safety_vector was given (or use identify_mode='none' with a "
                         "safety_weight and safety_calibration)")
    safety_map = (as_tensor_mapping(safety_vector, what="safety_vector")
                  if safety_vector is not None and config.needs_safety_vector else None)
    importance_map = as_tensor_mapping(importance, what="importance") if importance is not None else None
    if config.needs_importance and importance_map is None:
        raise ValueError(f"IRRConfig.remove_ratio={config.remove_ratio} < 1 ranks deltas by importance, "
                         "but no importance (Fisher) was given")
    return base_map, safety_map, importance_map


def prepare_calibration(calibration: Any, config: IRRConfig, model_config: Any,
                        num_layers: int, loss_mask: bool = False) -> tuple[list[dict[str, torch.Tensor]], IRRReport]:
    """Padded calibration batches, and the report that will record what is done with them."""
    pad = getattr(model_config, "pad_token_id", None)
    batches = calibration_batches(calibration, max_samples=config.num_calibration_samples,
                                  max_length=config.calibration_max_length,
                                  batch_size=config.calibration_batch_size,
                                  pad_token_id=pad if isinstance(pad, int) else 0, loss_mask=loss_mask)
    report = IRRReport(config=config.to_dict(), num_layers=num_layers,
                       calibration_sequences=sum(b["input_ids"].shape[0] for b in batches),
                       calibration_tokens=sum(int(b["attention_mask"].sum()) for b in batches))
    return batches, report


def prepare_safety_stream(safety_calibration: Any, config: IRRConfig, model_config: Any,
                          report: IRRReport) -> list[dict[str, torch.Tensor]]:
    """Padded safety-stream batches (harmful prompts with safe responses) when the safety weight is
    not 0, with `irr_token_mask` selecting the tokens `config.safety_tokens` names; [] otherwise."""
    if not config.uses_safety_stream:
        return []
    if safety_calibration is None:
        raise ValueError(f"IRRConfig.safety_weight={config.safety_weight!r} needs safety_calibration: harmful "
                         "prompts with safe responses (tokenized, with labels -100 on prompt tokens)")
    pad = getattr(model_config, "pad_token_id", None)
    batches = calibration_batches(safety_calibration, max_samples=config.num_safety_samples,
                                  max_length=config.calibration_max_length,
                                  batch_size=config.calibration_batch_size,
                                  pad_token_id=pad if isinstance(pad, int) else 0,
                                  token_selection=config.safety_tokens, what="safety_calibration",
                                  loss_mask=config.safety_weight == "auto")
    report.setting = "safety-regularised"
    report.safety_weight = None if config.safety_weight == "auto" else float(config.safety_weight)
    report.safety_sequences = sum(b["input_ids"].shape[0] for b in batches)
    report.safety_tokens = sum(int(b["irr_token_mask"].sum()) for b in batches)
    return batches


def arrange_streams(batches: list, safety_batches: list, dist_ctx: SingleProcess, auto: bool,
                    twins: bool = False) -> tuple[list, list[str], dict[str, list[int]]]:
    """All batches in one list (captured, propagated and hooked together), each one's stream name, and
    (auto) the indices of the held-out ones: calibration, safety, held-out calibration, held-out
    safety. Each part is this rank's share, padded with zero-weight batches. `twins`: every safety
    batch is preceded by a "safety_aligned" copy that travels through the aligned layers."""
    parts = [("calibration", batches), ("safety", safety_batches)]
    if auto:
        from .auto_weight import split_held_out

        cal_train, cal_held = split_held_out(batches, "calibration")
        saf_train, saf_held = split_held_out(safety_batches, "safety_calibration")
        parts = [("calibration", cal_train), ("safety", saf_train),
                 ("held_calibration", cal_held), ("held_safety", saf_held)]
    out, streams, held = [], [], {"calibration": [], "safety": []}
    for name, part in parts:
        if not part:
            continue
        part = dist_ctx.shard_calibration(part)
        if name.startswith("held_"):
            held[name[5:]] = list(range(len(out), len(out) + len(part)))
        if name == "safety" and twins:
            for batch in part:
                out += [batch, batch]
                streams += ["safety_aligned", "safety"]
            continue
        out += part
        streams += [name] * len(part)
    return out, streams, held


def propagate_streams(layer: nn.Module, hidden: list[torch.Tensor], args: list, streams: list[str],
                      aligned: Optional[AlignedWeights]) -> list[torch.Tensor]:
    """`propagate`, with the "safety_aligned" batches run through the layer's aligned weights."""
    if aligned is None or "safety_aligned" not in streams:
        return propagate(layer, hidden, args)
    out = []
    for b, x in enumerate(hidden):
        if streams[b] == "safety_aligned":
            with aligned.swapped_in():
                out.append(_run_layer(layer, x, *args[b]))
        else:
            out.append(_run_layer(layer, x, *args[b]))
    return out


def _recapture_with_aligned_embedding(model, layers, batches, streams, hidden, base) -> None:
    """Replace the layer-0 inputs of the "safety_aligned" batches by those of the aligned embedding."""
    embedding = model.get_input_embeddings().weight
    name = next((n for n, p in model.named_parameters() if p is embedding), None)
    if base is None or name not in base:
        return  # base holds only the targets: the aligned stream starts from the model's own embedding
    twins = [b for b, s in enumerate(streams) if s == "safety_aligned"]
    original = embedding.data
    embedding.data = base[name].to(device=original.device, dtype=original.dtype)
    try:
        again, _ = capture_with_stub_layers(model, layers, [batches[b] for b in twins])
    finally:
        embedding.data = original
    for b, x in zip(twins, again):
        hidden[b] = x


def _choose_safety_weight(model, layers, by_layer, hidden, layer_args, masks, streams, held, batches, base,
                          safety, importance, config, report, dist_ctx, progress, aligned_of) -> IRRConfig:
    """Run the auto pass (auto_weight.py), record the candidates in the report, return the config with λ*."""
    from .auto_weight import held_out_losses, resolved, search_weight

    if dist_ctx.kind not in ("single", "replicated"):
        raise ValueError(f"safety_weight='auto' is not supported under {dist_ctx.kind} yet: choose λ on one "
                         "process (irr apply --safety-weight auto) and pass the number")
    started = time.perf_counter()
    loss_batches = {k: [batches[i] for i in idx] for k, idx in held.items()}

    def run_candidates(candidates, references):
        return held_out_losses(model, layers, by_layer, hidden, layer_args, masks, streams, held, loss_batches,
                               base, safety, importance, config, candidates, dist_ctx,
                               collect_hessians=_collect_hessians, propagate=propagate,
                               propagate_streams=propagate_streams, write=_write, make_backup=make_backup,
                               progress=progress, aligned_of=aligned_of, references=references)

    weight, table = search_weight(run_candidates)
    table["seconds"] = time.perf_counter() - started
    report.auto, report.safety_weight = table, weight
    logger.info(f"IRR safety_weight='auto': chose λ={weight:g} ({table['reason']}) in {table['seconds']:.1f}s")
    return resolved(config, weight)


def realign_layer(layer: nn.Module, targets: list[Target], hidden: list[torch.Tensor], args: list, masks: list,
                  base: Optional[Mapping], safety: Mapping, importance: Optional[Mapping], config: IRRConfig,
                  backup: "_Backup", report: IRRReport, dist_ctx: Optional[SingleProcess] = None,
                  stop_plan: Optional[dict] = None, streams: Optional[list[str]] = None,
                  aligned: Optional["AlignedWeights"] = None) -> None:
    """One decoder layer: H per distinct input from one pass of the unmodified layer, then every group
    of targets identified, removed, recalibrated and written (originals saved to `backup` first).

    `dist_ctx` sums H over processes and divides the solves (default: one process, no collectives).
    `stop_plan`: a dict kept across layers lets the H pass stop after the last target (None: full passes).
    `streams`: the input stream of each batch ("calibration" or "safety"; default all calibration):
    each stream gets its own H; the safety stream's H_s reaches the solver by the group's first name."""
    if not targets:
        return
    dist_ctx = dist_ctx or SingleProcess()
    if not dist_ctx.stop_capture_early:
        stop_plan = None
    streams = streams or ["calibration"] * len(hidden)
    by_stream = _collect_hessians(layer, targets, hidden, args, masks, config, reduce=dist_ctx.reduce_hessian,
                                  stop_plan=stop_plan, streams=streams, aligned=aligned)
    hessians = by_stream.pop("calibration")
    safety_hessians = {name: {group[0].name: h for group, (h, _) in entries} for name, entries in by_stream.items()}
    del by_stream
    release_free_memory()  # the pass's activations: the solves below start from a trimmed heap
    solve = functools.partial(_realign_group, base=base, safety=safety, importance=importance, config=config,
                              backup=backup, report=report, safety_hessians=safety_hessians)
    dist_ctx.solve_layer(hessians, solve, backup)
    del hessians, safety_hessians
    release_free_memory()  # the solver's buffers


def propagate(layer: nn.Module, hidden: list[torch.Tensor], args: list) -> list[torch.Tensor]:
    """The next layer's inputs: the calibration batches run through the (realigned) layer."""
    return [_run_layer(layer, x, *args[b]) for b, x in enumerate(hidden)]


def validate_inputs(targets: list[Target], base: Optional[Mapping], safety: Mapping,
                    importance: Optional[Mapping]) -> None:
    """Every target has a base, a safety vector and (when needed) an importance of its shape, all finite."""
    for t in targets:
        shape = tuple(getattr(t.weight, "ds_shape", t.weight.shape))  # ZeRO-3 keeps a flat partition
        if t.kind == "lora":
            _check_lora_supported(t)
        sources = [("safety_vector", safety)] if safety is not None else []
        if t.kind != "lora":
            if base is None:
                raise ValueError(f"base is required: '{t.name}' is a fully fine-tuned weight (no LoRA)")
            sources.insert(0, ("base", base))
        if importance is not None:
            sources.append(("importance", importance))
        if not all_finite(t.weight.detach()):
            raise ValueError(f"the model's '{t.name}' contains NaN or Inf")
        for label, mapping in sources:
            check_entry(label, mapping, t.name, shape)
            tensor = mapping[t.name]
            if tensor.is_floating_point() and not all_finite(tensor):
                raise ValueError(f"{label}['{t.name}'] contains NaN or Inf")


def check_entry(label: str, mapping: Mapping, name: str, shape: tuple[int, ...]) -> None:
    """`mapping` (base, safety vector or importance) has `name` with the weight's shape."""
    if name not in mapping:
        raise KeyError(f"{label} has no entry for target '{name}' "
                       f"(it has {len(mapping)} entries, e.g. {list(mapping)[:3]})")
    got = tensor_shape(mapping, name)
    if got != shape:
        raise ValueError(f"{label}['{name}'] has shape {got}, the model's weight has shape {shape}")


def _check_lora_supported(t: Target) -> None:
    module = t.module
    if getattr(module, "use_dora", {}).get(t.adapter, False):
        raise TargetError(f"{t.name}: DoRA adapters are not supported; merge the adapter "
                          "(model.merge_and_unload()) and realign the merged model with `base`")
    if getattr(module, "lora_bias", {}).get(t.adapter, False):
        raise TargetError(f"{t.name}: LoRA with lora_bias=True is not supported; merge the adapter first")


def _capture_layer_inputs(model: nn.Module, layers: nn.ModuleList, batches: list[dict[str, torch.Tensor]],
                          stop_early: bool = True):
    """One forward pass per batch recording every layer's non-hidden arguments (masks, rotary
    embeddings, positions: they may differ per layer) and the hidden states entering layer 0.

    `stop_early`: end each pass with an exception at the last layer's pre-hook (saves the last layer
    and the LM head). Sharded backends (ZeRO-3, FSDP) pass False: their forward hooks gather and
    release parameters and keep per-pass bookkeeping (DeepSpeed's module stack and prefetch trace)
    that an interrupted forward leaves mid-pass; the pass then completes, with logits for one
    position only where the model accepts `logits_to_keep` (docs/distributed.md)."""
    hidden: list[torch.Tensor] = []
    layer_args: list[list[tuple[tuple, dict, bool]]] = [[] for _ in layers]
    last = len(layers) - 1

    def make_hook(index: int):
        def hook(module, args, kwargs):
            in_kwargs = not args
            x = kwargs["hidden_states"] if in_kwargs else args[0]
            rest_kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            layer_args[index].append((tuple(args[1:]), rest_kwargs, in_kwargs))
            if index == 0:
                hidden.append(x)
            if index == last and stop_early:
                raise _StopForward
        return hook

    handles = [layer.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    device = _input_device(model)
    extra = {} if stop_early or not _accepts(model, "logits_to_keep") else {"logits_to_keep": 1}
    try:
        for batch in batches:
            try:
                model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                      use_cache=False, **extra)
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    return hidden, layer_args


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        return None


def release_free_memory() -> None:
    """Hand freed heap back to the OS (glibc's malloc_trim): called after each layer's H pass, after
    each group's solve and at the end of each layer.

    Each of those phases frees tens to hundreds of MB (activations, solver buffers); glibc keeps
    freed blocks below its (self-raising) mmap threshold in the heap, where fragmentation makes the
    next phase grow the process instead of reusing them. Costs milliseconds; a no-op elsewhere."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class _ArgsRecorder(nn.Module):
    """Stands in for a decoder layer during the capture pass: identity, so the model's forward
    reaches every layer's pre-hook without computing any layer; attribute reads go to the real
    layer (e.g. `attention_type`, which picks the mask a layer gets)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        object.__setattr__(self, "_layer", layer)

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_layer"), name)


def capture_with_stub_layers(model: nn.Module, layers: nn.ModuleList, batches: list[dict[str, torch.Tensor]]):
    """`_capture_layer_inputs` with every decoder layer replaced by an identity stub.

    The per-layer arguments (masks, rotary embeddings, positions) are built by the model before its
    layer loop from the batch alone, not from earlier layers' outputs, so they come out the same
    as from a real pass, for the cost of the embedding (a real pass costs a whole forward)."""
    originals = list(layers)
    for i, layer in enumerate(originals):
        layers[i] = _ArgsRecorder(layer)
    try:
        return _capture_layer_inputs(model, layers, batches)
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer


def _accepts(model: nn.Module, name: str) -> bool:
    import inspect

    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _input_device(model: nn.Module) -> torch.device:
    try:
        return model.get_input_embeddings().weight.device
    except Exception:
        return next(model.parameters()).device


def _check_finite(hidden: list[torch.Tensor], masks: list[torch.Tensor], what: str, dist_ctx) -> None:
    """Stop at the layer where NaN/Inf first appears on real tokens, instead of failing later with a
    NaN Hessian blamed on the next layer's modules (or, worse, writing weights computed from it).
    Under a process group every rank agrees (one flag reduction) so no rank is left waiting."""
    error = None
    for b, (x, mask) in enumerate(zip(hidden, masks)):
        real = x[mask.to(x.device).bool()] if mask.shape == x.shape[:-1] else x
        if not torch.isfinite(real).all():
            error = NumericalError(f"{what} contains NaN or Inf on calibration batch {b}; every weight was "
                                   "restored. Check the model in float32, or exclude the layer's modules via "
                                   "target_modules")
            break
    if dist_ctx.kind != "single":
        raise_if_any_failed(error)
    elif error is not None:
        raise error


def _run_layer(layer: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict, in_kwargs: bool) -> torch.Tensor:
    out = layer(hidden_states=x, *args, **kwargs) if in_kwargs else layer(x, *args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _collect_hessians(layer, targets, hidden, args, masks, config, reduce=lambda accumulator: None,
                      stop_plan: Optional[dict] = None, streams: Optional[list[str]] = None,
                      aligned: Optional["AlignedWeights"] = None):
    """Run the calibration batches through the unmodified layer; one H per distinct input.

    Pre-hooks on the targets accumulate H before each target runs. Targets fed the very same
    tensor object (q/k/v, gate/up) share one H; the first batch finds them through weak references,
    so no target input is kept alive beyond the model's own use of it. `stop_plan` (a dict shared
    across layers, None to disable) remembers which target a layer of this shape calls last; once
    it is reached and every target has been seen, the pass ends (the output of this pass is never
    used, so the last module and whatever follows it are skipped: for Llama, down_proj).
    `reduce` sums each raw accumulator over processes before it is normalised (no-op in one process).
    `streams` names the input stream of each batch; returns {stream: [(group, (H, tokens))]}, one H per
    distinct input and stream, accumulated by the same hooks (padding excluded by each batch's mask).
    A "safety_aligned" batch (run with the aligned weights swapped in by `aligned`) must come right
    before its "safety" twin: its target inputs x_A are held until the twin's x_r arrive, and
    "safety_cross" (2·Σx_A x_rᵀ/n) and "safety_aligned" (H_A) are returned beside the other streams."""
    device = torch.device(config.device) if config.device else targets[0].weight.device
    streams = streams or ["calibration"] * len(hidden)
    names_of_streams = list(dict.fromkeys(streams))
    accumulators: dict[int, HessianAccumulator] = {}
    stream_accumulators: dict[tuple[str, int], HessianAccumulator] = {}
    crosses: dict[int, CrossAccumulator] = {}
    pending: dict[int, torch.Tensor] = {}  # a safety_aligned batch's target inputs, until its twin comes
    representative: dict[int, int] = {}  # target -> the target whose accumulator it shares
    seen: dict[int, weakref.ref] = {}
    relative = {id(m): n for n, m in layer.named_modules()}
    names = [relative.get(id(t.module)) for t in targets]
    key = tuple(sorted(str(n) for n in names))
    can_stop = stop_plan is not None and None not in names and not _has_offload_hooks(layer)
    state = {"batch": 0, "stop_at": stop_plan.get(key) if can_stop else None, "calls": [0] * len(targets),
             "order": []}

    def first_batch_group(k: int, x: torch.Tensor) -> None:
        for j, ref in seen.items():
            if ref() is x:
                representative[k] = representative[j]
                break
        else:
            representative[k] = k
            accumulators[k] = HessianAccumulator(targets[k].out_in_shape[1], device=device)
        seen[k] = weakref.ref(x)

    def make_hook(k: int, target: Target):
        def hook(module, inputs):
            x = inputs[0]
            if state["batch"] == 0:
                state["calls"][k] += 1
                state["order"].append(k)
                if k not in representative:
                    first_batch_group(k, x)
            if representative.get(k) == k:
                stream = streams[state["batch"]]
                acc = accumulators[k] if stream == names_of_streams[0] else stream_accumulators.setdefault(
                    (stream, k), HessianAccumulator(targets[k].out_in_shape[1], device=device))
                token_mask = _token_mask(target, x, masks[state["batch"]])
                acc.add(x.detach().to(device), token_mask)
                if stream == "safety_aligned":
                    pending[k] = x.detach().to(device)
                elif stream == "safety" and k in pending:
                    crosses.setdefault(k, CrossAccumulator(targets[k].out_in_shape[1], device=device)).add(
                        pending.pop(k), x.detach().to(device), token_mask)
            if names[k] == state["stop_at"] and (state["batch"] > 0 or len(representative) == len(targets)):
                raise _StopForward
        return hook

    handles = [t.module.register_forward_pre_hook(make_hook(k, t)) for k, t in enumerate(targets)]
    try:
        for b, x in enumerate(hidden):
            state["batch"] = b
            try:
                if streams[b] == "safety_aligned":
                    with aligned.swapped_in():
                        _run_layer(layer, x, *args[b])
                else:
                    _run_layer(layer, x, *args[b])
            except _StopForward:
                pass
            if b == 0:
                seen.clear()
                for k, t in enumerate(targets):
                    if k not in representative:
                        raise TargetError(f"{t.name}: the module was not called during the layer's forward pass")
                if can_stop:  # every target called once: stop later passes at the last one
                    once = all(c == 1 for c in state["calls"])
                    state["stop_at"] = names[state["order"][-1]] if once else None
                    stop_plan[key] = state["stop_at"]
    finally:
        for h in handles:
            h.remove()
    groups = [(k, [i for i in range(len(targets)) if representative[i] == k]) for k in sorted(accumulators)]
    out = {}
    for stream in names_of_streams:
        accs = {k: accumulators[k] if stream == names_of_streams[0] else stream_accumulators.setdefault(
            (stream, k), HessianAccumulator(targets[k].out_in_shape[1], device=device)) for k, _ in groups}
        for k, _ in groups:  # every rank reduces every stream's accumulator, in the same order
            reduce(accs[k])
        out[stream] = [([targets[i] for i in members], (_finalize(accs[k], stream), accs[k].tokens))
                       for k, members in groups]
    if "safety_aligned" in names_of_streams:
        accs = {k: crosses.get(k) or CrossAccumulator(targets[k].out_in_shape[1], device=device) for k, _ in groups}
        for k, _ in groups:
            reduce(accs[k])
        out["safety_cross"] = [([targets[i] for i in members], (_finalize(accs[k], "safety"), accs[k].tokens))
                               for k, members in groups]
    return out


def _finalize(accumulator: HessianAccumulator, stream: str) -> torch.Tensor:
    try:
        return accumulator.finalize()
    except ValueError as exc:
        raise ValueError(f"the {stream} stream: {exc}") from None


def _has_offload_hooks(layer: nn.Module) -> bool:
    """accelerate's offload hooks move weights in and out around each forward: never interrupt one."""
    return any(hasattr(m, "_hf_hook") for m in layer.modules())


def _token_mask(target: Target, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if x.shape[:-1].numel() != mask.numel():
        raise TargetError(f"{target.name}: its input has {x.shape[:-1].numel()} token positions but the batch has "
                          f"{mask.numel()}; cannot exclude padding (exclude this module via target_modules)")
    return mask.reshape(x.shape[:-1])


def _realign_group(group: list[Target], hessian: torch.Tensor, tokens: int, base, safety, importance,
                   config: IRRConfig, backup: "_Backup", report: IRRReport,
                   safety_hessians: Optional[Mapping[str, Mapping[str, torch.Tensor]]] = None) -> None:
    device = hessian.device
    dtype = torch.float64 if all(t.weight.dtype == torch.float64 for t in group) else torch.float32
    rows = [t.out_in_shape[0] for t in group]
    stacked = torch.empty(sum(rows), group[0].out_in_shape[1], dtype=dtype, device=device)  # the group's Δ
    deltas, safeties, scores = [], [], []
    for t, (r0, r1) in zip(group, row_spans(rows)):
        delta = stacked[r0:r1]  # written in place: no per-module copy of Δ or W_A is kept
        if t.kind == "lora":
            delta.copy_(t.to_out_in(t.lora_delta().detach()))
        else:
            current = t.to_out_in(t.weight.detach()).to(device=device, dtype=dtype)
            torch.sub(current, t.to_out_in(base[t.name]).to(device=device, dtype=dtype), out=delta)
        deltas.append(delta)
        safeties.append(t.to_out_in(safety[t.name]).to(device) if config.needs_safety_vector else None)
        scores.append(t.to_out_in(importance[t.name]).to(device) if config.needs_importance else None)
    weight = float(config.safety_weight)
    streams = {name: hs.get(group[0].name) for name, hs in (safety_hessians or {}).items()} if weight else {}
    cross = {}
    if streams.get("safety_cross") is not None:
        cross = dict(safety_cross=streams["safety_cross"], aligned_hessian=streams["safety_aligned"],
                     bases=[t.to_out_in(t.weight.detach() if t.kind == "lora" else base[t.name]).to(device=device)
                            for t in group])
    results = realign_group(
        deltas, safeties, scores, hessian, names=[t.name for t in group],
        remove_ratio=config.remove_ratio, remove_more=config.remove_more, recalibrate=config.recalibrate,
        blocksize=config.blocksize, percdamp=config.percdamp, mode=config.identify_mode, seed=config.irr_seed,
        max_damping_retries=config.max_damping_retries, fallback_to_removal=config.fallback_to_removal,
        removal_error=config.fallback_to_removal,
        safety_hessian=streams.get("safety"), safety_weight=weight, ridge=config.safety_ridge, **cross,
    )
    del stacked, deltas
    for t, (new_delta, stats) in zip(group, results):
        # W_A read again (lazily, from the base mapping) rather than held through the solve
        source = t.weight.detach() if t.kind == "lora" else base[t.name]
        _write(t, t.to_out_in(source).to(device=device, dtype=dtype) + new_delta, backup)
        stats.layer, stats.hessian_tokens = t.layer, tokens
        report.modules.append(stats)
    results = new_delta = None  # the last view keeps the whole solver output alive
    release_free_memory()  # this group's solver buffers, before the next group allocates its own


def _write(target: Target, new_weight: torch.Tensor, backup: "_Backup") -> None:
    """W' = W_A + Δ' computed in float32, cast once; a LoRA layer's adapter is switched off (B = 0)."""
    param = target.weight
    backup.save(param)
    param.data.copy_(target.from_out_in(new_weight).to(dtype=param.dtype, device=param.device))
    if target.kind == "lora":
        lora_b = target.module.lora_B[target.adapter].weight
        backup.save(lora_b)
        lora_b.data.zero_()


class AlignedWeights:
    """Swaps the aligned weights into one decoder layer for the aligned safety stream: every target gets
    W_A (a LoRA target's adapter is switched off), and every other parameter of the layer that the
    base mapping holds (norms) its base value. `swapped_in()` restores the layer's own tensors."""

    def __init__(self, layer: nn.Module, layer_name: str, targets: list[Target], base: Optional[Mapping]) -> None:
        self._swaps: list[tuple[torch.Tensor, Any]] = []
        target_params = set()
        for t in targets:
            target_params.add(id(t.weight))
            if t.kind == "lora":
                lora_b = t.module.lora_B[t.adapter].weight
                self._swaps.append((lora_b, lambda p=lora_b: torch.zeros_like(p)))
            else:
                self._swaps.append((t.weight, lambda p=t.weight, n=t.name: base[n]))
        for name, param in layer.named_parameters():
            full = f"{layer_name}.{name}"
            if id(param) not in target_params and base is not None and full in base and "lora_" not in name:
                self._swaps.append((param, lambda p=param, n=full: base[n]))

    @contextlib.contextmanager
    def swapped_in(self):
        saved = []
        try:
            for param, value in self._swaps:
                saved.append((param, param.data))
                param.data = value().to(device=param.device, dtype=param.dtype)
            yield
        finally:
            for param, data in saved:
                param.data = data


def make_backup(where: str) -> "_Backup":
    """The all-or-nothing backup: 'cpu' (RAM), 'disk' (a temp file: no RAM) or 'none' (callers that
    discard the model on failure, e.g. the offline path)."""
    if where == "cpu":
        return _Backup()
    if where == "disk":
        return _DiskBackup()
    if where == "none":
        return _NoBackup()
    raise ValueError(f"backup must be 'cpu', 'disk' or 'none', got {where!r}")


class _Backup:
    """Original values of every tensor written, on CPU, to restore on failure."""

    def __init__(self) -> None:
        self._saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._ids: set[int] = set()

    def save(self, param: torch.Tensor) -> None:
        if id(param) not in self._ids:
            self._ids.add(id(param))
            self._saved.append((param, param.detach().to("cpu", copy=True)))

    def originals(self):
        """(param, original CPU tensor) pairs, last written first: what `restore` puts back."""
        for param, original in reversed(self._saved):
            yield param, original

    def restore(self) -> None:
        with torch.no_grad():
            for param, original in self.originals():
                param.data.copy_(original.to(param.device))
        self.close()

    def close(self) -> None:
        self._saved.clear()
        self._ids.clear()


class _DiskBackup(_Backup):
    """Like `_Backup`, but the originals are written as raw bytes to an unlinked-on-close temp file
    (under $TMPDIR), so the backup costs disk, not RAM. The writes run on a background thread while
    the next module is computed; each snapshot stays in RAM until its write succeeded (at most
    `in_flight` pending), and one whose write failed (disk full) is kept in RAM, so a restore never
    depends on a write that did not happen."""

    def __init__(self, in_flight: int = 1) -> None:
        super().__init__()
        from concurrent.futures import ThreadPoolExecutor

        self._file = tempfile.TemporaryFile(prefix="irr-backup-")
        # [param, offset, size, shape, dtype, snapshot kept in RAM until written (or if the write failed)]
        self._entries: list[list] = []
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="irr-backup")
        self._pending: list = []
        self._in_flight = in_flight
        self._offset = 0

    def save(self, param: torch.Tensor) -> None:
        if id(param) in self._ids:
            return
        self._ids.add(id(param))
        value = param.detach().to("cpu", copy=True).contiguous()  # a snapshot: param is overwritten next
        size = value.numel() * value.element_size()
        # the shape at save time: a ZeRO-3 parameter is only full-shaped while gathered
        entry = [param, self._offset, size, value.shape, value.dtype, value]
        self._entries.append(entry)
        self._offset += size
        while len(self._pending) >= self._in_flight:
            self._pending.pop(0).result()
        self._pending.append(self._writer.submit(self._write, entry))

    def _write(self, entry: list) -> None:
        raw = memoryview(entry[5].view(-1).view(torch.uint8).numpy())
        try:
            written = 0
            while written < len(raw):
                written += os.pwrite(self._file.fileno(), raw[written:], entry[1] + written)
        except OSError as exc:  # keep the RAM snapshot instead
            logger.warning(f"IRR backup: writing to the temp file failed ({exc}); keeping that tensor in RAM")
            return
        entry[5] = None

    def _drain(self) -> None:
        while self._pending:
            self._pending.pop(0).result()

    def originals(self):
        self._drain()
        for param, offset, size, shape, dtype, in_ram in reversed(self._entries):
            if in_ram is not None:
                yield param, in_ram
                continue
            buffer = bytearray(size)
            view, done = memoryview(buffer), 0
            while done < size:  # pread may return less than asked (2 GiB per call on Linux)
                chunk = os.preadv(self._file.fileno(), [view[done:]], offset + done)
                if chunk <= 0:
                    raise OSError(f"IRR backup: the temp file ended early at byte {offset + done}")
                done += chunk
            yield param, torch.frombuffer(buffer, dtype=torch.uint8).view(dtype).view(shape)

    def close(self) -> None:
        try:
            self._drain()
        finally:
            self._writer.shutdown(wait=True)
            self._entries.clear()
            self._ids.clear()
            self._file.close()


class _NoBackup(_Backup):
    """No rollback: for callers whose model copy is thrown away on failure."""

    def save(self, param: torch.Tensor) -> None:
        pass
