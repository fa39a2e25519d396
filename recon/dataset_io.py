"""Load, validate and save datasets in the competition's format.

A dataset file is a dict with `images` float32 (N, C, H, W) in [0, 1] and integer `labels` (N,),
saved with `torch.save` (`.pt`) or `np.savez` (`.npz`). Loading never unpickles arbitrary objects.
"""

from __future__ import annotations

import io
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from recon.atomic import atomic_write

NUM_CLASSES = 10


class DatasetError(ValueError):
    """A dataset file is unusable; the message names the file, the field and the problem."""

    def __init__(self, source: str | os.PathLike, field: str, problem: str):
        self.source, self.field, self.problem = str(source), field, problem
        super().__init__(f"{source}: field '{field}': {problem}")


@dataclass(frozen=True)
class Dataset:
    images: np.ndarray  # float32 (N, C, H, W) in [0, 1]
    labels: np.ndarray  # int64 (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def of_class(self, c: int) -> np.ndarray:
        return self.images[self.labels == c]

    def subset(self, idx: np.ndarray) -> Dataset:
        return Dataset(self.images[idx], self.labels[idx])


def _as_numpy(value, source, field: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value
    raise DatasetError(source, field, f"expected a tensor or array, got {type(value).__name__}")


def validate_images(
    images, source: str | os.PathLike = "<array>", *, convert_uint8: bool = False, field: str = "images"
) -> np.ndarray:
    """Check rank, dtype and range; return float32. uint8 is converted only when asked."""
    arr = _as_numpy(images, source, field)
    if arr.ndim != 4:
        raise DatasetError(source, field, f"expected rank 4 (N, C, H, W), got shape {tuple(arr.shape)}")
    if arr.shape[0] == 0:
        raise DatasetError(source, field, "is empty")
    if arr.dtype == np.uint8:
        if not convert_uint8:
            raise DatasetError(
                source, field, "is uint8 (0-255); pass convert_uint8=True (--convert-uint8) to scale to [0, 1]"
            )
        arr = arr.astype(np.float32) / 255.0
    if not np.issubdtype(arr.dtype, np.floating):
        raise DatasetError(source, field, f"expected float values, got dtype {arr.dtype}")
    if not np.isfinite(arr).all():
        n_bad = int((~np.isfinite(arr)).sum())
        raise DatasetError(source, field, f"contains {n_bad} NaN or inf values")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0.0 or hi > 1.0:
        raise DatasetError(source, field, f"values must lie in [0, 1], got min {lo:.4g}, max {hi:.4g}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def validate_labels(labels, n: int, source: str | os.PathLike = "<array>", num_classes: int = NUM_CLASSES):
    arr = _as_numpy(labels, source, "labels")
    if arr.ndim != 1:
        raise DatasetError(source, "labels", f"expected rank 1 (N,), got shape {tuple(arr.shape)}")
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise DatasetError(source, "labels", f"expected integer labels, got dtype {arr.dtype}")
    if len(arr) != n:
        raise DatasetError(source, "labels", f"length {len(arr)} does not match {n} images")
    bad = (arr < 0) | (arr >= num_classes)
    if bad.any():
        raise DatasetError(
            source, "labels", f"must be integers in 0..{num_classes - 1}, got {sorted(set(arr[bad].tolist()))[:5]}"
        )
    return arr.astype(np.int64)


def validate_dataset(
    images,
    labels,
    source: str | os.PathLike = "<array>",
    *,
    num_classes: int = NUM_CLASSES,
    min_per_class: int = 2,
    convert_uint8: bool = False,
) -> Dataset:
    imgs = validate_images(images, source, convert_uint8=convert_uint8)
    labs = validate_labels(labels, len(imgs), source, num_classes)
    counts = np.bincount(labs, minlength=num_classes)
    short = [c for c in range(num_classes) if counts[c] < min_per_class]
    if short:
        detail = ", ".join(f"class {c}: {counts[c]}" for c in short)
        raise DatasetError(source, "labels", f"every class needs at least {min_per_class} images ({detail})")
    return Dataset(imgs, labs)


def _read_raw(path: Path) -> dict:
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except ValueError as e:  # object arrays need pickle
            raise DatasetError(path, "<file>", f"cannot be read without unpickling objects ({e})") from e
        except Exception as e:
            raise DatasetError(path, "<file>", f"is not a readable .npz file ({e})") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):
            raise DatasetError(path, "<file>", "is not a readable torch file (corrupt or not a torch.save)") from e
        raise DatasetError(
            path, "<file>", "needs unsafe (arbitrary-object) unpickling, which recon refuses; "
            "re-save it as a dict of tensors"
        ) from e
    except Exception as e:
        raise DatasetError(path, "<file>", f"is not a readable torch file ({e})") from e
    if not isinstance(obj, dict):
        raise DatasetError(path, "<file>", f"expected a dict with 'images' and 'labels', got {type(obj).__name__}")
    return obj


def load_dataset(
    path: str | os.PathLike,
    *,
    num_classes: int = NUM_CLASSES,
    min_per_class: int = 2,
    convert_uint8: bool = False,
) -> Dataset:
    """Load a competition-format `.pt` or `.npz` file, validating every field."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(path, "<file>", "does not exist")
    raw = _read_raw(path)
    for key in ("images", "labels"):
        if key not in raw:
            raise DatasetError(path, key, f"missing key (found keys: {sorted(map(str, raw))})")
    return validate_dataset(
        raw["images"], raw["labels"], path,
        num_classes=num_classes, min_per_class=min_per_class, convert_uint8=convert_uint8,
    )


def dataset_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    torch.save({"images": torch.from_numpy(ds.images), "labels": torch.from_numpy(ds.labels)}, buf)
    return buf.getvalue()


def save_dataset(path: str | os.PathLike, ds: Dataset) -> Path:
    """Write atomically; `.npz` by suffix, otherwise `torch.save`."""
    path = Path(path)
    if path.suffix == ".npz":
        return atomic_write(path, lambda fh: np.savez(fh, images=ds.images, labels=ds.labels))
    data = dataset_bytes(ds)
    return atomic_write(path, lambda fh: fh.write(data))
