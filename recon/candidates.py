"""Per-class, multi-seed k-means candidates with provenance.

Kinds: `centroid` (a cluster mean), `medoid` (the member with the least summed squared distance to its
cluster) and `nearest` (the member nearest its centroid; the reference recipes call this one "medoid").
Under squared distances the two member kinds coincide whenever the centroid is the exact cluster mean
(sum_j ||x_i - x_j||^2 = n ||x_i - mu||^2 + const); they differ only where k-means stopped short of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.cluster import KMeans

from recon.scoring import pairwise_mse

KINDS = ("centroid", "medoid", "nearest")


@dataclass(frozen=True)
class Candidates:
    images: np.ndarray  # (n, C, H, W) float32
    cls: np.ndarray  # (n,) class
    seed: np.ndarray  # (n,) k-means seed
    k: np.ndarray  # (n,) clusters in the run that made it
    kind: np.ndarray  # (n,) one of KINDS
    member: np.ndarray  # (n,) index into the class's images for member kinds, -1 for centroids

    def __len__(self) -> int:
        return len(self.cls)

    def take(self, idx: np.ndarray) -> Candidates:
        return Candidates(*(getattr(self, f)[idx] for f in self.__dataclass_fields__))

    @staticmethod
    def concat(parts: Sequence[Candidates]) -> Candidates:
        return Candidates(*(np.concatenate([getattr(p, f) for p in parts]) for f in Candidates.__dataclass_fields__))

    def provenance(self, i: int) -> dict:
        return {"class": int(self.cls[i]), "seed": int(self.seed[i]), "k": int(self.k[i]), "kind": str(self.kind[i])}


def class_stream(global_seed: int, seed: int, cls: int) -> int:
    """Each class gets its own k-means stream, so changing one class's data never reshuffles another's."""
    return int(np.random.SeedSequence([global_seed, seed, cls]).generate_state(1)[0])


def first_per_group(groups: np.ndarray, cost: np.ndarray, n_groups: int) -> np.ndarray:
    """Index of the lowest-cost element of each group 0..n_groups-1 (vectorised arg-min by group)."""
    order = np.lexsort((cost, groups))
    firsts = order[np.searchsorted(groups[order], np.arange(n_groups))]
    return firsts


def kmeans_candidates(
    x: np.ndarray, *, k: int, random_state: int, d_within: np.ndarray | None = None
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """One k-means run on one class: {kind: (images, member_index)}."""
    n = len(x)
    if k > n:
        raise ValueError(f"pipeline.k={k} exceeds the {n} images available in a class")
    flat = x.reshape(n, -1)
    km = KMeans(n_clusters=k, n_init=1, random_state=random_state).fit(flat)
    # k-means can leave clusters empty (duplicate images): keep only the occupied ones, renumbered 0..m-1.
    present = np.unique(km.labels_)
    labels = np.searchsorted(present, km.labels_)
    k_eff = len(present)
    centroids = km.cluster_centers_[present].astype(np.float32).reshape((k_eff, *x.shape[1:]))
    to_own = km.transform(flat)[np.arange(n), km.labels_]
    nearest = first_per_group(labels, to_own, k_eff)
    if d_within is None:
        d_within = pairwise_mse(x, x)
    onehot = np.eye(k_eff)[labels]  # (n, k)
    summed = (d_within @ onehot)[np.arange(n), labels]  # each point's summed distance to its cluster
    medoid = first_per_group(labels, summed, k_eff)
    return {
        "centroid": (np.clip(centroids, 0.0, 1.0), np.full(k_eff, -1)),
        "medoid": (x[medoid], medoid),
        "nearest": (x[nearest], nearest),
    }


def class_candidates(
    x: np.ndarray, *, cls: int, ks: Sequence[int], seeds: Sequence[int], global_seed: int = 0,
    progress_desc: str | None = None,
) -> Candidates:
    """Every (k, seed) k-means run on one class's images, all kinds, with provenance."""
    from recon.progress import track

    d_within = pairwise_mse(x, x)
    parts = []
    runs = [(k, s) for k in ks for s in seeds]
    for k, s in (track(runs, desc=progress_desc, total=len(runs)) if progress_desc else runs):
        result = kmeans_candidates(x, k=int(k), random_state=class_stream(global_seed, s, cls), d_within=d_within)
        for kind, (imgs, member) in result.items():
            m = len(imgs)
            parts.append(Candidates(
                imgs.astype(np.float32), np.full(m, cls), np.full(m, s), np.full(m, k),
                np.full(m, kind, dtype=object), member,
            ))
    return Candidates.concat(parts)
