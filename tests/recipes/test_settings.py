"""One source of the method's settings: the dataclass, its presets, the generated command lines, and the
training-dynamics check (no model needed)."""
from dataclasses import fields, replace

import pytest

from abft_kernels.recipes.cli import build_parser, main
from abft_kernels.loss import FixedA, PIDController, SetpointController, make_controller
from abft_kernels.recipes.settings import (DEMO, PAPER, QUICK, SPLIT_SETTINGS, ABFTSettings, DataSettings, data_settings,
                                   given_settings)
from abft_kernels.recipes.training import count_check
from abft_kernels.recipes.workflow import held_out_settings


def parse(*argv):
    return build_parser().parse_args(list(argv))


def test_paper_values_are_the_defaults_everywhere():
    assert (PAPER.A0, PAPER.B, PAPER.kp, PAPER.ki, PAPER.kd) == (0.5, 1.0, 0.03, 0.005, 0.005)
    assert (PAPER.lr, PAPER.steps, PAPER.prompts_per_step, PAPER.k) == (2e-5, 32, 32, 4)
    pid = PIDController()
    assert (pid.A0, pid.kp, pid.ki, pid.kd) == (PAPER.A0, PAPER.kp, PAPER.ki, PAPER.kd)
    # the presets derive from the paper's: only what they say differs
    differs = lambda a, b: {f.name for f in fields(ABFTSettings) if getattr(a, f.name) != getattr(b, f.name)}
    assert differs(PAPER, DEMO) == {"prompt_style", "lr", "steps", "prompts_per_step", "train_prompts", "eval_prompts",
                                    "max_chars"}
    assert (PAPER.prompt_style, DEMO.prompt_style) == ("staicc", "space-on-label")
    assert differs(DEMO, QUICK) == {"steps", "prompts_per_step", "micro_batch", "train_prompts", "eval_prompts",
                                    "max_chars"}
    with pytest.raises(Exception):  # frozen: a preset cannot be changed in place
        PAPER.lr = 1.0


@pytest.mark.parametrize("command, settings_type", [("train", ABFTSettings), ("demo", ABFTSettings),
                                                    ("eval", DataSettings)])
def test_every_setting_is_an_option_and_defaults_to_the_preset(command, settings_type):
    args = parse(command)
    assert given_settings(args, settings_type) == {}  # nothing given: the preset decides
    for f in fields(settings_type):
        assert hasattr(args, f.name), f.name
    flags = ["--lr", "1e-3", "--prompts-per-step", "8", "--A0", "0.25", "--controller", "fixed", "--bf16",
             "--count-all-heads"] if settings_type is ABFTSettings else []
    given = given_settings(parse(command, "--seed", "7", "--eval-prompts", "300", "--max-chars", "99", *flags),
                           settings_type)
    expected = {"seed": 7, "eval_prompts": 300, "max_chars": 99}
    if settings_type is ABFTSettings:
        expected.update(lr=1e-3, prompts_per_step=8, A0=0.25, controller="fixed", bf16=True, count_all_heads=True)
    assert given == expected
    assert replace(DEMO, **given).lr == (1e-3 if flags else DEMO.lr)


def test_eval_has_no_training_options_and_choices_are_checked():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "--lr", "1e-3"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--controller", "pd"])
    assert build_parser().parse_args(["train", "--controller", "setpoint"]).controller == "setpoint"


def test_held_out_settings_take_the_runs_split_and_refuse_other_ones():
    saved = {"base_model": "some/model", "settings": {
        "dataset": "rt-subj", "text_column": "text", "label_column": "label", "max_chars": 160, "seed": 3,
        "eval_prompts": 200, "model": None, "k": 8, "lr": 2e-4}}  # as abft_config.json records a run
    settings = held_out_settings({"eval_prompts": 100}, saved)
    assert settings == replace(data_settings(PAPER), dataset="rt-subj", max_chars=160, seed=3, eval_prompts=100,
                               model="some/model", k=8, loss_row="read-out")  # saved before loss_row: read-out
    assert held_out_settings({}, saved).eval_prompts == 200
    assert set(SPLIT_SETTINGS) <= {f.name for f in fields(DataSettings)}
    with pytest.raises(ValueError, match="overlap the training pool"):
        held_out_settings({"seed": 4}, saved)
    with pytest.raises(ValueError, match="exceeds the training run's held-out set"):
        held_out_settings({"eval_prompts": 201}, saved)
    # StaICC: the test prompts (up to 1024) are fixed and training draws from the calibration split
    staicc = {**saved, "settings": {**saved["settings"], "dataset": "staicc:mr", "eval_prompts": 512}}
    assert held_out_settings({"eval_prompts": 1024}, staicc).eval_prompts == 1024


def test_eval_and_export_refuse_a_folder_without_a_run(tmp_path):
    """`abft eval --weights` and `abft export --weights` on a folder without abft_config.json (a typo, or a run that
    has not saved yet): a ValueError naming the folder, before any model is loaded."""
    for argv in (["eval", "--weights", str(tmp_path)],
                 ["export", "--weights", str(tmp_path), "--output-dir", str(tmp_path / "plain")]):
        with pytest.raises(ValueError, match=f"{tmp_path} holds no abft_config.json"):
            main(argv)


def test_controllers():
    assert type(make_controller(PAPER)) is PIDController
    fixed = make_controller(replace(PAPER, controller="fixed", A0=0.0))
    assert isinstance(fixed, FixedA) and [fixed.update(n) for n in (10, 40, 80, 5)] == [0.0] * 4
    assert fixed.history == [10, 40, 80, 5]
    with pytest.raises(ValueError, match="controller"):
        make_controller(replace(PAPER, controller="pd"))


def test_setpoint_controller_hand_computed():
    # at the paper's lr the gains are the paper's: A = 0.5 + 0.03·e + 0.005·Σe + 0.005·Δe, e = n − n_1
    pid = make_controller(replace(PAPER, controller="setpoint"))
    assert isinstance(pid, SetpointController) and pid.update(10) == 0.5
    assert pid.update(20) == pytest.approx(0.5 + 0.3 + 0.05 + 0.05)
    assert pid.update(14) == pytest.approx(0.5 + 0.12 + 0.005 * 14 + 0.005 * (4 - 10))
    # far below the start A would turn negative: held at 0, and the sum stops growing
    assert pid.update(-100) == 0.0 and pid.integral == 14
    restored = SetpointController()
    restored.load_state_dict(pid.state_dict())
    assert restored.update(12) == pytest.approx(pid.update(12))
    # 25 x the paper's lr: gains / 25
    fast = make_controller(replace(PAPER, controller="setpoint", lr=5e-4))
    fast.update(10)
    assert fast.update(20) == pytest.approx(0.5 + (0.3 + 0.05 + 0.05) / 25)
    with pytest.raises(ValueError, match="scale"):
        SetpointController(scale=0)


def log(*counts):
    return [{"step": i + 1, "counted_heads": n, "A": 0.5, "abft_loss": 1.0, "gold_mass": 0.04}
            for i, n in enumerate(counts)] + [{"train_runtime": 1.0}]


def test_count_check_band_collapse_and_explosion():
    steady = count_check(log(16, 20, 30, 25, 17))
    assert steady.within_band and not (steady.collapsed or steady.exploded) and steady.warnings == []
    assert "stayed within [8.0, 32.0]" in steady.summary and (steady.min, steady.max) == (16, 30)
    surge = count_check(log(16, 50, 40, 20))  # left the band, came back: no warning
    assert not surge.within_band and "left the band" in surge.summary and surge.warnings == []
    collapse = count_check(log(16, 50, 20, 3.9))
    assert collapse.collapsed and len(collapse.warnings) == 1 and "collapsed" in collapse.warnings[0]
    assert "--gold-demonstration" in collapse.warnings[0]  # what to do on a many-class task
    explode = count_check(log(16, 40, 65))
    assert explode.exploded and "exploded" in explode.warnings[0]
    with pytest.raises(ValueError, match="no ABFT training step"):
        count_check([{"train_runtime": 1.0}])
