"""Streaming syncs: the owned tensors cut into F fragments that are synced at staggered steps.

With ``fragments`` = F > 1 the values this rank owns, read as one flat vector of N values (the
owned tensors in order), are cut into F contiguous ranges of N/F values (rounded down at each
boundary, so sizes differ by at most one value). A range may start or end inside a tensor: the
algorithm then works on *pieces*, 1-D views of the owned tensors, each lying in one fragment. The
anchor and the outer optimizer hold one tensor per piece, so a fragment's outer step moves only
its own pieces and its own momentum; the pull, the drift and the overlapped sync act on pieces
exactly as they act on whole tensors (every operation is elementwise).

Fragment i is synced after step t when (t + 1) mod H == o_i with o_i = floor(i H / F) (Streaming
DiLoCo's staggering; fragment 0 keeps the paper's (t + 1) mod H == 0). Each fragment thus sees H
steps between two of its syncs, and one sync sends N/F values instead of N: the peak bytes per
sync fall by F, the bytes per period stay the same.

With F = 1 the pieces are the owned tensors themselves (no views), so the algorithm, its anchor
shapes and its checkpoints are exactly those of the unfragmented algorithm.

Peers (the ranks that own the same shard in every replica) own tensors of the same sizes, so they
cut the same fragments; the ranks of one replica may own different sizes, but every rank syncs
fragment i at the same step, so the replica's agreement collectives still pair up.
"""

from __future__ import annotations

from typing import Optional

import torch


def fragment_offsets(interval: int, fragments: int) -> list[int]:
    """o_i = floor(i H / F): the value of (t + 1) mod H at which fragment i is synced."""
    return [(i * interval) // fragments for i in range(fragments)]


def due_fragment(step: int, interval: int, fragments: int) -> Optional[int]:
    """The fragment synced after the step that brings the count to ``step`` (= t + 1), or None."""
    phase = step % interval
    offsets = fragment_offsets(interval, fragments)
    return offsets.index(phase) if phase in offsets else None


class FragmentLayout:
    """Where the F fragments cut the flat vector of one rank's owned tensors.

    ``pieces`` lists (tensor index, start, end, fragment) in tensor order; ``members[i]`` holds the
    indices into ``pieces`` of fragment i.
    """

    def __init__(self, numels: list[int], fragments: int):
        self.numels, self.fragments = list(numels), fragments
        total = sum(numels)
        bounds = [(i * total) // fragments for i in range(fragments + 1)]
        self.pieces: list[tuple[int, int, int, int]] = []
        offset = 0
        for index, n in enumerate(numels):
            for f in range(fragments):
                lo, hi = max(bounds[f], offset), min(bounds[f + 1], offset + n)
                if hi > lo:
                    self.pieces.append((index, lo - offset, hi - offset, f))
            offset += n
        self.members = [[j for j, piece in enumerate(self.pieces) if piece[3] == f] for f in range(fragments)]

    def numel(self, fragment: int) -> int:
        return sum(self.pieces[j][2] - self.pieces[j][1] for j in self.members[fragment])


class Fragments:
    """The F fragments of one rank: cuts lists of owned tensors into pieces (see the module docstring)."""

    def __init__(self, count: int):
        self.count = count
        self._layout: Optional[FragmentLayout] = None

    def layout(self, tensors: list[torch.Tensor]) -> FragmentLayout:
        numels = [t.numel() for t in tensors]
        if self._layout is None or self._layout.numels != numels:
            self._layout = FragmentLayout(numels, self.count)
        return self._layout

    def split(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The pieces of ``tensors``: views that write through to them (the tensors themselves when F = 1)."""
        if self.count == 1:
            return tensors
        for t in tensors:
            if not t.is_contiguous():
                raise ValueError(
                    f"fragments={self.count} needs contiguous owned tensors (a piece is a view of a flat tensor), "
                    f"but one of shape {tuple(t.shape)} is not; use fragments=1 with this model or backend."
                )
        return [tensors[i].view(-1)[lo:hi] for i, lo, hi, _ in self.layout(tensors).pieces]

    def split_groups(self, groups: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
        """The pieces of each parameter group's tensors (groups hold consecutive owned tensors)."""
        if self.count == 1:
            return groups
        pieces = self.split([t for g in groups for t in g])  # sets the layout of these tensors
        owner = [i for i, _, _, _ in self._layout.pieces]
        out, first = [], 0
        for g in groups:
            last = first + len(g)
            out.append([p for p, i in zip(pieces, owner) if first <= i < last])
            first = last
        return out

    def members(self, fragment: Optional[int]) -> Optional[list[int]]:
        """Indices of fragment ``fragment``'s pieces in the last split (None: every piece, a whole-model sync)."""
        if fragment is None or self.count == 1:
            return None
        return self._layout.members[fragment]
