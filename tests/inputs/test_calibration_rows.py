"""Calibration rows as training saw them (issue 23): packed rows split into their sequences, a sample is
one sequence, loss masks kept as `labels`, and `calibration_loss_tokens_only` choosing which tokens enter H."""

from __future__ import annotations

import copy

import pytest
import torch

from irr_callback import IRRConfig, realign
from irr_callback.inputs.data import DataError, calibration_examples, trained_sequences
from tests.helpers import perturbed, tiny_model


def test_a_packed_row_is_split_at_seq_lengths_or_position_restarts():
    ids = list(range(10, 20))
    labels = [-100, 11, 12, -100, -100, 15, 16, 17, -100, 19]
    by_lengths = trained_sequences({"input_ids": ids, "labels": labels, "seq_lengths": [3, 5, 2]})
    by_positions = trained_sequences(
        {"input_ids": ids, "labels": labels, "position_ids": [0, 1, 2, 0, 1, 2, 3, 4, 0, 1]}
    )
    expected = [
        {"input_ids": [10, 11, 12], "labels": [-100, 11, 12]},
        {"input_ids": [13, 14, 15, 16, 17], "labels": [-100, -100, 15, 16, 17]},
        {"input_ids": [18, 19], "labels": [-100, 19]},
    ]
    assert by_lengths == expected and by_positions == expected
    assert trained_sequences({"input_ids": ids, "seq_lengths": [10]}) == [{"input_ids": ids}]  # one sequence
    with pytest.raises(DataError, match="seq_lengths"):
        trained_sequences({"input_ids": ids, "seq_lengths": [3, 3]})


def test_trl_loss_masks_become_labels():
    row = {"input_ids": [5, 6, 7, 8], "completion_mask": [0, 0, 1, 1]}
    assert trained_sequences(row) == [{"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]}]
    both = {"input_ids": [5, 6, 7, 8], "labels": [5, 6, 7, 8], "assistant_masks": [0, 1, 1, 0]}
    assert trained_sequences(both)[0]["labels"] == [-100, 6, 7, -100]


def test_num_calibration_samples_counts_sequences_not_packed_rows():
    rows = [{"input_ids": list(range(3 * k, 3 * k + 6)), "seq_lengths": [2, 4]} for k in range(5)]
    out = calibration_examples(rows, None, num_samples=7, max_length=64)
    assert [len(r["input_ids"]) for r in out] == [2, 4] * 3 + [2]


def test_calibration_loss_tokens_only_takes_the_trained_tokens_into_h():
    """With labels, the default takes every real token into H; `calibration_loss_tokens_only` only the
    trained ones: fewer tokens, another H, other weights. Rows without labels: the same either way."""
    base = tiny_model()
    finetuned = perturbed(base, 0.05, seed=1)
    signs = {
        n: torch.sign(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
        for n, p in base.named_parameters()
    }
    state = {n: p.detach().clone() for n, p in base.named_parameters()}
    g = torch.Generator().manual_seed(0)
    rows = []
    for k in range(8):
        ids = torch.randint(3, 96, (10 + k,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * 6 + ids[6:]})

    def run(data, only):
        model = copy.deepcopy(finetuned)
        config = IRRConfig(num_calibration_samples=8, calibration_loss_tokens_only=only)
        report = realign(model, base=state, safety_vector=signs, calibration=data, config=config, progress=False)
        return report, {n: p.detach().clone() for n, p in model.named_parameters()}

    (all_report, all_w), (only_report, only_w) = run(rows, False), run(rows, True)
    assert all_report.calibration_tokens == sum(len(r["input_ids"]) for r in rows)
    assert only_report.calibration_tokens == sum(len(r["input_ids"]) - 6 for r in rows)
    assert only_report.config["calibration_loss_tokens_only"] is True
    assert max((all_w[n] - w).abs().max().item() for n, w in only_w.items()) > 1e-4
    unlabelled = [{"input_ids": r["input_ids"]} for r in rows]
    (_, a), (_, b) = run(unlabelled, False), run(unlabelled, True)
    assert all(torch.equal(a[n], b[n]) for n in a)
