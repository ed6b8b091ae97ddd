"""How sampler settings come in from outside: widget and API values, and command-line flags.

Both read ``settings.SETTING_FIELDS``, so a setting has the same name, type and range in the
studio, its API and every command line (``--num-steps``, ``--num-rounds``, ...).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterable, Mapping

from scan_core.sampling.settings import (
    FIELDS,
    SETTING_FIELDS,
    Bound,
    SamplerSettings,
    SettingField,
    model_sizes,
    range_problem,
    short_repr,
)


def number_from(value, name: str, kind: type = float):
    """A finite number (a whole one for ``kind=int``) from a widget, API or command-line value.

    Raises ValueError naming ``name`` for anything else: text, None, NaN, inf, 2.5 for an int.
    """
    if isinstance(value, int) and kind is int:
        return int(value)  # exact, however large (bool included: True is 1)
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{name} must be a number, got {short_repr(value)}") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {short_repr(value)}")
    if kind is int:
        if not number.is_integer():
            raise ValueError(f"{name} must be a whole number, got {short_repr(value)}")
        return int(number)
    return number


def value_from(field: SettingField, value):
    """``value`` (from a widget, an API call or a flag) as the field's type; ValueError names
    the setting when it cannot be one."""
    if field.kind in (int, float):
        return number_from(value, field.title, field.kind)
    if field.kind is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{field.title} must be true or false, got {short_repr(value)}")
    if not isinstance(value, str) or value not in field.choices:
        raise ValueError(f"{field.title} must be one of {field.choices}, got {short_repr(value)}")
    return value


def settings_from_values(
    values: Mapping[str, object],
    base: SamplerSettings,
    num_tokens: int,
    vocab_size: int | None = None,
    limits: Mapping[str, Bound] | None = None,
) -> SamplerSettings:
    """``base`` with the settings named in ``values`` (raw widget or API values), validated.

    ``limits`` caps settings whose own range is open (a server's request limits). Raises
    ValueError naming the first bad setting, in table order, and its valid range.
    """
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown sampler settings {unknown}; known: {', '.join(FIELDS)}")
    sizes, limits = model_sizes(num_tokens, vocab_size), limits or {}
    changes = {}
    for field in SETTING_FIELDS:
        if field.name not in values:
            continue
        value = value_from(field, values[field.name])
        problem = range_problem(field, value, sizes, limits.get(field.name))
        if problem:
            raise ValueError(f"{field.title} {problem}")
        changes[field.name] = value
    return base.replace(**changes).validate(num_tokens)


# ------------------------------------------------------------------------------ flags


def _fields(names: Iterable[str] | None) -> list[SettingField]:
    return list(SETTING_FIELDS) if names is None else [FIELDS[name] for name in names]


def flag_type(field: SettingField):
    """An argparse ``type`` for ``field``: converts and checks the range that does not depend
    on the model (K <= N is checked by ``validate`` once the model is loaded)."""

    def parse(text: str):
        try:
            value = value_from(field, text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        problem = range_problem(field, value, {})
        if problem:
            raise argparse.ArgumentTypeError(f"{field.title} {problem}")
        return value

    parse.__name__ = field.kind.__name__
    return parse


def add_setting_flags(
    parser: argparse.ArgumentParser,
    names: Iterable[str] | None = None,
    defaults: SamplerSettings | None = None,
    title: str = "sampler settings",
) -> None:
    """One flag per named setting (all by default): ``--num-steps``, ``--lookahead/--no-...``.

    Flags left out keep the caller's base settings (``settings_from_args``); ``defaults`` is
    what ``--help`` says they are (None: the caller's help says it, e.g. "the model card's").
    """
    group = parser.add_argument_group(title)
    for field in _fields(names):
        shown = "" if defaults is None else f" (default: {getattr(defaults, field.name)})"
        if field.kind is bool:
            action = argparse.BooleanOptionalAction
            group.add_argument(field.flag, action=action, default=None, help=field.help + shown)
            continue
        group.add_argument(
            field.flag,
            type=flag_type(field),
            choices=field.choices or None,
            default=None,
            metavar=None if field.choices else field.kind.__name__.upper(),
            help=field.help + shown,
        )


def settings_from_args(
    args: argparse.Namespace, base: SamplerSettings, names: Iterable[str] | None = None
) -> SamplerSettings:
    """``base`` with every setting flag that was given (not validated: the caller knows N)."""
    given = {f.name: getattr(args, f.name, None) for f in _fields(names)}
    return base.replace(**{name: value for name, value in given.items() if value is not None})
