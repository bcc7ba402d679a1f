"""The `abft` command."""
from __future__ import annotations

import argparse

import torch

from . import suite, workflow


def run_example(args: argparse.Namespace) -> None:
    """Label masses and the ABFT loss on a tiny random ICL-shaped problem."""
    import abft_kernels as ak

    torch.manual_seed(args.seed)
    batch, heads, kv_heads, seq_len, head_dim, num_classes = 2, 4, 2, 24, 16, 2
    label_positions = [5, 11, 17]  # three demonstration labels
    q = torch.randn(batch, heads, seq_len, head_dim)
    k = torch.randn(batch, kv_heads, seq_len, head_dim, requires_grad=True)
    v = torch.randn(batch, kv_heads, seq_len, head_dim)
    # Let the query rows of heads 0 and 1 (kv head 0) look at the labels, like induction heads do.
    q[:, :2, -1] = k.detach()[:, :1, label_positions].sum(2)
    q.requires_grad_(True)
    key_class = torch.full((batch, seq_len), -1)
    key_class[:, label_positions] = torch.tensor([0, 1, 0])
    query_rows = torch.full((batch, 1), seq_len - 1)  # the query is the last token
    target = torch.tensor([[0], [1]])
    choice = ak.resolve_backend(q, k, v, key_class, num_classes, query_rows=query_rows, backend=args.backend)
    out, mass = ak.label_attention(q, k, v, key_class, num_classes, query_rows=query_rows, backend=args.backend)
    loss, info = ak.abft_loss([mass], target, key_class, query_rows)
    loss.backward()
    print(f"backend={choice.name} ({choice.reason})  out {tuple(out.shape)}  mass {tuple(mass.shape)}")
    for b in range(batch):
        for h in range(heads):
            print(f"sample {b} head {h}: mass per class {[round(x, 4) for x in mass[b, h, 0].tolist()]}")
    print(f"loss {loss.item():.4f}  counted heads per sample {info.counted_heads.tolist()}  "
          f"|dL/dq| {q.grad.norm().item():.4f}")


def run_bench(args: argparse.Namespace) -> None:
    """The benchmark runner: `benchmarks.run`, installed with this package (`python -m benchmarks.run`)."""
    from benchmarks.run import main as run_benchmarks

    run_benchmarks(args.bench_args)


def build_parser() -> argparse.ArgumentParser:
    """The `abft` parser: example, demo, train, eval, export, suite (their settings options generated from
    `abft_kernels.recipes.settings` by transformers' HfArgumentParser) and bench."""
    from transformers import HfArgumentParser

    parser = argparse.ArgumentParser(prog="abft", description="Attention Behavior Fine-Tuning kernels and tools")
    # train/eval/demo: options generated from the settings dataclass (abft_kernels.recipes.settings), as for TrainingArguments.
    commands = parser.add_subparsers(dest="command", required=True, parser_class=HfArgumentParser)
    example = commands.add_parser("example", help="label masses and the ABFT loss on a tiny random problem")
    example.add_argument("--backend", default="auto")
    example.add_argument("--seed", type=int, default=0)
    example.set_defaults(func=run_example)
    for name, run, help_text in (
            ("demo", workflow.run_demo, "ABFT end to end on the built-in offline model and data: before/after table"),
            ("train", workflow.run_train, "ABFT training of W_Q/W_K on a model and dataset"),
            ("eval", workflow.run_eval, "ICL accuracy and label attention, before and after --weights")):
        command = commands.add_parser(name, help=help_text, dataclass_types=[workflow.SETTINGS_TYPE[name]])
        workflow.configure_parser(command, name)
        command.set_defaults(func=run)
    command = commands.add_parser("export", help="an `abft train` output folder as a plain transformers folder (LoRA "
                                  "merged) and, for LoRA runs, a PEFT adapter folder")
    command.add_argument("--weights", required=True, help="an `abft train` output folder (or a checkpoint-N in it)")
    command.add_argument("--output-dir", required=True, help="the plain transformers folder (LoRA merged)")
    command.add_argument("--adapter-dir", help="also a PEFT adapter folder here (LoRA runs)")
    command.add_argument("--device", default="cpu")
    command.set_defaults(func=workflow.run_export)
    command = commands.add_parser("suite", dataclass_types=[suite.SuiteSettings],
                                  help="vanilla / calibration / ABFT / E2E, in and out of domain, consistency, "
                                       "unseen-label prompts: table, report.json, accuracy.png")
    suite.configure_parser(command)
    command.set_defaults(func=suite.run_suite)
    bench = commands.add_parser("bench", add_help=False,
                                help="benchmark suite; options as python -m benchmarks.run --help")
    bench.set_defaults(func=run_bench)
    return parser


def main(argv=None) -> None:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if args.command == "bench":
        args.bench_args = unknown  # every option after `bench` belongs to the benchmark runner
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.func(args)


if __name__ == "__main__":
    main()
