"""Multi-process IRR on CPU: 2 torchrun processes (gloo) against the single-process result.

One torchrun launch runs every case (tests/dist_workers/worker.py); each test compares its case's
per-rank outputs with the same case computed here, in one process with no process group.
"""

import functools
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from irr_callback.distributed import assign_owners
from tests.dist_workers import cases

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = ["fisher", "hessian", "realign", "realign_ranked", "fsdp2_ranked", "fsdp2_save"]

pytestmark = pytest.mark.distributed


@functools.lru_cache(maxsize=None)
def reference(ratio):
    """The single-process result (no process group), computed once per ratio."""
    return cases.realign_case(ratio)


def torchrun(out_dir, script, *args, nproc=2, timeout=240):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT,
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone",
           os.path.join(ROOT, "tests", "dist_workers", script), str(out_dir), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    errors = [open(os.path.join(out_dir, f)).read() for f in sorted(os.listdir(out_dir)) if f.endswith(".error")]
    assert proc.returncode == 0 and not errors, "\n".join(errors) or proc.stderr[-4000:]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
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
    assert not [p for p in two_ranks.out.iterdir() if p.name.startswith(".irr-save-")]  # no temp dir left
    loaded = AutoModelForCausalLM.from_pretrained(str(saved_dir))
    expected, _ = reference(1.0)
    state = loaded.state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(state[k], v, rtol=1e-4, atol=1e-5)
