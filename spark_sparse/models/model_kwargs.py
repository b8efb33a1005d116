"""Keyword arguments for a model's constructor, as ``KEY=VALUE`` words (timm's ``--model-kwargs``).

A model is more than its name: Swin pre-trained at 192 px with 6x6 windows is
``swin_tiny_patch4_window7_224`` built with ``img_size=192, window_size=6``, and its weights load
only into a model built the same way. So the command line takes the constructor's arguments as
words, each value read as a Python literal (``6``, ``(8, 16)``, ``True``) or else kept as a string
(``stem_type=deep``), as timm's own training script reads them; and the words written back from a
dict are ones that read back into the same dict.
"""
from __future__ import annotations

import ast
import re
import shlex
from typing import Any, Iterable

from ..errors import ConfigError

__all__ = ["check_literal_model_kwargs", "format_model_kwargs", "parse_model_kwargs"]


def _literal_or_string(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):   # TypeError: {[1]: 2}
        return text


def parse_model_kwargs(words: Iterable[str]) -> dict[str, Any]:
    """``["img_size=192", "window_size=6 stem_type=deep"]`` -> ``{"img_size": 192, ...}``.

    A word may hold several pairs separated by spaces (``"a=1 b=2"``, timm's form pasted in one
    quoted value); spaces inside brackets or quotes do not split (``"channels=(8, 16)"`` is one pair)."""
    kwargs: dict[str, Any] = {}
    for word in words:
        for pair in _pairs(word):
            key, sep, value = pair.partition("=")
            if not sep or not key.isidentifier():
                raise ConfigError(f"--model_kwargs {pair!r}: expected KEY=VALUE with KEY a Python name "
                                  f"(e.g. img_size=192)")
            if key in kwargs:
                raise ConfigError(f"--model_kwargs: {key} is given twice ({kwargs[key]!r} and {value})")
            kwargs[key] = _literal_or_string(value)
    return kwargs


def check_literal_model_kwargs(kwargs: dict[str, Any]) -> None:
    """Refuse names that are not Python names and values that are not Python literals.

    A run's constructor arguments are written into its command, log and checkpoint and compared on
    resume: only literals read back as themselves (a ``functools.partial`` compares by identity, so
    its resume would be refused; a lambda cannot be pickled into the checkpoint)."""
    for key, value in kwargs.items():
        if not (isinstance(key, str) and key.isidentifier()):
            raise ConfigError(f"model_kwargs: {key!r} is not a Python name")
        if isinstance(value, str):
            continue
        read_back = _literal_or_string(repr(value))
        if type(read_back) is not type(value) or read_back != value:
            raise ConfigError(f"model_kwargs {key}={value!r}: a run's constructor arguments must be Python literals "
                              f"(numbers, strings, tuples, lists, dicts, True/False/None), which its command, log "
                              f"and checkpoint hold and a resume compares; build a model taking other objects from "
                              f"Python: spark_sparse.create_spark(name, {key}=...)")
        if not _string_keyed(value):
            raise ConfigError(f"model_kwargs {key}={value!r}: dicts in a run's constructor arguments need string keys "
                              f"(the run's log is JSON, and a resume compares what it logged)")


def _string_keyed(value: Any) -> bool:
    """Whether every dict within ``value`` has string keys only (JSON's, so the log reads back as given)."""
    if isinstance(value, dict):
        return all(isinstance(key, str) and _string_keyed(item) for key, item in value.items())
    if isinstance(value, (list, tuple, set, frozenset)):
        return all(_string_keyed(item) for item in value)
    return True


def _pairs(word: str) -> list[str]:
    """Split on spaces outside brackets and quotes, so ``"channels=(8, 16) b=1"`` is two pairs."""
    pairs, current, depth, quote = [], [], 0, ""
    for char in word:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char.isspace() and depth == 0:
            if current:
                pairs.append("".join(current))
                current = []
            continue
        current.append(char)
    if quote or depth:
        raise ConfigError(f"--model_kwargs {word!r}: unbalanced {'quotes' if quote else 'brackets'}, so its pairs "
                          f"cannot be told apart")
    if current:
        pairs.append("".join(current))
    return pairs


def format_model_kwargs(kwargs: dict[str, Any], as_options: bool = False) -> str:
    """``kwargs`` as Python reads them (``img_size=192, stem_type='deep'``), or with ``as_options`` as the
    ``--model_kwargs`` words, shell-quoted, that parse back into the same dict; '' for none."""
    if not as_options:
        return ", ".join(f"{key}={value!r}" for key, value in kwargs.items())
    words = []
    for key, value in kwargs.items():
        plain = isinstance(value, str) and re.fullmatch(r"[\w.:/+-]+", value) and _literal_or_string(value) == value
        as_text = value if plain else repr(value)
        words.append(f"--model_kwargs {shlex.quote(f'{key}={as_text}')}")
    return " ".join(words)
