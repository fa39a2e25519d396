"""The unsupervised core: aux images in, one submission (per_class images per class) out."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from recon.candidates import Candidates, class_candidates
from recon.dataset_io import Dataset
from recon.progress import track
from recon.selection import SelectionError, select_class


@dataclass(frozen=True)
class Params:
    k: tuple[int, ...] = (10,)
    seeds: tuple[int, ...] = (0,)
    per_class: int = 10
    medoid_ratio: float | None = None
    dedup_threshold: float = 0.0
    ranking: str = "class_mean"
    medoid_kind: str = "nearest"
    centroid_preference: float = 0.0
    global_seed: int = 0
    num_classes: int = 10


def parse_seeds(seeds: int | Sequence[int]) -> tuple[int, ...]:
    """An int n means seeds 0..n-1; a list is taken as is."""
    if isinstance(seeds, bool):
        raise ValueError(f"pipeline.seeds={seeds!r}: expected an int n (seeds 0..n-1) or a list of ints")
    if isinstance(seeds, (int, np.integer)):
        seeds = int(seeds)
        if seeds < 1:
            raise ValueError(f"pipeline.seeds={seeds}: must be at least 1")
        return tuple(range(seeds))
    if isinstance(seeds, str) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ValueError(f"pipeline.seeds={seeds!r}: expected an int n (seeds 0..n-1) or a list of ints")
    out = tuple(int(s) for s in seeds)
    if not out:
        raise ValueError("pipeline.seeds: the list is empty")
    if min(out) < 0:
        raise ValueError(f"pipeline.seeds={list(out)}: seeds must be non-negative")
    return out


def parse_k(k: int | Sequence[int]) -> tuple[int, ...]:
    items = [k] if isinstance(k, int) else k
    if isinstance(k, str) or not all(isinstance(x, int) and not isinstance(x, bool) for x in items):
        raise ValueError(f"pipeline.k={k!r}: expected a positive int or a list of them")
    ks = tuple(int(x) for x in items)
    if not ks or min(ks) < 1:
        raise ValueError(f"pipeline.k={k!r}: expected a positive int or a list of them")
    return ks


CandidateFn = Callable[..., Candidates]


@dataclass(frozen=True)
class Reconstruction:
    images: np.ndarray  # (num_classes * per_class, C, H, W)
    labels: np.ndarray
    chosen: Candidates  # provenance of each submitted image, aligned with `images`
    pool: dict[int, Candidates]  # every candidate of each class (for refine stages)


def reconstruct(aux: Dataset, p: Params, *, candidate_fn: CandidateFn = class_candidates,
                progress: bool = True) -> Reconstruction:
    classes = range(p.num_classes)
    pools, chosen = {}, []
    it = track(classes, desc=f"k-means x {len(p.seeds)} seeds") if progress else classes
    for c in it:
        x = aux.of_class(c)
        pool = candidate_fn(x, cls=c, ks=p.k, seeds=p.seeds, global_seed=p.global_seed)
        try:
            idx = select_class(
                pool.images, pool.kind, pool.member, x,
                per_class=p.per_class, medoid_ratio=p.medoid_ratio, dedup_threshold=p.dedup_threshold,
                ranking=p.ranking, medoid_kind=p.medoid_kind, centroid_preference=p.centroid_preference,
            )
        except SelectionError as e:
            raise SelectionError(f"class {c}: {e}") from e
        pools[c] = pool
        chosen.append(pool.take(idx))
    sel = Candidates.concat(chosen)
    return Reconstruction(sel.images, sel.cls.astype(np.int64), sel, pools)
