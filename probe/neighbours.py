"""Exact k nearest neighbours over blocks: the one kNN primitive of `probe knn` and `analyze align`.

    from diffprobe.probe.neighbours import RunningTopK, similarities
    top = RunningTopK(n_queries, k, device)
    for offset, db in database_blocks:               # in increasing offset order
        top.add(similarities(queries, db, "cosine"), offset)
    top.values, top.index                              # (n_queries, k): best first

It knows no store: callers hand it tensors. Memory is the running top-k (n_queries x k) plus one
(query block x database block) similarity matrix, whatever the database size.

Ties are broken by the smaller database index, exactly, whatever the block sizes: each block's
candidates are the k best by (similarity desc, index asc) (rows whose k-th value is tied beyond
the cut are re-sorted stably), and merging puts the running list, whose indices are all smaller,
before the block's in a stable sort. So the neighbours are a function of the similarities alone.

Similarities: ``cosine`` is the dot product of L2-normalised features (`normalise`; DINOv2's
kNN, platonic-rep's alignment metrics); ``l2`` is minus half the squared Euclidean distance,
x.y - |x|^2/2 - |y|^2/2, which ranks like the distance and equals cosine - 1 on normalised
features (so a temperature means the same on both).
"""

from __future__ import annotations

import torch

METRICS = ("cosine", "l2")


def normalise(x: torch.Tensor, metric: str) -> torch.Tensor:
    """Features as the similarity wants them: unit rows for ``cosine`` (zero rows stay zero), as is for ``l2``."""
    if metric == "cosine":
        return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return x


def similarities(q: torch.Tensor, db: torch.Tensor, metric: str) -> torch.Tensor:
    """(len(q), len(db)) similarities of prepared (`normalise`d) rows; larger is nearer."""
    s = q @ db.T
    if metric == "l2":
        s -= 0.5 * (q * q).sum(1, keepdim=True)
        s -= 0.5 * (db * db).sum(1)[None, :]
    return s


def block_topk(s: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``min(k, columns)`` best columns of each row of ``s``, ordered by (value desc, column asc)."""
    k = min(k, s.shape[1])
    if k < s.shape[1]:
        # topk picks arbitrarily among values tied at the cut (the (k+1)-th equal to the k-th):
        # redo those rows with a stable sort
        v, i = s.topk(k + 1, dim=1)
        over = v[:, k] == v[:, k - 1]
        v, i = v[:, :k].contiguous(), i[:, :k].contiguous()
        if bool(over.any()):
            r = over.nonzero().squeeze(1)
            sv, si = torch.sort(s[r], dim=1, descending=True, stable=True)
            v[r], i[r] = sv[:, :k], si[:, :k]
    else:
        v, i = s.topk(k, dim=1)
    if k > 1:  # rows with ties inside the k: smaller column first
        tied = (v[:, 1:] == v[:, :-1]).any(1)
        if bool(tied.any()):
            r = tied.nonzero().squeeze(1)
            ir, o = i[r].sort(dim=1)
            vr = v[r].gather(1, o)
            vr, o = vr.sort(dim=1, descending=True, stable=True)
            v[r], i[r] = vr, ir.gather(1, o)
    return v, i


class RunningTopK:
    """The k largest similarities of each query row seen so far, and their database indices."""

    def __init__(self, n_queries: int, k: int, device: torch.device | str = "cpu", dtype=torch.float32):
        self.k = k
        self.values = torch.empty((n_queries, 0), dtype=dtype, device=device)
        self.index = torch.empty((n_queries, 0), dtype=torch.long, device=device)
        self._next = 0  # database blocks come in increasing index order (the tie rule depends on it)

    def add(self, s: torch.Tensor, offset: int) -> None:
        """Merge (queries x database block) similarities ``s`` whose column 0 is database index ``offset``."""
        if offset < self._next:
            raise ValueError(f"database blocks must come in increasing order: {offset} after {self._next}")
        self._next = offset + s.shape[1]
        bv, bi = block_topk(s, self.k)
        bv, bi = bv.to(self.values.dtype), bi + offset
        if self.values.shape[1] == 0:
            self.values, self.index = bv, bi
            return
        # the running list's indices are all smaller and each list is ordered by (value desc,
        # index asc), so the concatenation's column order is the index order among equal values
        v, o = block_topk(torch.cat([self.values, bv], dim=1), self.k)
        self.values, self.index = v, torch.cat([self.index, bi], dim=1).gather(1, o)
