"""Typing a recipe's keys with ``HfArgumentParser``: each ``key: value`` is parsed as ``--key value`` would be.

One parser over the recipe's own dataclass and the trainer's arguments class (recipe_spec.py) types
every value exactly as that trainer's command line does (``1e-3`` is a float, ``true`` a boolean, a
choice must be one of its choices, a list field takes several words), and its complaints become
:class:`~palsgd_hf.cli.recipe_source.RecipeError` sentences that name the key and the value.
Unknown keys are refused with the closest known name.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import re
import typing
from typing import Any

from transformers import HfArgumentParser

from .recipe_source import RecipeError
from .recipe_spec import RESERVED


class _ArgumentParser(HfArgumentParser):
    """``HfArgumentParser`` whose mistakes are exceptions (argparse would print its usage and exit)."""

    def error(self, message: str):
        raise _ParseError(message)


class _ParseError(Exception):
    pass


@functools.lru_cache(maxsize=None)
def _parser(*dataclass_types) -> tuple[_ArgumentParser, dict[str, argparse.Action]]:
    # A key two classes share (trl's configs have trust_remote_code too) is one option, the last class's.
    taken: set[str] = set()
    unique = []
    for cls in reversed(dataclass_types):
        unique.insert(0, _without(cls, taken))
        taken |= init_fields(cls)
    parser = _ArgumentParser(unique, allow_abbrev=False)
    actions = {}
    for action in parser._actions:  # the --key action of each field (not its --no_key twin, nor --help)
        if action.option_strings and action.option_strings[0] == f"--{action.dest}":
            actions[action.dest] = action
    return parser, actions


def _without(cls, names: set[str]):
    """``cls``, or a copy of it for parsing without the fields in ``names``."""
    if not names & init_fields(cls):
        return cls
    hints = typing.get_type_hints(cls)
    kept = [(f.name, hints[f.name], dataclasses.field(default=f.default, default_factory=f.default_factory,
                                                       metadata=f.metadata))
            for f in dataclasses.fields(cls) if f.init and f.name not in names]
    return dataclasses.make_dataclass(cls.__name__, kept)


def init_fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.init}


def parse_section(source: str, name: str, cls, raw: Any) -> Any:
    """A mapping section (``launch``) parsed with its own HfArgumentParser."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {source}: {name} must be a mapping of keys to values, got {raw!r}.")
    values = parse_values(source, raw, cls, prefix=f"{name}.")
    return cls(**values)


def parse_values(source: str, raw: dict[str, Any], *classes, prefix: str = "") -> dict[str, Any]:
    """Type each ``key: value`` as the parser of ``classes`` types ``--key value``; unknown keys are errors."""
    parser, actions = _parser(*classes)
    known = set().union(*(init_fields(c) for c in classes))
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if not isinstance(key, str) or key not in known or key in RESERVED:
            why = f" ({RESERVED[key]})" if key in RESERVED else ""
            raise RecipeError(f"recipe {source}: unknown key '{prefix}{key}'{why}.{suggest(key, known)}")
        action = actions[key]
        if action.type is dict and value is not None and not isinstance(value, dict):
            raise RecipeError(f"recipe {source}: {prefix}{key} must be a mapping of keys to values, got {value!r}.")
        if value is None or isinstance(value, dict) or (isinstance(value, list) and action.nargs not in ("+", "*")):
            # null, and mappings/lists for fields that take them whole (lr_scheduler_kwargs, report_to: [...]):
            # the arguments class checks these when it is constructed.
            out[key] = value
            continue
        words = [_word(v) for v in value] if isinstance(value, list) else [_word(value)]
        argv = [f"--{key}", *words] if action.nargs in ("+", "*") else [f"--{key}={words[0]}"]
        try:
            out[key] = getattr(parser.parse_args(argv), key)
        except _ParseError as err:
            raise RecipeError(f"recipe {source}: {prefix}{key}={value!r} {_explain(str(err))}.") from None
    return out


def _explain(message: str) -> str:
    """argparse's complaint about one value, as the rest of a sentence that starts with ``key=value``."""
    message = re.sub(r"^argument [^:]*: ", "", message)
    kind = re.match(r"invalid (\w+) value", message)
    if kind:
        return f"should be {'an' if kind.group(1)[0] in 'aeiou' else 'a'} {kind.group(1)}"
    choices = re.match(r"invalid choice: .*\(choose from (.*)\)", message)
    if choices:
        return f"is not one of {choices.group(1)}"
    return f"is refused: {message}"


def _word(value: Any) -> str:
    """A YAML value as the command-line word that means it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def suggest(key: Any, known) -> str:
    close = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else " See docs/cli.md for the recipe keys."
