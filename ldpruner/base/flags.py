"""The command line of the options (:mod:`ldpruner.base.options`): one flag per flat name of a config, typed by its
declaration, with its choices, default and help; ``--x/--no-x`` for bools; ``NAME=VALUE`` flags for a mapping of a
section's fields. Part of the base layer: standard library only.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from ldpruner.base.errors import ConfigError
from ldpruner.base.options import Config, Inherited
from ldpruner.base.values import short_repr, unknown_options

__all__ = ["add_flags", "parse_value"]


def _show(value: Any) -> str:
    if isinstance(value, Mapping):
        return " ".join(f"{k}={_show(v)}" for k, v in value.items()) or "none"
    if isinstance(value, (tuple, list)):
        return " ".join(_show(v) for v in value)
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def parse_value(config: type[Config], name: str, text: str) -> Any:
    """``text`` (a command-line word) as a value of ``config``'s field ``name``, by its declared type; the config
    validates the value itself later."""
    if name not in config.names():
        raise ConfigError(unknown_options(f"{config.__name__} ", [name], config.names()))
    kind = config._kind_of()[name]
    if kind.optional and text.lower() == "none":
        return None
    try:
        if kind.base is bool:
            words = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False,
                     "off": False}
            return words[text.lower()]
        if kind.base in (int, float):
            return kind.base(text)
    except (KeyError, ValueError):
        raise ConfigError(f"{name}={short_repr(text)} is not {kind.describe()}") from None
    return text


class _Assignments(argparse.Action):
    """``--flag NAME=VALUE`` (repeatable) into a dict of ``config``'s fields, each value typed by its declaration."""

    def __init__(self, *args: Any, config: type[Config], **kwargs: Any) -> None:
        self.config = config
        super().__init__(*args, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        name, sep, text = str(values).partition("=")
        if not sep:
            parser.error(f"{option_string} takes NAME=VALUE, got {short_repr(values)}")
        try:
            value = parse_value(self.config, name.strip().replace("-", "_"), text.strip())
        except ConfigError as exc:
            parser.error(f"{option_string}: {exc}")
        current = dict(getattr(namespace, self.dest, None) or {})
        current[name.strip().replace("-", "_")] = value
        setattr(namespace, self.dest, current)


def add_flags(parser: argparse.ArgumentParser, config: type[Config], names: Sequence[str] | None = None, *,
              help: Mapping[str, str] | None = None, skip: Sequence[str] = ()) -> None:
    """One flag per flat name of ``config`` (all of those the command line takes, or ``names``): ``--num-samples``
    for ``num_samples``, typed, with its choices, ``--x/--no-x`` for bools, several values for tuples, and the
    declared help with the default; one ``--<mapping>`` NAME=VALUE flag per mapping key of a composed config
    (``--distill-option``). Absent flags stay absent from the parsed namespace (the config's default applies), so
    only what the user typed reaches the API. ``help`` replaces the help of some flat names; ``skip`` leaves some
    out (a command that adds them itself)."""
    flat = config.flat()
    chosen = names if names is not None else [n for n in flat if config.flat_spec(n)[0].flag and n not in skip]
    for name in chosen:
        spec, default = config.flat_spec(name)
        owner, field_name = flat[name]
        kind = (config if owner is None else config.sections()[owner].config)._kind_of()[field_name]
        label = config.sections()[owner].label if owner is not None else ""
        text = (help or {}).get(name, f"{label}: {spec.help}" if label else spec.help).replace("%", "%%")
        if isinstance(default, Inherited):
            shown = f"default: the {default.source}'s {field_name}"
        elif default is dataclasses.MISSING:
            shown = "required"
        else:
            shown = "default: " + (spec.none if default is None and spec.none else _show(default))
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": f"{text} ({shown})", "dest": name}
        if kind.base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = kind.element if kind.base is tuple else kind.base
            if kind.base is tuple:
                kwargs["nargs"] = "+"
            if spec.choices is not None:
                kwargs["choices"] = spec.choices
            if spec.metavar:
                kwargs["metavar"] = spec.metavar
        parser.add_argument("--" + name.replace("_", "-"), **kwargs)
    if names is None:
        for key, owner in config.mappings.items():
            section_config = config.sections()[owner].config
            parser.add_argument("--" + key.replace("_", "-").removesuffix("s"), action=_Assignments,
                                config=section_config, metavar="NAME=VALUE", dest=key, default=argparse.SUPPRESS,
                                help=f"a {section_config.__name__} field (NAME=VALUE, the field's own name); repeat "
                                     "the flag for several")
