"""The transformers Trainer with our loss, validation and checkpoint safety, and the callbacks a run needs.

`PreferenceTrainer.compute_loss` is the packed shared-prefix forward plus `losses.pair_losses` (with the
reference's log-probs of the same batch when the loss has one, see `reference`); its validation is
`scoring.score_batches` (the same functions), and best/, final/ and checkpoints are written to a staging folder
and renamed, so a kill never leaves half of one.
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
from transformers import Trainer, TrainerCallback
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_utils import rotate_checkpoints
from transformers.training_args import ParallelMode

from vlm_orpo.cards import CardFacts, write_training_card
from vlm_orpo.config import LossConfig
from vlm_orpo.data.streaming import StreamedPairs, StreamProgress
from vlm_orpo.errors import RunStopped
from vlm_orpo.fsdp import configure_fsdp
from vlm_orpo.losses import pair_losses
from vlm_orpo.modeling.forward import pair_logps
from vlm_orpo.reference import reference_for
from vlm_orpo.reporting import ACCURACY
from vlm_orpo.run_dir import BEST, METRICS
from vlm_orpo.scoring import score_batches

log = logging.getLogger(__name__)

BEST_METRICS = {"loss": ("eval_loss", min), "accuracy": (f"eval_{ACCURACY}", max)}


class PreferenceTrainer(Trainer):
    """Trainer whose loss is a preference loss over the packed shared-prefix forward."""

    def __init__(self, *args, loss_cfg: LossConfig, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_cfg = loss_cfg
        self.reference = reference_for(self.model, loss_cfg, training=True)  # None when the loss needs none
        self.model_accepts_loss_kwargs = False  # our loss is a per-pair mean: let Trainer scale it for accumulation
        self._train_metrics: dict[str, list[float]] = defaultdict(list)
        self._pairs_since_log = 0
        self._last_log_time = time.perf_counter()
        self.evaluated_at_step: int | None = None
        self.card_facts: CardFacts | None = None  # set by train.py: every saved adapter then gets a model card
        self.stream_progress = None
        if isinstance(self.train_dataset, StreamedPairs):
            self.args.ignore_data_skip = True  # a resumed stream starts at its saved position, not by replaying
            self.stream_progress = StreamProgress({"processes": self.args.world_size,
                                                   "workers": self.args.dataloader_num_workers})

    def get_train_dataloader(self):
        """A stream's dataloader is left out of `accelerator.prepare`: accelerate would either have every process
        read the whole stream and keep every n-th batch, or have process 0 read all batches and send them, which
        it cannot do with our batches' non-tensor fields. Each process reads its own part instead (`StreamedPairs`)
        and Trainer moves the batches to the device."""
        if not isinstance(self.train_dataset, StreamedPairs):
            return super().get_train_dataloader()
        args = self.args
        workers = args.dataloader_num_workers
        return torch.utils.data.DataLoader(
            self.train_dataset, batch_size=args.per_device_train_batch_size, collate_fn=self.data_collator,
            num_workers=workers, pin_memory=args.dataloader_pin_memory,
            prefetch_factor=args.dataloader_prefetch_factor if workers else None,
        )

    def _load_optimizer_and_scheduler(self, checkpoint):
        """transformers maps a multi-process run's optimizer state to `args.device`, which accelerate makes
        `cpu:0` for CPU processes: a location torch.load cannot restore, so resuming CPU DDP died. Map it to
        "cpu" (a private Trainer method: test_scale_out's streamed DDP resume pins it)."""
        device = self.args.device
        if checkpoint is None or device.type != "cpu" or device.index is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        self.args.__dict__["_setup_devices"] = torch.device("cpu")  # the cached value behind args.device
        try:
            return super()._load_optimizer_and_scheduler(checkpoint)
        finally:
            self.args.__dict__["_setup_devices"] = device

    def resume_stream(self, checkpoint: Path) -> None:
        """Start each reader of the training stream where it was at `checkpoint` (data.streaming)."""
        if self.stream_progress is not None:
            self.train_dataset.start = self.stream_progress.load(checkpoint, self.args.process_index)

    def stream_totals(self) -> list[dict]:
        """Every process's stream counts (rows read, kept, skipped), for the run's report; [] without a stream."""
        if self.stream_progress is None:
            return []
        from accelerate.utils import gather_object

        totals = [self.stream_progress.totals()]
        return gather_object(totals) if self.args.world_size > 1 else totals

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        self.is_fsdp_enabled = configure_fsdp(self.accelerator, self.args, self.model)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Under FSDP every saved model folder holds the full weights, gathered on rank 0, whatever
        `fsdp_config.state_dict_type` says: the sharded files are what a checkpoint resumes from, while best/,
        final/ and each checkpoint's adapter load, merge and serve like a single-process run's."""
        if not self.is_fsdp_enabled:
            return super().save_model(output_dir, _internal_call)
        state_dict = self.accelerator.get_state_dict(self.model)  # collective: every rank takes part
        if self.args.should_save:
            self._save(output_dir or self.args.output_dir, state_dict=state_dict)

    def train(self, *args, **kwargs):
        self._last_log_time = time.perf_counter()  # pairs/s counts training, not model loading or the base eval
        return super().train(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # the reference first: its no-grad activations are freed before the policy's are kept for backward
        ref = self.reference.logps(model, inputs) if self.reference is not None else None
        metrics = pair_losses(pair_logps(model, inputs), self.loss_cfg, ref)
        loss = metrics.pop("loss").mean()
        if model.training:
            for name, value in metrics.items():
                self._train_metrics[name].append(value.mean().item())
            self._pairs_since_log += int(inputs["segment_tokens"].shape[0])
            if self.stream_progress is not None:
                self.stream_progress.record(inputs["stream_states"])
        return (loss, {"loss": loss}) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._train_metrics:  # a training log: add the loss's metrics and throughput
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
            self.model, dataloader, self.loss_cfg, accelerator=self.accelerator, reference=self.reference
        )
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in scores.means().items()}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        self._keep_best(metrics)
        self.evaluated_at_step = self.state.global_step
        self._last_log_time += time.perf_counter() - started  # pairs/s counts training time only
        return metrics

    def _keep_best(self, metrics: dict[str, float]) -> None:
        """Save the adapter to best/ when the chosen eval metric improves (survives resume via best.json)."""
        key, better = BEST_METRICS[self.args.best_metric]
        record = Path(self.args.output_dir) / BEST / "best.json"
        previous = json.loads(record.read_text())["metrics"][key] if record.exists() else None
        if previous is not None and better(previous, metrics[key]) == previous:
            return
        self.save_model_atomically(BEST, "best.json", {"step": self.state.global_step, "metrics": metrics})

    def save_model_atomically(self, name: str, record_name: str, record: dict) -> Path:
        """save_model into a staging folder with a JSON record, then rename it to output_dir/name."""
        out = Path(self.args.output_dir)
        staging = out / f".{name}.tmp"
        self.save_model(str(staging))
        if self.args.should_save:
            (staging / record_name).write_text(json.dumps(record))
            self._write_card(staging, name)
            shutil.rmtree(out / name, ignore_errors=True)
            os.replace(staging, out / name)
        self.accelerator.wait_for_everyone()
        return out / name

    def _write_card(self, folder: Path, name: str) -> None:
        """README.md of a saved folder, over PEFT's empty template; a card that fails costs a warning, not the run."""
        if self.card_facts is None:
            return
        args = self.args
        batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        scheduler = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
        optimisation = (f"lr {args.learning_rate:g} ({scheduler}), {batch} rows per step "
                        f"({args.per_device_train_batch_size} x accumulation {args.gradient_accumulation_steps} x "
                        f"{args.world_size} processes), seed {args.seed}")
        try:
            write_training_card(folder, self.card_facts, name, step=self.state.global_step, epoch=self.state.epoch,
                                max_steps=self.state.max_steps or None, optimisation=optimisation,
                                metrics_path=Path(args.output_dir) / METRICS)
        except Exception as exc:  # noqa: BLE001
            log.warning("no model card in %s: %s", folder, exc)

    def _save_checkpoint(self, model, trial):
        """Write the checkpoint into a staging folder, then rename it: a kill mid-save leaves no half checkpoint.

        A private Trainer method: tests/test_train_e2e.py pins its behaviour (resume after SIGKILL, best model)."""
        run_dir = self._get_output_dir(trial=trial)
        staging = os.path.join(run_dir, ".staging")
        self._get_output_dir = lambda trial=None: staging
        name = f"checkpoint-{self.state.global_step}"
        try:
            super()._save_checkpoint(model, trial)
        finally:
            del self._get_output_dir
        if self.stream_progress is not None:  # every process writes its own readers' positions
            self.stream_progress.save(Path(staging) / name, self.args.process_index)
        self.accelerator.wait_for_everyone()
        best = self.state.best_model_checkpoint
        if best is not None and Path(best).parent == Path(staging):  # Trainer saw the checkpoint in staging
            self.state.best_model_checkpoint = os.path.join(run_dir, Path(best).name)
        if self.args.should_save:
            self._write_card(Path(staging) / name, name)
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


class FiniteGuard(TrainerCallback):
    """Stop before an optimizer step that would write a non-finite gradient into the weights.

    A NaN or inf loss makes NaN gradients, so checking the gradients catches both. The check runs once per
    optimizer step, after gradients are reduced across processes, so every process stops at the same step.
    With fp16 the gradients are loss-scaled and an inf is routine: the GradScaler skips that step itself."""

    def __init__(self, model):
        self.params = [p for p in model.parameters() if p.requires_grad]

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if args.fp16:
            return
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads and not torch.stack([g.isfinite().all() for g in grads]).all():
            raise RunStopped(
                f"the loss or its gradients became NaN/inf at step {state.global_step + 1} (learning_rate "
                f"{args.learning_rate:g} may be too high); no weights were updated with them: best/ and the "
                "checkpoints keep the last good weights"
            )


class CompactProgress(ProgressCallback):
    """The progress bar with the few numbers a person watches; every metric still goes to metrics.jsonl."""

    SHOWN = {"loss": "loss", ACCURACY: "acc", "rewards/margins": "margin", "pairs_per_s": "pairs/s"}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or self.training_bar is None or not logs:
            return
        if "eval_loss" in logs:
            self.training_bar.write(
                f"step {state.global_step}: eval loss {logs['eval_loss']:.4f}, "
                f"accuracy {logs.get(f'eval_{ACCURACY}', float('nan')):.1%}"
            )
        elif any(key in logs for key in self.SHOWN):
            self.training_bar.set_postfix(
                {short: f"{logs[key]:.3g}" for key, short in self.SHOWN.items() if key in logs}, refresh=False
            )
