"""The options of a KV spec stage, declared once on its dataclass fields.

A stage class (a compaction policy, the retrieval config) declares each option it accepts as a
field made with ``option(default, kind, ...)``: its default, its kind (``whole``, ``budget``,
``fraction``, ``choice``) and its range. ``SpecStage`` reads those fields to turn a stage's
``key=value`` text into the typed object (``read``), to check it (``check``, one ``KVSpecError``
path whose messages say what to write instead) and to render it back (``str``), so the text a
user wrote and the object the runtime runs are always one thing.
"""

from __future__ import annotations

from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any, ClassVar

KINDS = ("whole", "budget", "fraction", "choice")


class KVSpecError(ValueError):
    """A KV spec that cannot be used; the message says what to write instead."""


@dataclass(frozen=True)
class Option:
    """How one option is read from text. ``stages``: the stage names that accept it (all if empty);
    ``required``: no default (budgets only); ``example``: the value error messages suggest (default:
    the field's default); ``hint``: what to write instead, where the generic advice says too little."""

    kind: str
    minimum: int = 0
    choices: tuple[str, ...] = ()
    required: bool = False
    stages: tuple[str, ...] = ()
    example: Any = None
    hint: str | None = None


def option(default: Any, kind: str, **how: Any) -> Any:
    """A dataclass field that is also a spec option (see ``Option`` for ``how``)."""
    if kind not in KINDS:
        raise ValueError(f"option kind {kind!r}; use one of {', '.join(KINDS)}")
    return field(default=default, metadata={"option": Option(kind, **how)})


def read_value(key: str, text: str, how: Option, default: Any, where: str) -> Any:
    """The typed value of ``key=text`` in the stage ``where``; a ``KVSpecError`` says what to write instead."""
    default = default if how.example is None else how.example

    def bad(shown: str, problem: str, fix: str) -> KVSpecError:
        return KVSpecError(f"{key}={shown} {problem} in {where!r}; {how.hint or fix}")

    if how.kind == "choice":
        value = text.lower()
        if value not in how.choices:
            raise KVSpecError(f"unknown {key} {value!r} in {where!r}; use one of {', '.join(how.choices)}")
        return value
    if how.kind == "whole":
        try:
            value = int(text)
        except ValueError:
            raise bad(repr(text), "is not a whole number", f"e.g. {key}={default}") from None
        if value < how.minimum:
            raise bad(str(value), f"must be at least {how.minimum}", f"e.g. {key}={default}")
        return value
    fix = f"give a fraction such as {key}={default}" if how.kind == "fraction" else \
        f"give a token count ({key}=1024) or a fraction of the context ({key}=0.25)"
    try:
        number = float(text)
    except ValueError:
        raise bad(repr(text), "is not a number", fix) from None
    if how.kind == "fraction":
        if not 0.0 <= number <= 1.0:
            raise bad(text, "is outside [0, 1]", fix)
        return number
    if number <= 0:
        raise bad(text, "must be positive", fix)
    if number >= 1 and number != int(number):
        raise bad(text, "is neither a token count nor a fraction", "a token count is a whole number, a fraction "
                  "is below 1")
    return number if number < 1 else int(number)


def format_value(value: Any) -> str:
    """How a typed option value is written in a spec (the parser reads it back to the same value)."""
    if isinstance(value, SpecStage):
        return value.name
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    return str(value)


def resolve_budget(budget: float | int, context: int) -> int:
    """Token count for ``budget`` at ``context`` tokens (fractions round to nearest, at least 1)."""
    if isinstance(budget, float):
        return max(1, round(budget * context))
    return budget


@dataclass(frozen=True)
class SpecStage:
    """Base of a stage dataclass. ``written``: the options the spec text gave, in its order
    (``None`` for an object built in Python); ``str`` renders those, so a spec reads as written."""

    name: ClassVar[str]
    written: tuple[str, ...] | None = field(default=None, kw_only=True, compare=False, repr=False)

    @classmethod
    def option_fields(cls, name: str) -> dict[str, tuple[Field, Option]]:
        """The options stage ``name`` accepts, in declaration order."""
        return {f.name: (f, f.metadata["option"]) for f in fields(cls)
                if "option" in f.metadata and (not f.metadata["option"].stages or name in f.metadata["option"].stages)}

    @classmethod
    def option_names(cls, name: str, params: dict[str, str], where: str) -> tuple[str, ...]:
        """The option keys stage ``name`` accepts given its ``params`` (a KVCrush base adds its own)."""
        return tuple(cls.option_fields(name))

    @classmethod
    def read(cls, name: str, params: dict[str, str], where: str, **fixed: Any) -> SpecStage:
        """The stage object for ``params`` (known keys only), each value read by its field's option."""
        values = dict(fixed)
        for key, (f, how) in cls.option_fields(name).items():
            if key in params:
                values[key] = read_value(key, params[key], how, f.default, where)
            elif how.required:  # a budget
                raise KVSpecError(f"{name} needs a {key} in {where!r}; add {key}=0.25 (a fraction of the context) "
                                  f"or {key}=1024 (tokens)")
        return cls(**values, written=tuple(params))

    def check(self, where: str) -> None:
        """Rules between options (ranges of single options are checked by ``read``)."""

    def option_items(self) -> list[tuple[str, Any, Any]]:
        """``(key, value, default)`` of every option of this stage."""
        return [(key, getattr(self, key), f.default if f.default is not MISSING else None)
                for key, (f, _) in self.option_fields(self.name).items()]

    def given(self, key: str) -> bool:
        """Whether option ``key`` was set: written in the spec, or (built in Python) not its default."""
        if self.written is not None:
            return key in self.written
        return any(k == key and format_value(v) != format_value(d) for k, v, d in self.option_items())

    def __str__(self) -> str:
        values = {key: value for key, value, _ in self.option_items()}
        keys = self.written if self.written is not None else [k for k, _, _ in self.option_items() if self.given(k)]
        return self.name + "".join((":" if i == 0 else ",") + f"{k}={format_value(values[k])}" for i, k in enumerate(keys))
