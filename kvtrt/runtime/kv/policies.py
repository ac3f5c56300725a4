"""Compaction policies: which stored KV slots to keep when the cache exceeds its budget.

Each policy is a small frozen dataclass with one scoring method (``token_scores``); ``Policy.select``
turns scores into kept slot indices. A spec's compaction stage is the policy itself::

    policy = parse_kv_spec("kvcrush:budget=0.25,base=snapkv").compaction
    keep = policy.budget_tokens(context)          # tokens to keep, per KV head
    kept = policy.select(scores, keep)            # int64 array [Hkv, keep]

``scores`` is ``[Hkv, N]`` float: the attention mass each stored slot received, per KV head, or
``[Hkv, g, N]``: per query head, grouped by KV head (exports with ``score_heads`` "query"); policies
rank the group mean, KVCrush's ``signature=query`` reads the heads.

Policies compute in numpy on the host: a numpy array is read as is, a torch tensor (a GPU store's
scores, tests) is copied to the host first (``[Hkv, N]`` per layer, once per compaction). So a CPU
process that compacts never imports torch. Sums and pooling run in the order torch's kernels did
(slot by slot), so the picks are those of the earlier torch implementation, ties included
(``tests/test_policies.py`` checks the float steps against torch's kernels bit for bit).
Slots are in position order, so the *sink* is the first ``sink`` slots and the *window* the last
``window`` slots; both are always kept and count inside the budget. Everything is deterministic:
ties are broken by slot index and KVCrush's random anchor comes from its ``seed``.

Each field made with ``option(...)`` is a spec option, with its default, kind and range stated
there (see ``kv.options``); a KVCrush spec also takes its base's options (sink, window, kernel,
pool). A budget is a token count (``1024``) or a fraction of the context (``0.25``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from ..arrays import host
from .options import KVSpecError, SpecStage, option, read_value, resolve_budget

if TYPE_CHECKING:
    from numpy import ndarray as Array

ANCHORS = ("random", "zeros", "ones", "mean", "alternating")
GRANULARITIES = ("token", "page")
SIGNATURES = ("kv", "query", "block")
PICKS = ("first", "best")
POOLS = ("avg", "max")
#: Default ``slack=``: tokens a compacted sequence may grow past its budget while decoding before it is
#: compacted back to the budget (compaction then runs once every ``slack`` tokens).
COMPACTION_SLACK = 64


class Policy(SpecStage, ABC):
    """Keep ``sink`` + ``window`` slots plus the best-scoring rest, up to a per-head budget."""

    sink: int
    window: int
    budget: float | int | None
    #: whether KV heads keep different numbers of tokens (``allocate``; rows decode from one slot pool per
    #: layer, ``head_pool_batch``), rather than ``keep`` each (``select``)
    per_head_counts: ClassVar[bool] = False

    def check(self, where: str) -> None:
        """The policy's own rules, then a token budget against sink + window (a fraction waits for
        the context)."""
        self.check_options(where)
        if not isinstance(self.budget, float):
            self.budget_tokens(0)

    def check_options(self, where: str) -> None:
        """Rules between this policy's options."""

    def budget_tokens(self, context: int) -> int:
        """Tokens kept per KV head at ``context`` tokens; raises if it cannot hold sink+window."""
        tokens = self.sink + self.window if self.budget is None else resolve_budget(self.budget, context)
        at = f" at a context of {context} tokens" if isinstance(self.budget, float) else ""
        self._check_keep(tokens, f"budget={self.budget} gives {tokens} tokens{at}")
        return tokens

    @abstractmethod
    def token_scores(self, scores: Array) -> Array:
        """``[Hkv, N]`` importance of each slot (higher = keep) from attention mass ``scores``."""

    def select(self, scores: Array, keep: int) -> Array:
        """Kept slots, int64 ``[Hkv, keep]``, rows ascending: sink + window + top ``token_scores``.

        All ``N`` slots when ``N <= keep``. Ties in ``token_scores`` go to the older slot. With
        ``block > 1`` (H2O, SnapKV) whole blocks come first: the slots ``[b*block, (b+1)*block)``
        outside sink and window, ranked by their mean ``token_scores``, taken whole until the last
        one, which gives its best slots (a fact spread over a few tokens stays together).
        ``scores``: numpy (read without a copy) or a torch tensor (copied to the host).
        """
        scores = group_mass(host(scores))
        heads, n = _shape(scores)
        if n <= keep:
            return _all_slots(heads, n)
        self._check_keep(keep, f"select(keep={keep})")
        middle = self.token_scores(scores)[:, self.sink : n - self.window]
        best = argsort_descending(middle)
        block = getattr(self, "block", 1)
        if block > 1:  # by block mean first, then (stable) by the slot's own score
            of = np.arange(self.sink, n - self.window) // block - self.sink // block
            mean = np.zeros((heads, int(of[-1]) + 1), dtype=middle.dtype)
            np.add.at(mean, (slice(None), of), middle)  # slot by slot, as torch's index_add_
            mean /= np.bincount(of).astype(mean.dtype)
            best = np.take_along_axis(best, argsort_descending(np.take_along_axis(mean[:, of], best, 1)), 1)
        best = best[:, : keep - self.sink - self.window] + self.sink
        slots = np.arange(n)
        fixed = np.broadcast_to(np.concatenate([slots[: self.sink], slots[n - self.window :]]),
                                (heads, self.sink + self.window))
        return np.sort(np.concatenate([fixed, best], axis=1), axis=1)

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
    sink: int = option(4, "whole")
    window: int = option(0, "whole")
    budget: float | int | None = option(None, "budget")
    slack: int = option(COMPACTION_SLACK, "whole", minimum=1)

    def check_options(self, where: str) -> None:
        if self.budget is None and not self.given("window"):
            raise KVSpecError(f"streaming needs window= (recent tokens) or budget= in {where!r}; "
                              f"e.g. streaming:sink=4,window=1020")
        if self.budget is None and self.sink + self.window == 0:
            raise KVSpecError(f"streaming with sink=0,window=0 keeps nothing in {where!r}; set window=N")

    def token_scores(self, scores: Array) -> Array:
        """Recency: the slot index, so the newest slots win."""
        return np.broadcast_to(np.arange(scores.shape[-1], dtype=scores.dtype), scores.shape)


@dataclass(frozen=True)
class H2OPolicy(Policy):
    """H2O: heavy hitters (largest accumulated attention mass) plus sink and window."""

    name: ClassVar[str] = "h2o"
    budget: float | int | None = option(None, "budget", required=True)
    sink: int = option(4, "whole")
    window: int = option(32, "whole")
    slack: int = option(COMPACTION_SLACK, "whole", minimum=1)
    block: int = option(1, "whole", minimum=1)

    def token_scores(self, scores: Array) -> Array:
        """The raw attention mass."""
        return scores


@dataclass(frozen=True)
class SnapKVPolicy(Policy):
    """SnapKV: attention mass pooled over ``kernel`` neighbouring slots, plus sink and window.

    The default kernel, 15, is wider than SnapKV's and kvpress's (5-7): a fact the prompt asks for
    (a pass key, one token per digit) then survives as a whole; it costs a little perplexity.

    As in SnapKV, only the slots before the observation window are pooled (1-D, stride 1,
    padding ``kernel // 2``, zero padding counted by ``avg``), so the length is unchanged.
    """

    name: ClassVar[str] = "snapkv"
    budget: float | int | None = option(None, "budget", required=True)
    sink: int = option(4, "whole")
    window: int = option(32, "whole")
    slack: int = option(COMPACTION_SLACK, "whole", minimum=1)
    kernel: int = option(15, "whole", minimum=1)  # 5 (kvpress's) drops digits of a pass key: docs/results/kvcrush_tuning.md
    pool: str = option("avg", "choice", choices=POOLS)
    block: int = option(1, "whole", minimum=1)

    def check_options(self, where: str) -> None:
        if self.kernel % 2 == 0:
            raise KVSpecError(f"kernel={self.kernel} in {where!r} must be odd so pooling keeps the length; "
                              f"e.g. kernel=5")

    def token_scores(self, scores: Array) -> Array:
        """Pooled mass for the slots before the window; the window's own slots are unchanged."""
        prefix = max(scores.shape[-1] - self.window, 0)
        if prefix == 0:
            return scores
        return np.concatenate([pool1d(scores[:, :prefix], self.kernel, self.pool), scores[:, prefix:]], axis=1)


class BasedPolicy(Policy):
    """A policy built on a base policy (``base=``): the spec's other options (sink, window, kernel,
    pool) are the base's, and the base's ``token_scores`` rank the slots."""

    base: Policy

    @classmethod
    def base_class(cls, params: dict[str, str], where: str) -> type[Policy]:
        """The base policy class a spec's ``base=`` names."""
        how = cls.option_fields(cls.name)["base"][1]
        return BASES[read_value("base", params.get("base", "snapkv"), how, "snapkv", where)]

    @classmethod
    def option_names(cls, name: str, params: dict[str, str], where: str) -> tuple[str, ...]:
        """The policy's own options, then its base's (sink, window, ...)."""
        own = tuple(cls.option_fields(name))
        base = cls.base_class(params, where)
        return own + tuple(k for k in base.option_names(base.name, params, where) if k not in own)

    @classmethod
    def read(cls, name: str, params: dict[str, str], where: str, **fixed) -> BasedPolicy:
        """The policy's own options; the base is read from the others and the shared budget."""
        own = cls.option_fields(name)
        policy = super().read(name, {k: v for k, v in params.items() if k in own and k != "base"}, where, **fixed)
        base = cls.base_class(params, where)
        base_policy = base.read(base.name, {k: v for k, v in params.items() if k not in own or k == "budget"}, where)
        return replace(policy, base=base_policy, written=tuple(params))

    def check_options(self, where: str) -> None:
        self.base.check_options(where)

    def option_items(self) -> list[tuple[str, object, object]]:
        own = super().option_items()
        keys = {key for key, _, _ in own}
        return own + [item for item in self.base.option_items() if item[0] not in keys]

    @property
    def sink(self) -> int:  # type: ignore[override]
        """The base policy's sink."""
        return self.base.sink

    @property
    def window(self) -> int:  # type: ignore[override]
        """The base policy's window."""
        return self.base.window

    def token_scores(self, scores: Array) -> Array:
        """The base policy's scores."""
        return self.base.token_scores(scores)


@dataclass(frozen=True)
class KVCrushPolicy(BasedPolicy):
    """KVCrush: a base policy keeps most of the budget, representatives of the evicted rest fill it.

    With ``keep`` tokens per head (see ``split``), the base keeps ``keep - reps`` (sink and window
    included) and ``reps`` tokens go to representatives of the *candidates*: the slots (or pages)
    outside sink and window that the base evicts for at least one head.

    1. Signature (``signature=``):
       - ``kv``: one bit per KV head, 1 where that head's mean attention mass ranks the candidate in
         the top half (``floor(M/2)`` of ``M`` candidates; ties to the older one);
       - ``query``: the same with one bit per query head (scores ``[Hkv, g, N]``: an export with
         ``score_heads`` "query"), 9 bits instead of 3 on SmolLM2;
       - ``block`` (OpenVINO GenAI's; page granularity only): one bit per token position of a page,
         1 where the token's mass summed over heads ranks in the top half of all slots outside
         sink and window (ties to the older one); positions past a short edge page are 0.
    2. Anchor: ``random`` (bits from ``seed``), ``zeros``, ``ones``, ``mean`` (per-bit majority,
       ties to 0) or ``alternating`` (0101...), as long as the signature.
    3. Candidates sorted by Hamming distance to the anchor (stable: ties by slot).
    4. The order is split into ``R`` buckets, bucket ``i`` = positions ``[floor(i*M/R),
       floor((i+1)*M/R))``; the representative of a bucket is its first entry (``pick=first``,
       KVCrush's), or with ``pick=best`` the entry the base scores highest (mean ``token_scores``
       over the unit's slots, summed over heads; ties to the earlier entry): the buckets still
       spread the budget over head behaviours, the base chooses inside each.

    Representatives are the same for every head. If a head's base share already holds one, that
    head takes the next entry of the same bucket instead (then the second free entry of each
    bucket in bucket order, and so on), so every head keeps exactly ``keep`` distinct slots. At
    page granularity the units are the pages ``[p*page, (p+1)*page)`` cut to the slots outside
    sink and window (so edge pages may be shorter), ``R = reps // page``, and a head takes its
    ``reps`` tokens page by page in that order, skipping the tokens its base share holds.
    """

    name: ClassVar[str] = "kvcrush"
    budget: float | int | None = option(None, "budget", required=True)
    base: Policy = option(SnapKVPolicy(), "choice", choices=("snapkv", "h2o", "streaming"))
    ratio: float = option(0.25, "fraction")
    anchor: str = option("random", "choice", choices=ANCHORS)
    granularity: str = option("token", "choice", choices=GRANULARITIES)
    page: int = option(32, "whole", minimum=1)
    seed: int = option(0, "whole")
    signature: str = option("kv", "choice", choices=SIGNATURES)
    pick: str = option("best", "choice", choices=PICKS)
    slack: int = option(COMPACTION_SLACK, "whole", minimum=1)

    def check_options(self, where: str) -> None:
        if self.given("page") and self.granularity != "page":
            raise KVSpecError(f"page= in {where!r} only applies with granularity=page; add granularity=page or "
                              f"drop page=")
        if self.signature == "block" and self.granularity != "page":
            raise KVSpecError(f"signature=block in {where!r} compares the token patterns of pages; add "
                              f"granularity=page (and page=N, default 32)")
        super().check_options(where)

    def split(self, keep: int) -> tuple[int, int]:
        """``(base tokens, representative tokens)`` for ``keep`` tokens per head.

        Representatives get ``round(ratio * keep)`` tokens, capped so the base still holds sink and
        window; at page granularity that is rounded down to whole pages and the remainder goes to
        the base.
        """
        reps = min(round(self.ratio * keep), keep - self.sink - self.window)
        reps -= reps % self._unit
        return keep - reps, reps

    def select(self, scores: Array, keep: int) -> Array:
        """Base share plus per-head representatives, int64 ``[Hkv, keep]`` rows ascending."""
        scores = host(scores)
        if self.signature == "query" and scores.ndim != 3:
            raise ValueError("kvcrush signature=query needs per-query-head scores [Hkv, g, N] (an export with "
                             "score_heads 'query')")
        mass = group_mass(scores)
        heads, n = _shape(mass)
        if n <= keep:
            return _all_slots(heads, n)
        self._check_keep(keep, f"select(keep={keep})")
        base_keep, reps = self.split(keep)
        kept = self.base.select(mass, base_keep)
        if reps == 0:
            return kept
        return np.sort(np.concatenate([kept, self._representatives(mass, scores, kept, reps)], axis=1), axis=1)

    @property
    def _unit(self) -> int:
        return self.page if self.granularity == "page" else 1

    def _representatives(self, scores: Array, head_scores: Array, kept: Array, reps: int) -> Array:
        """``[Hkv, reps]`` slots outside ``kept`` chosen by Hamming-distance buckets; ``scores`` is the
        ``[Hkv, N]`` mass per KV head, ``head_scores`` what ``select`` was given."""
        heads, n = scores.shape
        slots = np.arange(n)
        middle = (slots >= self.sink) & (slots < n - self.window)
        base_kept = np.zeros((heads, n), dtype=bool)
        np.put_along_axis(base_kept, kept, True, 1)
        evicted = middle & ~base_kept
        unit_of = slots // self._unit
        n_units = int(unit_of[-1]) + 1

        # Per-head evicted-token count and mean mass of each unit (over its slots outside sink/window).
        unit_evicted = unit_sums(evicted.astype(np.int64), unit_of, n_units) > 0
        mass = unit_sums(np.where(middle, scores, 0), unit_of, n_units)
        size = np.maximum(unit_sums(middle.astype(scores.dtype), unit_of, n_units), 1)
        candidates = np.flatnonzero(unit_evicted.any(axis=0))
        m, buckets = len(candidates), reps // self._unit

        if self.signature == "block":
            bits = block_signatures(np.where(middle, scores.sum(axis=0), -np.inf), middle.sum(), self.page)
            bits = bits[:, candidates]
        elif self.signature == "query":
            per_query = head_scores.reshape(-1, n)  # [H, N]
            mass_q = unit_sums(np.where(middle, per_query, 0), unit_of, n_units)
            bits = signatures(mass_q[:, candidates] / size[candidates])
        else:
            bits = signatures(mass[:, candidates] / size[candidates])
        order = candidates[hamming_order(bits, anchor_bits(self.anchor, bits, self.seed))]
        position = np.arange(m)
        bucket = ((position + 1) * buckets - 1) // max(m, 1)  # bucket i spans [floor(i*m/R), floor((i+1)*m/R))
        if self.pick == "best":  # inside each bucket, the base's best unit first
            base = np.where(middle, self.base.token_scores(scores), 0).sum(axis=0)
            value = unit_sums(base, unit_of, n_units)[order] / size[order]
            within = argsort_descending(value)
            order = order[within[np.argsort(bucket[within], kind="stable")]]

        # Rank of each unit among the units still free for this head inside its bucket.
        free = unit_evicted[:, order].astype(np.int64)
        seen = np.concatenate([np.zeros((heads, 1), dtype=np.int64), free.cumsum(axis=1)], axis=1)
        rank = seen[:, 1:] - seen[:, bucket_starts(m, buckets)[bucket]] - 1

        # Token priority: (rank in bucket, bucket, slot); tokens the base keeps are never taken.
        at = np.full(n_units, m)
        at[order] = position
        pos = np.broadcast_to(np.minimum(at[unit_of], m - 1), (heads, n))
        key = (np.take_along_axis(rank, pos, 1) * buckets + bucket[pos]) * n + slots
        key = np.where(evicted, key, np.iinfo(np.int64).max)
        return np.argsort(key, axis=1, kind="stable")[:, :reps]


@dataclass(frozen=True)
class AdaKVPolicy(BasedPolicy):
    """AdaKV: one budget per layer shared by its KV heads, spent where the base's scores are highest.

    A layer keeps ``Hkv * keep`` tokens in all, as the base would with ``keep`` per head, but a head
    whose attention is spread out keeps more and a focused head fewer (Feng et al., "Ada-KV", 2024;
    kvpress's ``AdaKVPress``). Each head first keeps its sink and window and, as AdaKV's safeguard,
    the best ``floor`` share of the rest of its uniform budget; the remaining tokens go to the highest
    base scores (``token_scores`` per head; attention mass sums to one per query, so heads compare)
    across the layer's heads, ties to the lower head, then the older slot. Rows with different
    numbers of tokens per head decode from one slot pool per layer (the ``decode_heads`` graph), so the
    bytes are exactly the budget's.
    """

    name: ClassVar[str] = "adakv"
    per_head_counts: ClassVar[bool] = True
    budget: float | int | None = option(None, "budget", required=True)
    base: Policy = option(SnapKVPolicy(), "choice", choices=("snapkv", "h2o"))
    floor: float = option(0.2, "fraction")
    slack: int = option(COMPACTION_SLACK, "whole", minimum=1)

    def select(self, scores: Array, keep: int) -> Array:
        raise TypeError("adakv keeps a different number of tokens per KV head: use allocate(), not select()")

    def allocate(self, scores: list[Array], keep: int) -> list[Array]:
        """Kept slots of each KV head of one layer, int64 ascending, ``Hkv * keep`` in all (every slot
        when the heads hold no more). ``scores[h]``: ``[N_h]`` or ``[g, N_h]`` (per query head; the
        group mean is ranked) mass of head ``h``'s own slots, in position order."""
        mass = [host(s).mean(axis=0) if host(s).ndim == 2 else host(s) for s in scores]
        lengths = [len(m) for m in mass]
        total = len(mass) * keep
        if sum(lengths) <= total:
            return [np.arange(n) for n in lengths]
        self._check_keep(keep, f"allocate(keep={keep})")
        fixed = self.sink + self.window
        floor = fixed + int(self.floor * (keep - fixed))
        kept, extra_scores, extra_slots = [], [], []
        for m in mass:
            n = len(m)
            if n <= floor:
                kept.append(np.arange(n))
                extra_scores.append(np.zeros(0, m.dtype))
                extra_slots.append(np.zeros(0, np.int64))
                continue
            ranked = self.base.token_scores(m[None])[0]
            order = argsort_descending(ranked[self.sink : n - self.window]) + self.sink
            kept.append(np.concatenate([np.arange(self.sink), np.arange(n - self.window, n), order[: floor - fixed]]))
            extra_slots.append(order[floor - fixed :])
            extra_scores.append(ranked[extra_slots[-1]])
        room = total - sum(len(k) for k in kept)
        head_of = np.repeat(np.arange(len(mass)), [len(e) for e in extra_slots])
        best = argsort_descending(np.concatenate(extra_scores))[:room]  # stable: lower head, then its own order
        slots = np.concatenate(extra_slots)
        return [np.sort(np.concatenate([k, slots[best[head_of[best] == h]]])) for h, k in enumerate(kept)]


def signatures(unit_scores: Array) -> Array:
    """``[Hkv, M]`` bool: True where a head ranks the unit in its top ``floor(M/2)`` (ties: older)."""
    heads, m = unit_scores.shape
    bits = np.zeros((heads, m), dtype=bool)
    np.put_along_axis(bits, argsort_descending(unit_scores)[:, : m // 2], True, 1)
    return bits


def block_signatures(token_scores: Array, count: int | Array, page: int) -> Array:
    """``[page, ceil(N/page)]`` bool: bit ``j`` of page ``p`` is True where slot ``p*page + j`` is among
    the top ``floor(count/2)`` of ``token_scores [N]`` (ties: older); slots that do not take part
    carry ``-inf`` and ``count`` is how many do. Positions past the last slot are False."""
    n = token_scores.shape[0]
    marked = np.zeros(-(-n // page) * page, dtype=bool)
    marked[argsort_descending(token_scores)[: int(count) // 2]] = True
    return marked.reshape(-1, page).T


def anchor_bits(mode: str, bits: Array, seed: int = 0) -> Array:
    """``[K]`` bool anchor for signatures ``bits [K, M]`` (K bits per unit: KV heads or page positions).

    ``random`` draws from MT19937 seeded with ``seed`` (numpy's ``RandomState``: the same bits as
    ``torch.randint(0, 2, (K,), generator=torch.Generator().manual_seed(seed))``, which earlier
    versions used). ``mean`` is the per-head majority bit (ties to 0). With top-half signatures every
    head has ``floor(M/2)`` ones, so ``mean`` equals ``zeros``; it is kept for parity with KVCrush's modes.
    """
    heads = bits.shape[0]  # signature length
    if mode == "random":
        return np.random.RandomState(seed).randint(0, 2, heads).astype(bool)
    if mode == "zeros":
        return np.zeros(heads, dtype=bool)
    if mode == "ones":
        return np.ones(heads, dtype=bool)
    if mode == "mean":
        return bits.mean(axis=1) > 0.5
    if mode == "alternating":
        return np.arange(heads) % 2 == 1
    raise KVSpecError(f"unknown anchor {mode!r}; use one of {', '.join(ANCHORS)}")


def hamming_order(bits: Array, anchor: Array) -> Array:
    """Unit positions sorted by Hamming distance of ``bits[:, j]`` to ``anchor`` (stable)."""
    distance = (bits != anchor[:, None]).sum(axis=0)
    return np.argsort(distance, kind="stable")


def bucket_starts(m: int, buckets: int) -> Array:
    """First position of each of ``buckets`` equal buckets over ``m`` sorted entries."""
    return np.arange(buckets) * m // buckets


def argsort_descending(x: Array) -> Array:
    """Indices sorting ``x`` largest first along the last axis, ties to the lower index."""
    return np.argsort(-x, axis=-1, kind="stable")


def pool1d(x: Array, kernel: int, how: str) -> Array:
    """``[Hkv, N]`` pooled over ``kernel`` neighbours (stride 1, padding ``kernel // 2``, so the length
    is kept): ``avg`` counts the zero padding (torch's ``avg_pool1d`` default), ``max`` ignores it.
    The window is summed left to right, as torch's kernel does, so the values are its values."""
    pad, n = kernel // 2, x.shape[-1]
    padded = np.pad(x, ((0, 0), (pad, pad)), constant_values=0 if how == "avg" else -np.inf)
    out = padded[:, :n].copy()
    combine = np.add if how == "avg" else np.maximum
    for k in range(1, kernel):
        combine(out, padded[:, k : k + n], out=out)
    if how == "avg":
        out /= np.asarray(kernel, dtype=out.dtype)
    return out


def unit_sums(x: Array, unit_of: Array, n_units: int) -> Array:
    """``x [..., N]`` summed into ``n_units`` units along the last axis, slot by slot (the order of
    torch's ``index_add_``, so float sums round the same way)."""
    out = np.zeros((*x.shape[:-1], n_units), dtype=x.dtype)
    np.add.at(out, (..., unit_of), x)
    return out


BASES: dict[str, type[Policy]] = {"snapkv": SnapKVPolicy, "h2o": H2OPolicy, "streaming": StreamingPolicy}
POLICIES: dict[str, type[Policy]] = {"streaming": StreamingPolicy, "h2o": H2OPolicy, "snapkv": SnapKVPolicy,
                                     "kvcrush": KVCrushPolicy, "adakv": AdaKVPolicy}


def group_mass(scores: Array) -> Array:
    """``[Hkv, N]`` mass per KV head: ``scores`` itself, or the mean of ``[Hkv, g, N]`` over each
    group's query heads."""
    return scores.mean(axis=1) if scores.ndim == 3 else scores


def _shape(scores: Array) -> tuple[int, int]:
    if scores.ndim != 2:
        raise ValueError(f"scores must be [Hkv, N], got shape {tuple(scores.shape)}")
    return scores.shape[0], scores.shape[1]


def _all_slots(heads: int, n: int) -> Array:
    return np.tile(np.arange(n), (heads, 1))
