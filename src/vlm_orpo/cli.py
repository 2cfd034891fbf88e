"""Thin command line: parse, then call the module that does the job. Errors in input are one line, no traceback."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from vlm_orpo.config import DEFAULT_ORPO_LAMBDA, non_negative_float, non_negative_int, positive_int
from vlm_orpo.errors import ConfigError, DataError, RunStopped

USER_ERRORS = (ConfigError, DataError, FileNotFoundError)


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file with data/model/lora/loss/training sections")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. training.learning_rate=1e-4")


def cmd_assets(args) -> None:
    from vlm_orpo.assets import ensure_assets

    paths = ensure_assets()
    if args.json:
        print(json.dumps(paths))
        return
    print("Bundled assets (built on first use, offline):")
    for name, path in paths.items():
        print(f"  {name:<11} {path}")


def cmd_train(args) -> None:
    from vlm_orpo.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        from vlm_orpo.train import dry_run

        print(dry_run(cfg))
        return
    from vlm_orpo.train import train

    out = train(cfg, resume=args.resume, overwrite=args.overwrite)
    print(f"run directory: {out}")


def cmd_evaluate(args) -> None:
    from vlm_orpo.evaluate import run_evaluate

    run_evaluate(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlm-orpo", description="ORPO preference fine-tuning for vision-language models."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="fine-tune an adapter with ORPO")
    _config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output_dir")
    p.add_argument("--overwrite", action="store_true", help="start over in an output_dir that holds checkpoints")
    p.add_argument("--dry-run", action="store_true", help="validate the config and print the plan; no training")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="score base and adapters on preference pairs; one table")
    _config_args(p)
    p.add_argument("--model", help="base model: a hub name, a local directory, or 'bundled' (default: config's)")
    p.add_argument("--adapters", nargs="*", default=[], help="adapter directories, each scored on the same base")
    p.add_argument("--data", help="data source (default: config's data.source)")
    p.add_argument("--split", help="named split to score (default: config's validation split or fraction)")
    p.add_argument("--limit", type=positive_int, help="score at most N pairs")
    p.add_argument("--lambda", dest="orpo_lambda", type=non_negative_float, default=None,
                   help=f"ORPO lambda (default: the config's loss.orpo_lambda, else {DEFAULT_ORPO_LAMBDA:g})")
    p.add_argument("--batch-size", type=positive_int, default=4, help="pairs per forward")
    p.add_argument("--out", default="eval", help="output directory for results.md/json/csv and plots")
    p.add_argument("--per-pair", help="write one JSON object per pair and model to this JSONL file")
    p.add_argument("--generate", type=non_negative_int, default=0, metavar="N",
                   help="answer N prompts greedily with each model")
    p.add_argument("--pope", help="POPE-style file (image, question, label yes/no) to score hallucination")
    p.set_defaults(func=cmd_evaluate)

    from vlm_orpo.export import add_merge_arguments, run_merge
    from vlm_orpo.quantize import add_quantize_arguments, run_quantize
    from vlm_orpo.serve import add_serve_arguments, run_serve
    from vlm_orpo.ui import add_chat_arguments, run_chat

    for name, text, add_arguments, run in (
        ("merge", "merge a LoRA adapter into its base model (loads in transformers and vLLM)", add_merge_arguments, run_merge),
        ("quantize", "quantize a merged model with llm-compressor (compressed-tensors)", add_quantize_arguments, run_quantize),
        ("serve", "serve a model with vLLM's OpenAI-compatible server", add_serve_arguments, run_serve),
        ("chat", "Gradio chat against an OpenAI-compatible endpoint; compare and judge", add_chat_arguments, run_chat),
    ):
        p = sub.add_parser(name, help=text)
        add_arguments(p)
        p.set_defaults(func=run)

    p = sub.add_parser("assets", help="build (if needed) and show the bundled tiny model and synthetic data")
    p.add_argument("--json", action="store_true", help='print {"tiny_model": DIR, "train": PATH, "validation": PATH}')
    p.set_defaults(func=cmd_assets)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        args.func(args)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RunStopped as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"error: vlm-orpo {args.command} stopped by Ctrl-C", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
