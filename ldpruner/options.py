"""Options declared once: every knob of every stage is a field of a frozen config dataclass that says its default,
what it means and which values it takes. From that one declaration come

* validation — :meth:`Config.__post_init__` checks every field against its type annotation and its :class:`Spec`
  (choices, bounds), adds the config's own cross-field rules (:meth:`Config.problems`), and raises one
  :class:`~ldpruner.errors.ConfigError` that lists every problem;
* construction from data — :meth:`Config.from_dict` (TOML, JSON, keyword arguments) refuses unknown keys by name;
* the command line — :func:`add_flags` makes one flag per field, with the field's type, choices, default and help.

A config that composes others (a build runs every stage) reuses their declarations with :func:`same_as`, so a
default is written in one place. Part of the base layer: standard library only.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import reprlib
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar

from .errors import ConfigError

__all__ = ["Config", "Spec", "add_flags", "option", "parse_value", "same_as", "short_repr", "split_options",
           "unknown_options"]

_META = "ldpruner.option"


@dataclasses.dataclass(frozen=True)
class Spec:
    """What a field means and which values it takes (beyond its type annotation).

    ``minimum`` / ``maximum`` bound numbers (and every element of a tuple), inclusive unless ``exclusive_*``;
    ``none`` says what None means (only fields annotated ``X | None`` may be None); ``hint`` is appended to an
    error about the field (the reason for the rule, or the fix); ``flag`` False keeps the field off the command
    line (API and config files only); ``nonempty`` refuses an empty tuple or string; ``path`` str fields take
    ``os.PathLike`` too; ``check`` adds rules of its own (required for a type the validator does not read, such as
    a mapping)."""

    help: str
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    exclusive_maximum: bool = False
    none: str | None = None
    hint: str = ""
    flag: bool = True
    nonempty: bool = False
    metavar: str | None = None
    path: bool = False  # a str field that names a file or folder: os.PathLike values are accepted (as str)
    check: Callable[[Any], Iterable[str]] | None = None  # more rules for one field (its problems, if any)
    items: Any = None  # a mapping of another config's fields: that config (the CLI takes NAME=VALUE flags)

    def bounds_text(self) -> str | None:
        lo, hi = self.minimum, self.maximum
        if lo is not None and hi is not None:
            return (f"in {'(' if self.exclusive_minimum else '['}{_number(lo)}, {_number(hi)}"
                    f"{')' if self.exclusive_maximum else ']'}")
        if lo is not None:
            return f"{'>' if self.exclusive_minimum else '>='} {_number(lo)}"
        if hi is not None:
            return f"{'<' if self.exclusive_maximum else '<='} {_number(hi)}"
        return None

    def within(self, value: float) -> bool:
        if self.minimum is not None and (value <= self.minimum if self.exclusive_minimum else value < self.minimum):
            return False
        if self.maximum is not None and (value >= self.maximum if self.exclusive_maximum else value > self.maximum):
            return False
        return True


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


# --- quoting values in messages ---------------------------------------------------------------------------------------

_SHOWN_ITEMS = 6  # the items of a long sequence an error shows (then "…" and how many there are)
_SHORT = reprlib.Repr()
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxset = _SHORT.maxfrozenset = _SHORT.maxdict = _SHOWN_ITEMS
_SHORT.maxstring = _SHORT.maxother = 100
_SHORT.maxlevel = 3
_SHORT.fillvalue = "…"


def short_repr(value: Any) -> str:
    """``repr(value)`` for an error message, capped (a message is one line of a few hundred characters at most): a
    long sequence or mapping shows its first items and how many it has, a long string its two ends."""
    text = _SHORT.repr(value)
    if isinstance(value, (list, tuple, set, frozenset, Mapping)) and len(value) > _SHOWN_ITEMS:
        text += f" ({len(value)} {'entries' if isinstance(value, Mapping) else 'values'})"
    return text


def unknown_options(what: str, unknown: Iterable[Any], known: Sequence[str]) -> str:
    """The message for keys no option is called: each with the known name it is closest to ("did you mean"); every
    known name, compactly, only when some key is close to none. ``what`` names the config ("BuildConfig ") or is
    empty."""
    unknown = sorted(unknown, key=str)
    close = {key: difflib.get_close_matches(str(key).replace("-", "_"), known, n=1, cutoff=0.6) for key in unknown}
    if len(unknown) == 1 and close[unknown[0]]:
        return f"unknown {what}option {short_repr(unknown[0])}; did you mean {close[unknown[0]][0]!r}?"
    shown = [f"{short_repr(key)}" + (f" (did you mean {close[key][0]!r}?)" if close[key] else "")
             for key in unknown[:_SHOWN_ITEMS]]
    more = f" and {len(unknown) - _SHOWN_ITEMS} more" if len(unknown) > _SHOWN_ITEMS else ""
    text = f"unknown {what}option{'s' if len(unknown) > 1 else ''} {', '.join(shown)}{more}"
    if not all(close[key] for key in unknown):
        text += f"; the options are {', '.join(sorted(known))}"
    return text


def option(default: Any = dataclasses.MISSING, help: str = "", *, default_factory: Any = dataclasses.MISSING,
           **spec: Any) -> Any:
    """A dataclass field with its default and its :class:`Spec` (``help`` and the keywords of Spec)."""
    meta = {_META: Spec(help=help, **spec)}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def same_as(config: type[Config], name: str, *, default: Any = dataclasses.MISSING, **changes: Any) -> Any:
    """The declaration of ``config``'s field ``name`` (default and spec) for a config that composes it; ``changes``
    replace spec entries (a different ``help`` for the composed meaning, say) and ``default`` the default (the
    composed field may hold several values of the original, each under the same rules)."""
    field = config.field(name)
    spec = dataclasses.replace(field.metadata[_META], **changes)
    if default is not dataclasses.MISSING:
        return dataclasses.field(default=default, metadata={_META: spec})
    if field.default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=field.default_factory, metadata={_META: spec})
    return dataclasses.field(default=field.default, metadata={_META: spec})


# --- types -----------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Kind:
    base: Any  # int, float, bool, str, or None for types checked by the config itself
    optional: bool
    element: Any = None  # for tuple[T, ...]: T
    label: str = "a value"  # how an error names a type the validator does not read

    def describe(self) -> str:
        names = {int: "an int", float: "a finite number", bool: "a bool (true/false)", str: "a string"}
        if self.base is tuple:
            text = f"a sequence of {names.get(self.element, 'a value').split(' ', 1)[1]}s"
        else:
            text = names.get(self.base, self.label)
        return text + (" or None" if self.optional else "")


def _kind(annotation: Any) -> _Kind:
    optional = False
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        optional = len(rest) < len(args)
        annotation = rest[0] if len(rest) == 1 else None
        args = typing.get_args(annotation)
    if annotation in (int, float, bool, str):
        return _Kind(annotation, optional)
    if typing.get_origin(annotation) is tuple and len(args) == 2 and args[1] is Ellipsis:
        return _Kind(tuple, optional, args[0])
    origin = typing.get_origin(annotation) or annotation
    is_mapping = isinstance(origin, type) and issubclass(origin, Mapping)
    return _Kind(None, optional, label="a mapping" if is_mapping else "a value")


def _scalar(value: Any, base: Any) -> tuple[bool, Any]:
    """(ok, value converted): ints are accepted for floats (and become floats); bools are never numbers."""
    if base is bool:
        return isinstance(value, bool), value
    if isinstance(value, bool):
        return False, value
    if base is int:
        return isinstance(value, int), value
    if base is float:
        if isinstance(value, (int, float)) and math.isfinite(value):
            return True, float(value)
        return False, value
    if base is str:
        return isinstance(value, str), value
    return True, value


class Config:
    """Base of the frozen option dataclasses: one validator, ``to_dict`` / ``from_dict``, declarations by name.

    Subclasses are ``@dataclasses.dataclass(frozen=True)`` whose fields are made with :func:`option` (or
    :func:`same_as`) and may add cross-field rules in :meth:`problems`."""

    _kinds: ClassVar[dict[str, _Kind]]

    def __post_init__(self) -> None:
        problems = self._field_problems()
        if not problems:
            problems = list(self.problems())
        if problems:
            raise ConfigError(f"invalid {type(self).__name__}: " + "; ".join(problems))

    def problems(self) -> Iterable[str]:
        """Rules between fields, checked once every field is valid on its own; one message per broken rule."""
        return ()

    @classmethod
    def _kind_of(cls) -> dict[str, _Kind]:
        if "_kinds" not in cls.__dict__:
            hints = typing.get_type_hints(cls)
            kinds = {f.name: _kind(hints[f.name]) for f in dataclasses.fields(cls)}
            unchecked = [f.name for f in dataclasses.fields(cls) if kinds[f.name].base is None
                         and _META in f.metadata and f.metadata[_META].check is None]
            if unchecked:  # a declaration the validator cannot read would let any value through
                raise TypeError(f"{cls.__name__}: options {unchecked} have a type the validator does not check "
                                "(int, float, bool, str, tuple[T, ...], optionally | None); give them a check=")
            cls._kinds = kinds
        return cls._kinds

    def _field_problems(self) -> list[str]:
        problems = []
        kinds = self._kind_of()
        for f in dataclasses.fields(self):
            spec = f.metadata.get(_META)
            if spec is None:
                continue
            value = getattr(self, f.name)
            kind = kinds[f.name]
            problem, converted = _check(f.name, value, kind, spec)
            if problem:
                problems.append(problem + (f" ({spec.hint})" if spec.hint else ""))
                continue
            if converted is not value:
                object.__setattr__(self, f.name, converted)
            if spec.check is not None and converted is not None:
                problems += list(spec.check(converted))
        return problems

    # --- declarations -----------------------------------------------------------------------------------------------
    @classmethod
    def field(cls, name: str) -> dataclasses.Field:
        for f in dataclasses.fields(cls):
            if f.name == name:
                return f
        raise KeyError(f"{cls.__name__} has no option {name!r}")

    @classmethod
    def spec(cls, name: str) -> Spec:
        return cls.field(name).metadata[_META]

    @classmethod
    def default(cls, name: str) -> Any:
        f = cls.field(name)
        return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    # --- data ---------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Every field, tuples as lists and mappings as dicts: what a report or a config file records."""
        def plain(value: Any) -> Any:
            if isinstance(value, (list, tuple)):
                return [plain(v) for v in value]
            if isinstance(value, Mapping):
                return {k: plain(v) for k, v in value.items()}
            if hasattr(value, "to_dict"):
                return value.to_dict()
            return value

        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Any:
        """Build from a mapping; an unknown key is a ConfigError naming it and the option it is closest to (every
        option when it is close to none)."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{cls.__name__} options must be a mapping, got {type(data).__name__}")
        known = cls.names()
        unknown = set(data) - set(known)
        if unknown:
            raise ConfigError(unknown_options(f"{cls.__name__} ", unknown, known))
        return cls(**data)


def _check(name: str, value: Any, kind: _Kind, spec: Spec) -> tuple[str | None, Any]:
    """(problem or None, the value converted to its declared type)."""
    if value is None:
        return (None, value) if kind.optional else (f"{name}=None must be {kind.describe()}", value)
    if kind.base is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            return f"{name}={short_repr(value)} must be {kind.describe()}", value
        items = []
        for item in value:
            ok, item = _scalar(item, kind.element)
            if not ok or (isinstance(item, (int, float)) and not isinstance(item, bool) and not spec.within(item)):
                bounds = spec.bounds_text()
                return (f"{name}={short_repr(list(value))} must be {kind.describe()}"
                        + (f", each {bounds}" if bounds else "")), value
            items.append(item)
        if spec.nonempty and not items:
            return f"{name}=[] must hold at least one value", value
        if spec.choices is not None and any(i not in spec.choices for i in items):
            return f"{name}={short_repr(list(value))} may only hold {list(spec.choices)}", value
        return None, tuple(items)
    if spec.path and isinstance(value, os.PathLike):
        value = os.fspath(value)
    ok, converted = _scalar(value, kind.base)
    if not ok:
        return f"{name}={short_repr(value)} must be {kind.describe()}", value
    if spec.nonempty and converted == "":
        return f"{name}='' must not be empty", value
    if spec.choices is not None and converted not in spec.choices:
        return f"{name}={short_repr(value)} is not one of {list(spec.choices)}", value
    if isinstance(converted, (int, float)) and not isinstance(converted, bool) and not spec.within(converted):
        return f"{name}={short_repr(value)} must be {spec.bounds_text()}", value
    return None, converted


def split_options(options: Mapping[str, Any], *configs: type[Config] | tuple[type[Config], Sequence[str]]
                  ) -> list[dict[str, Any]]:
    """Share keyword options out among configs: one dict per config with the keys it declares (a name two configs
    declare goes to both). ``(Config, names)`` restricts a config to some of its fields. A key no config takes is
    a ConfigError that names the key this call takes that it is closest to (every key it takes when none is
    close)."""
    parts: list[dict[str, Any]] = []
    accepted: list[str] = []
    for entry in configs:
        config, names = entry if isinstance(entry, tuple) else (entry, entry.names())
        parts.append({k: v for k, v in options.items() if k in names})
        accepted += [n for n in names if n not in accepted]
    unknown = set(options) - set(accepted)
    if unknown:
        raise ConfigError(unknown_options("", unknown, accepted))
    return parts


# --- the command line ------------------------------------------------------------------------------------------------

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
              help: Mapping[str, str] | None = None) -> None:
    """One flag per field of ``config`` (all of its command-line fields, or ``names``): ``--num-samples`` for
    ``num_samples``, typed, with its choices, ``--x/--no-x`` for bools, several values for tuples, and the
    declared help with the default. Absent flags stay absent from the parsed namespace (the config's default
    applies), so only what the user typed reaches the API. ``help`` replaces the help of some fields."""
    kinds = config._kind_of()
    for name in names if names is not None else [n for n in config.names() if config.spec(n).flag]:
        spec, kind, default = config.spec(name), kinds[name], config.default(name)
        text = (help or {}).get(name, spec.help).replace("%", "%%")  # argparse %-formats help ("95 % interval")
        if default is dataclasses.MISSING:
            shown = "required"
        else:
            shown = "default: " + (spec.none if default is None and spec.none else _show(default))
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": f"{text} ({shown})"}
        if spec.items is not None:  # a mapping of another config's fields: one NAME=VALUE flag per entry
            flag = "--" + name.replace("_", "-").removesuffix("s")
            kwargs.update(action=_Assignments, config=spec.items, metavar=spec.metavar or "NAME=VALUE",
                          dest=name, help=f"{text}; repeat the flag for several ({shown})")
            parser.add_argument(flag, **kwargs)
            continue
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
