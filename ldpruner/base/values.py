"""What an option's value must be, and how a value is quoted in a message: the kinds read from type annotations
(int, float, bool, str, tuple[T, ...], optionally | None), the check of one value against its kind and declaration,
and short quotes for one-line errors. Part of the base layer: standard library only.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import reprlib
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = ["Kind", "check", "kind_of", "number", "short_repr", "unknown_options"]


def number(x: float) -> str:
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


def unknown_options(what: str, unknown: Iterable[Any], known: Sequence[str], listing: str | None = None) -> str:
    """The message for keys no option is called: each with the known name it is closest to ("did you mean"); every
    known name, compactly (or ``listing`` in their place), only when some key is close to none. ``what`` names the
    config ("BuildConfig ") or is empty."""
    unknown = sorted(unknown, key=str)
    close = {key: difflib.get_close_matches(str(key).replace("-", "_"), known, n=1, cutoff=0.6) for key in unknown}
    if len(unknown) == 1 and close[unknown[0]]:
        return f"unknown {what}option {short_repr(unknown[0])}; did you mean {close[unknown[0]][0]!r}?"
    shown = [f"{short_repr(key)}" + (f" (did you mean {close[key][0]!r}?)" if close[key] else "")
             for key in unknown[:_SHOWN_ITEMS]]
    more = f" and {len(unknown) - _SHOWN_ITEMS} more" if len(unknown) > _SHOWN_ITEMS else ""
    text = f"unknown {what}option{'s' if len(unknown) > 1 else ''} {', '.join(shown)}{more}"
    if not all(close[key] for key in unknown):
        text += f"; the options are {listing or ', '.join(sorted(known))}"
    return text



# --- types -----------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Kind:
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


def kind_of(annotation: Any) -> Kind:
    optional = False
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        optional = len(rest) < len(args)
        annotation = rest[0] if len(rest) == 1 else None
        args = typing.get_args(annotation)
    if annotation in (int, float, bool, str):
        return Kind(annotation, optional)
    if typing.get_origin(annotation) is tuple and len(args) == 2 and args[1] is Ellipsis:
        return Kind(tuple, optional, args[0])
    origin = typing.get_origin(annotation) or annotation
    is_mapping = isinstance(origin, type) and issubclass(origin, Mapping)
    return Kind(None, optional, label="a mapping" if is_mapping else "a value")


def scalar(value: Any, base: Any) -> tuple[bool, Any]:
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


def check(name: str, value: Any, kind: Kind, spec: Any) -> tuple[str | None, Any]:
    """(problem or None, the value converted to its declared type); ``spec``: the field's
    :class:`~ldpruner.base.options.Spec`."""
    if value is None:
        return (None, value) if kind.optional else (f"{name}=None must be {kind.describe()}", value)
    if kind.base is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            return f"{name}={short_repr(value)} must be {kind.describe()}", value
        items = []
        for item in value:
            ok, item = scalar(item, kind.element)
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
    ok, converted = scalar(value, kind.base)
    if not ok:
        return f"{name}={short_repr(value)} must be {kind.describe()}", value
    if spec.nonempty and converted == "":
        return f"{name}='' must not be empty", value
    if spec.choices is not None and converted not in spec.choices:
        return f"{name}={short_repr(value)} is not one of {list(spec.choices)}", value
    if isinstance(converted, (int, float)) and not isinstance(converted, bool) and not spec.within(converted):
        return f"{name}={short_repr(value)} must be {spec.bounds_text()}", value
    return None, converted
