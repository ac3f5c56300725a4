"""Compaction policies: which stored KV slots to keep when the cache exceeds its budget.

Each policy is a small class with one scoring method (``token_scores``); ``Policy.select`` turns
scores into kept slot indices. Build one from a spec stage with ``build_policy``::

    policy = build_policy(parse_kv_spec("kvcrush:budget=0.25,base=snapkv").compaction)
    keep = policy.budget_tokens(context)          # tokens to keep, per KV head
    kept = policy.select(scores, keep)            # LongTensor [Hkv, keep]

``scores`` is ``[Hkv, N]`` float: the attention mass each stored slot received, per KV head.
Slots are in position order, so the *sink* is the first ``sink`` slots and the *window* the last
``window`` slots; both are always kept and count inside the budget. Everything is deterministic:
ties are broken by slot index and KVCrush's random anchor comes from its ``seed``.

Specs (defaults in brackets)::

    streaming:[sink=4,]window=N            budget = sink+window (or budget=B: sink + latest B-sink)
    h2o:budget=B[,sink=4,window=32]
    snapkv:budget=B[,sink=4,window=32,kernel=5,pool=avg|max]
    kvcrush:budget=B[,base=snapkv,ratio=0.25,anchor=random,granularity=token,page=32,seed=0]
            plus the base's own keys (sink, window, kernel, pool)

A budget is a token count (``1024``) or a fraction of the context (``0.25``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from .spec import COMPACTION_NAMES, KVSpecError, Stage, parse_budget, resolve_budget

ANCHORS = ("random", "zeros", "ones", "mean", "alternating")
GRANULARITIES = ("token", "page")
POOLS = ("avg", "max")


class Policy(ABC):
    """Keep ``sink`` + ``window`` slots plus the best-scoring rest, up to a per-head budget."""

    name: ClassVar[str]
    keys: ClassVar[tuple[str, ...]]
    sink: int
    window: int
    budget: float | int | None

    def budget_tokens(self, context: int) -> int:
        """Tokens kept per KV head at ``context`` tokens; raises if it cannot hold sink+window."""
        tokens = self.sink + self.window if self.budget is None else resolve_budget(self.budget, context)
        at = f" at a context of {context} tokens" if isinstance(self.budget, float) else ""
        self._check_keep(tokens, f"budget={self.budget} gives {tokens} tokens{at}")
        return tokens

    @abstractmethod
    def token_scores(self, scores: Tensor) -> Tensor:
        """``[Hkv, N]`` importance of each slot (higher = keep) from attention mass ``scores``."""

    def select(self, scores: Tensor, keep: int) -> Tensor:
        """Kept slots, ``LongTensor [Hkv, keep]``, rows ascending: sink + window + top ``token_scores``.

        All ``N`` slots when ``N <= keep``. Ties in ``token_scores`` go to the older slot.
        """
        heads, n = _shape(scores)
        if n <= keep:
            return _all_slots(heads, n, scores.device)
        self._check_keep(keep, f"select(keep={keep})")
        middle = self.token_scores(scores)[:, self.sink : n - self.window]
        best = torch.sort(middle, dim=1, descending=True, stable=True).indices
        best = best[:, : keep - self.sink - self.window] + self.sink
        slots = torch.arange(n, device=scores.device)
        fixed = torch.cat([slots[: self.sink], slots[n - self.window :]]).expand(heads, -1)
        return torch.cat([fixed, best], dim=1).sort(dim=1).values

    def _check_keep(self, keep: int, what: str) -> None:
        floor = self.sink + self.window
        if keep < floor:
            raise KVSpecError(
                f"{self.name}: {what}, fewer than sink+window = {self.sink}+{self.window} = {floor} "
                f"tokens that are always kept; raise budget= to at least {floor} or lower sink=/window="
            )


@dataclass(frozen=True)
class StreamingPolicy(Policy):
    """StreamingLLM: the attention sink plus the most recent tokens (scores are ignored).

    Without ``budget=`` it keeps exactly ``sink + window``; with a larger budget the recent part
    grows to ``budget - sink``.
    """

    name: ClassVar[str] = "streaming"
    keys: ClassVar[tuple[str, ...]] = ("sink", "window", "budget")
    sink: int = 4
    window: int = 0
    budget: float | int | None = None

    def token_scores(self, scores: Tensor) -> Tensor:
        """Recency: the slot index, so the newest slots win."""
        return torch.arange(scores.shape[-1], device=scores.device).to(scores.dtype).expand_as(scores)


@dataclass(frozen=True)
class H2OPolicy(Policy):
    """H2O: heavy hitters (largest accumulated attention mass) plus sink and window."""

    name: ClassVar[str] = "h2o"
    keys: ClassVar[tuple[str, ...]] = ("budget", "sink", "window")
    budget: float | int | None = None
    sink: int = 4
    window: int = 32

    def token_scores(self, scores: Tensor) -> Tensor:
        """The raw attention mass."""
        return scores


@dataclass(frozen=True)
class SnapKVPolicy(Policy):
    """SnapKV: attention mass pooled over ``kernel`` neighbouring slots, plus sink and window.

    As in SnapKV, only the slots before the observation window are pooled (1-D, stride 1,
    padding ``kernel // 2``, zero padding counted by ``avg``), so the length is unchanged.
    """

    name: ClassVar[str] = "snapkv"
    keys: ClassVar[tuple[str, ...]] = ("budget", "sink", "window", "kernel", "pool")
    budget: float | int | None = None
    sink: int = 4
    window: int = 32
    kernel: int = 5
    pool: str = "avg"

    def token_scores(self, scores: Tensor) -> Tensor:
        """Pooled mass for the slots before the window; the window's own slots are unchanged."""
        prefix = max(scores.shape[-1] - self.window, 0)
        if prefix == 0:
            return scores
        pool = F.avg_pool1d if self.pool == "avg" else F.max_pool1d
        pooled = pool(scores[:, None, :prefix], self.kernel, stride=1, padding=self.kernel // 2)[:, 0]
        return torch.cat([pooled, scores[:, prefix:]], dim=1)


@dataclass(frozen=True)
class KVCrushPolicy(Policy):
    """KVCrush: a base policy keeps most of the budget, representatives of the evicted rest fill it.

    With ``keep`` tokens per head (see ``split``), the base keeps ``keep - reps`` (sink and window
    included) and ``reps`` tokens go to representatives of the *candidates*: the slots (or pages)
    outside sink and window that the base evicts for at least one head.

    1. Signature: one bit per KV head, 1 where that head's mean attention mass ranks the candidate
       in the top half (``floor(M/2)`` of ``M`` candidates; ties to the older one).
    2. Anchor: ``random`` (bits from ``seed``), ``zeros``, ``ones``, ``mean`` (per-bit majority,
       ties to 0) or ``alternating`` (0101...).
    3. Candidates sorted by Hamming distance to the anchor (stable: ties by slot).
    4. The order is split into ``R`` buckets, bucket ``i`` = positions ``[floor(i*M/R),
       floor((i+1)*M/R))``; the representative of a bucket is its first entry.

    Representatives are the same for every head. If a head's base share already holds one, that
    head takes the next entry of the same bucket instead (then the second free entry of each
    bucket in bucket order, and so on), so every head keeps exactly ``keep`` distinct slots. At
    page granularity the units are the pages ``[p*page, (p+1)*page)`` cut to the slots outside
    sink and window (so edge pages may be shorter), ``R = reps // page``, and a head takes its
    ``reps`` tokens page by page in that order, skipping the tokens its base share holds.
    """

    name: ClassVar[str] = "kvcrush"
    keys: ClassVar[tuple[str, ...]] = ("budget", "base", "ratio", "anchor", "granularity", "page", "seed")
    base: Policy
    budget: float | int | None = None
    ratio: float = 0.25
    anchor: str = "random"
    granularity: str = "token"
    page: int = 32
    seed: int = 0

    @property
    def sink(self) -> int:  # type: ignore[override]
        """The base policy's sink."""
        return self.base.sink

    @property
    def window(self) -> int:  # type: ignore[override]
        """The base policy's window."""
        return self.base.window

    def token_scores(self, scores: Tensor) -> Tensor:
        """The base policy's scores."""
        return self.base.token_scores(scores)

    def split(self, keep: int) -> tuple[int, int]:
        """``(base tokens, representative tokens)`` for ``keep`` tokens per head.

        Representatives get ``round(ratio * keep)`` tokens, capped so the base still holds sink and
        window; at page granularity that is rounded down to whole pages and the remainder goes to
        the base.
        """
        reps = min(round(self.ratio * keep), keep - self.sink - self.window)
        reps -= reps % self._unit
        return keep - reps, reps

    def select(self, scores: Tensor, keep: int) -> Tensor:
        """Base share plus per-head representatives, ``LongTensor [Hkv, keep]`` rows ascending."""
        heads, n = _shape(scores)
        if n <= keep:
            return _all_slots(heads, n, scores.device)
        self._check_keep(keep, f"select(keep={keep})")
        base_keep, reps = self.split(keep)
        kept = self.base.select(scores, base_keep)
        if reps == 0:
            return kept
        return torch.cat([kept, self._representatives(scores, kept, reps)], dim=1).sort(dim=1).values

    @property
    def _unit(self) -> int:
        return self.page if self.granularity == "page" else 1

    def _representatives(self, scores: Tensor, kept: Tensor, reps: int) -> Tensor:
        """``[Hkv, reps]`` slots outside ``kept`` chosen by Hamming-distance buckets."""
        heads, n = scores.shape
        device = scores.device
        slots = torch.arange(n, device=device)
        middle = (slots >= self.sink) & (slots < n - self.window)
        evicted = middle & ~torch.zeros(heads, n, dtype=torch.bool, device=device).scatter_(1, kept, True)
        unit_of = slots // self._unit
        n_units = int(unit_of[-1]) + 1

        # Per-head evicted-token count and mean mass of each unit (over its slots outside sink/window).
        unit_evicted = torch.zeros(heads, n_units, device=device).index_add_(1, unit_of, evicted.float()) > 0
        mass = torch.zeros(heads, n_units, device=device).index_add_(1, unit_of, torch.where(middle, scores, 0.0))
        size = torch.zeros(n_units, device=device).index_add_(0, unit_of, middle.float()).clamp_min(1)
        candidates = unit_evicted.any(dim=0).nonzero().squeeze(1)
        m, buckets = len(candidates), reps // self._unit

        bits = signatures(mass[:, candidates] / size[candidates])
        order = candidates[hamming_order(bits, anchor_bits(self.anchor, bits, self.seed))]
        position = torch.arange(m, device=device)
        bucket = ((position + 1) * buckets - 1) // m  # bucket i spans [floor(i*m/R), floor((i+1)*m/R))

        # Rank of each unit among the units still free for this head inside its bucket.
        free = unit_evicted[:, order].long()
        seen = torch.cat([free.new_zeros(heads, 1), free.cumsum(dim=1)], dim=1)
        rank = seen[:, 1:] - seen[:, bucket_starts(m, buckets, device)[bucket]] - 1

        # Token priority: (rank in bucket, bucket, slot); tokens the base keeps are never taken.
        at = torch.full((n_units,), m, device=device)
        at[order] = position
        pos = at[unit_of].clamp_max(m - 1).expand(heads, -1)
        key = (rank.gather(1, pos) * buckets + bucket[pos]) * n + slots
        key = torch.where(evicted, key, torch.iinfo(torch.long).max)
        return key.topk(reps, dim=1, largest=False).indices


def signatures(unit_scores: Tensor) -> Tensor:
    """``[Hkv, M]`` bool: True where a head ranks the unit in its top ``floor(M/2)`` (ties: older)."""
    heads, m = unit_scores.shape
    top = torch.sort(unit_scores, dim=1, descending=True, stable=True).indices[:, : m // 2]
    return torch.zeros(heads, m, dtype=torch.bool, device=unit_scores.device).scatter_(1, top, True)


def anchor_bits(mode: str, bits: Tensor, seed: int = 0) -> Tensor:
    """``[Hkv]`` bool anchor for signatures ``bits [Hkv, M]``.

    ``mean`` is the per-head majority bit (ties to 0). With top-half signatures every head has
    ``floor(M/2)`` ones, so ``mean`` equals ``zeros``; it is kept for parity with KVCrush's modes.
    """
    heads = bits.shape[0]
    if mode == "random":
        generator = torch.Generator().manual_seed(seed)
        return torch.randint(0, 2, (heads,), generator=generator).bool().to(bits.device)
    if mode == "zeros":
        return torch.zeros(heads, dtype=torch.bool, device=bits.device)
    if mode == "ones":
        return torch.ones(heads, dtype=torch.bool, device=bits.device)
    if mode == "mean":
        return bits.float().mean(dim=1) > 0.5
    if mode == "alternating":
        return torch.arange(heads, device=bits.device) % 2 == 1
    raise KVSpecError(f"unknown anchor {mode!r}; use one of {', '.join(ANCHORS)}")


def hamming_order(bits: Tensor, anchor: Tensor) -> Tensor:
    """Unit positions sorted by Hamming distance of ``bits[:, j]`` to ``anchor`` (stable)."""
    distance = (bits != anchor[:, None]).sum(dim=0)
    return torch.sort(distance, stable=True).indices


def bucket_starts(m: int, buckets: int, device: torch.device | None = None) -> Tensor:
    """First position of each of ``buckets`` equal buckets over ``m`` sorted entries."""
    return torch.arange(buckets, device=device) * m // buckets


def build_policy(stage: Stage) -> Policy | None:
    """The policy for a compaction stage (``None`` for ``full``); every key is validated."""
    if stage.name == "full":
        if stage.params:
            raise KVSpecError(f"'full' takes no options (got {stage}); write just 'full'")
        return None
    if stage.name not in _BUILDERS:
        raise KVSpecError(
            f"{stage.name!r} is not a compaction policy; use one of {', '.join(COMPACTION_NAMES)}"
        )
    options = _Options(stage)
    policy = _BUILDERS[stage.name](options)
    if not isinstance(policy.budget, float):
        policy.budget_tokens(0)  # token budgets can be checked against sink+window right away
    return policy


class _Options:
    """Typed access to a stage's ``key=value`` options with spec-level error messages."""

    def __init__(self, stage: Stage, params: dict[str, str] | None = None):
        self.stage = stage
        self.params = stage.params if params is None else params

    def check_keys(self, valid: tuple[str, ...]) -> None:
        for key in self.params:
            if key not in valid:
                raise KVSpecError(
                    f"unknown option {key!r} for {self.stage.name} in {str(self.stage)!r}; "
                    f"valid options: {', '.join(valid)}"
                )

    def has(self, key: str) -> bool:
        return key in self.params

    def whole(self, key: str, default: int, minimum: int = 0) -> int:
        text = self.params.get(key)
        if text is None:
            return default
        try:
            value = int(text)
        except ValueError:
            raise KVSpecError(
                f"{key}={text!r} in {str(self.stage)!r} is not a whole number; e.g. {key}={default}"
            ) from None
        if value < minimum:
            raise KVSpecError(f"{key}={value} in {str(self.stage)!r} must be at least {minimum}")
        return value

    def budget(self, required: bool) -> float | int | None:
        text = self.params.get("budget")
        if text is None:
            if required:
                raise KVSpecError(
                    f"{self.stage.name} needs a budget in {str(self.stage)!r}; add budget=0.25 "
                    f"(a fraction of the context) or budget=1024 (tokens)"
                )
            return None
        return parse_budget(text)

    def ratio(self, key: str, default: float) -> float:
        text = self.params.get(key)
        if text is None:
            return default
        try:
            value = float(text)
        except ValueError:
            raise KVSpecError(
                f"{key}={text!r} in {str(self.stage)!r} is not a number; give a fraction such as {key}={default}"
            ) from None
        if not 0.0 <= value <= 1.0:
            raise KVSpecError(
                f"{key}={text} in {str(self.stage)!r} is outside [0, 1]; give a fraction such as {key}={default}"
            )
        return value

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.params.get(key, default).lower()
        if value not in choices:
            raise KVSpecError(f"unknown {key} {value!r} in {str(self.stage)!r}; use one of {', '.join(choices)}")
        return value


def _streaming(options: _Options) -> StreamingPolicy:
    options.check_keys(StreamingPolicy.keys)
    budget = options.budget(required=False)
    if budget is None and not options.has("window"):
        raise KVSpecError(
            f"streaming needs window= (recent tokens) or budget= in {str(options.stage)!r}; "
            f"e.g. streaming:sink=4,window=1020"
        )
    sink, window = options.whole("sink", 4), options.whole("window", 0)
    if budget is None and sink + window == 0:
        raise KVSpecError(f"streaming with sink=0,window=0 keeps nothing in {str(options.stage)!r}; set window=N")
    return StreamingPolicy(sink=sink, window=window, budget=budget)


def _h2o(options: _Options) -> H2OPolicy:
    options.check_keys(H2OPolicy.keys)
    return H2OPolicy(
        budget=options.budget(required=True), sink=options.whole("sink", 4), window=options.whole("window", 32)
    )


def _snapkv(options: _Options) -> SnapKVPolicy:
    options.check_keys(SnapKVPolicy.keys)
    kernel = options.whole("kernel", 5, minimum=1)
    if kernel % 2 == 0:
        raise KVSpecError(
            f"kernel={kernel} in {str(options.stage)!r} must be odd so pooling keeps the length; e.g. kernel=5"
        )
    return SnapKVPolicy(
        budget=options.budget(required=True),
        sink=options.whole("sink", 4),
        window=options.whole("window", 32),
        kernel=kernel,
        pool=options.choice("pool", "avg", POOLS),
    )


_BASES = {"snapkv": (_snapkv, SnapKVPolicy), "h2o": (_h2o, H2OPolicy), "streaming": (_streaming, StreamingPolicy)}


def _kvcrush(options: _Options) -> KVCrushPolicy:
    build_base, base_cls = _BASES[options.choice("base", "snapkv", tuple(_BASES))]
    own = KVCrushPolicy.keys
    options.check_keys(own + tuple(k for k in base_cls.keys if k not in own))
    granularity = options.choice("granularity", "token", GRANULARITIES)
    if options.has("page") and granularity != "page":
        raise KVSpecError(
            f"page= in {str(options.stage)!r} only applies with granularity=page; add granularity=page or drop page="
        )
    budget = options.budget(required=True)
    base_params = {k: v for k, v in options.params.items() if k not in own or k == "budget"}
    return KVCrushPolicy(
        base=build_base(_Options(options.stage, base_params)),
        budget=budget,
        ratio=options.ratio("ratio", 0.25),
        anchor=options.choice("anchor", "random", ANCHORS),
        granularity=granularity,
        page=options.whole("page", 32, minimum=1),
        seed=options.whole("seed", 0),
    )


_BUILDERS = {"streaming": _streaming, "h2o": _h2o, "snapkv": _snapkv, "kvcrush": _kvcrush}


def _shape(scores: Tensor) -> tuple[int, int]:
    if scores.dim() != 2:
        raise ValueError(f"scores must be [Hkv, N], got shape {tuple(scores.shape)}")
    return scores.shape[0], scores.shape[1]


def _all_slots(heads: int, n: int, device: torch.device) -> Tensor:
    return torch.arange(n, device=device).repeat(heads, 1)
