"""``RunConfig``: one training run, as typed on the command line, and the model it builds.

Legend: L layers, E width (dim), H heads, V vocab, C classes.

Fields left None take the task's defaults (``attnkit.tasks.base.Defaults``); ``resolved()``
fills them. Words are resolved through the registries (``attnkit.train.words``): the variant
and position specs are built, the variant is made causal for language-model tasks
(``spec.causal_version()``) and asked whether it takes the position scheme
(``spec.position_reason``); every refusal is one line naming the argument.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..models import DecoderLM, LayerSpec, SequenceClassifier, TransformerConfig
from ..tasks import Task
from .words import attention_from_word, position_from_word, task_from_word

DEFAULTED = ("layers", "dim", "heads", "steps", "batch", "lr", "position", "eval_every")


@dataclass(frozen=True)
class RunConfig:
    """task, attention, position: words (``WORD[:OPTIONS]``); the rest as ``attnkit train --help``."""

    task: str = "mqar"
    attention: str = "softmax"
    position: str | None = None
    layers: int | None = None
    dim: int | None = None
    heads: int | None = None
    steps: int | None = None
    batch: int | None = None
    lr: float | None = None
    eval_every: int | None = None
    seed: int = 0
    device: str = "cpu"

    def resolved(self) -> RunConfig:
        """This config with the task's defaults for the fields left None, checked."""
        task = self.get_task()
        fill = {f: getattr(task.defaults, f) for f in DEFAULTED if getattr(self, f) is None}
        cfg = dataclasses.replace(self, **fill)
        cfg._check()
        return cfg

    def _check(self) -> None:
        for name in ("layers", "dim", "heads", "steps", "batch", "eval_every"):
            val = getattr(self, name)
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be an int >= 1, got {val!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not 0 < self.lr < 10:
            raise ValueError(f"--lr must be a number in (0, 10), got {self.lr!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"--seed must be an int >= 0, got {self.seed!r}")
        if self.dim % self.heads:
            raise ValueError(f"--dim {self.dim} must be divisible by --heads {self.heads}")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ValueError(f"--device {self.device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {self.device}: CUDA is not available on this machine (use --device cpu)")

    def get_task(self) -> Task:
        return task_from_word(self.task, "TASK")

    def specs(self) -> tuple[object, str | None, object]:
        """(attention spec, abs_position, position spec) for this task, or a one-line ValueError."""
        task = self.get_task()
        attn = attention_from_word(self.attention, context={"max_len": task.max_len})
        abs_pos, pos = position_from_word(self.position)
        if task.kind == "lm":
            try:
                attn = attn.causal_version()
            except ValueError as e:
                raise ValueError(f"--attention {self.attention}: {task.name} trains a causal language model, "
                                 f"but {e}") from None
        reason = attn.position_reason(pos)
        if reason:
            raise ValueError(f"--position {self.position}: {reason}")
        return attn, abs_pos, pos

    def model_config(self, task: Task) -> TransformerConfig:
        attn, abs_pos, pos = self.specs()
        return TransformerConfig(vocab_size=task.vocab_size, d_model=self.dim, num_heads=self.heads,
                                 num_layers=self.layers, max_len=task.max_len, layers=LayerSpec(attn, pos),
                                 abs_position=abs_pos)

    def build_model(self):
        """The model for this run (call after ``torch.manual_seed``)."""
        task = self.get_task()
        cfg = self.model_config(task)
        return DecoderLM(cfg) if task.kind == "lm" else SequenceClassifier(cfg, task.num_classes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict) -> RunConfig:
        names = {f.name for f in dataclasses.fields(RunConfig)}
        return RunConfig(**{k: v for k, v in d.items() if k in names})


__all__ = ["RunConfig", "DEFAULTED"]
