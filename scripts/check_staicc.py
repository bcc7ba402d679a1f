"""Check, by hand, the StaICC loader and prompt builder against StaICC's exported data (not a test: needs the export).

For every dataset in splits.json and every one of its 1024 prompts, the "staicc"-style prompt text must equal the
prompt written directly from the JSON by the recipe of the export's README (StaICC's `write_prompt_from_dataline`),
and the "space-on-label" text the same without the trailing space; the first --tokenize prompts per dataset and
style are also tokenized on the model's tokenizer (label positions checked by PromptBuilder.build). Also checks the
example in StaICC's docstring of `write_prompt_from_dataline` (a contextual-calibration prompt with query "").

    python scripts/check_staicc.py --staicc-root $STAICC
"""
import argparse
import json
import sys
from pathlib import Path

from abft_kernels.recipes.icl import PROMPT_STYLES, Example, PromptBuilder, load_staicc, staicc_prompts

STAICC_DOC_EXAMPLE = ("review: thoughtful , provocative and entertaining . sentiment: positive\n"
                      "review: don't be fooled by the impressive cast list - eye see you is pure junk . "
                      "sentiment: negative\nreview:  sentiment: ")


def readme_prompt(spec: dict, rows: list, demo_rows: list, test_row: int) -> str:
    t = spec["template"]
    (prefix,), (affix,) = t["input_text_prefixes"], t["input_text_affixes"]
    text = t["instruction"]
    for r in demo_rows:
        text += prefix + rows[r]["text"] + affix + t["label_prefix"] + spec["label_space"][rows[r]["label"]] \
            + t["label_affix"]
    return text + t["query_prefix"] + prefix + rows[test_row]["text"] + affix + t["label_prefix"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--staicc-root", required=True)
    parser.add_argument("--model", help="tokenizer to check label positions on (default: the built-in model's)")
    parser.add_argument("--tokenize", type=int, default=64, help="prompts per dataset and style to tokenize")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from abft_kernels.recipes.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.model))
    root = Path(args.staicc_root)
    datasets = json.loads((root / "splits.json").read_text(encoding="utf-8"))["datasets"]
    failures, unchecked = 0, []
    for name, spec in datasets.items():
        rows = [json.loads(line) for line in (root / spec["file"]).read_text(encoding="utf-8").split("\n") if line]
        task = load_staicc(name, root)
        builders = {}
        for style in PROMPT_STYLES:
            try:
                builders[style] = PromptBuilder(tokenizer, task.template, style=style)
            except ValueError as error:  # this tokenizer splits a label word: the style refuses it, as it should
                print(f"{name} [{style}]: not checked: {error}")
                unchecked.append(f"{name} [{style}]")
        mismatches = 0
        for j, prompt in enumerate(spec["prompts"]):
            expected = readme_prompt(spec, rows, prompt["demo_rows"], prompt["test_row"])
            demos, query = task.prompt_examples(j)
            for style, builder in builders.items():
                mismatches += builder.text(demos, query) != (expected if style == "staicc" else expected[:-1])
        tokenized = {style: len(staicc_prompts(b, task, args.tokenize)) for style, b in builders.items()}
        read_out = {style: tokenizer.convert_ids_to_tokens(b.label_token_ids) for style, b in builders.items()}
        print(f"{name}: {len(spec['prompts'])} prompts, {mismatches} text mismatches; tokenized {tokenized}; "
              f"train/demonstrations/test {len(task.train)}/{len(task.demonstrations)}/{len(task.test)}; "
              f"read-out tokens {read_out}")
        failures += mismatches
        if name == "rotten_tomatoes" and "staicc" in builders:
            by_text = {r["text"]: Example(r["text"], r["label"]) for r in rows}
            demos = [by_text["thoughtful , provocative and entertaining ."],
                     by_text["don't be fooled by the impressive cast list - eye see you is pure junk ."]]
            same = builders["staicc"].text(demos, Example("", 0)) == STAICC_DOC_EXAMPLE
            print(f"StaICC's docstring example (content-free query \"\"): {'identical' if same else 'DIFFERENT'}")
            failures += not same
    if unchecked:
        print(f"not checked with this tokenizer, which splits their label words (another --model may keep them "
              f"whole): {', '.join(unchecked)}")
    print("OK" if failures == 0 else f"FAILED: {failures} mismatches")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
