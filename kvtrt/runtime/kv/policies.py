"""Compaction policies: which stored KV slots to keep when the cache exceeds its budget.

Each policy is a small frozen dataclass with one scoring method (``token_scores``); ``Policy.select``
turns scores into kept slot indices. A spec's compaction stage is the policy itself::

    policy = parse_kv_spec("kvcrush:budget=0.25,base=snapkv").compaction
    keep = policy.budget_tokens(context)          # tokens to keep, per KV head
    kept = policy.select(scores, keep)            # LongTensor [Hkv, keep]

``scores`` is ``[Hkv, N]`` float: the attention mass each stored slot received, per KV head, or
``[Hkv, g, N]``: per query head, grouped by KV head (exports with ``score_heads`` "query"); policies
rank the group mean, KVCrush's ``signature=query`` reads the heads.
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

from ..lazy_torch import F, torch

from .options import KVSpecError, SpecStage, option, read_value, resolve_budget

if TYPE_CHECKING:
    from torch import Tensor

ANCHORS = ("random", "zeros", "ones", "mean", "alternating")
GRANULARITIES = ("token", "page")
SIGNATURES = ("kv", "query", "block")
PICKS = ("first", "best")
POOLS = ("avg", "max")


class Policy(SpecStage, ABC):
    """Keep ``sink`` + ``window`` slots plus the best-scoring rest, up to a per-head budget."""

    sink: int
    window: int
    budget: float | int | None

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
    def token_scores(self, scores: Tensor) -> Tensor:
        """``[Hkv, N]`` importance of each slot (higher = keep) from attention mass ``scores``."""

    def select(self, scores: Tensor, keep: int) -> Tensor:
        """Kept slots, ``LongTensor [Hkv, keep]``, rows ascending: sink + window + top ``token_scores``.

        All ``N`` slots when ``N <= keep``. Ties in ``token_scores`` go to the older slot. With
        ``block > 1`` (H2O, SnapKV) whole blocks come first: the slots ``[b*block, (b+1)*block)``
        outside sink and window, ranked by their mean ``token_scores``, taken whole until the last
        one, which gives its best slots (a fact spread over a few tokens stays together).
        ``scores`` may also be a numpy array (the CPU runtime's store): it is read without a copy.
        """
        scores = group_mass(torch.as_tensor(scores))
        heads, n = _shape(scores)
        if n <= keep:
            return _all_slots(heads, n, scores.device)
        self._check_keep(keep, f"select(keep={keep})")
        middle = self.token_scores(scores)[:, self.sink : n - self.window]
        best = torch.sort(middle, dim=1, descending=True, stable=True).indices
        block = getattr(self, "block", 1)
        if block > 1:  # by block mean first, then (stable) by the slot's own score
            of = torch.arange(self.sink, n - self.window, device=scores.device) // block - self.sink // block
            mean = torch.zeros(heads, int(of[-1]) + 1, device=scores.device).index_add_(1, of, middle)
            mean /= torch.bincount(of)
            best = best.gather(1, torch.sort(mean[:, of].gather(1, best), dim=1, descending=True, stable=True).indices)
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
    sink: int = option(4, "whole")
    window: int = option(0, "whole")
    budget: float | int | None = option(None, "budget")

    def check_options(self, where: str) -> None:
        if self.budget is None and not self.given("window"):
            raise KVSpecError(f"streaming needs window= (recent tokens) or budget= in {where!r}; "
                              f"e.g. streaming:sink=4,window=1020")
        if self.budget is None and self.sink + self.window == 0:
            raise KVSpecError(f"streaming with sink=0,window=0 keeps nothing in {where!r}; set window=N")

    def token_scores(self, scores: Tensor) -> Tensor:
        """Recency: the slot index, so the newest slots win."""
        return torch.arange(scores.shape[-1], device=scores.device).to(scores.dtype).expand_as(scores)


@dataclass(frozen=True)
class H2OPolicy(Policy):
    """H2O: heavy hitters (largest accumulated attention mass) plus sink and window."""

    name: ClassVar[str] = "h2o"
    budget: float | int | None = option(None, "budget", required=True)
    sink: int = option(4, "whole")
    window: int = option(32, "whole")
    block: int = option(1, "whole", minimum=1)

    def token_scores(self, scores: Tensor) -> Tensor:
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
    kernel: int = option(15, "whole", minimum=1)  # 5 (kvpress's) drops digits of a pass key: docs/results/kvcrush_tuning.md
    pool: str = option("avg", "choice", choices=POOLS)
    block: int = option(1, "whole", minimum=1)

    def check_options(self, where: str) -> None:
        if self.kernel % 2 == 0:
            raise KVSpecError(f"kernel={self.kernel} in {where!r} must be odd so pooling keeps the length; "
                              f"e.g. kernel=5")

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

    @classmethod
    def base_class(cls, params: dict[str, str], where: str) -> type[Policy]:
        """The base policy class a spec's ``base=`` names."""
        how = cls.option_fields(cls.name)["base"][1]
        return BASES[read_value("base", params.get("base", "snapkv"), how, "snapkv", where)]

    @classmethod
    def option_names(cls, name: str, params: dict[str, str], where: str) -> tuple[str, ...]:
        """KVCrush's own options, then its base's (sink, window, ...)."""
        own = tuple(cls.option_fields(name))
        base = cls.base_class(params, where)
        return own + tuple(k for k in base.option_names(base.name, params, where) if k not in own)

    @classmethod
    def read(cls, name: str, params: dict[str, str], where: str, **fixed) -> KVCrushPolicy:
        """KVCrush's own options; the base is read from the others and the shared budget."""
        own = cls.option_fields(name)
        policy = super().read(name, {k: v for k, v in params.items() if k in own and k != "base"}, where, **fixed)
        base = cls.base_class(params, where)
        base_policy = base.read(base.name, {k: v for k, v in params.items() if k not in own or k == "budget"}, where)
        return replace(policy, base=base_policy, written=tuple(params))

    def check_options(self, where: str) -> None:
        if self.given("page") and self.granularity != "page":
            raise KVSpecError(f"page= in {where!r} only applies with granularity=page; add granularity=page or "
                              f"drop page=")
        if self.signature == "block" and self.granularity != "page":
            raise KVSpecError(f"signature=block in {where!r} compares the token patterns of pages; add "
                              f"granularity=page (and page=N, default 32)")
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
        scores = torch.as_tensor(scores)
        if self.signature == "query" and scores.dim() != 3:
            raise ValueError("kvcrush signature=query needs per-query-head scores [Hkv, g, N] (an export with "
                             "score_heads 'query')")
        mass = group_mass(scores)
        heads, n = _shape(mass)
        if n <= keep:
            return _all_slots(heads, n, scores.device)
        self._check_keep(keep, f"select(keep={keep})")
        base_keep, reps = self.split(keep)
        kept = self.base.select(mass, base_keep)
        if reps == 0:
            return kept
        return torch.cat([kept, self._representatives(mass, scores, kept, reps)], dim=1).sort(dim=1).values

    @property
    def _unit(self) -> int:
        return self.page if self.granularity == "page" else 1

    def _representatives(self, scores: Tensor, head_scores: Tensor, kept: Tensor, reps: int) -> Tensor:
        """``[Hkv, reps]`` slots outside ``kept`` chosen by Hamming-distance buckets; ``scores`` is the
        ``[Hkv, N]`` mass per KV head, ``head_scores`` what ``select`` was given."""
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

        if self.signature == "block":
            bits = block_signatures(torch.where(middle, scores.sum(dim=0), float("-inf")), middle.sum(), self.page)
            bits = bits[:, candidates]
        elif self.signature == "query":
            per_query = head_scores.flatten(0, 1)  # [H, N]
            mass_q = torch.zeros(per_query.shape[0], n_units, device=device).index_add_(
                1, unit_of, torch.where(middle, per_query, 0.0))
            bits = signatures(mass_q[:, candidates] / size[candidates])
        else:
            bits = signatures(mass[:, candidates] / size[candidates])
        order = candidates[hamming_order(bits, anchor_bits(self.anchor, bits, self.seed))]
        position = torch.arange(m, device=device)
        bucket = ((position + 1) * buckets - 1) // m  # bucket i spans [floor(i*m/R), floor((i+1)*m/R))
        if self.pick == "best":  # inside each bucket, the base's best unit first
            base = torch.where(middle, self.base.token_scores(scores), 0.0).sum(dim=0)
            value = torch.zeros(n_units, device=device).index_add_(0, unit_of, base)[order] / size[order]
            within = torch.sort(value, descending=True, stable=True).indices
            order = order[within[torch.sort(bucket[within], stable=True).indices]]

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


def block_signatures(token_scores: Tensor, count: int | Tensor, page: int) -> Tensor:
    """``[page, ceil(N/page)]`` bool: bit ``j`` of page ``p`` is True where slot ``p*page + j`` is among
    the top ``floor(count/2)`` of ``token_scores [N]`` (ties: older); slots that do not take part
    carry ``-inf`` and ``count`` is how many do. Positions past the last slot are False."""
    n = token_scores.shape[0]
    top = torch.sort(token_scores, descending=True, stable=True).indices[: int(count) // 2]
    marked = torch.zeros(-(-n // page) * page, dtype=torch.bool, device=token_scores.device)
    marked[top] = True
    return marked.view(-1, page).T


def anchor_bits(mode: str, bits: Tensor, seed: int = 0) -> Tensor:
    """``[K]`` bool anchor for signatures ``bits [K, M]`` (K bits per unit: KV heads or page positions).

    ``mean`` is the per-head majority bit (ties to 0). With top-half signatures every head has
    ``floor(M/2)`` ones, so ``mean`` equals ``zeros``; it is kept for parity with KVCrush's modes.
    """
    heads = bits.shape[0]  # signature length
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


BASES: dict[str, type[Policy]] = {"snapkv": SnapKVPolicy, "h2o": H2OPolicy, "streaming": StreamingPolicy}
POLICIES: dict[str, type[Policy]] = {"streaming": StreamingPolicy, "h2o": H2OPolicy, "snapkv": SnapKVPolicy,
                                     "kvcrush": KVCrushPolicy}


def group_mass(scores: Tensor) -> Tensor:
    """``[Hkv, N]`` mass per KV head: ``scores`` itself, or the mean of ``[Hkv, g, N]`` over each
    group's query heads."""
    return scores.mean(dim=1) if scores.dim() == 3 else scores


def _shape(scores: Tensor) -> tuple[int, int]:
    if scores.dim() != 2:
        raise ValueError(f"scores must be [Hkv, N], got shape {tuple(scores.shape)}")
    return scores.shape[0], scores.shape[1]


def _all_slots(heads: int, n: int, device: torch.device) -> Tensor:
    return torch.arange(n, device=device).repeat(heads, 1)
