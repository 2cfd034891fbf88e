"""`vlm-orpo train`: a preference loss with the shared-prefix forward on the transformers Trainer.

Read top to bottom: check and lock the run directory, load data and model, attach the adapter, train with
validation, keep best/ and final/, write metrics.jsonl, summary.md and plots. Gradient accumulation, mixed
precision, checkpoints, report_to and accelerate/DeepSpeed/FSDP all come from the Trainer (see `trainer`).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml
from transformers import TrainerState, set_seed
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import ProgressCallback

from vlm_orpo.cards import CardFacts
from vlm_orpo.config import (
    DEFAULT_ORPO_LAMBDA,
    LOSS_TYPES,
    ConfigError,
    LossConfig,
    PreferenceTrainingArguments,
    RunConfig,
    add_config_arguments,
    load_config,
)
from vlm_orpo.data.packing import PairEncoder, PlainCollator, load_pairs
from vlm_orpo.data.streaming import StreamedPairs, add_to_report, check_streaming, describe_stream
from vlm_orpo.errors import RunStopped, first_line
from vlm_orpo.launch_check import check_accelerate_config
from vlm_orpo.modeling.forward import pair_collator, resolve_forward_mode
from vlm_orpo.modeling.compile import compile_decoder_layers
from vlm_orpo.modeling.load import attach_adapter, load_base_model, load_processor, model_family, trainable_parameters
from vlm_orpo.modeling.shared_prefix import attention_backend, set_attention_backend
from vlm_orpo.reporting import plot_training, read_jsonl, results_table
from vlm_orpo.run_dir import BEST, FINAL, METRICS, SUMMARY, RunDir
from vlm_orpo.run_report import CONFIG, write_report
from vlm_orpo.trackers import RunTrackers, take_trackers
from vlm_orpo.reference import REFERENCE_FILE, precompute
from vlm_orpo.trainer import CompactProgress, FiniteGuard, MetricsFile, PreferenceTrainer

log = logging.getLogger(__name__)


HELP = "fine-tune an adapter with a preference loss (ORPO by default; see the loss: section)"


def add_arguments(parser) -> None:
    parser.epilog = (
        f"Config sections: data, model, lora, loss, training. loss.type is one of {', '.join(LOSS_TYPES)} (default "
        f"orpo); loss.orpo_lambda defaults to {DEFAULT_ORPO_LAMBDA:g}, as TRL's ORPO beta (the seed's run used 10). "
        "training takes any transformers TrainingArguments field. See README.md, 'train'."
    )
    add_config_arguments(parser)
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output_dir")
    parser.add_argument("--overwrite", action="store_true", help="start over in an output_dir that holds checkpoints")
    parser.add_argument("--dry-run", action="store_true", help="validate the config and print the plan; no training")
    parser.add_argument("--accelerate-config", metavar="FILE",
                        help="with --dry-run: check the config file you will give `accelerate launch --config_file` "
                             "(DDP, FSDP, DeepSpeed, several machines) against this run")


def run(args) -> None:
    cfg = load_config(args.config, args.overrides)
    if args.accelerate_config and not args.dry_run:
        raise ConfigError("--accelerate-config checks a launch with --dry-run; to train, give the file to "
                          "`accelerate launch --config_file FILE -m vlm_orpo.cli train ...`")
    if args.dry_run:
        print(dry_run(cfg, args.accelerate_config))
        return
    print(f"run directory: {train(cfg, resume=args.resume, overwrite=args.overwrite)}")


def training_arguments(cfg: RunConfig) -> PreferenceTrainingArguments:
    """The Trainer's arguments, range-checked; CPU-only runs get no pinned memory (and none of its warnings)."""
    multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    # accelerate runs CPU processes as DDP (gloo) only with use_cpu; without it they would train apart, silently
    args = cfg.training_args(**({"use_cpu": True} if multi_cpu else {}))
    if args.n_gpu > 1:  # Trainer would wrap the model in DataParallel, which splits a packed batch's rows apart
        raise ConfigError(
            f"{args.n_gpu} GPUs are visible to one process: launch one process per GPU (`accelerate launch -m "
            "vlm_orpo.cli train ...` or `torchrun --nproc_per_node N -m vlm_orpo.cli train ...`), or pick one GPU "
            "with CUDA_VISIBLE_DEVICES"
        )
    if args.gradient_checkpointing and args.gradient_checkpointing_kwargs is None:
        args.gradient_checkpointing_kwargs = {"use_reentrant": False}  # LoRA with a frozen embedding needs this
    args.dataloader_pin_memory = args.dataloader_pin_memory and args.device.type == "cuda"
    check_streaming(cfg, args)
    return args


def build_trainer(cfg: RunConfig, args: PreferenceTrainingArguments):
    """Everything up to `Trainer.train`: data, model, adapter, collator."""
    set_seed(args.seed)
    processor = load_processor(cfg.model)
    family = model_family(cfg.model)
    encoder = PairEncoder(processor, cfg.data.max_answer_tokens, cfg.data.max_prompt_tokens)
    train_set, eval_set, report = load_pairs(cfg.data, encoder, limit=cfg.data.eval_limit,
                                             process_index=args.process_index, num_processes=args.world_size)
    if train_set is None:
        raise ConfigError(f"no usable training pairs in {cfg.data.source!r} ({report.summary()})")
    model = load_base_model(cfg.model, args.device, quantize_4bit=cfg.lora.method == "qlora")
    mode = resolve_forward_mode(cfg.model.forward_mode, model.config)
    set_attention_backend(model, cfg.model.attn_backend if mode == "packed" else "sdpa")
    model = attach_adapter(model, family, cfg.lora, args.gradient_checkpointing)
    if cfg.model.compile_layers is True or (cfg.model.compile_layers == "auto" and args.device.type == "cuda"):
        compile_decoder_layers(model)
    collator = pair_collator(mode, model, processor.tokenizer.pad_token_id, encoder.image_token_id,
                             cfg.data.max_tokens_per_row, cfg.loss.sft_on_prompt)
    if eval_set is None:
        args.eval_strategy = "no"
    trainer = PreferenceTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=collator,
        processing_class=processor,
        loss_cfg=cfg.loss,
    )
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(CompactProgress)
    trainer.add_callback(FiniteGuard(model))
    if cfg.loss.precompute_reference and trainer.reference is not None:
        datasets = {name: d for name, d in (("train", train_set), ("validation", eval_set)) if d is not None}
        facts = {"model": cfg.model.name_or_path, "revision": cfg.model.revision, "dtype": str(model.dtype),
                 "reference_model": cfg.loss.reference_model}
        with args.main_process_first(local=False, desc="reference log-probs"):  # one process computes, all read
            trainer.reference = precompute(trainer.reference, model, datasets, collator,
                                           args.per_device_eval_batch_size, Path(args.output_dir) / REFERENCE_FILE,
                                           facts)
    return trainer, report


def plan(cfg: RunConfig, args, trainer: PreferenceTrainer | None = None, report=None) -> str:
    lines = [f"model: {cfg.model.name_or_path} ({cfg.lora.method}, attention {cfg.model.attn_backend})"]
    if trainer is not None:
        trainable, total = trainable_parameters(trainer.model)
        lines.append(f"trainable parameters: {trainable:,} of {total:,} ({trainable / total:.2%})")
        lines.append("forward: plain, two sequences per pair" if isinstance(trainer.data_collator, PlainCollator)
                     else f"forward: packed shared prefix, attention backend {attention_backend(trainer.model)}")
        train_set = trainer.train_dataset
        lines.append(f"train pairs: {train_set.describe() if isinstance(train_set, StreamedPairs) else len(train_set)}")
        eval_n = len(trainer.eval_dataset) if trainer.eval_dataset is not None else 0
        lines.append(f"validation pairs: {eval_n}")
    elif cfg.data.streaming:
        lines.append(f"train pairs: {describe_stream(cfg.data.shuffle_buffer)}")
    if report is not None:
        lines.append(report.summary())
    lines.append(
        f"optimisation: lr {args.learning_rate:g} ({args.lr_scheduler_type}), "
        f"batch {args.per_device_train_batch_size} x accumulation {args.gradient_accumulation_steps}, "
        f"{'max_steps ' + str(args.max_steps) if args.max_steps > 0 else str(args.num_train_epochs) + ' epochs'}, "
        f"loss {cfg.loss.describe()}"
    )
    if trainer is not None and trainer.reference is not None:
        lines.append(f"reference: {trainer.reference}")
    lines.append(f"output: {args.output_dir}")
    return "\n".join(lines)


def train(cfg: RunConfig, resume: bool = False, overwrite: bool = False) -> Path:
    """Train into `cfg.output_dir`; every check that needs no model runs before the model loads."""
    start = time.perf_counter()
    args = training_arguments(cfg)
    trackers = take_trackers(args)  # ours write inside the run directory; a missing package is one line now
    run = RunDir(cfg.output_dir)
    if resume and run.finished_step() is not None:
        print(f"{run.path} finished at step {run.finished_step()}: nothing to resume (final/ is its adapter; "
              "--overwrite starts over)", flush=True)
        return run.path
    old = run.checkpoints()
    if old and not resume and not overwrite:
        raise ConfigError(
            f"{run.path} holds checkpoints of an earlier run ({', '.join(p.name for p in old[-3:])}): pass --resume "
            "to continue it, --overwrite to start over (deletes them), or set another training.output_dir"
        )
    checkpoint = run.last_checkpoint() if resume else None
    if resume and checkpoint is None:
        raise ConfigError(f"--resume: no checkpoint in {run.path}")
    main_process = args.process_index == 0
    if main_process:  # one process owns the run folder for the run's life; the others wait for it
        run.lock()
    try:
        trainer, report = build_trainer(cfg, args)
        trainer.card_facts = CardFacts.from_run(cfg, report)  # best/, final/ and checkpoints get a model card
        if main_process:
            for stale in (".staging", f".{BEST}.tmp", f".{FINAL}.tmp"):
                shutil.rmtree(run / stale, ignore_errors=True)
            if checkpoint is None:
                for stale in [*old, run / BEST, run / FINAL]:
                    shutil.rmtree(stale, ignore_errors=True)
                (run / METRICS).unlink(missing_ok=True)
            else:
                run.truncate_metrics(int(checkpoint.name.split("-")[-1]))
        trainer.accelerator.wait_for_everyone()
        trainer.add_callback(MetricsFile(run / METRICS))
        run_trackers = RunTrackers(trackers, run.path, cfg.as_dict()) if trackers and main_process else None
        if main_process:  # the resolved config, for report.html and for rerunning the run as it was
            (run.path / CONFIG).write_text(yaml.safe_dump(cfg.as_dict(), sort_keys=False))
        if run_trackers is not None:
            trainer.add_callback(run_trackers)
        if main_process:
            print(plan(cfg, trainer.args, trainer, report), flush=True)
        with stopped_cleanly(trainer, run):
            if checkpoint is not None:
                trainer.resume_stream(checkpoint)
            if checkpoint is not None and run.completed(checkpoint):
                # transformers 5.17 trains one step past max_steps when resumed from the last step's checkpoint
                trainer.state = TrainerState.load_from_json(str(checkpoint / TRAINER_STATE_NAME))
                trainer._load_from_checkpoint(str(checkpoint))
                trainer.evaluated_at_step = run.last_eval_step()
            else:
                # step 0 is the base model's row (the adapter is still the identity); evaluated inside train(),
                # once the engine has wrapped the model: under FSDP the ranks hold the loaded weights only then
                trainer.args.eval_on_start = trainer.eval_dataset is not None and checkpoint is None
                trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
            add_to_report(report, cfg.data.train_split, trainer.stream_totals())
            if trainer.eval_dataset is not None and trainer.evaluated_at_step != trainer.state.global_step:
                trainer.evaluate()  # Trainer evaluates at the last step itself when eval_strategy is steps
            trainer.save_model_atomically(FINAL, "run.json", {"step": trainer.state.global_step})
            if main_process:
                summary = write_summary(run.path, cfg.loss, time.perf_counter() - start, report)
                print(f"report: {write_report(run.path)}", flush=True)
                if run_trackers is not None:
                    run_trackers.finish(summary)
    finally:
        run.unlock()
    return run.path


@contextmanager
def stopped_cleanly(trainer: PreferenceTrainer, run: RunDir):
    """Ctrl-C and a full disk end the run with one line that says what was kept and how to go on."""
    try:
        yield
    except BaseException as exc:
        for callback in trainer.callback_handler.callbacks:  # so the error line starts a line of its own
            if isinstance(callback, ProgressCallback) and callback.training_bar is not None:
                callback.training_bar.close()
        step = trainer.state.global_step
        if isinstance(exc, KeyboardInterrupt):
            raise RunStopped(f"stopped by Ctrl-C at step {step}; {_kept(run)}; continue with the same command and "
                             "--resume", exit_code=130) from None
        if isinstance(exc, (OSError, RuntimeError)) and not isinstance(exc, RunStopped) and _disk_full(exc, run.path):
            raise RunStopped(f"no space left on the device of {run.path} at step {step} ({first_line(exc)[:120]}); "
                             f"{_kept(run)}; free space and run again with --resume") from None
        raise


def _kept(run: RunDir) -> str:
    names = [p.name for p in run.checkpoints()[-1:]] + ([f"{BEST}/"] if (run / BEST).is_dir() else [])
    return f"kept: {', '.join(names)}" if names else "no checkpoint was complete yet"


def _disk_full(exc: BaseException, path: Path) -> bool:
    """ENOSPC, or a writer (torch.save, safetensors) whose own error hides it while the disk is indeed full."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        return shutil.disk_usage(path).free < (1 << 20)
    except OSError:
        return False


def write_summary(out: Path, loss: LossConfig, seconds: float, report) -> str:
    """Print the run's results table and write summary.md with the curves; returns the printed text."""
    records = read_jsonl(out / METRICS)
    evals = [r for r in records if "eval_loss" in r]
    rows = []
    if evals:
        strip = lambda r: {k.removeprefix("eval_"): v for k, v in r.items()}  # noqa: E731
        best = json.loads((out / BEST / "best.json").read_text())
        rows = [
            ("base (step 0)", strip(evals[0])),
            (f"best (step {best['step']})", strip(best["metrics"])),
            (f"final (step {evals[-1]['step']})", strip(evals[-1])),
        ]
    plots = plot_training(out / METRICS, out, loss)
    text = [f"# Run summary: {out.name}", ""]
    text += [results_table(rows, loss), ""] if rows else ["No validation split, so no results table.", ""]
    text += [f"Wall time: {seconds:.0f} s. {report.summary()}", ""]
    printed = "\n".join(text)
    print(printed, flush=True)
    text += [f"![{p.stem}]({p.name})" for p in plots]
    (out / SUMMARY).write_text("\n".join(text) + "\n")
    return printed


def dry_run(cfg: RunConfig, accelerate_config: str | None = None) -> str:
    """Validate what can be validated offline and print the plan; hub models and data are not fetched."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from vlm_orpo.config import BUNDLED
    from vlm_orpo.data.sources import DataError, local_source_path
    from vlm_orpo.modeling.load import resolve_model_path

    notes = []
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        notes.append("no GPU here: the training arguments were checked as if on CPU (bf16/qlora runs need a GPU)")
    args = cfg.training_args(**({} if on_gpu else {"use_cpu": True}))  # builds and checks every training value
    check_streaming(cfg, args)
    take_trackers(args)
    source = cfg.data.source
    path = local_source_path(source) if source != BUNDLED else None
    if path is not None and not path.exists():
        raise DataError(f"data path not found: {source}")
    try:
        config = AutoConfig.from_pretrained(
            resolve_model_path(cfg.model.name_or_path), revision=cfg.model.revision,
            trust_remote_code=cfg.model.trust_remote_code,
        )
    except OSError as exc:
        config = None
        notes.append(f"model config not reachable here ({type(exc).__name__}); its family is checked when it loads")
    model = None
    if config is not None:
        family = model_family(cfg.model)  # raises ConfigError for a model that is not image-text-to-text
        mode = resolve_forward_mode(cfg.model.forward_mode, config)
        with torch.device("meta"):  # shapes only: counts parameters of a 7B model without memory
            model = AutoModelForImageTextToText.from_config(config)
            model = attach_adapter(model, family, cfg.lora)
        trainable, total = trainable_parameters(model)
        notes.append(f"model family: {family.name}; forward: {'packed shared prefix' if mode == 'packed' else 'plain, two sequences per pair'}; "
                     f"trainable parameters: {trainable:,} of {total:,} ({trainable / total:.2%})")
    if accelerate_config is not None:
        notes += check_accelerate_config(accelerate_config, args, model)
    return plan(cfg, args) + "\n" + "\n".join(notes)
