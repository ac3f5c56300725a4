"""What a retrieval manager did and holds: ``FreeKVRetrieval.stats()``."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RetrievalStats:
    """What a manager did since ``start`` (counters) and what it holds (filled in by ``stats()``)."""

    steps: int = 0
    heads_checked: int = 0  # (layer, sequence, KV head) whose query drift was compared with tau
    heads_corrected: int = 0
    pages_selected: int = 0
    pages_hit: int = 0  # selected pages the view already held
    pages_recalled: int = 0
    selections_reused: int = 0  # prefetches that took the last correction's selection (same query and pool)
    reruns: int = 0  # steps run again on pages chosen with their own query (select=previous, rerun=)
    tokens_copied: int = 0  # sink/recent tokens copied into views
    wait_s: float = 0.0  # finish_step waiting for the worker
    correction_s: float = 0.0
    sync_prepare_s: float = 0.0  # finish_step preparing the next view itself (quest, no prefetch)
    start_s: float = 0.0  # start(): the prompt's pages and sink/recent stored, the first view built
    pages_summarized_in_prefill: int = 0  # pool pages (per layer) whose summaries absorb() built during the prefill
    recalled_bytes: int = 0
    pool_pages: list[int] = field(default_factory=list)
    budget: int = 0
    k_pages: int = 0
    slots: int = 0
    stored_bytes: int = 0  # pool with its summaries (and int8 scales), sink/recent master copy
    view_bytes: int = 0  # both views
    pool_bytes: int = 0  # the page store alone, in pool_dtype (with its int8 scales)
    pool_dtype: str = "fp32"
    dense_store_bytes_after_start: int = 0  # of the dense KV given to start(): still alive when it returned
    dense_store_bytes: int = 0  # the same, when stats() was called

    @property
    def correction_rate(self) -> float:
        return self.heads_corrected / self.heads_checked if self.heads_checked else 0.0

    @property
    def rerun_rate(self) -> float:
        """Steps run a second time over steps (``select=previous,rerun=``)."""
        return self.reruns / self.steps if self.steps else 0.0

    @property
    def page_hit_rate(self) -> float:
        return self.pages_hit / self.pages_selected if self.pages_selected else 1.0

    @property
    def recalled_bytes_per_step(self) -> float:
        return self.recalled_bytes / max(1, self.steps)

    @property
    def pages_recalled_per_step(self) -> float:
        return self.pages_recalled / max(1, self.steps)

    @property
    def wait_s_per_step(self) -> float:
        return self.wait_s / max(1, self.steps)

    def as_dict(self) -> dict:
        """Every counter, rate and size by name."""
        return {name: getattr(self, name) for name in _REPORT_ORDER}


_REPORT_ORDER = (
    "steps", "heads_checked", "heads_corrected", "pages_selected", "pages_hit", "pages_recalled", "selections_reused", "reruns",
    "tokens_copied", "wait_s", "correction_s", "sync_prepare_s", "start_s", "pages_summarized_in_prefill",
    "correction_rate", "rerun_rate", "page_hit_rate", "recalled_bytes", "recalled_bytes_per_step", "pages_recalled_per_step",
    "wait_s_per_step", "pool_pages", "budget", "k_pages", "slots", "stored_bytes", "view_bytes", "pool_bytes",
    "pool_dtype", "dense_store_bytes_after_start", "dense_store_bytes",
)
