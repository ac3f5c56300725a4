"""The retrieval stage of a KV spec (``freekv:...`` / ``quest:...``): its options and sizes.

``RetrievalConfig`` is what ``parse_kv_spec(...).retrieval`` holds; ``create(...)`` builds the
runtime manager (``kv.freekv.FreeKVRetrieval``). See ``docs/freekv.md`` for the design.
"""

from __future__ import annotations

from dataclasses import dataclass
from .freekv import FreeKVRetrieval
from .layout import ViewLayout
from .options import KVSpecError, SpecStage, option, resolve_budget
from .pages import COMBINES, POOL_DTYPES

RETRIEVAL_MODES = ("freekv", "quest")
#: with which query a step's pages are chosen: ``inline`` (each layer's own, inside kvtrt's decode attention
#: op right before the layer attends: one graph call a step; needs that op and the C page ops, i.e. a CPU
#: engine with a C compiler), ``fresh`` (each layer range's own, before it attends;
#: needs an export with decode groups), ``speculative`` (the one before the previous step's, in a
#: worker beside the decode graph, corrected with the previous step's: two views; quest runs the step
#: twice), ``previous`` (the previous step's, after it ends, for the heads whose query moved: one view,
#: nothing beside the decode graph), ``auto`` (inline where it runs, else fresh when the export has decode
#: groups, else previous on a CPU engine and speculative on a GPU; see ``RetrievalConfig.path``)
SELECT_MODES = ("auto", "inline", "fresh", "speculative", "previous")
DRIFTS = ("mean", "min")  # how a KV group's query-head cosines combine in the correction test
#: the correction test's defaults: the cosine's tau (FreeKV's), and where the inline refresh runs (the CPU
#: default) the cover test with COVER pages beside a cosine at TAU_WITH_COVER (docs/results/cover_test.md)
TAU, TAU_WITH_COVER, COVER = 0.9, 0.7, 4


@dataclass(frozen=True)
class RetrievalConfig(SpecStage):
    """A validated ``freekv``/``quest`` stage.

    ``budget`` counts attended tokens, sink and window included; a fraction is resolved against
    the ``max_context`` given to ``create``. ``page``: FreeKV/Quest page size; ``sink``:
    StreamingLLM's attention sink; ``window``: recent tokens always attended; ``tau``: heads whose
    query cosine to the query that chose their pages falls below it are corrected (default ``TAU``, or
    ``TAU_WITH_COVER`` beside the cover test; quest: always 1, every head selects with the current query);
    ``combine``: how the query heads of a KV group score a page;
    ``min_context`` (default ``2 * budget``): retrieval runs only for longer caches;
    ``pool_dtype``: how the page pool stores the KV (``fp16``, the default, half the bytes of fp32
    KV; ``fp32`` the KV's own dtype, exact; ``int8`` a quarter plus per-channel value scales), dequantized into the view as
    pages are recalled (views and the sink/recent master copy stay full precision; summaries are float16 rounded
    outward whatever the pool);
    ``select``: which query chooses a step's pages (``SELECT_MODES``, ``docs/freekv.md``);
    ``drift``: a KV head is corrected when the ``mean`` (FreeKV's group mean) or the ``min`` (any one
    query head) of its query heads' cosines falls below ``tau``; ``cover`` (``select=inline`` only, where it
    defaults to ``COVER``; 0: off): a head the cosine keeps is also corrected when one of its query heads'
    ``cover`` best pages (by Quest's bound, searched over the ``cover`` best spans of ``PagePool.span`` pages)
    is not among the pages it holds, and a page leaving the window no longer re-selects every head
    (``docs/freekv.md``, "The cover test"); ``rerun`` (``select=previous`` only):
    when a step's query moved so far from the one that chose the pages it attended that some KV head's
    cosine is below ``rerun``, those heads re-select with it and the step runs again on the new pages
    (Quest's second pass, only for the steps that turn to other tokens; 0: never).
    """

    mode: str = "freekv"
    budget: int | float = option(2048, "budget")
    page: int = option(8, "whole", minimum=1)
    sink: int = option(4, "whole")
    window: int = option(64, "whole")
    tau: float | None = option(None, "fraction", stages=("freekv",), example=TAU,
                               hint="tau=0 never corrects, tau=1 always corrects, e.g. tau=0.9")
    combine: str = option("softmax", "choice", choices=COMBINES, stages=("freekv",))
    drift: str = option("mean", "choice", choices=DRIFTS, stages=("freekv",))
    cover: int | None = option(None, "whole", stages=("freekv",), example=COVER)
    min_context: int | None = option(None, "whole", example=0)
    pool_dtype: str = option("fp16", "choice", choices=POOL_DTYPES)
    select: str = option("auto", "choice", choices=SELECT_MODES)
    rerun: float = option(0.0, "fraction", stages=("freekv",),
                          hint="rerun=0 never runs a step again, e.g. rerun=0.5 (with select=previous)")

    def correction(self, inline: bool) -> tuple[float, int]:
        """``(tau, cover)`` this stage corrects with on a path that runs the inline refresh (``inline``) or
        not: the given values; by default the cover test with ``COVER`` pages where the inline refresh runs
        (FreeKV), none elsewhere, and ``tau`` ``TAU_WITH_COVER`` beside the cover test, else ``TAU``."""
        cover = self.cover if self.cover is not None else (COVER if inline and self.mode == "freekv" else 0)
        return (self.tau if self.tau is not None else TAU_WITH_COVER if cover else TAU), cover

    @property
    def name(self) -> str:  # type: ignore[override]
        """The stage name: the mode."""
        return self.mode

    @classmethod
    def read(cls, name: str, params: dict[str, str], where: str, **fixed) -> RetrievalConfig:
        if name == "quest":
            fixed["tau"] = 1.0  # quest selects every step with the current query
        return super().read(name, params, where, mode=name, **fixed)

    def check(self, where: str) -> None:
        if isinstance(self.budget, int):
            self.budget_tokens()  # budget < sink + window + page -> KVSpecError now
        if self.rerun and self.select != "previous":
            raise KVSpecError(f"rerun={self.rerun} in {where!r} runs a step again on one view; add select=previous "
                              f"or drop rerun=")

    def path(self, manifest, cpu: bool, inline: bool = False) -> str:
        """How pages are chosen on this export and engine: ``inline``, ``fresh``, ``speculative`` or
        ``previous`` (``select``). ``auto``: inline where the engine can (``inline``: its decode attention
        is kvtrt's op with the C page ops; every layer's pages chosen with its own query in one graph
        call, ``docs/results/inline_refresh.md``); else fresh when the export has decode groups; else
        FreeKV takes ``previous`` on a CPU engine (``cpu``: its cores already run the decode graph, so a
        worker beside it only slows it; ``docs/results/select_previous.md``) and ``speculative`` on a
        GPU (the recall overlaps the engine); Quest keeps its two passes (``speculative``)."""
        if self.select != "auto":
            return self.select
        if inline:
            return "inline"
        if manifest.decode_groups:
            return "fresh"
        return "previous" if cpu and self.mode == "freekv" else "speculative"

    def views(self, manifest, cpu: bool, inline: bool = False) -> int:
        """View buffers a sequence holds: one with ``inline``, ``fresh`` or ``previous``, two (double
        buffer) with ``speculative``."""
        return 2 if self.path(manifest, cpu, inline) == "speculative" else 1

    @property
    def min_budget(self) -> int:
        return self.sink + self.window + self.page

    def budget_tokens(self, max_context: int | None = None) -> int:
        """The budget in tokens (a fraction needs ``max_context``)."""
        if isinstance(self.budget, float):
            if max_context is None:
                raise KVSpecError(
                    f"{self.mode}: budget={self.budget} is a fraction of the context, but the view has a fixed "
                    f"size; give a token count (e.g. budget=1024) or pass max_context to create()"
                )
            budget = resolve_budget(self.budget, max_context)
        else:
            budget = self.budget
        if budget < self.min_budget:
            raise KVSpecError(
                f"{self.mode}: budget={budget} tokens is below sink+window+page = {self.sink}+{self.window}+"
                f"{self.page} = {self.min_budget}; raise budget to at least {self.min_budget} "
                f"or lower window/page"
            )
        return budget

    def threshold(self, context: int) -> int:
        """``min_context``, or by default twice the budget (resolved against ``context``)."""
        return self.min_context if self.min_context is not None else 2 * self.budget_tokens(context)

    def engages(self, context: int) -> bool:
        """Whether retrieval runs for a cache of ``context`` tokens: above the threshold. Below it
        the view would hold half the cache or more, so retrieval costs more per step than it saves,
        and decoding attends to the whole cache instead (exact)."""
        return context > self.threshold(context)

    def layout(self, max_context: int | None = None, staging_slot: bool = False) -> ViewLayout:
        """The slot layout of a view: ``(budget - sink - window) // page`` page slots per KV head."""
        k_pages = (self.budget_tokens(max_context) - self.sink - self.window) // self.page
        return ViewLayout(self.sink, self.page, self.window, k_pages, staging=int(staging_slot))

    def k_pages(self, max_context: int | None = None) -> int:
        """Pages selected per KV head."""
        return self.layout(max_context).k_pages

    def slots(self, max_context: int | None = None) -> int:
        """View length ``sink + k_pages*page + window + page``."""
        return self.layout(max_context).slots

    def create(self, *shape, **options) -> FreeKVRetrieval:
        """The retrieval manager of one batch of sequences: ``create(n_layers, n_kv_heads, n_heads,
        head_dim, batch=1, dtype="float32", *, device="cpu", mask_dtype="bool",
        max_context=None, threaded=True, staging_slot=False)`` (see ``FreeKVRetrieval``); the pool
        stores pages in ``pool_dtype``."""
        return FreeKVRetrieval(self, *shape, **options)
