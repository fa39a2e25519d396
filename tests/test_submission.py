"""Submission files are validated with the competition's verbatim messages and written atomically."""

import io
import os

import numpy as np
import pytest

from recon.submission import (
    MAX_BYTES,
    SubmissionError,
    load_submission,
    validate_submission_bytes,
    write_submission,
)

SHAPE = (100, 3, 32, 32)


def npz_bytes(**arrays):
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def images(dtype=np.float32, shape=SHAPE, seed=0):
    return np.random.default_rng(seed).random(shape).astype(dtype)


def test_write_then_load_roundtrip_and_deterministic(tmp_path):
    x = images()
    p1, p2 = write_submission(tmp_path / "a.npz", x), write_submission(tmp_path / "b.npz", x)
    np.testing.assert_array_equal(load_submission(p1), x)
    assert p1.read_bytes() == p2.read_bytes()
    with np.load(p1, allow_pickle=False) as z:
        assert z.files == ["images"]


@pytest.mark.parametrize(
    "data,filename,message",
    [
        (npz_bytes(images=images()), "sub.txt", "File must be .npz and contain an 'images' array."),
        (b"plain text", "sub.npz", "File must be .npz and contain an 'images' array."),
        (npz_bytes(pixels=images()), "sub.npz", "File must be .npz and contain an 'images' array."),
        (npz_bytes(images=images(), extra=np.zeros(1)), "sub.npz", "File must be .npz and contain an 'images' array."),
        (npz_bytes(images=images(shape=(100, 3, 32))), "sub.npz",
         "Submitted images must have shape (N, C, H, W), but got (100, 3, 32)."),
        (npz_bytes(images=images(np.float64)), "sub.npz",
         "Submitted images must be of type torch.float32, but got torch.float64."),
        (npz_bytes(images=images(shape=(99, 3, 32, 32))), "sub.npz",
         "Submitted images must have shape (100, 3, 32, 32), but got (99, 3, 32, 32)."),
    ],
)
def test_verbatim_messages(data, filename, message):
    with pytest.raises(SubmissionError) as exc:
        validate_submission_bytes(data, filename, SHAPE)
    assert str(exc.value) == message
    assert exc.value.status == 400


def test_pickled_object_array():
    data = npz_bytes(images=np.array([{"a": 1}], dtype=object))
    with pytest.raises(SubmissionError, match=r"^Failed to read \.npz: "):
        validate_submission_bytes(data, "s.npz", SHAPE)


def test_unconvertible_dtype():
    data = npz_bytes(images=np.array(["a", "b"]))
    with pytest.raises(SubmissionError, match=r"^Failed to convert 'images' to torch tensor: "):
        validate_submission_bytes(data, "s.npz", SHAPE)


@pytest.mark.parametrize("bad", [1.5, -0.1, np.nan])
def test_values_out_of_range(bad):
    x = images()
    x[0, 0, 0, 0] = bad
    with pytest.raises(SubmissionError, match="Submitted images must"):
        validate_submission_bytes(npz_bytes(images=x), "s.npz", SHAPE)


def test_too_large_is_413(tmp_path):
    path = tmp_path / "big.npz"
    with open(path, "wb") as fh:  # sparse file: the size check must come before reading
        fh.truncate(MAX_BYTES + 1)
    with pytest.raises(SubmissionError, match=f"File too large: {MAX_BYTES + 1} bytes") as exc:
        load_submission(path)
    assert exc.value.status == 413


def test_failed_write_leaves_previous_file(tmp_path):
    path = write_submission(tmp_path / "s.npz", images())
    before = path.read_bytes()
    with pytest.raises(SubmissionError):
        write_submission(path, images(np.float64))
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["s.npz"]
