"""CI runs exactly the test command that README.md gives a newcomer."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_readme_test_command():
    lines = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    ci_command = next(line for line in lines if line.startswith("python3 -m venv"))
    assert ci_command.endswith("python -m pytest -q")
    assert ci_command in (ROOT / "README.md").read_text()
