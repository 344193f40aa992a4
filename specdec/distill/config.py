"""What a distillation run is told, in configs that mean one thing each: ``DataConfig`` (prompts and answers),
``TrainConfig`` (the training loop), and the objective's, ``DraftConfig`` (an independent small draft) or
``HeadConfig`` (a draft head). ``DistillConfig`` is the same settings flat, as ``specdec distill`` takes them
and ``distill.json`` records them; it makes the others and is read through them."""

from __future__ import annotations

import dataclasses
import math

from specdec.validate import integer

SAVED_DTYPES = ("float32", "bfloat16")


def _integers(config, names, minimum: int = 1) -> None:
    for name in names:
        integer(name, getattr(config, name), minimum)


def _saved_dtype(dtype) -> None:
    if dtype not in SAVED_DTYPES:
        raise ValueError(f"dtype must be float32 or bfloat16, got dtype={dtype!r}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    num_prompts: int = 1200  # training prompts made from specdec.prompts' templates
    eval_prompts: int = 60  # held-out prompts: as many templated, and as many self-written where there are some
    max_new_tokens: int = 128  # an answer's length limit
    gen_batch: int = 32  # answers made at once: the grain of the chunks in out/data/
    sample_fraction: float = 0.25  # training answers sampled at temperature 0.7 / top_p 0.9 instead of greedy
    # prompts the target writes itself (``self_written_prompts``), on top of the num_prompts from templates
    self_prompts: int = 0
    max_prompt_tokens: int = 64  # a self-written prompt's length limit
    seed: int = 0  # of the prompts and the sampled answers

    def __post_init__(self):
        _integers(self, ("num_prompts", "eval_prompts", "max_new_tokens", "gen_batch", "max_prompt_tokens"))
        _integers(self, ("self_prompts", "seed"), minimum=0)
        if not 0.0 <= self.sample_fraction <= 1.0:
            raise ValueError(f"sample_fraction must be in [0, 1], got sample_fraction={self.sample_fraction}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 2000
    batch_size: int = 8  # records per step (a small draft's: ~1000 answer tokens)
    lr: float = 2e-3  # AdamW's peak: linear warm-up over ``warmup`` steps, then cosine down to a tenth
    warmup: int = 100
    weight_decay: float = 0.01
    checkpoint_every: int = 100  # steps between saves of out/trainer.pt
    seed: int = 0  # of the initialisation and the order of the records

    def __post_init__(self):
        _integers(self, ("steps", "batch_size", "checkpoint_every"))
        _integers(self, ("warmup", "seed"), minimum=0)
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got lr={self.lr}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ValueError(f"weight_decay must be a number >= 0, got weight_decay={self.weight_decay}")


@dataclasses.dataclass(frozen=True)
class DraftConfig:
    # for a 49152-token vocabulary the tied output layer is 49152 x hidden_size, so hidden_size sets most of the
    # cost (256: 12.6 M of the draft's ~16 M parameters); layers are cheap by comparison.
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 768
    teacher_top_k: int = 32  # the target's logits kept per answer position; the teacher is renormalised over them
    dtype: str = "bfloat16"  # of the saved weights: 2 bytes a parameter keeps the shipped draft under 40 MB

    def __post_init__(self):
        _integers(self, ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                         "teacher_top_k"))
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(f"hidden_size={self.hidden_size} must divide by num_heads={self.num_heads}, "
                             f"which must divide by num_kv_heads={self.num_kv_heads}")
        if (self.hidden_size // self.num_heads) % 2:  # RoPE turns pairs of features
            raise ValueError(f"hidden_size / num_heads must be even, got hidden_size={self.hidden_size} and "
                             f"num_heads={self.num_heads} (head size {self.hidden_size // self.num_heads})")
        _saved_dtype(self.dtype)


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    num_layers: int = 1  # decoder layers, each shaped like the target's
    kept_vocab: int = 8192  # ids the head can propose: the most frequent in the training prompts and answers
    unroll: int = 2  # training passes: the first reads the target's features, each next one the previous pass's
    dtype: str = "bfloat16"  # of the saved weights; a head drafts in the dtype it was saved in

    def __post_init__(self):
        _integers(self, ("num_layers", "kept_vocab", "unroll"))
        _saved_dtype(self.dtype)


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """The settings of one run, flat: every field of the configs above under its own name, once (``seed`` is
    the data's and the training's, ``dtype`` and ``num_layers`` the objective's), and ``head``, which picks
    the objective. ``data``, ``train`` and ``objective`` make the configs the pipeline reads; fields of the
    objective not picked are validated but not read."""

    hidden_size: int = DraftConfig.hidden_size
    num_layers: int = DraftConfig.num_layers  # the draft's layers, or with head the head's (HEAD: 1)
    num_heads: int = DraftConfig.num_heads
    num_kv_heads: int = DraftConfig.num_kv_heads
    intermediate_size: int = DraftConfig.intermediate_size
    num_prompts: int = DataConfig.num_prompts
    eval_prompts: int = DataConfig.eval_prompts
    max_new_tokens: int = DataConfig.max_new_tokens
    gen_batch: int = DataConfig.gen_batch
    sample_fraction: float = DataConfig.sample_fraction
    teacher_top_k: int = DraftConfig.teacher_top_k
    self_prompts: int = DataConfig.self_prompts
    max_prompt_tokens: int = DataConfig.max_prompt_tokens
    steps: int = TrainConfig.steps
    batch_size: int = TrainConfig.batch_size
    lr: float = TrainConfig.lr
    warmup: int = TrainConfig.warmup
    weight_decay: float = TrainConfig.weight_decay
    checkpoint_every: int = TrainConfig.checkpoint_every
    seed: int = DataConfig.seed
    dtype: str = DraftConfig.dtype
    head: bool = False  # train a draft head (models/head.py) instead of a small model (``--head``; defaults: HEAD)
    kept_vocab: int = HeadConfig.kept_vocab
    unroll: int = HeadConfig.unroll

    def __post_init__(self):
        for config in (DataConfig, TrainConfig, DraftConfig, HeadConfig):  # each checks its own fields
            self._make(config)
        if self.head and self.max_new_tokens < 2:  # it learns the token after next: one answer token teaches nothing
            raise ValueError(f"a head run needs max_new_tokens >= 2, got max_new_tokens={self.max_new_tokens}")

    def _make(self, config):
        return config(**{field.name: getattr(self, field.name) for field in dataclasses.fields(config)})

    @property
    def data(self) -> DataConfig:
        return self._make(DataConfig)

    @property
    def train(self) -> TrainConfig:
        return self._make(TrainConfig)

    @property
    def objective(self) -> DraftConfig | HeadConfig:
        return self._make(HeadConfig if self.head else DraftConfig)


#: ``--head``'s defaults: one layer like the target's; answers in batches of 64 (the native model answers and
#: records its features in one go: SmolLM2 0.39 s an answer at 64 rows on a 2-core CPU); steps of 16 answers
#: (~2500 positions, ~2 passes each)
HEAD = dict(head=True, num_layers=HeadConfig.num_layers, num_prompts=900, gen_batch=64, steps=600, batch_size=16,
            lr=1e-3, warmup=50, weight_decay=0.0, checkpoint_every=50)

#: settings a resumed run may change: more prompts (or another batch size) add chunks to the data it has
GROWABLE = ("num_prompts", "self_prompts", "gen_batch")
