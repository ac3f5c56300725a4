"""KV spec strings: what the KV manager stores (compaction) and what it attends (retrieval).

Grammar: ``STAGE[+STAGE]`` where ``STAGE = NAME[:KEY=VALUE[,KEY=VALUE...]]``.
At most one compaction stage (``full``, ``streaming``, ``h2o``, ``snapkv``, ``kvcrush``) and
at most one retrieval stage (``freekv``, ``quest``), e.g.
``kvcrush:budget=0.5,base=snapkv+freekv:budget=1024``.

This module only splits the text; each stage's keys and values are checked by the class that
builds it (``kv.policies.build_policy``, ``kv.freekv.build_retrieval``), which knows its keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field

COMPACTION_NAMES = ("full", "streaming", "h2o", "snapkv", "kvcrush")
RETRIEVAL_NAMES = ("freekv", "quest")


class KVSpecError(ValueError):
    """A KV spec string that cannot be used; the message says what to write instead."""


@dataclass(frozen=True)
class Stage:
    """One ``name:key=value,...`` part of a spec."""

    name: str
    params: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        if not self.params:
            return self.name
        return self.name + ":" + ",".join(f"{k}={v}" for k, v in self.params.items())


@dataclass(frozen=True)
class KVSpec:
    """A parsed spec: an optional compaction stage and an optional retrieval stage."""

    compaction: Stage | None = None
    retrieval: Stage | None = None

    @property
    def is_full(self) -> bool:
        """True when every token is stored and attended (the reference behaviour)."""
        return (self.compaction is None or self.compaction.name == "full") and self.retrieval is None

    def __str__(self) -> str:
        parts = [str(s) for s in (self.compaction, self.retrieval) if s is not None]
        return "+".join(parts) or "full"


def _parse_stage(text: str) -> Stage:
    name, _, rest = text.partition(":")
    name = name.strip().lower()
    if name not in COMPACTION_NAMES + RETRIEVAL_NAMES:
        raise KVSpecError(
            f"unknown KV policy {name!r} in {text!r}; use one of "
            f"{', '.join(COMPACTION_NAMES + RETRIEVAL_NAMES)} (e.g. 'snapkv:budget=0.25')"
        )
    params: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip().lower()
        if not eq or not key or not value.strip():
            raise KVSpecError(f"malformed option {item!r} in {text!r}; write KEY=VALUE, e.g. budget=0.25")
        if key in params:
            raise KVSpecError(f"option {key!r} given twice in {text!r}")
        params[key] = value.strip()
    return Stage(name, params)


def parse_kv_spec(spec: str | KVSpec | None) -> KVSpec:
    """Parse ``spec`` (``None`` or ``""`` mean ``full``)."""
    if isinstance(spec, KVSpec):
        return spec
    if spec is None or not spec.strip():
        return KVSpec()
    compaction = retrieval = None
    for part in spec.split("+"):
        if not part.strip():
            raise KVSpecError(f"empty stage in KV spec {spec!r}; join stages with a single '+'")
        stage = _parse_stage(part.strip())
        if stage.name in COMPACTION_NAMES:
            if compaction is not None:
                raise KVSpecError(f"two compaction stages in {spec!r}; combine at most one of "
                                  f"{', '.join(COMPACTION_NAMES)} with one of {', '.join(RETRIEVAL_NAMES)}")
            compaction = stage
        else:
            if retrieval is not None:
                raise KVSpecError(f"two retrieval stages in {spec!r}; use one of {', '.join(RETRIEVAL_NAMES)}")
            retrieval = stage
    if compaction is not None and compaction.name == "full" and compaction.params:
        raise KVSpecError(f"'full' takes no options (got {compaction}); write just 'full'")
    return KVSpec(compaction, retrieval)


def parse_budget(value: str, what: str = "budget") -> float | int:
    """A budget is a token count (``1024``) or a fraction of the context (``0.25``)."""
    try:
        number = float(value)
    except ValueError:
        raise KVSpecError(f"{what}={value!r} is not a number; give a token count (1024) or a fraction (0.25)") from None
    if number <= 0:
        raise KVSpecError(f"{what}={value} must be positive")
    if number < 1:
        return number
    if number != int(number):
        raise KVSpecError(f"{what}={value}: a token count must be a whole number, a fraction must be below 1")
    return int(number)


def resolve_budget(budget: float | int, context: int) -> int:
    """Token count for ``budget`` at ``context`` tokens (fractions round to nearest, at least 1)."""
    if isinstance(budget, float):
        return max(1, round(budget * context))
    return budget
