"""`abft demo --quick` end to end (what CI runs), then `abft eval --weights` on its output."""
import json

import pytest

from abft_fixtures import needs_builtin
from abft_kernels.recipes.cli import main

pytestmark = needs_builtin


def test_quick_demo_then_eval_of_its_weights(tmp_path, capsys):
    demo_dir, eval_dir = tmp_path / "demo", tmp_path / "eval"
    main(["demo", "--quick", "--output-dir", str(demo_dir)])
    printed = capsys.readouterr()
    for row in ("ICL accuracy", "counted heads / prompt", "gold-label mass", "time (s)", "peak memory (MiB)"):
        assert row in printed.out
    assert "heads=" in printed.err and "A=" in printed.err  # the training progress bar
    assert "seed 42" in printed.out and "standard error of about" in printed.out
    assert "counted heads per prompt over 2 steps: start" in printed.out  # the band line

    report = json.loads((demo_dir / "report.json").read_text())
    before, after = report["before"], report["after"]
    assert before["num_prompts"] == after["num_prompts"] == 16
    assert len(before["gold_mass"]) == 30 and len(before["gold_mass"][0]) == 9  # SmolLM2: 30 layers, 9 heads
    assert [h["step"] for h in report["training_log"] if "abft_loss" in h] == [1, 2]
    assert report["settings"]["lr"] == 2e-4 and report["settings"]["k"] == 4
    assert (demo_dir / "heatmap.png").read_bytes()[:4] == b"\x89PNG"
    assert (demo_dir / "dynamics.png").read_bytes()[:4] == b"\x89PNG"
    check = report["count_check"]
    assert check["start"] == report["training_log"][0]["counted_heads"] and report["warnings"] == check["warnings"]
    assert after["gold_mass"] != before["gold_mass"]  # training moved the attention

    # The saved weights reproduce the demo's "after" on the same held-out prompts (split settings from the run).
    main(["eval", "--weights", str(demo_dir), "--output-dir", str(eval_dir)])
    evaluated = json.loads((eval_dir / "report.json").read_text())
    assert evaluated["before"]["predictions"] == before["predictions"]
    assert evaluated["after"]["predictions"] == after["predictions"]
    assert abs(evaluated["after"]["mean_gold_mass"] - after["mean_gold_mass"]) < 1e-5
    with pytest.raises(ValueError, match="overlap the training pool"):
        main(["eval", "--weights", str(demo_dir), "--max-chars", "1024", "--output-dir", str(eval_dir)])
    with pytest.raises(ValueError, match="exceeds the training run's held-out set"):
        main(["eval", "--weights", str(demo_dir), "--eval-prompts", "17", "--output-dir", str(eval_dir)])
