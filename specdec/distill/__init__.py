"""``specdec distill``: train a draft for a target by knowledge distillation on the target's own text.

One run, in three resumable stages that write into its output folder, for either of two objectives:

1. **data** (``data.py``) — the target answers varied prompts (``specdec.prompts``' templates, plus with
   ``self_prompts`` user messages it wrote itself: ``self_written_prompts``), batched, through
   ``specdec.generate``, whose ``feature_hook`` hands over the target's feature at every position. On-policy:
   the draft learns the text it will be asked to predict. Each objective turns a batch of answers into its
   records; chunks land in ``data/<source>/`` one batch at a time, a restart skips the finished ones, and a
   run resumed with more prompts (``GROWABLE``) only makes the new ones.
2. **train** (``train.py``) — one loop for both objectives; ``trainer.pt`` is saved every
   ``checkpoint_every`` steps and on Ctrl-C, and ``--resume`` continues from it.
3. **evaluate** — on held-out prompts, answered greedily: how often the draft agrees with the target given
   its own prefix, expected tokens per target forward for k = 1..8, and the draft's cost ratio c timed
   against the target with the native models (``cost.py``). Written to ``eval.json``.

The objectives (``DraftObjective``, ``HeadObjective``: ``records``, ``make``, ``loss``, ``evaluate``,
``drafting``, ``save``):

- **a small draft** (``draft.py``): a Llama-shaped model (tied embeddings initialised from a PCA of the
  target's) minimises the cross-entropy against the target's top-k distribution on answer positions (the
  target's output layer over the features). The result is a plain transformers checkpoint.
- **a draft head** (``head.py``, ``head=True``, ``--head``; ``HEAD``'s defaults): a ``models/head.py`` head
  learns the target's distribution over the ids it keeps and the target's features, unrolled over its own
  predictions; its evaluation drafts exactly as ``HeadProposer`` does. The result is a head folder.

Settings: ``DataConfig``, ``TrainConfig``, ``DraftConfig``, ``HeadConfig`` (``config.py``), or all of them flat
in ``DistillConfig``, as the command line takes them.
"""

from specdec.distill.config import (
    GROWABLE,
    HEAD,
    DataConfig,
    DistillConfig,
    DraftConfig,
    HeadConfig,
    TrainConfig,
)
from specdec.distill.cost import cost_ratio
from specdec.distill.data import (
    SELF_PROMPT_BATCH,
    Answer,
    _prompt_key,
    _user_turn_prefix,
    answer,
    answer_batch,
    make_chunks,
    self_written_prompts,
)
from specdec.distill.draft import DraftObjective, _batch, distill_loss, evaluate, make_draft, teacher_records
from specdec.distill.head import HeadObjective, evaluate_head, feature_records, head_loss, make_head
from specdec.distill.run import _load_target, distill
from specdec.distill.train import train

__all__ = [
    "GROWABLE", "HEAD", "SELF_PROMPT_BATCH", "Answer", "DataConfig", "DistillConfig", "DraftConfig",
    "DraftObjective", "HeadConfig", "HeadObjective", "TrainConfig", "answer", "answer_batch", "cost_ratio",
    "distill", "distill_loss", "evaluate", "evaluate_head", "feature_records", "head_loss", "make_chunks",
    "make_draft", "make_head", "self_written_prompts", "teacher_records", "train",
]
