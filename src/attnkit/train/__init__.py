"""Training and comparing attention variants on the learning tasks of ``attnkit.tasks``.

``train(RunConfig(task="mqar", attention="performer"), "runs/mqar-performer")`` trains one run
and writes metrics.json, curve.csv, loss.png and checkpoint.pt; ``compare(...)`` trains several
and writes results.md/.csv and three plots. The command-line forms are ``attnkit train`` and
``attnkit compare``.
"""

from .compare import compare
from .config import RunConfig
from .loop import Interrupted, evaluate, train

__all__ = ["RunConfig", "train", "evaluate", "compare", "Interrupted"]
