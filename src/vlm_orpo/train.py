"""`vlm-orpo train`: ORPO with the shared-prefix forward on the transformers Trainer.

Read top to bottom: load data and model, attach the adapter, train with validation, keep best/ and final/,
write metrics.jsonl, summary.md and plots. Gradient accumulation, mixed precision, checkpoints, report_to and
accelerate/DeepSpeed/FSDP all come from the Trainer.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections import defaultdict
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, set_seed
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import get_last_checkpoint, rotate_checkpoints, sort_checkpoints
from transformers.training_args import ParallelMode

from vlm_orpo.config import ConfigError, RunConfig
from vlm_orpo.data.packing import PackedCollator, PairEncoder, load_pairs
from vlm_orpo.losses import orpo_metrics, orpo_terms
from vlm_orpo.modeling.load import (
    attach_adapter,
    load_base_model,
    load_processor,
    model_family,
    trainable_parameters,
)
from vlm_orpo.modeling.compile import compile_decoder_layers
from vlm_orpo.modeling.shared_prefix import packed_logps, set_attention_backend
from vlm_orpo.reporting import plot_training, read_jsonl, results_table
from vlm_orpo.scoring import score_batches

log = logging.getLogger(__name__)

BEST, FINAL, METRICS, SUMMARY = "best", "final", "metrics.jsonl", "summary.md"
BEST_METRICS = {"loss": ("eval_loss", min), "accuracy": ("eval_accuracy", max)}


class OrpoTrainer(Trainer):
    """Trainer whose loss is ORPO over the packed shared-prefix forward, with our own validation pass."""

    def __init__(self, *args, attn_backend: str = "sdpa", **kwargs):
        super().__init__(*args, **kwargs)
        self.attn_backend = attn_backend
        self.model_accepts_loss_kwargs = False  # our loss is a per-pair mean: let Trainer scale it for accumulation
        self._train_metrics: dict[str, list[float]] = defaultdict(list)
        self._pairs_since_log = 0
        self._last_log_time = time.perf_counter()
        self.evaluated_at_step: int | None = None

    def train(self, *args, **kwargs):
        self._last_log_time = time.perf_counter()  # pairs/s counts training, not model loading or the base eval
        return super().train(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logps = packed_logps(model, inputs, self.attn_backend)
        terms = orpo_terms(logps, self.args.orpo_lambda, self.args.sft_on_prompt)
        loss = terms.loss.mean()
        if model.training:
            for name, value in orpo_metrics(logps, terms, self.args.orpo_lambda).items():
                self._train_metrics[name].append(value)
            self._pairs_since_log += int(inputs["segment_tokens"].shape[0])
        return (loss, {"loss": loss}) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._train_metrics:  # a training log: add the ORPO metrics and throughput
            local = {k: sum(v) / len(v) for k, v in self._train_metrics.items()}
            if self.args.parallel_mode != ParallelMode.DISTRIBUTED:  # Trainer gathers loss only on GPU DDP
                local["loss"] = logs["loss"]
            logs.update(self._mean_over_processes(local))
            now = time.perf_counter()
            logs["pairs_per_s"] = self._pairs_since_log * self.args.world_size / max(now - self._last_log_time, 1e-9)
            self._train_metrics.clear()
            self._pairs_since_log, self._last_log_time = 0, now
        super().log(logs, start_time)

    def _mean_over_processes(self, values: dict[str, float]) -> dict[str, float]:
        if self.args.world_size <= 1:
            return values
        keys = sorted(values)
        mean = self.accelerator.reduce(torch.tensor([values[k] for k in keys], device=self.args.device), "mean")
        return dict(zip(keys, mean.tolist()))

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        started = time.perf_counter()
        dataloader = self.get_eval_dataloader(eval_dataset)
        scores = score_batches(
            self.model,
            dataloader,
            self.attn_backend,
            self.args.orpo_lambda,
            self.args.sft_on_prompt,
            gather=self.accelerator.gather_for_metrics,
        )
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in scores.summary(self.args.orpo_lambda).items()}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        self._keep_best(metrics)
        self.evaluated_at_step = self.state.global_step
        self._last_log_time += time.perf_counter() - started  # pairs/s counts training time only
        return metrics

    def _keep_best(self, metrics: dict[str, float]) -> None:
        """Save the adapter to best/ when the chosen eval metric improves (survives resume via best.json)."""
        key, better = BEST_METRICS[self.args.best_metric]
        out = Path(self.args.output_dir)
        record = out / BEST / "best.json"
        previous = json.loads(record.read_text())["metrics"][key] if record.exists() else None
        if previous is not None and better(previous, metrics[key]) == previous:
            return
        staging = out / f".{BEST}.tmp"
        self.save_model(str(staging))
        if self.args.should_save:
            (staging / "best.json").write_text(json.dumps({"step": self.state.global_step, "metrics": metrics}))
            shutil.rmtree(out / BEST, ignore_errors=True)
            os.replace(staging, out / BEST)
        self.accelerator.wait_for_everyone()

    def _save_checkpoint(self, model, trial):
        """Write the checkpoint into a staging folder, then rename it: a kill mid-save leaves no half checkpoint."""
        run_dir = self._get_output_dir(trial=trial)
        staging = os.path.join(run_dir, ".staging")
        self._get_output_dir = lambda trial=None: staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            del self._get_output_dir
        self.accelerator.wait_for_everyone()
        name = f"checkpoint-{self.state.global_step}"
        best = self.state.best_model_checkpoint
        if best is not None and Path(best).parent == Path(staging):  # Trainer saw the checkpoint in staging
            self.state.best_model_checkpoint = os.path.join(run_dir, Path(best).name)
        if self.args.should_save:
            shutil.rmtree(os.path.join(run_dir, name), ignore_errors=True)
            os.replace(os.path.join(staging, name), os.path.join(run_dir, name))
            if best != self.state.best_model_checkpoint:
                self.state.save_to_json(os.path.join(run_dir, name, TRAINER_STATE_NAME))
            rotate_checkpoints(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint, use_mtime=False)
        self.accelerator.wait_for_everyone()


class MetricsFile(TrainerCallback):
    """Append every log record, with its step, to metrics.jsonl (main process only)."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")


def _truncate_metrics(path: Path, last_step: int) -> None:
    """On resume, drop records the killed run wrote after its last checkpoint (they are recomputed)."""
    if path.exists():
        kept = [r for r in read_jsonl(path) if r["step"] <= last_step]
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def build_trainer(cfg: RunConfig):
    """Everything up to `Trainer.train`: data, model, adapter, collator."""
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
    set_seed(args.seed)
    processor = load_processor(cfg.model)
    family = model_family(cfg.model)
    encoder = PairEncoder(processor, cfg.data.max_answer_tokens, cfg.data.max_prompt_tokens)
    train_set, eval_set, report = load_pairs(cfg.data, encoder, limit=cfg.data.eval_limit)
    if train_set is None:
        raise ConfigError(f"no usable training pairs in {cfg.data.source!r} ({report.summary()})")
    model = load_base_model(cfg.model, args.device, quantize_4bit=cfg.lora.method == "qlora")
    backend = set_attention_backend(model, cfg.model.attn_backend)
    model = attach_adapter(model, family, cfg.lora, args.gradient_checkpointing)
    if cfg.model.compile_layers is True or (cfg.model.compile_layers == "auto" and args.device.type == "cuda"):
        compile_decoder_layers(model)
    collator = PackedCollator(
        pad_token_id=processor.tokenizer.pad_token_id,
        image_token_id=encoder.image_token_id,
        max_tokens_per_row=cfg.data.max_tokens_per_row,
        sft_on_prompt=args.sft_on_prompt,
    )
    if eval_set is None:
        args.eval_strategy = "no"
    trainer = OrpoTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=collator,
        processing_class=processor,
        attn_backend=backend,
    )
    return trainer, report


def plan(cfg: RunConfig, args, trainer: OrpoTrainer | None = None, report=None) -> str:
    lines = [f"model: {cfg.model.name_or_path} ({cfg.lora.method}, attention {cfg.model.attn_backend})"]
    if trainer is not None:
        trainable, total = trainable_parameters(trainer.model)
        lines.append(f"trainable parameters: {trainable:,} of {total:,} ({trainable / total:.2%})")
        lines.append(f"attention backend: {trainer.attn_backend}")
        lines.append(f"train pairs: {len(trainer.train_dataset)}")
        eval_n = len(trainer.eval_dataset) if trainer.eval_dataset is not None else 0
        lines.append(f"validation pairs: {eval_n}")
    if report is not None:
        lines.append(report.summary())
    lines.append(
        f"optimisation: lr {args.learning_rate:g} ({args.lr_scheduler_type}), "
        f"batch {args.per_device_train_batch_size} x accumulation {args.gradient_accumulation_steps}, "
        f"{'max_steps ' + str(args.max_steps) if args.max_steps > 0 else str(args.num_train_epochs) + ' epochs'}, "
        f"ORPO lambda {args.orpo_lambda:g}"
    )
    lines.append(f"output: {args.output_dir}")
    return "\n".join(lines)


def train(cfg: RunConfig, resume: bool = False, overwrite: bool = False) -> Path:
    start = time.perf_counter()
    out = Path(cfg.output_dir)
    old = [Path(p) for p in sort_checkpoints(str(out))]  # oldest first
    if old and not resume and not overwrite:  # before the model loads: fail fast
        raise ConfigError(
            f"{out} holds checkpoints of an earlier run ({', '.join(p.name for p in old[-3:])}): pass --resume to "
            "continue it, --overwrite to start over (deletes them), or set another training.output_dir"
        )
    trainer, report = build_trainer(cfg)
    checkpoint = get_last_checkpoint(str(out)) if resume else None
    if resume and checkpoint is None:
        raise ConfigError(f"--resume: no checkpoint in {out}")
    metrics_path = out / METRICS
    if trainer.is_world_process_zero():  # one process edits the run folder; the others wait
        out.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(out / ".staging", ignore_errors=True)
        if checkpoint is None:
            for stale in [*old, out / BEST]:
                shutil.rmtree(stale, ignore_errors=True)
            metrics_path.unlink(missing_ok=True)
        else:
            _truncate_metrics(metrics_path, int(Path(checkpoint).name.split("-")[-1]))
    trainer.accelerator.wait_for_everyone()
    trainer.add_callback(MetricsFile(metrics_path))
    if trainer.is_world_process_zero():
        print(plan(cfg, trainer.args, trainer, report), flush=True)
    if trainer.eval_dataset is not None and checkpoint is None:
        trainer.evaluate()  # step 0: the adapter is still the identity, so this is the base model's row
    trainer.train(resume_from_checkpoint=checkpoint)
    if trainer.eval_dataset is not None and trainer.evaluated_at_step != trainer.state.global_step:
        trainer.evaluate()  # Trainer evaluates at the last step itself when eval_strategy is steps
    trainer.save_model(str(out / FINAL))
    if trainer.is_world_process_zero():
        write_summary(out, trainer.args.orpo_lambda, time.perf_counter() - start, report)
    return out


def write_summary(out: Path, orpo_lambda: float, seconds: float, report) -> None:
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
    plots = plot_training(out / METRICS, out)
    text = [f"# Run summary: {out.name}", ""]
    text += [results_table(rows, orpo_lambda), ""] if rows else ["No validation split, so no results table.", ""]
    text += [f"Wall time: {seconds:.0f} s. {report.summary()}", ""]
    print("\n".join(text), flush=True)
    text += [f"![{p.stem}]({p.name})" for p in plots]
    (out / SUMMARY).write_text("\n".join(text) + "\n")


def dry_run(cfg: RunConfig) -> str:
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
    if config is not None:
        family = model_family(cfg.model)  # raises ConfigError for an unsupported family
        with torch.device("meta"):  # shapes only: counts parameters of a 7B model without memory
            model = AutoModelForImageTextToText.from_config(config)
            model = attach_adapter(model, family, cfg.lora)
        trainable, total = trainable_parameters(model)
        notes.append(f"model family: {family.name}; trainable parameters: {trainable:,} of {total:,} ({trainable / total:.2%})")
    return plan(cfg, args) + "\n" + "\n".join(notes)
