"""The library does not carry its recipes: `import abft_kernels` (the op, the loss, the transformers hooks) loads no
dataset, settings or training code, and no transformers."""
import subprocess
import sys


def test_import_loads_no_recipe_code():
    code = ("import abft_kernels, sys; print(sorted(m for m in sys.modules if m.startswith(("
            "'abft_kernels.recipes.icl', 'abft_kernels.recipes.settings', 'abft_kernels.recipes.training', 'abft_kernels.recipes.workflow', "
            "'transformers', 'datasets'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
