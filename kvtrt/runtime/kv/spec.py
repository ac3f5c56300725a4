"""KV specs: what the KV manager stores (compaction) and what it attends (retrieval).

Grammar: ``STAGE[+STAGE]`` where ``STAGE = NAME[:KEY=VALUE[,KEY=VALUE...]]``.
At most one compaction stage (``full``, ``streaming``, ``h2o``, ``snapkv``, ``kvcrush``, ``adakv``) and
at most one retrieval stage (``freekv``, ``quest``), e.g.
``kvcrush:budget=0.5,base=snapkv+freekv:budget=1024``.

``parse_kv_spec`` returns a ``KVSpec`` of typed stages: ``compaction`` is the policy itself
(``kv.policies``, ``None`` for ``full``) and ``retrieval`` a ``kv.retrieval.RetrievalConfig``.
Every option is checked here, once, by the stage class that declares it (``kv.options``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .options import KVSpecError, SpecStage
from .policies import POLICIES, Policy
from .retrieval import RETRIEVAL_MODES, RetrievalConfig

__all__ = ["KVSpec", "KVSpecError", "StageText", "parse_kv_spec", "parse_stage", "split_kv_spec",
           "COMPACTION_NAMES", "RETRIEVAL_NAMES"]

COMPACTION_NAMES = ("full", *POLICIES)
RETRIEVAL_NAMES = RETRIEVAL_MODES
STAGES: dict[str, type[SpecStage]] = {**POLICIES, **{mode: RetrievalConfig for mode in RETRIEVAL_MODES}}
KINDS = {"compaction": COMPACTION_NAMES, "retrieval": RETRIEVAL_NAMES}


@dataclass(frozen=True)
class StageText:
    """One ``name:key=value,...`` part of a spec as written (syntax only, nothing checked)."""

    name: str
    params: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        if not self.params:
            return self.name
        return self.name + ":" + ",".join(f"{k}={v}" for k, v in self.params.items())


@dataclass(frozen=True)
class KVSpec:
    """A parsed spec: an optional compaction policy and an optional retrieval config."""

    compaction: Policy | None = None
    retrieval: RetrievalConfig | None = None

    @property
    def is_full(self) -> bool:
        """True when every token is stored and attended (the reference behaviour)."""
        return self.compaction is None and self.retrieval is None

    def __str__(self) -> str:
        parts = [str(s) for s in (self.compaction, self.retrieval) if s is not None]
        return "+".join(parts) or "full"


def _split_stage(text: str) -> StageText:
    name, _, rest = text.partition(":")
    name = name.strip().lower()
    params: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip().lower()
        if not eq or not key or not value.strip():
            raise KVSpecError(f"malformed option {item!r} in {text!r}; write KEY=VALUE, e.g. budget=0.25")
        if key in params:
            raise KVSpecError(f"option {key!r} given twice in {text!r}")
        params[key] = value.strip()
    return StageText(name, params)


def split_kv_spec(text: str) -> list[StageText]:
    """The stages of ``text`` as written (syntax only: ``kvtrt eval`` fills in budgets before parsing)."""
    if not text.strip():
        return []
    parts = text.split("+")
    if not all(p.strip() for p in parts):
        raise KVSpecError(f"empty stage in KV spec {text!r}; join stages with a single '+'")
    return [_split_stage(p.strip()) for p in parts]


def _kind(stage: StageText) -> str:
    """``compaction`` or ``retrieval``; an unknown name is refused."""
    for kind, names in KINDS.items():
        if stage.name in names:
            return kind
    raise KVSpecError(f"unknown KV policy {stage.name!r} in {str(stage)!r}; use one of "
                      f"{', '.join(COMPACTION_NAMES + RETRIEVAL_NAMES)} (e.g. 'snapkv:budget=0.25')")


def parse_stage(text: str | StageText, kind: str | None = None) -> SpecStage | None:
    """One stage: its policy or retrieval config (``None`` for ``full``). ``kind`` (``compaction``
    or ``retrieval``) refuses the other kind's names."""
    stage = _split_stage(text) if isinstance(text, str) else text
    name, where = stage.name, str(stage)
    actual = _kind(stage)
    if kind is not None and actual != kind:
        raise KVSpecError(f"{name!r} is not a {kind} policy; use one of {', '.join(KINDS[kind])}")
    if name == "full":
        if stage.params:
            raise KVSpecError(f"'full' takes no options (got {where}); write just 'full'")
        return None
    cls = STAGES[name]
    valid = cls.option_names(name, stage.params, where)
    for key in stage.params:
        if key not in valid:
            elsewhere = [other for other, c in STAGES.items()
                         if other != name and key in c.option_names(other, {}, where)]
            also = f" (an option of {', '.join(elsewhere)})" if elsewhere else ""
            raise KVSpecError(f"unknown option {key!r} for {name} in {where!r}{also}; valid options: {', '.join(valid)}")
    result = cls.read(name, stage.params, where)
    result.check(where)
    return result


def parse_kv_spec(spec: str | KVSpec | None) -> KVSpec:
    """Parse and check ``spec`` (``None`` or ``""`` mean ``full``); a ``KVSpec`` is returned as is."""
    if isinstance(spec, KVSpec):
        return spec
    stages = split_kv_spec(spec or "")
    kinds = [_kind(stage) for stage in stages]
    if kinds.count("compaction") > 1:
        raise KVSpecError(f"two compaction stages in {spec!r}; combine at most one of {', '.join(COMPACTION_NAMES)} "
                          f"with one of {', '.join(RETRIEVAL_NAMES)}")
    if kinds.count("retrieval") > 1:
        raise KVSpecError(f"two retrieval stages in {spec!r}; use one of {', '.join(RETRIEVAL_NAMES)}")
    typed = {kind: parse_stage(stage) for kind, stage in zip(kinds, stages)}
    compaction, retrieval = typed.get("compaction"), typed.get("retrieval")
    if compaction is not None and compaction.per_head_counts and retrieval is not None:
        raise KVSpecError(f"{compaction.name} keeps a different number of tokens per KV head, which {retrieval.name}'s "
                          f"pages cannot hold, in {spec!r}; combine {retrieval.name} with snapkv, h2o or kvcrush, or "
                          f"use {compaction.name} alone")
    return KVSpec(compaction, retrieval)
