"""Submission files, written and validated exactly as the competition server does.

The messages of `SubmissionError` are the server's, verbatim (CHALLENGE.md), so a file that passes here
passes there. Where the record has no message (shape against the targets, value range) we use the same style.
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import numpy as np
import torch

from recon.atomic import atomic_write

MAX_BYTES = 209_715_200  # 200 MB, the competition's limit
SUBMISSION_SHAPE = (100, 3, 32, 32)


class SubmissionError(ValueError):
    """A submission the server would refuse; `status` is the HTTP code it would answer with."""

    def __init__(self, message: str, status: int = 400):
        self.status = status
        super().__init__(message)


def _shape_str(shape) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


def validate_images_array(
    images: np.ndarray, expected_shape: tuple[int, ...] | None = SUBMISSION_SHAPE
) -> torch.Tensor:
    """Apply the server's checks to an in-memory array, in the server's order."""
    try:
        tensor = torch.from_numpy(np.asarray(images))
    except Exception as e:  # e.g. strings or objects
        raise SubmissionError(f"Failed to convert 'images' to torch tensor: {e}") from e
    if tensor.ndim != 4:
        raise SubmissionError(f"Submitted images must have shape (N, C, H, W), but got {_shape_str(tensor.shape)}.")
    if tensor.dtype != torch.float32:
        raise SubmissionError(f"Submitted images must be of type torch.float32, but got {tensor.dtype}.")
    if expected_shape is not None and tuple(tensor.shape) != tuple(expected_shape):
        raise SubmissionError(
            f"Submitted images must have shape {_shape_str(expected_shape)}, but got {_shape_str(tensor.shape)}."
        )
    if not torch.isfinite(tensor).all():
        raise SubmissionError("Submitted images must be finite, but got NaN or inf values.")
    lo, hi = float(tensor.min()), float(tensor.max())
    if lo < 0.0 or hi > 1.0:
        raise SubmissionError(f"Submitted images must have values in [0, 1], but got min {lo:.6g}, max {hi:.6g}.")
    return tensor


def read_images_npz(data: bytes) -> np.ndarray:
    """Parse uploaded bytes as the server does; the only accepted content is one `images` array."""
    if len(data) > MAX_BYTES:
        raise SubmissionError(f"File too large: {len(data)} bytes (limit {MAX_BYTES}).", status=413)
    if not zipfile.is_zipfile(io.BytesIO(data)):
        raise SubmissionError("File must be .npz and contain an 'images' array.")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            if list(z.files) != ["images"]:
                raise SubmissionError("File must be .npz and contain an 'images' array.")
            return z["images"]
    except SubmissionError:
        raise
    except Exception as e:
        raise SubmissionError(f"Failed to read .npz: {e}") from e


def validate_submission_bytes(
    data: bytes, filename: str = "submission.npz", expected_shape: tuple[int, ...] | None = SUBMISSION_SHAPE
) -> np.ndarray:
    if not filename.endswith(".npz"):
        raise SubmissionError("File must be .npz and contain an 'images' array.")
    images = read_images_npz(data)
    return validate_images_array(images, expected_shape).numpy()


def load_submission(path: str | os.PathLike, expected_shape: tuple[int, ...] | None = SUBMISSION_SHAPE):
    """Read and validate a submission file; errors are prefixed with the file name."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise SubmissionError(f"File too large: {size} bytes (limit {MAX_BYTES}).", status=413)
        return validate_submission_bytes(path.read_bytes(), path.name, expected_shape)
    except SubmissionError as e:
        raise SubmissionError(f"{path}: {e}", e.status) from e
    except OSError as e:
        raise SubmissionError(f"{path}: cannot read file ({e.strerror})") from e


def submission_bytes(images: np.ndarray, expected_shape: tuple[int, ...] | None = SUBMISSION_SHAPE) -> bytes:
    validate_images_array(images, expected_shape)
    buf = io.BytesIO()
    np.savez(buf, images=images)
    data = buf.getvalue()
    if len(data) > MAX_BYTES:
        raise SubmissionError(f"File too large: {len(data)} bytes (limit {MAX_BYTES}).", status=413)
    return data


def write_submission(
    path: str | os.PathLike, images: np.ndarray, expected_shape: tuple[int, ...] | None = SUBMISSION_SHAPE
) -> Path:
    """Validate, then write atomically (temp file + rename): a failed write leaves no file."""
    data = submission_bytes(images, expected_shape)
    return atomic_write(path, lambda fh: fh.write(data))
