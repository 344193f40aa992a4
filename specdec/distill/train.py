"""The one training loop, whatever the objective: AdamW with a warm-up and cosine schedule, a progress bar,
``out/trainer.pt`` saved every ``checkpoint_every`` steps, on Ctrl-C and at the end, and resumed from."""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path

import torch

from specdec.distill.config import TrainConfig


def _schedule(config: TrainConfig):
    def lr_at(step):  # linear warm-up, cosine to a tenth
        if step < config.warmup:
            return (step + 1) / config.warmup
        frac = (step - config.warmup) / max(1, config.steps - config.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))

    return lr_at


def _step_records(records: list, config: TrainConfig, step: int) -> list:
    """The records of one step. Their order is a function of (seed, epoch): a resumed run sees the batches it
    would have seen."""
    per_epoch = max(1, len(records) // config.batch_size)
    epoch, offset = divmod(step, per_epoch)
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(config.seed * 1000 + epoch))
    return [records[i] for i in order[offset * config.batch_size:(offset + 1) * config.batch_size].tolist()]


class _Checkpoint:
    """``out/trainer.pt``: the model's, optimizer's and schedule's states, the step and the loss history."""

    def __init__(self, file: Path, model, optimizer, scheduler):
        # "draft": the trained model's state, a head's too (the key every run's trainer.pt holds it under)
        self.file, self.parts = file, {"draft": model, "optimizer": optimizer, "scheduler": scheduler}

    def load(self) -> tuple[int, list]:
        if not self.file.exists():
            return 0, []
        state = torch.load(self.file, weights_only=False, map_location="cpu")  # (a GPU run resumes anywhere)
        for name, part in self.parts.items():
            part.load_state_dict(state[name])
        return state["step"], state["history"]

    def save(self, step: int, history: list) -> None:
        tmp = self.file.with_suffix(".tmp")
        torch.save({**{name: part.state_dict() for name, part in self.parts.items()}, "step": step,
                    "history": history}, tmp)
        os.replace(tmp, self.file)


def train(model, records: list, out: Path, config: TrainConfig, loss_of, resume: bool, progress: bool = True):
    """AdamW over ``model``'s parameters on ``loss_of(records of one step) -> (loss, agreement)`` (scalar
    tensors), ``config.steps`` steps in all, checkpointed in ``out/trainer.pt``; ``resume`` continues from it.
    -> the history, (step, loss, agreement) per step. Ctrl-C saves and raises KeyboardInterrupt."""
    from tqdm.auto import tqdm

    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                  betas=(0.9, 0.98))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config))
    checkpoint = _Checkpoint(out / "trainer.pt", model, optimizer, scheduler)
    step, history = checkpoint.load() if resume else (0, [])
    model.train()
    bar = tqdm(total=config.steps, initial=step, desc="distill", unit="step", disable=not progress)
    interrupted = []
    previous = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
    try:
        while step < config.steps and not interrupted:
            loss, agree = loss_of(_step_records(records, config, step))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            step += 1
            history.append((step, loss.item(), agree.item()))
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", agree=f"{agree.item():.2f}")
            if step % config.checkpoint_every == 0:
                checkpoint.save(step, history)
    finally:
        signal.signal(signal.SIGINT, previous)
        bar.close()
        checkpoint.save(step, history)
    model.eval()
    if interrupted:
        raise KeyboardInterrupt(f"stopped at step {step}; continue with --resume")
    return history
