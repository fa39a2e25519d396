"""The offline replica of the challenge: hidden split, trained classifier, targets and exact scorer.

Layout of a replica directory:
    auxiliary_dataset.pt      what a participant gets
    hidden/train.pt           the classifier's training set (T)
    hidden/targets.pt         the scored ground truth (G), drawn from T
    hidden/model.pt           the classifier's state_dict
    meta.json                 sizes, seeds, accuracies, rule, task id, sha256 of each file, recon version
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

import recon
from recon import scoring
from recon.atomic import atomic_write_bytes, atomic_write_json
from recon.classifier import SmallCNN, accuracy, load_model, predict_logits, train_classifier
from recon.dataset_io import NUM_CLASSES, Dataset, dataset_bytes, load_dataset

DEFAULT_TASK_ID = "12-data-reconstruction"
FILES = {
    "aux": "auxiliary_dataset.pt",
    "train": "hidden/train.pt",
    "targets": "hidden/targets.pt",
    "model": "hidden/model.pt",
}


class ReplicaError(ValueError):
    pass


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def split_pool(
    pool: Dataset,
    *,
    aux_per_class: int,
    train_per_class: int | None,
    seed: int,
    num_classes: int = NUM_CLASSES,
    pool_name: str = "pool",
) -> tuple[Dataset, Dataset]:
    """Per class, a seeded disjoint split; `train_per_class=None` gives the train side what is left."""
    rng = np.random.default_rng(seed)
    aux_idx, train_idx = [], []
    for c in range(num_classes):
        members = np.flatnonzero(pool.labels == c)
        need = aux_per_class + (train_per_class or 1)
        if len(members) < need:
            want = f"--aux-per-class {aux_per_class}" + (
                f" + --train-per-class {train_per_class}" if train_per_class else " + at least 1 train image"
            )
            raise ReplicaError(
                f"{pool_name}: class {c} has only {len(members)} images, but {want} needs {need}; "
                "lower the per-class counts or use a larger pool"
            )
        members = rng.permutation(members)
        aux_idx.append(members[:aux_per_class])
        end = None if train_per_class is None else aux_per_class + train_per_class
        train_idx.append(members[aux_per_class:end])
    # Shuffle across classes: recon must never rely on file order for labels.
    aux_all = rng.permutation(np.concatenate(aux_idx))
    train_all = rng.permutation(np.concatenate(train_idx))
    return pool.subset(aux_all), pool.subset(train_all)


def draw_targets(train: Dataset, per_class: int, seed: int, num_classes: int = NUM_CLASSES) -> Dataset:
    rng = np.random.default_rng([seed, 1])
    picks = []
    for c in range(num_classes):
        members = np.flatnonzero(train.labels == c)
        if len(members) < per_class:
            raise ReplicaError(
                f"train set: class {c} has {len(members)} images, fewer than --targets-per-class {per_class}"
            )
        picks.append(np.sort(rng.choice(members, per_class, replace=False)))
    return train.subset(np.concatenate(picks))


@dataclass
class Replica:
    """A built replica, loaded; the hidden parts are for scoring and the in-process logits only."""

    root: Path
    meta: dict
    aux: Dataset
    train: Dataset
    targets: Dataset
    _model_state: dict = field(repr=False)

    @property
    def id(self) -> str:
        return self.meta["replica_id"]

    @property
    def rule(self) -> str:
        return self.meta["rule"]

    @property
    def task_id(self) -> str:
        return self.meta["task_id"]

    @cached_property
    def model(self) -> SmallCNN:
        return load_model(self._model_state, self.meta["num_classes"], self.aux.images.shape[1])

    def logits(self, images: np.ndarray) -> np.ndarray:
        return predict_logits(self.model, images)

    def score(self, images: np.ndarray, rule: str | None = None) -> float:
        return scoring.score(images, rule=rule or self.rule, targets=self.targets.images, train=self.train.images)

    def score_all(self, images: np.ndarray) -> dict[str, float]:
        return scoring.score_all(images, targets=self.targets.images, train=self.train.images)

    def train_without_targets(self) -> Dataset:
        """T minus G: hidden images from aux's distribution that are never scored under `matching` or
        `coverage`. Fitting on aux plus these shows what more data, but no sight of the targets, would buy."""
        d = scoring.pairwise_mse(self.train.images, self.targets.images)
        return self.train.subset(np.flatnonzero(d.min(axis=1) > 0.0))

    def redrawn_scores(self, images: np.ndarray, draws: int = 200) -> dict[str, float]:
        """`matching` and `coverage` over `draws` target sets redrawn from T like the real one."""
        per_class = len(self.targets.images) // self.meta["num_classes"]
        return scoring.redrawn_target_scores(images, self.train.images, self.train.labels, per_class, draws)


def replica_exists(root: str | os.PathLike) -> bool:
    return (Path(root) / "meta.json").is_file()


def load_replica(root: str | os.PathLike, *, verify: bool = True) -> Replica:
    """Load a replica directory; with `verify`, every file must match the sha256 in meta.json."""
    root = Path(root)
    meta_path = root / "meta.json"
    if not meta_path.is_file():
        raise ReplicaError(f"{root}: not a replica directory (no meta.json); build one with `recon-challenge build`")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise ReplicaError(f"{meta_path}: invalid JSON ({e})") from e
    for key in ("files", "rule", "task_id", "replica_id", "num_classes"):
        if key not in meta:
            raise ReplicaError(f"{meta_path}: field '{key}' is missing")
    if verify:
        for name, rel in FILES.items():
            path = root / rel
            if not path.is_file():
                raise ReplicaError(f"{path}: missing ({name})")
            if sha256_file(path) != meta["files"][rel]:
                raise ReplicaError(f"{path}: sha256 does not match meta.json; the replica was modified")
    state = torch.load(root / FILES["model"], map_location="cpu", weights_only=True)
    nc = meta["num_classes"]
    return Replica(
        root=root,
        meta=meta,
        aux=load_dataset(root / FILES["aux"], num_classes=nc),
        train=load_dataset(root / FILES["train"], num_classes=nc),
        targets=load_dataset(root / FILES["targets"], num_classes=nc, min_per_class=1),
        _model_state=state,
    )


def build_replica(
    out: str | os.PathLike,
    *,
    aux: Dataset | None = None,
    train: Dataset | None = None,
    pool: Dataset | None = None,
    pool_name: str = "digits",
    aux_per_class: int = 100,
    train_per_class: int | None = None,
    targets_per_class: int = 10,
    seed: int = 0,
    rule: str = "matching",
    task_id: str = DEFAULT_TASK_ID,
    epochs: int = 12,
    num_classes: int = NUM_CLASSES,
) -> Replica:
    """Build from explicit aux/train sets, or split `pool` per class; then draw targets and train."""
    scoring.check_rule(rule)
    t0 = time.perf_counter()
    if (aux is None) != (train is None):
        raise ReplicaError("give both aux and train, or neither (to split a pool)")
    if aux is None:
        if pool is None:
            from recon.builtin_data import load_digits_pool

            pool, pool_name = load_digits_pool(), "digits"
        aux, train = split_pool(
            pool, aux_per_class=aux_per_class, train_per_class=train_per_class, seed=seed,
            num_classes=num_classes, pool_name=pool_name,
        )
        source = {"pool": pool_name, "aux_per_class": aux_per_class, "train_per_class": train_per_class}
    else:
        source = {"pool": None, "aux": "explicit", "train": "explicit"}
    if aux.images.shape[1:] != train.images.shape[1:]:
        raise ReplicaError(f"aux images {aux.images.shape[1:]} and train images {train.images.shape[1:]} differ")
    targets = draw_targets(train, targets_per_class, seed, num_classes)
    model = train_classifier(train.images, train.labels, num_classes=num_classes, epochs=epochs, seed=seed)

    root = Path(out)
    blobs = {
        FILES["aux"]: dataset_bytes(aux),
        FILES["train"]: dataset_bytes(train),
        FILES["targets"]: dataset_bytes(targets),
    }
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    blobs[FILES["model"]] = buf.getvalue()
    hashes = {rel: sha256_bytes(data) for rel, data in blobs.items()}
    for rel, data in blobs.items():
        atomic_write_bytes(root / rel, data)
    meta = {
        "recon_version": recon.__version__,
        "task_id": task_id,
        "rule": rule,
        "seed": seed,
        "num_classes": num_classes,
        "image_shape": list(aux.images.shape[1:]),
        "sizes": {"aux": len(aux), "train": len(train), "targets": len(targets)},
        "targets_per_class": targets_per_class,
        "source": source,
        "classifier": {
            "arch": "SmallCNN",
            "epochs": epochs,
            "train_accuracy": accuracy(model, train.images, train.labels),
            "heldout_accuracy": accuracy(model, aux.images, aux.labels),
            "heldout_set": "auxiliary_dataset.pt",
        },
        "files": hashes,
        "replica_id": sha256_bytes("".join(hashes[r] for r in sorted(hashes)).encode())[:16],
        "build_seconds": round(time.perf_counter() - t0, 2),
    }
    atomic_write_json(root / "meta.json", meta)  # written last: its presence means the build is complete
    return load_replica(root)
