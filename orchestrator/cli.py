"""`raylhf` command line: parses the arguments and hands each command to its module (train: `orchestrator.job`;
config show; train-rm, train-dpo; eval: `orchestrator.evaluation`; export: `orchestrator.export`)."""

from __future__ import annotations

import argparse
import sys

from orchestrator.config import ConfigError, dump_config, load_config

EXAMPLES = """examples:
  raylhf train examples/arith_grpo.yaml
  raylhf train examples/arith_grpo.yaml --set loop.steps=5 --set trainer.lr=1e-4
  raylhf config show examples/arith_grpo.yaml --set rollout.group_size=4
  raylhf train-rm examples/arith_rm.yaml
  raylhf train-dpo examples/arith_dpo.yaml --set beta=0.2
  raylhf eval examples/arith_grpo.yaml --checkpoint runs/arith-grpo-20250101-120000 --k 1 8 --samples 16
  raylhf export runs/arith-grpo-20250101-120000/final_policy exported/arith-policy
"""
EVAL_EXAMPLES = """examples:
  raylhf eval examples/arith_grpo.yaml --checkpoint runs/arith-grpo-20250101-120000
  raylhf eval examples/arith_grpo.yaml --checkpoint checkpoints/arith-sft --k 1 4 --samples 8 --out sft.json
  raylhf eval examples/arith_grpo.yaml --checkpoint runs/x --set loop.eval_size=50 --set rollout.temperature=0.7
"""
EXPORT_EXAMPLES = """examples:
  raylhf export runs/arith-grpo-20250101-120000 exported/arith-policy
  raylhf export checkpoints/arith-sft exported/arith-sft --force
  raylhf export /models/custom-arch exported/custom --trust-remote-code
  raylhf export runs/arith-grpo-lora-20250101-120000 exported/arith-adapter --adapter-only
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raylhf", description="Distributed RLHF / GRPO on Ray.", epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    overrides = dict(action="append", default=[], metavar="KEY=VALUE",
                     help="override a config field, e.g. --set trainer.lr=1e-5 (repeatable; values are YAML)")

    p = sub.add_parser("train", help="run a training job", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="job config YAML, e.g. examples/arith_grpo.yaml")
    p.add_argument("--set", dest="overrides", **overrides)
    p.add_argument("--run-dir", help="output directory (default: logging.run_dir of the config), e.g. --run-dir runs/try1")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint of --run-dir (default: the newest run "
                        "directory of logging.run_dir that has one), e.g. --resume --run-dir runs/try1")

    show_example = "example:\n  raylhf config show examples/arith_grpo.yaml --set rollout.group_size=4\n"
    c = sub.add_parser("config", help="inspect a config", epilog=show_example,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    csub = c.add_subparsers(dest="config_command", required=True)
    show = csub.add_parser("show", help="print the resolved config with every field explained", epilog=show_example,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    show.add_argument("config", help="job config YAML, e.g. examples/arith_grpo.yaml")
    show.add_argument("--set", dest="overrides", **overrides)

    for name, what, example in (("train-rm", "train a reward model on preference pairs or rankings", "examples/arith_rm.yaml"),
                                ("train-dpo", "train a policy with offline DPO on preference pairs", "examples/arith_dpo.yaml")):
        how = "--set loss=kwise" if name == "train-rm" else "--set beta=0.2"
        t = sub.add_parser(name, help=what, epilog=f"example:\n  raylhf {name} {example} {how}\n",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        t.add_argument("config", help=f"{name} config YAML, e.g. {example}")
        t.add_argument("--set", dest="overrides", **overrides)

    e = sub.add_parser("eval", help="held-out greedy accuracy and pass@k of a checkpoint (no Ray)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EVAL_EXAMPLES)
    e.add_argument("config", help="job config YAML whose data.eval, reward and rollout sampling are used, "
                                  "e.g. examples/arith_grpo.yaml")
    e.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="policy to evaluate: a model directory or a run directory (its final_policy/), e.g. runs/x")
    e.add_argument("--k", action="extend", nargs="+", type=int, metavar="K",
                   help="pass@k for each K (default 1), e.g. --k 1 8")
    e.add_argument("--samples", type=int, metavar="N", help="completions per problem at rollout.temperature "
                   "for pass@k, N >= every K (default: max(K, rollout.group_size)), e.g. --samples 16")
    e.add_argument("--set", dest="overrides", **overrides)
    e.add_argument("--out", default="eval.json", metavar="FILE.json",
                   help="where to write the results as JSON (default eval.json), e.g. --out runs/x/eval.json")

    x = sub.add_parser("export", help="write a checkpoint as a verified Hugging Face model directory",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXPORT_EXAMPLES)
    x.add_argument("checkpoint", help="a run directory (its final_policy/) or any Hugging Face model "
                                      "directory, e.g. runs/x/final_policy")
    x.add_argument("out", help="output directory, created; must be empty unless --force, e.g. exported/policy")
    x.add_argument("--force", action="store_true", help="replace a non-empty OUT (its old contents are deleted)")
    x.add_argument("--trust-remote-code", action="store_true",
                   help="allow the checkpoint's own modelling code (model.trust_remote_code of a job)")
    x.add_argument("--adapter-only", action="store_true",
                   help="a LoRA run (model.lora): write its adapter alone in peft's format instead of the merged "
                        "model, verified on its base model")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; its exit code. Ctrl-C ends any command with one line and 130 (the actors a
    `train` started are shut down on the way out)."""
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("raylhf: interrupted", file=sys.stderr)
        return 130


def run(args: argparse.Namespace) -> int:
    if args.command in ("train-rm", "train-dpo"):  # offline preference training: own configs, no Ray
        from orchestrator.offline import train_dpo, train_rm

        return (train_rm if args.command == "train-rm" else train_dpo).main(args.config, args.overrides)
    if args.command == "eval":  # in-process, no Ray
        from orchestrator import evaluation

        return evaluation.main(args.config, args.checkpoint, args.k, args.samples, args.overrides, args.out)
    if args.command == "export":
        from orchestrator import export

        return export.main(args.checkpoint, args.out, args.force, args.trust_remote_code, args.adapter_only)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"raylhf: {e}", file=sys.stderr)
        return 2
    if args.command == "config":
        print(dump_config(cfg))
        return 0
    from orchestrator.job import run_train

    return run_train(cfg, args.run_dir, args.resume)


if __name__ == "__main__":
    sys.exit(main())
