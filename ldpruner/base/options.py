"""Options declared once: every knob of every stage is a field of a frozen config dataclass that says its default,
what it means and which values it takes. From that one declaration come

* validation — :meth:`Config.__post_init__` checks every field against its type annotation and its :class:`Spec`
  (choices, bounds), adds the config's own cross-field rules (:meth:`Config.problems`), and raises one
  :class:`~ldpruner.base.errors.ConfigError` that lists every problem;
* construction from data — :meth:`Config.from_dict` (TOML, JSON, keyword arguments) refuses unknown keys by name;
* the command line — :func:`ldpruner.base.flags.add_flags` makes one flag per field, with the field's type, choices,
  default and help.

A config that composes others (a build runs every stage) holds them whole, as sections (:func:`section`): the
build's ``analysis`` is an ``AnalysisConfig``, made and validated once. Its *flat names* — the section's fields,
prefixed where a section says so (``distill_steps`` is ``distill.steps``), and the composing config's own fields —
are what the command line, keyword arguments and flat config-file keys use, so a new field of a section reaches
every command that holds the section with no other edit; a name two sections declare is resolved by the composing
config's one table (``clashes``), and an unresolved one is an error when the class is first used. Part of the base
layer: standard library only.
"""

from __future__ import annotations

import contextvars
import dataclasses
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar

from ldpruner.base.errors import ConfigError
from ldpruner.base.values import Kind, check, kind_of, number, short_repr, unknown_options

__all__ = ["Config", "Inherited", "Section", "Spec", "option", "section"]

_META = "ldpruner.option"
_SECTION = "ldpruner.section"
# while a composed config builds its sections: their problems are collected here, under their flat names
# (the section's config class, where its problems go / how its fields are named): a config that config builds
# inside itself (ExportConfig's Tolerances) neither reports twice nor is renamed
_COLLECT: contextvars.ContextVar[tuple[type, list[str]] | None] = contextvars.ContextVar("ldpruner_collect",
                                                                                         default=None)
_NAMING: contextvars.ContextVar[tuple[type, Callable[[str], str]] | None] = contextvars.ContextVar("ldpruner_naming",
                                                                                      default=None)


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

    def bounds_text(self) -> str | None:
        lo, hi = self.minimum, self.maximum
        if lo is not None and hi is not None:
            return (f"in {'(' if self.exclusive_minimum else '['}{number(lo)}, {number(hi)}"
                    f"{')' if self.exclusive_maximum else ']'}")
        if lo is not None:
            return f"{'>' if self.exclusive_minimum else '>='} {number(lo)}"
        if hi is not None:
            return f"{'<' if self.exclusive_maximum else '<='} {number(hi)}"
        return None

    def within(self, value: float) -> bool:
        if self.minimum is not None and (value <= self.minimum if self.exclusive_minimum else value < self.minimum):
            return False
        if self.maximum is not None and (value >= self.maximum if self.exclusive_maximum else value > self.maximum):
            return False
        return True




def option(default: Any = dataclasses.MISSING, help: str = "", *, default_factory: Any = dataclasses.MISSING,
           **spec: Any) -> Any:
    """A dataclass field with its default and its :class:`Spec` (``help`` and the keywords of Spec)."""
    meta = {_META: Spec(help=help, **spec)}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class Section:
    """A field of a composed config that holds a whole config (``config``).

    ``prefix``: the section's flat names are ``<prefix>_<field>`` (``distill_steps``); ``only``: the fields the
    composed config exposes by flat name (None: all; the others keep their defaults unless given in the section's
    own table of a config file); ``hide``: fields not exposed, every other one is (a field added to the config
    later is exposed with no edit here); ``defaults``: other defaults in this composition; ``inherit``: field → the
    section whose field of the same name is its default when it is not given (the distillation's seed is the
    analysis' seed); ``label``: put before each field's help on the command line."""

    config: type[Config]
    prefix: str = ""
    only: tuple[str, ...] | None = None
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    inherit: Mapping[str, str] = dataclasses.field(default_factory=dict)
    label: str = ""
    hide: tuple[str, ...] = ()

    def exposed(self) -> tuple[str, ...]:
        names = self.only if self.only is not None else self.config.names()
        return tuple(n for n in names if n not in self.hide)

    def flat(self, name: str) -> str:
        return f"{self.prefix}_{name}" if self.prefix else name


def section(config: type[Config], *, prefix: str = "", only: Sequence[str] | None = None,
            defaults: Mapping[str, Any] | None = None, inherit: Mapping[str, str] | None = None,
            label: str = "", hide: Sequence[str] = ()) -> Any:
    """A dataclass field holding a whole ``config`` (see :class:`Section`); its default is ``config(**defaults)``."""
    spec = Section(config, prefix, tuple(only) if only is not None else None, dict(defaults or {}),
                   dict(inherit or {}), label, tuple(hide))
    return dataclasses.field(default_factory=lambda: config(**spec.defaults), metadata={_SECTION: spec})


class Config:
    """Base of the frozen option dataclasses: one validator, ``to_dict`` / ``from_dict``, declarations by name.

    Subclasses are ``@dataclasses.dataclass(frozen=True)`` whose fields are made with :func:`option` or, for a whole
    config held as a section, :func:`section`, and may add cross-field rules in :meth:`problems`."""

    _kinds: ClassVar[dict[str, Kind]]
    # a composed config: flat name -> the section it means, for names several sections declare
    clashes: ClassVar[Mapping[str, str]] = {}
    # a composed config: keys whose value is a mapping of one section's fields (``distill_options``), kept for the
    # command lines and config files that use them (the flag is ``--distill-option NAME=VALUE``)
    mappings: ClassVar[Mapping[str, str]] = {}
    label: ClassVar[str | None] = None  # how an unknown-option error names the config (None: the class name)

    def __post_init__(self) -> None:
        problems = self._section_problems() + self._field_problems()
        if not problems:
            problems = list(self.problems())
        if problems:
            collector = _COLLECT.get()
            if collector is not None and collector[0] is type(self):
                collector[1].extend(problems)
            raise ConfigError(f"invalid {type(self).__name__}: " + "; ".join(problems))
        self._inherit()

    def _inherit(self) -> None:
        """Each section field that follows another section's (``Section.inherit``) takes its value there, unless it
        was set on purpose (:meth:`given`) — however the config was made."""
        for name, spec in self.sections().items():
            if not spec.inherit:
                continue
            part = getattr(self, name)
            given = part.given()
            updates = {field: getattr(getattr(self, source), field) for field, source in spec.inherit.items()
                       if field not in given and getattr(part, field) != getattr(getattr(self, source), field)}
            if updates:
                object.__setattr__(self, name, part.replace(**updates))

    def _section_problems(self) -> list[str]:
        problems = []
        for name, spec in self.sections().items():
            value = getattr(self, name)
            if isinstance(value, Mapping):  # a section given as a table of its fields
                try:
                    value = spec.config.from_dict(value)
                except ConfigError as exc:
                    problems.append(f"{name}: {exc}")
                    continue
                object.__setattr__(self, name, value)
            elif not isinstance(value, spec.config):
                problems.append(f"{name}={short_repr(value)} must be a {spec.config.__name__} or a mapping of its "
                                "fields")
        return problems

    def problems(self) -> Iterable[str]:
        """Rules between fields, checked once every field is valid on its own; one message per broken rule."""
        return ()

    @classmethod
    def _kind_of(cls) -> dict[str, Kind]:
        if "_kinds" not in cls.__dict__:
            hints = typing.get_type_hints(cls)
            kinds = {f.name: kind_of(hints[f.name]) for f in dataclasses.fields(cls)}
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
        scoped = _NAMING.get()
        naming = scoped[1] if scoped is not None and scoped[0] is type(self) else (lambda name: name)
        for f in dataclasses.fields(self):
            spec = f.metadata.get(_META)
            if spec is None:
                continue
            value = getattr(self, f.name)
            kind = kinds[f.name]
            problem, converted = check(naming(f.name), value, kind, spec)
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

    @classmethod
    def sections(cls) -> dict[str, Section]:
        """The fields that hold whole configs, in declaration order."""
        return {f.name: f.metadata[_SECTION] for f in dataclasses.fields(cls) if _SECTION in f.metadata}

    @classmethod
    def options(cls) -> tuple[str, ...]:
        """The config's own option fields (not its sections)."""
        return tuple(f.name for f in dataclasses.fields(cls) if _META in f.metadata)

    @classmethod
    def flat(cls) -> dict[str, tuple[str | None, str]]:
        """Every flat name → (the section it belongs to, or None for an own field; the field's name there). An own
        field wins over a section's field of the same name; a name two sections expose must be in ``clashes``."""
        if "_flat" not in cls.__dict__:
            table: dict[str, tuple[str | None, str]] = {name: (None, name) for name in cls.options()}
            claims: dict[str, list[str]] = {}
            for name, spec in cls.sections().items():
                for field_name in spec.exposed():
                    claims.setdefault(spec.flat(field_name), []).append(name)
            shadowing = sorted(n for n in table if n in claims)
            if shadowing:
                raise TypeError(f"{cls.__name__}: own options named like a section's field: {shadowing}")
            idle = sorted(n for n, owner in cls.clashes.items() if len(claims.get(n, ())) < 2 or owner not in claims[n])
            if idle:
                raise TypeError(f"{cls.__name__}: clashes entries that resolve no clash between its sections: {idle}")
            unresolved = []
            for flat, owners in claims.items():
                owner = cls.clashes.get(flat) if len(owners) > 1 else owners[0]
                if owner is None or owner not in owners:
                    unresolved.append(f"{flat} ({', '.join(owners)})")
                    continue
                spec = cls.sections()[owner]
                table[flat] = (owner, flat.removeprefix(spec.prefix + "_") if spec.prefix else flat)
            shadowed = sorted(set(table) & set(cls.sections()))
            if shadowed:
                raise TypeError(f"{cls.__name__}: sections named like a flat name: {shadowed}")
            if unresolved:
                raise TypeError(f"{cls.__name__}: flat names several sections declare: {', '.join(unresolved)}; "
                                "say which section each means in clashes")
            cls._flat = table
        return cls._flat  # type: ignore[attr-defined]

    @classmethod
    def flat_spec(cls, flat: str) -> tuple[Spec, Any]:
        """(the declaration, the default in this config) of a flat name."""
        owner, name = cls.flat()[flat]
        if owner is None:
            return cls.spec(name), cls.default(name)
        spec = cls.sections()[owner]
        if name in spec.defaults:
            return spec.config.spec(name), spec.defaults[name]
        if name in spec.inherit:
            return spec.config.spec(name), Inherited(spec.inherit[name])
        return spec.config.spec(name), spec.config.default(name)

    def given(self) -> frozenset[str]:
        """The fields set on purpose: the keys :meth:`from_dict` was given, else those that differ from their
        default."""
        given = self.__dict__.get("_given")
        if given is not None:
            return given
        try:  # the defaults as the config resolves them (a learning rate that follows the optimizer, say)
            base = type(self)()
        except (TypeError, ConfigError):  # a config with required fields
            base = None
        return frozenset(name for name in self.options() if getattr(self, name) != (
            getattr(base, name) if base is not None else self.default(name)))

    def replace(self, *, on_purpose: Iterable[str] = (), **changes: Any) -> Any:
        """``dataclasses.replace`` that keeps what was set on purpose (:meth:`given`), plus ``on_purpose``."""
        changed = dataclasses.replace(self, **changes)
        object.__setattr__(changed, "_given", self.given() | frozenset(on_purpose))
        return changed

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
        option when it is close to none). A composed config takes flat names, sections as tables of their fields
        (``{"analysis": {"num_samples": 8}}``) and its ``mappings``, in any mix; a field given twice is an error."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{cls.__name__} options must be a mapping, got {type(data).__name__}")
        if not cls.sections():
            unknown = set(data) - set(cls.names())
            if unknown:
                what = f"{cls.__name__} " if cls.label is None else cls.label
                raise ConfigError(unknown_options(what, unknown, cls.names()))
            config = cls(**data)
            object.__setattr__(config, "_given", frozenset(data))
            return config
        return cls._compose(data)

    @classmethod
    def nest(cls, data: Mapping[str, Any]) -> dict[str, Any]:
        """A composed config's options in one form: own fields at the top, each section as a table of the fields
        given (flat names, section tables and ``mappings`` in any mix; a field given twice, an unknown key, a
        section that is not a table: one ConfigError)."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{cls.__name__} options must be a mapping, got {type(data).__name__}")
        sections, flat = cls.sections(), cls.flat()
        nested: dict[str, Any] = {}
        problems: list[str] = []
        unknown = []
        said: dict[tuple[str, str], str] = {}  # (section, field) -> how the user named it

        def put(owner: str, name: str, value: Any, how: str) -> None:
            if (owner, name) in said:
                problems.append(f"{said[owner, name]} and {how} both set {owner}'s {name}: give it once")
            said[owner, name] = how
            nested.setdefault(owner, {})[name] = value

        def fields_of(key: str, owner: str, value: Any) -> Mapping[str, Any]:
            spec = sections[owner]
            if isinstance(value, spec.config):
                value = {name: getattr(value, name) for name in value.given()}
            if not isinstance(value, Mapping):
                problems.append(f"{key} must be a mapping of {spec.config.__name__} fields, got {short_repr(value)}")
                return {}
            bad = set(value) - set(spec.config.names())
            if bad:
                problems.append(f"{key}: " + unknown_options(f"{spec.config.__name__} ", bad, spec.config.names()))
                return {}
            # a field another section (or the config itself) decides, or one this config does not take, is refused
            # rather than ignored: the analysis samples at the trace's size, bench's budgets are its own …
            default = spec.config(**spec.defaults)  # (a report records every field: those at their default pass)
            elsewhere = sorted(name for name in value if flat.get(spec.flat(name)) != (owner, name)
                               and value[name] != getattr(default, name) and value[name] != default.to_dict()[name])
            for name in elsewhere:
                routed = flat.get(spec.flat(name))
                instead = (f"; give {spec.flat(name)}" + (f" ({routed[0]}'s {routed[1]})" if routed[0] else "")
                           if routed else "")
                problems.append(f"{key}: {cls.__name__} does not take {owner}'s {name} here{instead}")
            return {name: item for name, item in value.items() if name not in elsewhere}

        for key, value in data.items():
            if key in sections:
                for name, item in fields_of(key, key, value).items():
                    put(key, name, item, f"{key}.{name}")
            elif key in cls.mappings:
                if value is None:
                    continue
                owner = cls.mappings[key]
                for name, item in fields_of(key, owner, value).items():
                    put(owner, name, item, f"{key} {name}")
            elif key in flat:
                owner, name = flat[key]
                if owner is None:
                    nested[name] = value
                else:
                    put(owner, name, value, key)
            else:
                unknown.append(key)
        if unknown:
            # a composed config has many: its flags' names, and its sections by name
            listing = (f"the command's flags by name (--num-samples is num_samples; see its --help), and the "
                       f"sections {', '.join(sections)} as tables of their fields" if len(flat) > 20 else None)
            raise ConfigError(unknown_options(f"{cls.__name__} " if cls.label is None else cls.label, unknown,
                                              [*flat, *sections, *cls.mappings], listing))
        if problems:
            raise ConfigError(f"invalid {cls.__name__}: " + "; ".join(problems))
        return nested

    @classmethod
    def _compose(cls, data: Mapping[str, Any]) -> Any:
        """The composed config of ``data``: each section made once, from its defaults and what was given (the
        fields that follow another section's are set by :meth:`_inherit`); the problems of the config and of every
        section in one ConfigError, a section's under their flat names."""
        nested = cls.nest(data)
        sections = cls.sections()
        own = {k: v for k, v in nested.items() if k not in sections}
        missing = [name for name in cls.options() if name not in own and cls.default(name) is dataclasses.MISSING]
        if missing:
            raise ConfigError(f"{cls.__name__} needs {' and '.join(missing)} (a flag, a keyword or a config-file key)")
        built: dict[str, Any] = {}
        problems: list[str] = []
        for name, spec in sections.items():
            given = nested.get(name, {})
            collected: list[str] = []
            token = _COLLECT.set((spec.config, collected))
            naming = _NAMING.set((spec.config, spec.flat))
            try:
                built[name] = spec.config(**{**spec.defaults, **given})
                object.__setattr__(built[name], "_given", frozenset(given))
            except ConfigError as exc:
                # a rule between fields names them as the section does: say which section (distill: w_out, ...)
                problems += [p if not spec.prefix or p.startswith(spec.prefix + "_") else f"{spec.prefix}: {p}"
                             for p in collected or [str(exc)]]
                built[name] = spec.config(**spec.defaults)  # a stand-in, so that the own options are checked too
            finally:
                _COLLECT.reset(token)
                _NAMING.reset(naming)
        collected = []
        token = _COLLECT.set((cls, collected))
        try:
            config = cls(**own, **built)
        except ConfigError as exc:
            problems = (collected or [str(exc)]) + problems
        finally:
            _COLLECT.reset(token)
        if problems:
            raise ConfigError(f"invalid {cls.__name__}: " + "; ".join(problems))
        object.__setattr__(config, "_given", frozenset(own))
        return config


@dataclasses.dataclass(frozen=True)
class Inherited:
    """The default of a field that follows another section's field of the same name."""

    source: str
