"""``distill()``: one run in its output folder, whatever the objective — data, training, evaluation — each
resumable (``resume=True``, ``--resume``)."""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path

import torch

from specdec.distill.config import GROWABLE, DistillConfig, HeadConfig
from specdec.distill.cost import cost_ratio
from specdec.distill.data import answer_batch, prompt_sources, records_by_source
from specdec.distill.draft import DraftObjective
from specdec.distill.head import HeadObjective
from specdec.distill.train import train


def _load_target(target):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from specdec.models.loading import checkpoint_folder

    folder = checkpoint_folder(target, "target")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(f"target={str(target)!r} has no usable tokenizer ({err}); distillation needs one to "
                         f"turn prompts into ids and to ship with the draft") from None
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, tokenizer


def _native_target(target, device: torch.device):
    """The target as a native model on ``device`` (the features of its cache are what the data is made of),
    and its tokenizer."""
    from specdec.models.llama import ARCHITECTURES  # (models imports specdec: at call time)
    from specdec.models.loading import from_transformers

    model, tokenizer = _load_target(target)
    if model.config.model_type not in ARCHITECTURES:
        raise ValueError(f"target={str(target)!r} is a {model.config.model_type!r} model; distill trains drafts "
                         f"for the native architectures ({', '.join(ARCHITECTURES)})")
    return from_transformers(model).to(device), tokenizer


def _device(device, head: bool) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r} is not a torch device") from None
    if device.type != "cpu" and not head:
        raise ValueError(f"device={str(device)!r}: a small draft trains on the CPU only; --device is for --head runs")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r}, but torch sees no CUDA device here")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device={str(device)!r}: distill runs on cpu or cuda")
    return device


def _check_out(out: Path, resume: bool) -> None:
    if out.exists() and not resume:
        raise ValueError(f"out={str(out)!r} exists; pass resume=True (--resume) to continue the run in it, "
                         f"or choose a new folder")
    if out.exists() and not (out / "distill.json").is_file():  # resume continues a run; it overwrites nothing else
        raise ValueError(f"out={str(out)!r} is not a distill run's folder (no distill.json): nothing to resume; "
                         f"choose a new folder")


def _fixed(settings: dict) -> dict:
    return {**settings, "config": {k: v for k, v in settings["config"].items() if k not in GROWABLE}}


def _record_settings(out: Path, target, config: DistillConfig) -> None:
    """``out/distill.json``: the run's settings; a resumed run must have the same but for ``GROWABLE``."""
    settings = {"target": str(target), "config": dataclasses.asdict(config)}
    settings_file = out / "distill.json"
    if settings_file.exists():
        before = json.loads(settings_file.read_text())
        # a run made before a setting existed ran with its default
        before["config"] = {**dataclasses.asdict(DistillConfig()), **before.get("config", {})}
        if _fixed(before) != _fixed(settings):
            raise ValueError(f"out={str(out)!r} holds a run with other settings ({before}); resume it with those "
                             f"(only {', '.join(GROWABLE)} may change: the data grows)")
    settings_file.write_text(json.dumps(settings, indent=2))


def _by_source(evaluate_on, held_out: dict[str, list]) -> dict:
    """The evaluation over all held-out answers; with self-written prompts too, also one per source."""
    report = evaluate_on([r for records in held_out.values() for r in records])
    if len(held_out) > 1:
        report["by_source"] = {source: evaluate_on(records) for source, records in held_out.items()}
    return report


def _finish(report: dict, history, model, objective, out: Path) -> dict:
    losses = [loss for _, loss, _ in history]
    report["initial_loss"] = sum(losses[:10]) / max(1, len(losses[:10]))  # means of the first and last 10 steps
    report["final_loss"] = sum(losses[-10:]) / max(1, len(losses[-10:]))
    report["parameters"] = sum(p.numel() for p in model.parameters())
    objective.save(model, out)
    (out / "eval.json").write_text(json.dumps(report, indent=2))
    return report


def distill(target, out, config: DistillConfig = DistillConfig(), resume: bool = False, progress: bool = True,
            device="cpu") -> dict:
    """Train a draft (or with ``config.head`` a draft head) for ``target`` into the folder ``out``; returns the
    held-out evaluation. ``device``: where a head's run answers and trains ("cuda" on a GPU; the data is kept
    on the CPU either way)."""
    out = Path(out)
    device = _device(device, config.head)
    _check_out(out, resume)
    native, tokenizer = _native_target(target, device)
    spec = config.objective  # settings only the target can refute are refused here, before anything is written
    objective = (HeadObjective if isinstance(spec, HeadConfig) else DraftObjective)(spec, native, tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    _record_settings(out, target, config)

    data = config.data
    held_out_data = dataclasses.replace(data, sample_fraction=0.0)  # greedy: drafts are compared with its tokens
    records, held_out = records_by_source(
        prompt_sources(native, tokenizer, data, out, progress), out, data.gen_batch,
        lambda start, prompts: objective.records(answer_batch(native, tokenizer, data, start, prompts)),
        lambda start, prompts: objective.records(answer_batch(native, tokenizer, held_out_data, start, prompts)))
    started = time.perf_counter()
    model = objective.make(records, config.train.seed)
    history = train(model, records, out, config.train, functools.partial(objective.loss, model), resume, progress)
    report = _by_source(functools.partial(objective.evaluate, model), held_out)
    drafting = objective.drafting(model)
    report["cost_ratio_c"] = cost_ratio(drafting, native)  # (on the run's device: c on a GPU is not c on a CPU)
    report["train_seconds_this_run"] = time.perf_counter() - started
    return _finish(report, history, drafting, objective, out)
