"""recipes/sft_irr.py with the recommended preset: no unaligned model, only safety data (issue 12), or no
safety flag at all: the default prompts answered by the base, `IRRCallback()`'s defaults (issue 14)."""

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
    args = _without_unaligned(_args(files, tmp_path / "out", "--safety_dataset", str(safety)))  # preset auto
    trainer, callback = _recipe().main(args)
    report = callback.report
    assert report.status == "ok" and report.setting == "recommended" and report.safety_weight > 0
    assert callback.sources["safety_vector"]["source"] == "none"
    margin("recipe recommended irr refusal", world.refusal_rate(trainer.model), ge=0.9)
    saved = json.loads((tmp_path / "out" / "irr_report.json").read_text())
    assert saved["setting"] == "recommended" and saved["auto"]["chosen"] == report.safety_weight


def test_recipe_with_no_safety_flag_realigns_like_the_no_argument_callback(files, tmp_path, monkeypatch):  # noqa: F811
    from irr_callback import IRRConfig
    from irr_callback.inputs import safety_prompts as sp

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the shipped prompts
    args = _without_unaligned(_args(files, tmp_path / "out", "--safety_max_new_tokens", "8"))
    assert not any(a in args for a in ("--safety_dataset", "--harmful_dataset", "--safety_vector", "--preset"))
    trainer, callback = _recipe().main(args)
    report = callback.report
    assert report.status == "ok" and report.setting == "recommended" and report.totals["removed"] == 0
    assert callback.config == IRRConfig.recommended(
        num_calibration_samples=16, cache_dir=str(files / "cache"), safety_max_new_tokens=8
    )
    assert callback.sources["safety_vector"]["source"] == "none"
    data = json.loads((tmp_path / "out" / "irr_report.json").read_text())["extra"]["safety_inputs"]
    assert data["safety_data"]["set"] == sp.SHIPPED_NAME and data["safety_data"]["generated_responses"]
    assert data["safety_data"]["prompts"] == IRRConfig().num_safety_samples


def test_recipe_preset_keeps_flags_given_and_paper_with_a_sign_mask_input(files, tmp_path):  # noqa: F811
    from irr_callback import IRRConfig

    recipe = _recipe()
    common = ["--model_name_or_path", "m", "--dataset", "d", "--output_dir", str(tmp_path)]
    _, irr, _ = recipe.parse(common)  # no safety flag: the recommended preset, IRRCallback()'s config
    assert irr == IRRConfig.recommended() and irr.identify_mode == "none" and irr.safety_weight == "auto"
    for flag in ("--unaligned_model", "--safety_vector", "--harmful_dataset"):  # a sign-mask input: the paper's
        _, irr, _ = recipe.parse([*common, flag, "x"])
        assert irr.setting_name == "irr" and irr.identify_mode == "sign" and irr.safety_weight == 0
    _, irr, _ = recipe.parse([*common, "--preset", "paper"])  # the old default, explicitly
    assert irr == IRRConfig() and irr.identify_mode == "sign" and irr.safety_weight == 0
    _, irr, _ = recipe.parse([*common, "--preset", "recommended", "--unaligned_model", "x"])
    assert irr.identify_mode == "none" and irr.unaligned_model == "x"  # explicit preset wins
    _, irr, _ = recipe.parse(
        [*common, "--preset", "recommended"] + ["--safety_weight", "0.5", "--num_calibration_samples", "16"]
    )
    assert irr.identify_mode == "none" and irr.safety_weight == 0.5 and irr.num_calibration_samples == 16
    assert irr.safety_term == "aligned" and irr.setting_name == "safety-regularised"


def test_recipe_flag_given_at_its_field_default_still_overrides_the_preset(files, tmp_path):  # noqa: F811
    """`--retain_weight 0` is IRRConfig()'s default but not the preset's: given, it turns the retain term off (and
    the preset's objective becomes the one without it), from flags or from a YAML file."""
    from irr_callback import IRRConfig

    recipe = _recipe()
    common = ["--model_name_or_path", "m", "--dataset", "d", "--output_dir", str(tmp_path)]
    _, irr, _ = recipe.parse(common)
    assert irr.retain_weight == IRRConfig.recommended().retain_weight > 0
    for flag in (["--retain_weight", "0"], ["--retain-weight=0"]):
        _, irr, _ = recipe.parse([*common, *flag])
        assert irr == IRRConfig.recommended(retain_weight=0.0) and irr.safety_tokens == "all"
    config = tmp_path / "run.yaml"
    config.write_text("model_name_or_path: m\ndataset: d\noutput_dir: " + str(tmp_path) + "\nretain_weight: 0\n")
    _, irr, _ = recipe.parse([str(config)])
    assert irr == IRRConfig.recommended(retain_weight=0.0)
