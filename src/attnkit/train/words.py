"""Command-line words for variants, position schemes and tasks: ``WORD[:OPTIONS]``.

    softmax                          Softmax()
    softmax:sliding_window(63)       Softmax(mask=sliding_window(63))   (a mask expression, see ``attnkit show``)
    softmax:causal & sliding_window(63), softcap=30.0
    performer:num_features=64        Performer(num_features=64)
    linformer:proj_dim=64            Linformer(max_len=<the task's length>, proj_dim=64)
    t5:num_buckets=16                T5(num_buckets=16)
    mqar:num_kv_pairs=16             the MQAR task with 16 pairs

The word picks a class from a registry (``attnkit.variants.REGISTRY``, ``POSITION_WORDS``,
``attnkit.tasks.TASKS``); the options are its dataclass fields, written as Python keyword
arguments (literals only, nothing is eval'ed). A positional argument is a mask expression and
goes to the spec's ``mask`` field when it has one. Required fields that the caller knows (a
Linformer's ``max_len``) come from ``context``. Nothing here branches on a word.
"""

from __future__ import annotations

import dataclasses
from functools import cache

from .. import masks as M
from .._expr import build, parse_arguments, split_top_level, to_value
from ..nn.positions import POSITIONS
from ..tasks import TASKS
from ..variants import REGISTRY

MASK_NAMES = {n: getattr(M, n) for n in ("causal", "sliding_window", "prefix_lm", "dilated", "strided", "fixed",
                                         "block_sparse", "global_tokens", "bigbird")}

# Absolute schemes are added to the token embeddings (``TransformerConfig.abs_position``); the
# others are ``MultiHeadAttention`` position specs, named by their class (Rope -> "rope").
ABSOLUTE = ("none", "sinusoidal", "learned")
POSITION_WORDS = {cls.__name__.lower(): cls for cls in POSITIONS}


def _split_word(text: str, what: str) -> tuple[str, str]:
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{what} must be a non-empty word, got {text!r}")
    word, _, rest = text.partition(":")
    return word.strip(), rest


def build_from_word(cls, text: str, rest: str, *, what: str, context: dict | None = None):
    """``cls(**options)`` from the option text after the colon (see the module docstring); any
    error is one line that starts with ``what`` and the word."""
    try:
        return _build(cls, text, rest, what=what, context=context)
    except (TypeError, ValueError) as e:
        if str(e).startswith(what):
            raise ValueError(str(e)) from None
        raise ValueError(f"{what} {text!r}: {e}") from None


def _build(cls, text: str, rest: str, *, what: str, context: dict | None):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    args, kw_nodes = parse_arguments(rest)
    kwargs = {}
    for name, node in kw_nodes.items():
        if name not in fields:
            raise ValueError(f"{what} {text!r}: {cls.__name__} has no option {name!r}; options: {', '.join(fields)}")
        kwargs[name] = build(node, MASK_NAMES) if name == "mask" and not _is_literal(node) else to_value(node)
    if args:
        if "mask" not in fields or len(args) > 1 or "mask" in kwargs:
            takes = ("one mask expression before its name=value options" if "mask" in fields
                     else "no mask; its options are name=value")
            raise ValueError(f"{what} {text!r}: {cls.__name__} takes {takes}")
        kwargs["mask"] = build(args[0], MASK_NAMES)
    for name, f in fields.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and name not in kwargs:
            if context is None or name not in context:
                raise ValueError(f"{what} {text!r}: {cls.__name__} needs {name}=...")
            kwargs[name] = context[name]
    return cls(**kwargs)


def _is_literal(node) -> bool:
    try:
        to_value(node)
        return True
    except ValueError:
        return False


def attention_from_word(text: str, *, context: dict | None = None, what: str = "--attention"):
    """A variant spec from ``WORD[:OPTIONS]`` (words: ``attnkit.variants.REGISTRY``)."""
    word, rest = _split_word(text, what)
    if word not in REGISTRY:
        raise ValueError(f"{what}: unknown attention variant {word!r}; registered: {', '.join(REGISTRY)}")
    return build_from_word(REGISTRY[word], text, rest, what=what, context=context)


def position_from_word(text: str, *, what: str = "--position") -> tuple[str | None, object]:
    """(abs_position, position spec) from ``WORD[:OPTIONS]``: words ``none``, ``sinusoidal``,
    ``learned`` (absolute) or one of ``POSITION_WORDS`` (rope, alibi, t5, shaw, xl)."""
    word, rest = _split_word(text, what)
    if word in ABSOLUTE:
        if rest.strip():
            raise ValueError(f"{what} {text!r}: {word} takes no options")
        return (None if word == "none" else word), None
    if word not in POSITION_WORDS:
        raise ValueError(f"{what}: unknown position scheme {word!r}; known: {', '.join(ABSOLUTE + tuple(POSITION_WORDS))}")
    return None, build_from_word(POSITION_WORDS[word], text, rest, what=what)


@cache
def task_from_word(text: str, what: str = "TASK"):
    """A task from ``WORD[:OPTIONS]`` (words: ``attnkit.tasks.TASKS``; cached, so that a task's
    fixed evaluation set is made once per process)."""
    word, rest = _split_word(text, what)
    if word not in TASKS:
        raise ValueError(f"{what}: unknown task {text!r}; known: {', '.join(TASKS)}")
    return build_from_word(TASKS[word], text, rest, what=what)


def split_list(text: str) -> list[str]:
    """A comma-separated list of words with options: ``softmax,"performer:num_features=64, causal=True",linear``.

    Commas inside parentheses stay; a piece that starts with ``name=`` continues the previous
    word's options (``performer:num_features=64,seed=1`` is one word)."""
    out: list[str] = []
    for piece in split_top_level(text):
        head = piece.split("(")[0]
        if out and "=" in head and ":" not in head:
            out[-1] = f"{out[-1]}, {piece}"
        elif piece:
            out.append(piece)
    return out


__all__ = ["attention_from_word", "position_from_word", "task_from_word", "build_from_word", "split_list", "POSITION_WORDS",
           "ABSOLUTE", "MASK_NAMES"]
