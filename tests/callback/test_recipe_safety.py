"""recipes/sft_irr.py with the recommended preset: no unaligned model, only safety data (issue 12)."""

from __future__ import annotations

import json

from tests import callback_world as world
from tests.callback.test_recipe import _args, _one_thread, _recipe, files  # noqa: F401  (fixtures)
from tests.helpers import margin


def _without_unaligned(args: list[str]) -> list[str]:
    k = args.index("--unaligned_model")
    return args[:k] + args[k + 2 :]


def test_recipe_recommended_preset_realigns_from_safety_data_alone(files, tmp_path):  # noqa: F811
    safety = tmp_path / "refusals.jsonl"
    safety.write_text(
        "".join(json.dumps({"prompt": p, "response": world.REFUSAL}) + "\n" for p in world.harmful_prompts())
    )
    args = _without_unaligned(
        _args(files, tmp_path / "out", "--preset", "recommended", "--safety_dataset", str(safety))
    )
    trainer, callback = _recipe().main(args)
    report = callback.report
    assert report.status == "ok" and report.setting == "recommended" and report.safety_weight > 0
    assert callback.sources["safety_vector"]["source"] == "none"
    margin("recipe recommended irr refusal", world.refusal_rate(trainer.model), ge=0.9)
    saved = json.loads((tmp_path / "out" / "irr" / "irr_report.json").read_text())
    assert saved["setting"] == "recommended" and saved["auto"]["chosen"] == report.safety_weight


def test_recipe_preset_keeps_flags_given_and_paper_stays_default(files, tmp_path):  # noqa: F811
    recipe = _recipe()
    _, irr, _ = recipe.parse(["--model_name_or_path", "m", "--dataset", "d", "--output_dir", str(tmp_path)])
    assert irr.setting_name == "irr" and irr.identify_mode == "sign" and irr.safety_weight == 0
    _, irr, _ = recipe.parse(
        ["--model_name_or_path", "m", "--dataset", "d", "--output_dir", str(tmp_path), "--preset", "recommended"]
        + ["--safety_weight", "0.5", "--num_calibration_samples", "16"]
    )
    assert irr.identify_mode == "none" and irr.safety_weight == 0.5 and irr.num_calibration_samples == 16
    assert irr.safety_term == "aligned" and irr.setting_name == "safety-regularised"
