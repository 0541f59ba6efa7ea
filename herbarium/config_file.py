"""``--config FILE``: option defaults read from a YAML or JSON file; flags on the command line still win.

Two shapes are read, and may be mixed:

* a run's own ``config.json`` (sections ``data``, ``model``, ``loss``,
  ``optim``, ``o2u`` holding field names), so that
  ``train.py --config runs/x/config.json --out runs/y`` trains run x again;
* flat option names, as on the command line without the dashes, e.g.
  ``trunk: resnet50`` or ``batch-size: 32``.

A value may be written as on the command line (``levels: species,genus``) or
as a YAML/JSON value (``levels: [species, genus]``). A key that is no option
is an error naming the file and the key: a typo must not silently train
something else. What a saved config records rather than sets (the options
changed on resume, the environment it ran in) is skipped.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Mapping

import yaml

from herbarium.errors import UsageError

# Keys of a saved config.json that describe how the run went, not what to train: the options changed on resume,
# the machine and versions it ran with, and the pause that applied to one process only.
RECORDS = ("changes", "environment", "stop_after_epoch")


def read_mapping(path: str | Path) -> dict[str, Any]:
    """The file's top-level mapping; YAML unless it ends in ``.json`` (YAML reads JSON too, but its errors are worse)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise UsageError(f"--config {path}: cannot read it ({error.strerror or error})") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise UsageError(f"--config {path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: "
                         f"{' '.join(str(error).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: expected a mapping of option names to values, got a {type(data).__name__}")
    return data


def flatten(data: Mapping[str, Any], sections: Mapping[str, tuple[str, ...]]) -> dict[str, Any]:
    """``{key: value}`` with a saved config's sections opened: ``{"model": {"trunk": ...}}`` -> ``{"model.trunk": ...}``.

    ``sections`` maps a section name to its field names; a mapping under any
    other key is a value (``rank-weights: {species: 1.5}``).
    """
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key in sections and isinstance(value, dict):
            flat.update({f"{key}.{name}": item for name, item in value.items()})
        elif key not in RECORDS:
            flat[str(key)] = value
    return flat


def option_defaults(path: str | Path, parser: argparse.ArgumentParser,
                    field_paths: Mapping[str, tuple[str, ...]]) -> dict[str, Any]:
    """``{argparse dest: value}`` that the config file at ``path`` gives, for ``parser.set_defaults``.

    ``field_paths`` maps each dest to the config field it sets (``("model", "trunk")``),
    so that a saved config's ``model.trunk`` and a flat ``trunk`` both reach
    the dest ``trunk``.
    """
    sections: dict[str, tuple[str, ...]] = {}
    for field_path in field_paths.values():
        if len(field_path) == 2:
            sections[field_path[0]] = (*sections.get(field_path[0], ()), field_path[1])
    by_name = _names_to_dests(parser, field_paths)
    actions = {action.dest: action for action in parser._actions}
    defaults: dict[str, Any] = {}
    for key, value in flatten(read_mapping(path), sections).items():
        dest = by_name.get(key) or by_name.get(key.replace("-", "_"))
        if dest is None:
            raise UsageError(f"--config {path}: {key!r} is no option of this command; see --help for the options")
        defaults[dest] = _as_option_value(value, actions[dest], path, key)
    return defaults


def _names_to_dests(parser: argparse.ArgumentParser, field_paths: Mapping[str, tuple[str, ...]]) -> dict[str, str]:
    """Every name a key may use for an option: its dest, its flags without dashes, its dotted field path."""
    names: dict[str, str] = {}
    for action in parser._actions:
        if action.dest in ("help", "config") or action.dest is argparse.SUPPRESS:
            continue
        names[action.dest] = action.dest
        for flag in action.option_strings:
            if flag.startswith("--no-"):
                continue  # --no-pretrained: the key is the setting (pretrained: false), not the switch
            names[flag.lstrip("-").replace("-", "_")] = action.dest
    for dest, field_path in field_paths.items():
        names[".".join(field_path)] = dest
    return names


def _as_option_value(value: Any, action: argparse.Action, path: str | Path, key: str) -> Any:
    """``value`` as the option's dest holds it: text goes through the option's parser, lists become tuples."""
    if isinstance(value, str) and action.type is not None:
        try:
            value = action.type(value)
        except argparse.ArgumentTypeError as error:
            raise UsageError(f"--config {path}: {key}: {error}") from None
        except ValueError:
            kind = getattr(action.type, "__name__", "")
            raise UsageError(f"--config {path}: {key}: invalid {kind} value {value!r}") from None
    elif isinstance(value, list):
        value = tuple(value)
    if action.choices is not None and value is not None and value not in action.choices:
        raise UsageError(f"--config {path}: {key}: {value!r} is not one of {', '.join(map(str, action.choices))}")
    if action.nargs == 0 and not isinstance(value, bool):
        raise UsageError(f"--config {path}: {key}: expected true or false, got {value!r}")
    return value

