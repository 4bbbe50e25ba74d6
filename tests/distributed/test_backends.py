"""Multi-process IRR on CPU: 2 torchrun processes (gloo) against the single-process result.

One torchrun launch runs every case (tests/dist_workers/worker.py): a Trainer + IRRCallback run under
DDP, the statistics, `realign` replicated / FSDP2 / ZeRO-3 (when deepspeed is installed) and
`save_realigned`; each test compares its case's per-rank outputs with the same case computed here,
in one process with no process group.
"""

import functools
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from irr_callback.distributed import assign_owners
from irr_callback.pipeline.auto_weight import AUTO_CANDIDATES
from tests.dist_workers import cases, trainer_case


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
ZERO3_CASES = [
    "zero3",
    "zero3_ranked",
    "zero3_failure",
    "zero3_safety",
    "zero3_safety_auto",
    "zero3_filter_auto",
    "zero3_safety_auto_put_back",
    "zero3_fine_tuned_task",
    "zero3_true_sequential",
]
CASES = [
    "trainer",
    "fisher",
    "hessian",
    "realign",
    "realign_ranked",
    "safety",
    "safety_auto",
    "retain_auto",
    "fsdp2_safety",
    "fsdp2_safety_auto",
    "safety_auto_put_back",
    "fsdp2_safety_auto_put_back",
    "fine_tuned_task",
    "fsdp2_fine_tuned_task",
    "true_sequential",
    "fsdp2_true_sequential",
    "filter_auto",
    "fsdp2_filter_auto",
    "fsdp1",
    "fsdp1_safety",
    "fsdp1_safety_auto",
    "fsdp2_ranked",
    "fsdp2_save",
    "lora",
    *(ZERO3_CASES if DEEPSPEED else []),
    # IRRCallback() with no arguments, end to end (tests/dist_workers/callback_case.py)
    "noarg_ddp",
    "noarg_fsdp2",
    "noarg_fsdp1",
    *(["noarg_zero3"] if DEEPSPEED else []),
]
needs_deepspeed = pytest.mark.skipif(
    not DEEPSPEED,
    reason="deepspeed is not installed (an optional extra, not in "
    "the test extra): pip install deepspeed to run the ZeRO-3 cases on CPU",
)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@functools.cache
def reference(ratio):
    """The single-process result (no process group), computed once per ratio."""
    return cases.realign_case(ratio)


def torchrun(out_dir, script, *args, nproc=2, timeout=600):
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": ROOT,
        "TOKENIZERS_PARALLELISM": "false",
        "DS_ACCELERATOR": "cpu",
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--standalone",
        os.path.join(ROOT, "tests", "dist_workers", script),
        str(out_dir),
        *args,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    errors = [open(os.path.join(out_dir, f)).read() for f in sorted(os.listdir(out_dir)) if f.endswith(".error")]
    assert proc.returncode == 0 and not errors, "\n".join(errors) or proc.stderr[-4000:]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    trainer_case.save_models(str(out / "models"))
    torchrun(out, "worker.py", *CASES)

    def load(case):
        ranks = [load_file(str(out / f"{case}.rank{r}.safetensors")) for r in range(2)]
        extras = [json.load(open(out / f"{case}.rank{r}.json")) for r in range(2)]
        return ranks, extras

    load.out = out
    return load


def assert_identical_ranks(ranks):
    assert ranks[0].keys() == ranks[1].keys()
    for k in ranks[0]:
        assert torch.equal(ranks[0][k], ranks[1][k]), f"{k} differs between ranks"


def test_fisher_sums_match_one_process(two_ranks):
    ranks, _ = two_ranks("fisher")
    expected = cases.fisher_case()  # 5 batches: 3 on rank 0, 2 + one zero-weight padding on rank 1
    assert_identical_ranks(ranks)
    assert ranks[0].keys() == expected.keys()
    for k, v in expected.items():
        torch.testing.assert_close(ranks[0][k], v, rtol=1e-5, atol=1e-10)


def test_hessian_sums_match_one_process(two_ranks):
    ranks, _ = two_ranks("hessian")
    expected = cases.hessian_case()
    assert_identical_ranks(ranks)
    assert len(expected) == 8  # 4 input groups (qkv, o, gate/up, down) x (H, tokens)
    for k, v in expected.items():
        if k.endswith(".tokens"):
            assert int(ranks[0][k]) == int(v) == 80  # 10 sequences x 8 tokens, padding batch excluded
        else:
            torch.testing.assert_close(ranks[0][k], v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case,ratio", [("realign", 1.0), ("realign_ranked", 0.5)])
def test_realign_two_processes_equals_one(two_ranks, case, ratio):
    ranks, extras = two_ranks(case)
    expected, totals = reference(ratio)
    assert_identical_ranks(ranks)
    assert extras[0] == extras[1] == totals  # merged report: every module once, global token count
    for k, v in expected.items():
        torch.testing.assert_close(ranks[0][k], v, rtol=1e-4, atol=1e-5)


@functools.cache
def safety_reference(weight, retain=False):
    """The recommended setting in one process (no process group), computed once per λ."""
    return cases.safety_case(weight, retain=retain)


#: the recommended setting (aligned twin, identify_mode='none') under every backend, fixed λ and 'auto'
BACKENDS = {"ddp": "", "fsdp2": "fsdp2_", "fsdp1": "fsdp1_", "zero3": "zero3_"}


@pytest.mark.parametrize(
    "backend,weight,retain",
    [(backend, weight, False) for backend in BACKENDS for weight in (0.5, "auto")] + [("ddp", "auto", True)],
)
def test_recommended_setting_two_processes_equals_one(two_ranks, backend, weight, retain):
    """The safety stream and its aligned twin split across ranks, H_s / H_A / C reduced like H_d, W_A swapped
    into each layer the backend's way (DDP: whole weights; FSDP2: each rank's rows; ZeRO-3 and FSDP1: through
    a gather); with 'auto' the candidates' trial weights are written and restored the same way and the held-out
    losses summed over ranks (the held-out parts split unevenly: padding scores nothing), so both choose the
    same λ and weights as one process. `retain`: with the retain stream too (H_r reduced like H_d)."""
    if backend == "zero3" and not DEEPSPEED:
        pytest.skip("deepspeed is not installed (pip install -e '.[test]' installs it)")
    case = "retain_auto" if retain else BACKENDS[backend] + ("safety_auto" if weight == "auto" else "safety")
    ranks, extras = two_ranks(case)
    expected, totals = safety_reference(weight, retain)
    assert_identical_ranks(ranks)
    assert extras[0] == extras[1]
    totals = dict(totals)
    losses = [extra.pop("losses") for extra in (extras[0], extras[1], totals)]
    references = [extra.pop("references") for extra in (extras[0], extras[1], totals)]
    assert extras[0] == totals  # same λ, candidates, modules and token counts
    # the smallest candidate alone when it passes, else the coarse grid and a refining midpoint or a fallback when
    # the held-out losses call for one (which depends on how the random triple came out under the CPU's kernels):
    # by construction, not a margin
    if weight == "auto":
        assert len(losses[2]) == 1 or len(losses[2]) >= len(AUTO_CANDIDATES)
    else:
        assert losses[2] == []
    for got, want in zip(losses[0], losses[2]):  # each candidate's held-out losses, summed over ranks
        assert got == pytest.approx(want, rel=1e-4)
    if weight == "auto":  # λ = 0 (the fine-tuned model) and λ = ∞ (every target at W_A, written and restored)
        for which in ("finetuned", "aligned_targets"):
            for key, value in references[2][which].items():
                assert references[0][which][key] == pytest.approx(value, rel=1e-4)
    # 12 sequences x 7 tokens ("all" tokens) or x 4 answer positions (the preset's objective with the retain term),
    # padding excluded
    assert totals["safety_tokens"] == (12 * 4 if retain else 84)
    assert totals.get("retain_tokens", 84) == 84
    for k, v in expected.items():
        torch.testing.assert_close(ranks[0][k], v, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["ddp", "fsdp2", "zero3"])
def test_a_kept_first_candidate_put_back_two_processes_equals_one(two_ranks, backend):
    """`AUTO_KEEP_FIRST` when the smallest candidate is not chosen (no candidate passes, by construction): every rank
    puts the written weights back through its backend (DDP: the backup; FSDP2: each rank's rows; ZeRO-3: through a
    gather), captures its streams again, runs the trial passes and the final realignment: the same λ, candidates and
    weights as one process."""
    if backend == "zero3" and not DEEPSPEED:
        pytest.skip("deepspeed is not installed (pip install -e '.[test]' installs it)")
    ranks, extras = two_ranks(BACKENDS[backend] + "safety_auto_put_back")
    expected, totals = cases.safety_case("auto", put_back=True)
    assert_identical_ranks(ranks)
    assert extras[0]["kept"] is extras[1]["kept"] is totals["kept"] is False
    assert extras[0]["candidates"] == totals["candidates"] and len(totals["candidates"]) > 1
    assert extras[0]["safety_weight"] == totals["safety_weight"] and extras[0]["modules"] == totals["modules"]
    for k, v in expected.items():
        torch.testing.assert_close(ranks[0][k], v, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("option", ["fine_tuned_task", "true_sequential"])
@pytest.mark.parametrize("backend", ["ddp", "fsdp2", "zero3"])
def test_objective_options_two_processes_equal_one(two_ranks, backend, option):
    """With the retain stream, the kept-first candidate put back and trial passes. `task_term="fine-tuned"`: the
    calibration and retain streams' fine-tuned twins split across ranks, run through each layer before its solve
    (a collective forward under FSDP2 and ZeRO-3), their pairs reduced like H_d. `true_sequential`: a collective
    pass of the layer per group, the groups before it written through the backend. One process's λ and weights."""
    if backend == "zero3" and not DEEPSPEED:
        pytest.skip("deepspeed is not installed (pip install -e '.[test]' installs it)")
    ranks, extras = two_ranks(BACKENDS[backend] + option)
    expected, totals = cases.safety_case(
        "auto",
        retain=True,
        put_back=True,
        task_term="fine-tuned" if option == "fine_tuned_task" else "delta",
        sequential=option == "true_sequential",
    )
    assert_identical_ranks(ranks)
    assert extras[0]["kept"] is totals["kept"] is False and len(totals["candidates"]) > 1
    assert extras[0]["candidates"] == totals["candidates"] and extras[0]["safety_weight"] == totals["safety_weight"]
    for got, want in zip(extras[0]["losses"], totals["losses"]):
        assert got == pytest.approx(want, rel=1e-4)
    for k, v in expected.items():
        torch.testing.assert_close(ranks[0][k], v, rtol=1e-4, atol=1e-5)


@functools.cache
def filter_reference():
    return cases.filter_case()


@pytest.mark.parametrize("backend", ["ddp", "fsdp2", "zero3"])
def test_calibration_filter_two_processes_equals_one(two_ranks, backend):
    """`calibration_filter="refused"`: every rank judges every calibration row through the aligned weights (swapped
    in the backend's way, the head too) and the verdicts are summed, so every rank drops the rows one process
    drops, and the realigned weights (auto λ) are one process's."""
    if backend == "zero3" and not DEEPSPEED:
        pytest.skip("deepspeed is not installed (pip install -e '.[test]' installs it)")
    ranks, extras = two_ranks(BACKENDS[backend] + "filter_auto")
    expected, totals = filter_reference()
    assert totals["dropped_rows"] == [2, 9]  # by construction (refused_calibration)
    assert_identical_ranks(ranks)
    assert extras[0] == extras[1] == totals
    for k, v in expected.items():
        torch.testing.assert_close(ranks[0][k], v, rtol=1e-4, atol=1e-5)


def test_fsdp1_equals_one_process(two_ranks):
    """The paper's setting under FSDP1 (`FullyShardedDataParallel`, per-layer units, use_orig_params=True)."""
    ranks, extras = two_ranks("fsdp1")
    expected, totals = reference(1.0)
    assert_identical_ranks(ranks)
    assert extras[0] == totals
    for k, v in expected.items():
        torch.testing.assert_close(ranks[0][k], v, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case,ratio", [("fsdp2_save", 1.0), ("fsdp2_ranked", 0.5)])
def test_fsdp2_row_sharded_equals_full_solve(two_ranks, case, ratio):
    """fully_shard on a CPU mesh: row-local solve (ratio 1) and score-gather path (ratio 0.5)."""
    ranks, extras = two_ranks(case)
    expected, totals = reference(ratio)
    assert_identical_ranks(ranks)
    assert extras[0] == totals  # row-shard statistics summed back to whole modules
    for k, v in expected.items():
        torch.testing.assert_close(ranks[0][k], v, rtol=1e-4, atol=1e-5)


def test_owner_assignment_balances_and_is_deterministic():
    sizes = [3072, 1024, 2048, 6144, 2048]
    owners = assign_owners(sizes, 2)
    loads = [sum(s for s, o in zip(sizes, owners) if o == r) for r in range(2)]
    assert owners == assign_owners(sizes, 2)
    assert abs(loads[0] - loads[1]) <= max(sizes) and min(loads) > 0
    assert assign_owners([5], 4) == [0]


def test_save_realigned_under_fsdp2_writes_full_model(two_ranks):
    """Gathered full state dict, written once, loadable as a plain model equal to one process's result."""
    from transformers import AutoModelForCausalLM

    saved_dir = two_ranks.out / "fsdp2_saved"
    assert sorted(p.name for p in saved_dir.iterdir() if p.suffix == ".safetensors") == ["model.safetensors"]
    assert not [p for p in two_ranks.out.iterdir() if p.name.startswith(".")]  # no temp dir left
    loaded = AutoModelForCausalLM.from_pretrained(str(saved_dir))
    expected, _ = reference(1.0)
    state = loaded.state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(state[k], v, rtol=1e-4, atol=1e-5)


def test_lora_adapter_factors_and_merged_output_under_ddp_equal_one_process(two_ranks, tmp_path):
    """Every rank computes the same adapter factors (H reduced, new weights broadcast before the step), equal
    to one process's; the merged output is gathered and written once under the plain names."""
    from transformers import AutoModelForCausalLM

    ranks, extras = two_ranks("lora")
    expected, info = cases.lora_case(str(tmp_path / "merged"))
    assert_identical_ranks(ranks)
    assert extras[0] == extras[1] == info
    for k, v in expected.items():
        torch.testing.assert_close(ranks[0][k], v, rtol=1e-4, atol=1e-5)
    loaded = AutoModelForCausalLM.from_pretrained(str(two_ranks.out / "lora_merged")).state_dict()
    reference_state = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert set(reference_state) <= set(loaded)
    for k, v in reference_state.items():
        torch.testing.assert_close(loaded[k], v, rtol=1e-4, atol=1e-5)


# ---- Trainer + IRRCallback under DDP ---------------------------------------------------------------
@pytest.fixture(scope="module")
def one_process_trainer(two_ranks, tmp_path_factory):
    """The same Trainer run in this process (no process group), from the same saved models."""
    out = tmp_path_factory.mktemp("trainer1")
    models = {name: str(two_ranks.out / "models" / name) for name in ("aligned", "unaligned")}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two shared cores: one thread is faster for this tiny model
    try:
        return trainer_case.run(models, str(out), 1)
    finally:
        torch.set_num_threads(threads)


def test_trainer_ddp_callback_equals_one_process(two_ranks, one_process_trainer):
    """Compared: a 3-step SGD fine-tune + IRRCallback (remove_ratio 0.5, so the Fisher is computed in the
    run, sharded) on 2 DDP processes with 4 sequences each vs 1 process with 8 (the same global batches).

    The fine-tuned weights just before IRR agree to float summation order, and so do the realigned
    live weights (tolerance 1e-5, IRR amplifies summation noise through H⁻¹); both ranks end with
    bitwise-identical live weights; the report matches; IRR really changed the model.
    """
    ranks, extras = two_ranks("trainer")
    ref = one_process_trainer
    assert_identical_ranks(ranks)
    assert all(e["distributed"] for e in extras)  # the Trainer really ran a 2-process group
    for key in ("finetuned", "live"):
        for name, value in ref[key].items():
            torch.testing.assert_close(
                ranks[0][f"{key}.{name}"],
                value,
                rtol=1e-5,
                atol=1e-5,
                msg=lambda m: f"{key}.{name}: {m}",  # noqa: B023 (called before the loop moves on)
            )
    changed = [n for n in ref["live"] if not torch.equal(ranks[0][f"live.{n}"], ranks[0][f"finetuned.{n}"])]
    assert changed and all(".layers." in n for n in changed)  # only decoder targets were realigned
    for extra in extras:
        assert extra["status"] == "ok"
        assert (extra["removed"], extra["modules"], extra["tokens"]) == (ref["removed"], ref["modules"], ref["tokens"])
        assert extra["removed"] > 0
        assert extra["sources"]["importance"]["source"] == "safety_dataset"


def test_trainer_ddp_callback_saves_once_and_output_reloads(two_ranks):
    """The main process alone writes <irr_output_dir> (once); it reloads as the live realigned model."""
    from transformers import AutoModelForCausalLM

    ranks, extras = two_ranks("trainer")
    target = str(two_ranks.out / "irr")
    assert [e["writes"] for e in extras] == [[target], []]
    # realign_checkpoints: the main process alone realigned each checkpoint from its files, the other waited
    copies = [two_ranks.out / "run" / f"checkpoint-{step}" / "irr" for step in (2, 3)]
    assert [e["checkpoint_writes"] for e in extras] == [[str(c) for c in copies], []]
    assert all(json.loads((c / "irr_report.json").read_text())["status"] == "ok" for c in copies)
    assert not [p for p in two_ranks.out.iterdir() if p.name.startswith(".")]  # no temp dir left
    assert (two_ranks.out / "irr" / "irr_report.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(target).state_dict()
    live = {k[len("live.") :]: v for k, v in ranks[0].items() if k.startswith("live.")}
    assert loaded.keys() == live.keys()
    for k, v in live.items():
        assert torch.equal(loaded[k], v), k


# ---- ZeRO-3 (DeepSpeed on CPU, gloo) ---------------------------------------------------------------
@needs_deepspeed
@pytest.mark.parametrize("case,ratio", [("zero3", 1.0), ("zero3_ranked", 0.5)])
def test_zero3_equals_one_process(two_ranks, case, ratio):
    """`deepspeed.initialize` (stage 3, every weight partitioned): per-group gather, owner solve, DeepSpeed
    broadcast on exit; the gathered weights equal the single-process result on both ranks."""
    ranks, extras = two_ranks(case)
    expected, totals = reference(ratio)
    assert_identical_ranks(ranks)
    for extra in extras:
        assert extra.pop("partitioned")  # the weights really were ZeRO-3 partitions (empty local tensors)
        assert extra.pop("unfinished_forwards") == 0  # every capture forward ran to the end (DeepSpeed hooks)
        assert extra == totals
    for k, v in expected.items():
        torch.testing.assert_close(ranks[0][k], v, rtol=1e-4, atol=1e-5)


@needs_deepspeed
def test_zero3_failure_on_one_rank_restores_every_rank(two_ranks):
    """A solver error on rank 1 at layer 1 (layer 0 already written): both ranks raise and restore."""
    ranks, extras = two_ranks("zero3_failure")
    _, finetuned, _ = cases.triple("llama")
    state = finetuned.state_dict()
    assert extras[1]["error"] == "injected failure"
    assert "failed on 1 other process" in extras[0]["error"]
    for r in ranks:
        assert r.keys() and all(torch.equal(v, state[k]) for k, v in r.items())


@needs_deepspeed
def test_save_realigned_under_zero3_writes_full_model(two_ranks):
    """Parameter-by-parameter gather (no `zero3_save_16bit_model`), one directory, a plain loadable model."""
    from transformers import AutoModelForCausalLM

    saved_dir = two_ranks.out / "zero3_saved"
    assert sorted(p.name for p in saved_dir.iterdir() if p.suffix == ".safetensors") == ["model.safetensors"]
    loaded = AutoModelForCausalLM.from_pretrained(str(saved_dir))
    expected, _ = reference(1.0)
    _, finetuned, _ = cases.triple("llama")
    state = loaded.state_dict()
    assert state.keys() == finetuned.state_dict().keys()  # persistent tensors only, none missing
    for k, v in finetuned.state_dict().items():
        torch.testing.assert_close(state[k], expected.get(k, v), rtol=1e-4, atol=1e-5)


# ---- IRRCallback() with no arguments, end to end, per backend --------------------------------------
@pytest.mark.parametrize("backend", ["ddp", "fsdp2", "fsdp1", "zero3"])
def test_no_argument_callback_end_to_end(two_ranks, backend):
    """`IRRCallback()` and nothing else, 2 processes: DDP and ZeRO-3 as a Trainer run, FSDP2 and FSDP1 through the
    callback's hooks around a few optimizer steps on the sharded model. At train begin the base answers the
    shipped harmful prompts (generated in step on every rank when sharded, cached once); at train end the
    recommended setting (aligned twin, λ chosen by 'auto') realigns the live model and writes irr_report.json;
    the model saved afterwards (`trainer.save_model`, or `save_realigned` for the FSDP loops) reloads equal to
    the live weights."""
    from transformers import AutoModelForCausalLM

    if backend == "zero3" and not DEEPSPEED:
        pytest.skip("deepspeed is not installed (pip install -e '.[test]' installs it)")
    ranks, extras = two_ranks(f"noarg_{backend}")
    out = two_ranks.out / f"noarg_{backend}"
    both = [extra.pop("safety_data") for extra in extras]
    assert extras[0] == extras[1]  # same λ and report on both ranks
    info = extras[0]
    assert info["world_size"] == 2 and info["sharding"] == (None if backend == "ddp" else backend)
    assert info["status"] == "ok" and info["error"] is None, info["error"]
    assert info["setting"] == "recommended" and info["auto"] and info["safety_weight"] > 0
    # DDP: the main process generates, the other reads its cache; sharded: every rank generates in step
    assert [d["cached"] for d in both] == ([False, True] if backend == "ddp" else [False, False])
    assert both[0]["path"] == both[1]["path"] and both[0]["refusal_rate"] == both[1]["refusal_rate"]
    data = both[0]
    assert data["origin"] == "shipped" and data["generated_responses"]
    assert data["prompts"] == data["responses"] == 128
    assert data["path"].startswith(str(two_ranks.out / f"cache_{backend}")) and os.path.isfile(data["path"])
    assert info["output_path"] is None  # no copy of its own: the live model is realigned and saved by the user
    report = json.loads((out / "irr_report.json").read_text())
    assert report["status"] == "ok" and report["setting"] == "recommended"
    assert report["safety_weight"] == info["safety_weight"] and report["auto"]["chosen"] == info["safety_weight"]
    assert len(report["modules"]) == 14  # 2 layers x 7 Linear targets, each once (row shards merged)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary directory left
    loaded = AutoModelForCausalLM.from_pretrained(str(out / "model")).state_dict()
    live = ranks[0]  # the live realigned model, gathered on the main process
    assert set(live) <= set(loaded) and live
    for name, value in live.items():
        assert torch.equal(loaded[name], value.to(loaded[name].dtype)), name
