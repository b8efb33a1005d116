"""Command-line checks the benchmark scripts share.

A setting no run can use must be one argparse usage error (exit status 2) before anything is built or
measured, not a traceback minutes later nor a table of nonsense. Each check returns the problem as one
line naming the flag, the value and the rule (``None`` when there is none); a script's ``parse_args``
hands the first problem to ``parser.error``.
"""
from __future__ import annotations

import argparse
import difflib
from typing import Iterable, Optional, Sequence

import spark_sparse as ss
from spark_sparse.decoder import check_decoder_width, decoder_width_rule
from spark_sparse.errors import ConfigError
from spark_sparse.train.config import PATCH
from spark_sparse.models import UnknownModelError, resolve_model_name

#: (flag, value, whether the value is allowed, the rule it breaks otherwise: "must be <rule>")
Rule = tuple[str, object, bool, str]


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and each option's default in its help (unless it says it already)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or "default" in (action.help or ""):   # not 0
            return action.help or ""
        return super()._get_help_string(action)


def first_problem(rules: Iterable[Rule]) -> Optional[str]:
    """The first broken rule as ``"--flag value: must be <rule>"``."""
    return next((f"{flag} {value}: must be {rule}" for flag, value, ok, rule in rules if not ok), None)


def at_least(flag: str, value: int, minimum: int) -> Rule:
    return flag, value, value >= minimum, f"at least {minimum}" if minimum else "0 or more"


def input_size(flag: str, value: int) -> Rule:
    return flag, value, value > 0 and value % 32 == 0, "a positive multiple of 32 (SparK's mask patch), e.g. 224"


def decoder_width(flag: str, value: int) -> Rule:
    """spark-pretrain's ``--decoder_width`` rule, in the decoder's own words (its check at SparK's patch)."""
    try:
        check_decoder_width(PATCH, value)
    except ConfigError:
        return flag, value, False, decoder_width_rule(PATCH)
    return flag, value, True, ""


def positive_seconds(flag: str, value: float) -> Rule:
    """nan and inf fail the comparison too."""
    return flag, value, 0 < value < float("inf"), "a positive number of seconds"


def mask_ratio(flag: str, value: float) -> Rule:
    """nan and inf fail the comparison too, so they are refused with the same rule."""
    return flag, value, 0 < value < 1, "a ratio of hidden patches above 0 and below 1, e.g. 0.6"


def unknown_model(flag: str, models: Sequence[str]) -> Optional[str]:
    """The first of ``models`` spark-sparse cannot build, with the registry's message (its "did you mean")."""
    for model in models:
        try:
            resolve_model_name(model)
        except UnknownModelError as err:
            return f"{flag}: {err}"
    return None


def unknown_backend(flag: str, names: Sequence[str]) -> Optional[str]:
    """The first of ``names`` that is not a registered backend, with the closest registered ones."""
    registered = [info.name for info in ss.list_backends()]
    for name in names:
        if name not in registered:
            close = difflib.get_close_matches(name, registered, n=3)
            hint = f" (did you mean {' or '.join(close)}?)" if close else ""
            return f"{flag} {name}: not a registered backend{hint}; registered: {', '.join(registered)}"
    return None


def unknown_recipe(flag: str, recipes: Sequence[str]) -> Optional[str]:
    """The first of ``recipes`` (``name`` or ``name@dtype``) that names no speed recipe or autocast dtype."""
    from spark_sparse.speed import RECIPES
    from _variants import DTYPES

    dtypes = tuple(DTYPES)
    for recipe in recipes:
        name, _, dtype = recipe.partition("@")
        if name not in RECIPES or (dtype and dtype not in dtypes) or recipe.endswith("@"):
            close = difflib.get_close_matches(name, list(RECIPES), n=2)
            hint = f" (did you mean {' or '.join(close)}?)" if close and name not in RECIPES else ""
            return (f"{flag} {recipe}: not a speed recipe{hint}; recipes: {', '.join(RECIPES)}, each optionally "
                    f"@{'/@'.join(dtypes)} for its own autocast dtype (e.g. fast@bf16)")
    return None


def unusable_backend(flag: str, names: Sequence[str]) -> Optional[str]:
    """The first of ``names`` that is not a registered backend, or cannot run on this machine (with why)."""
    unknown = unknown_backend(flag, names)
    if unknown:
        return unknown
    infos = {info.name: info for info in ss.list_backends()}
    for name in names:
        if not infos[name].available:
            return f"{flag} {name}: this backend cannot run here: {infos[name].reason}"
    return None
