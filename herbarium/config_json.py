"""Settings dataclasses to and from JSON: one policy for every saved config.

A saved config (``config.json`` in a run folder, the copy in a checkpoint)
is read key by key. A missing key takes the field's default, so run folders
written before a setting existed still load. A key this version does not
know is an error naming it: dropping it silently would rebuild another model,
or continue another run, than the one that was saved. JSON lists come back as
tuples where the field is a tuple.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Mapping

from herbarium.errors import ConfigError


def to_json(value: Any) -> Any:
    """``value`` with tuples as lists and every dict key a string, as ``json.dumps`` writes it back."""
    if isinstance(value, dict):
        return {str(key): to_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(item) for item in value]
    return value


def from_json(config_cls: type, values: Mapping[str, Any], section: str = "") -> Any:
    """``config_cls`` built from its saved ``values``; an unknown key raises :class:`ConfigError` naming it.

    ``section`` (``"data"``, ``"model"``, ...) prefixes the key in the
    message, as in ``data.foo``.
    """
    hints = typing.get_type_hints(config_cls)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        where = f"{section}." if section else ""
        named = ", ".join(f"'{where}{key}'" for key in unknown)
        raise ConfigError(f"unknown setting{'s' if len(unknown) > 1 else ''} {named} in a saved config (written by another "
                          f"version of herbarium?); valid keys: {', '.join(f.name for f in dataclasses.fields(config_cls))}")
    return config_cls(**{key: _restored(hints[key], value) for key, value in values.items()})


def _restored(hint: Any, value: Any) -> Any:
    """A JSON list as the tuple the field holds; any other value as it is."""
    return tuple(value) if isinstance(value, list) and _is_tuple(hint) else value


def _is_tuple(hint: Any) -> bool:
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        return any(_is_tuple(arg) for arg in typing.get_args(hint))
    return typing.get_origin(hint) is tuple
