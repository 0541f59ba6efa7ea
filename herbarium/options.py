"""Settings defined once: a dataclass field carries its help, and its command-line option is generated from it.

A setting is declared as ``name: type = option(default, "what it does")``.
:func:`add_options` turns every such field of a dataclass into one argparse
option, and :func:`values_from_namespace` builds the dataclass back from the
parsed arguments. Everything the option needs is read from the field:

* the flag, ``--name-with-dashes`` (after an optional prefix), and the dest,
  the field's name with the same prefix, unless the field names others;
* how a value is parsed, from the field's type: ``int``, ``float``, ``str``,
  ``bool`` (a ``store_true`` switch, or a ``--no-...`` switch that turns a
  setting on by default off), ``X | None``, tuples as comma-separated values
  and ``dict[str, float]`` as ``name=weight`` pairs; or from ``parse``;
* the choices, from the constant of the module that interprets them;
* the default, from the field only, so an empty command line gives the
  dataclass's own defaults, and the help ends with ``(default: X)``
  written from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import types
import typing
from dataclasses import MISSING, Field, dataclass
from typing import Any, Callable, Collection, Iterable

METADATA_KEY = "herbarium.option"


@dataclass(frozen=True)
class OptionSpec:
    """How a field appears on the command line (see :func:`option`)."""

    help: str
    flag: str | None = None
    aliases: tuple[str, ...] = ()
    dest: str | None = None
    choices: tuple[str, ...] | None = None
    parse: Callable[[str], Any] | None = None
    metavar: str | None = None
    negate: str | None = None
    default_text: str | None = None
    minimum: float | None = None
    maximum: float | None = None


def option(default: Any = MISSING, help: str = "", *, flag: str | None = None, aliases: Iterable[str] = (),
           dest: str | None = None, choices: Iterable[str] | None = None, parse: Callable[[str], Any] | None = None,
           metavar: str | None = None, negate: str | None = None, default_text: str | None = None,
           default_factory: Callable[[], Any] | Any = MISSING, minimum: float | None = None,
           maximum: float | None = None) -> Any:
    """A dataclass field that is also a command-line option.

    Args:
        default, default_factory: the setting's default, as for ``dataclasses.field``.
        help: what the setting does; ``(default: X)`` is appended.
        flag: the option string when it is not ``--`` + the (prefixed) name with dashes.
        aliases: further option strings, e.g. an older name.
        dest: the argparse dest when it is not the (prefixed) field name;
            recipes and resuming name options by dest.
        choices: the valid values, from the module that interprets them.
        parse: turns the command-line text into the value (a ``ValueError``
            becomes argparse's message for the option).
        metavar: the value's name in the help.
        negate: for a ``bool`` setting that is on by default, the ``--no-...``
            flag that turns it off (the only flag of the setting, unless ``flag``
            is given too: then both work, see :class:`Switch`).
        default_text: the default as the help states it, where the value alone
            does not say what it means (``None``: "each optimizer's own").
        minimum, maximum: the valid range, inclusive; a value outside it is
            refused naming the option (see :func:`within`).
    """
    spec = OptionSpec(help=help, flag=flag, aliases=tuple(aliases), dest=dest,
                      choices=tuple(choices) if choices is not None else None, parse=parse, metavar=metavar,
                      negate=negate, default_text=default_text, minimum=minimum, maximum=maximum)
    return dataclasses.field(default=default, default_factory=default_factory, metadata={METADATA_KEY: spec})


# ----------------------------------------------------------------- fields
def spec_of(field: Field) -> OptionSpec | None:
    """The field's option, or None for a field that is no option."""
    return field.metadata.get(METADATA_KEY)


def option_fields(config_cls: type) -> list[Field]:
    """The fields of ``config_cls`` declared with :func:`option`, in order."""
    return [field for field in dataclasses.fields(config_cls) if spec_of(field) is not None]


def dest_of(field: Field, prefix: str = "") -> str:
    spec = spec_of(field)
    return spec.dest if spec is not None and spec.dest else prefix + field.name


def flag_of(field: Field, prefix: str = "") -> str:
    spec = spec_of(field)
    if spec is not None and spec.negate:
        return spec.negate
    if spec is not None and spec.flag:
        return spec.flag
    return "--" + (prefix + field.name).replace("_", "-")


def dests(config_cls: type, prefix: str = "") -> dict[str, str]:
    """``{argparse dest: field name}`` of the option fields of ``config_cls``."""
    return {dest_of(field, prefix): field.name for field in option_fields(config_cls)}


def default_of(field: Field) -> Any:
    if field.default is not MISSING:
        return field.default
    if field.default_factory is not MISSING:
        return field.default_factory()
    raise TypeError(f"option {field.name!r} has no default; every option needs one")


# ---------------------------------------------------------------- parsing
def comma_separated(item: Callable[[str], Any] = str) -> Callable[[str], tuple[Any, ...]]:
    """A parser of ``a,b,c`` into a tuple, each part through ``item``; empty parts are dropped."""

    def parse(text: str) -> tuple[Any, ...]:
        try:
            return tuple(item(part.strip()) for part in text.split(",") if part.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {item.__name__} values, got {text!r}") from None

    parse.__name__ = f"comma-separated {item.__name__}"
    return parse


def fixed_tuple(items: tuple[Callable[[str], Any], ...]) -> Callable[[str], tuple[Any, ...]]:
    """A parser of exactly ``len(items)`` comma-separated values, e.g. ``20,100`` for ``tuple[int, int]``."""
    names = ",".join(item.__name__.upper() for item in items)

    def parse(text: str) -> tuple[Any, ...]:
        parts = [part.strip() for part in text.split(",")]
        try:
            if len(parts) != len(items):
                raise ValueError
            return tuple(item(part) for item, part in zip(items, parts))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {names}, got {text!r}") from None

    return parse


def rank_weights(text: str) -> dict[str, float]:
    """``species=1.5,genus=1`` -> ``{'species': 1.5, 'genus': 1.0}``."""
    try:
        return {name: float(weight) for name, weight in (part.split("=") for part in comma_separated()(text))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected rank=weight pairs like species=1.5,genus=1, got {text!r}") from None


def reporting(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse`` with its ``ValueError`` message shown by argparse (which otherwise prints only "invalid value")."""

    @functools.wraps(parse)
    def wrapped(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return wrapped


def number(text: str) -> float:
    """A float that is a number: ``nan`` is refused (it passes every comparison, so no range check would catch it)."""
    value = float(text)
    if math.isnan(value):
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
    return value


number.__name__ = "float"  # named as the type in argparse's and --config's messages


def within(parse: Callable[[str], Any], minimum: float | None = None, maximum: float | None = None,
           *, above: float | None = None) -> Callable[[str], Any]:
    """``parse`` refusing a value below ``minimum``, above ``maximum`` or not above ``above``, in argparse's
    one-line message for the option (a bad batch size or epoch count otherwise fails deep in training)."""

    @functools.wraps(parse)
    def checked(text: str) -> Any:
        value = parse(text)
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum:g}, got {text}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum:g}, got {text}")
        if above is not None and not value > above:
            raise argparse.ArgumentTypeError(f"must be greater than {above:g}, got {text}")
        return value

    return checked


def parser_for(hint: Any) -> Callable[[str], Any]:
    """How command-line text becomes a value of the type ``hint``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        inner = [arg for arg in args if arg is not type(None)]
        if len(inner) == 1:
            return parser_for(inner[0])
    if hint is float:
        return number
    if hint in (int, str):
        return hint
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return comma_separated(parser_for(args[0]))
    if origin is tuple and args:
        return fixed_tuple(tuple(parser_for(arg) for arg in args))
    if origin is dict and args == (str, float):
        return rank_weights
    raise TypeError(f"no command-line parser for {hint!r}; give the option a parse=")


# ------------------------------------------------------------------- help
def format_default(value: Any) -> str:
    """A default as the help states it: ``off``, ``none``, ``0.999``, ``species,genus,family``, ``species=1.5``."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None or value in ("", (), {}):
        return "none"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (tuple, list)):
        return ",".join(format_default(item) for item in value)
    if isinstance(value, dict):
        return ",".join(f"{key}={format_default(item)}" for key, item in value.items())
    return str(value)


def help_text(spec: OptionSpec, default: Any) -> str:
    """The field's help with its default appended, escaped for argparse's %-formatting."""
    stated = spec.default_text if spec.default_text is not None else format_default(default)
    return f"{spec.help} (default: {stated})".replace("%", "%%")


# --------------------------------------------------------------- argparse
def add_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, config_cls: type, *, prefix: str = "",
                skip: Collection[str] = (), only: Collection[str] | None = None) -> list[argparse.Action]:
    """Add one option per field of ``config_cls`` to ``parser`` (or an argument group); return them.

    ``skip`` names fields that are no option here (the caller writes or
    builds them otherwise); ``only`` limits this call to some fields, for a
    dataclass whose options are shown in several groups. A field that is
    neither skipped nor declared with :func:`option` is an error, so that a
    new setting cannot silently miss its flag.
    """
    names = {field.name for field in dataclasses.fields(config_cls)}
    unknown = (set(skip) | set(only or ())) - names
    if unknown:
        raise TypeError(f"{config_cls.__name__} has no field(s) {sorted(unknown)}")
    hints = typing.get_type_hints(config_cls)
    actions = []
    for field in dataclasses.fields(config_cls):
        if field.name in skip or (only is not None and field.name not in only):
            continue
        if spec_of(field) is None:
            raise TypeError(f"{config_cls.__name__}.{field.name} is not declared with option(...); declare it or skip it")
        actions.append(_add_option(parser, field, hints[field.name], prefix))
    return actions


def _add_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup, field: Field, hint: Any,
                prefix: str) -> argparse.Action:
    spec, default = spec_of(field), default_of(field)
    settings: dict[str, Any] = {"dest": dest_of(field, prefix), "default": default, "help": help_text(spec, default)}
    if hint is bool:
        if default and not spec.negate:
            raise TypeError(f"{field.name} is on by default: give it negate='--no-...' to be able to turn it off")
        if spec.negate and spec.flag:  # both spellings: --pretrained (the default, still accepted) and --no-pretrained
            return parser.add_argument(spec.flag, spec.negate, *spec.aliases, action=Switch, **settings)
        settings["action"] = "store_false" if spec.negate else "store_true"
    else:
        parse = reporting(spec.parse) if spec.parse else parser_for(hint)
        bounded = spec.minimum is not None or spec.maximum is not None
        settings["type"] = within(parse, spec.minimum, spec.maximum) if bounded else parse
        settings["choices"] = spec.choices
        settings["metavar"] = spec.metavar
    return parser.add_argument(flag_of(field, prefix), *spec.aliases, **settings)


class Switch(argparse.Action):
    """A setting turned on by ``--name`` and off by ``--no-name``, for a setting that is on by default but was once
    off, so that commands written with ``--name`` keep working."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, not (option_string or "").startswith("--no-"))

    def format_usage(self) -> str:
        return " | ".join(self.option_strings)


def values_from_namespace(config_cls: type, args: argparse.Namespace, prefix: str = "", **values: Any) -> Any:
    """``config_cls`` built from parsed ``args``: each option field from its dest.

    ``values`` gives fields that are no option (or rewritten ones); any other
    field keeps its default.
    """
    for field in option_fields(config_cls):
        if field.name not in values:
            values[field.name] = getattr(args, dest_of(field, prefix))
    return config_cls(**values)
