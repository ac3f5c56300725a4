"""Where each token of a sequence sits: in the page pool, in a view, in the sink + ring master copy.

One ``ViewLayout`` answers every layout question of FreeKV/Quest retrieval (see ``docs/freekv.md``)::

    view slots   [0, sink)                 sink tokens (token i at slot i)
                 [sink, ring_start)        k_pages page slots, slot j = [sink + j*page, sink + (j+1)*page)
                 [ring_start, slots)       recent ring: token i >= sink at ring_start + (i - sink) % ring_size
                 [slots, slots + staging)  where an in-place decode graph writes the step's K/V
    master copy  the sink and the ring only: token i >= sink at sink + (i - sink) % ring_size
    pool         page p holds tokens [sink + p*page, sink + (p+1)*page)

The ring holds ``window + page`` slots: the recent part keeps between ``window`` and
``window + page - 1`` tokens, and once it is full its oldest page is spilled to the pool.
"""

from __future__ import annotations

from dataclasses import dataclass

from typing import Any

Tensor = Any  # a numpy array or a torch tensor of token indices


@dataclass(frozen=True)
class ViewLayout:
    sink: int
    page: int
    window: int
    k_pages: int
    staging: int = 0

    @property
    def ring_size(self) -> int:
        """Slots of the recent ring (``window + page``)."""
        return self.window + self.page

    @property
    def ring_start(self) -> int:
        """First ring slot of a view (right after the page slots)."""
        return self.sink + self.k_pages * self.page

    @property
    def slots(self) -> int:
        """View length without the staging slot: ``sink + k_pages*page + window + page``."""
        return self.ring_start + self.ring_size

    @property
    def master_slots(self) -> int:
        """Length of the sink + ring master copy."""
        return self.sink + self.ring_size

    def first_unpaged(self, n_pages: int) -> int:
        """First token after the sink that is not in the pool when it holds ``n_pages`` pages."""
        return self.sink + n_pages * self.page

    def pages_at_start(self, n_tokens: int) -> int:
        """Pool pages of a prompt of ``n_tokens``: whole pages outside sink and window."""
        return max(0, (n_tokens - min(self.sink, n_tokens) - self.window) // self.page)

    def master_slot(self, tokens: Tensor | int) -> Tensor | int:
        """Slots of (sink or recent) tokens in the master copy."""
        return self._place(tokens, self.sink)

    def view_slot(self, tokens: Tensor | int) -> Tensor | int:
        """Slots of (sink or recent) tokens in a view."""
        return self._place(tokens, self.ring_start)

    def _place(self, tokens: Tensor | int, ring_start: int) -> Tensor | int:
        if isinstance(tokens, int):
            return tokens if tokens < self.sink else ring_start + (tokens - self.sink) % self.ring_size
        ring = ring_start + (tokens - self.sink) % self.ring_size  # (numpy or torch: no backend needed)
        return ring + (tokens < self.sink) * (tokens - ring)
