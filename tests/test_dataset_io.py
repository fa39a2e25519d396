"""Every loader error names the file, the field and the problem."""

import pickle

import numpy as np
import pytest
import torch

from recon.dataset_io import Dataset, DatasetError, load_dataset, save_dataset


def good(n_per_class=3, classes=10, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), n_per_class)
    return rng.random((len(labels), 3, 8, 8), dtype=np.float32), labels


def write_pt(path, obj):
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("suffix", [".pt", ".npz"])
def test_roundtrip(tmp_path, suffix):
    imgs, labels = good()
    path = save_dataset(tmp_path / f"d{suffix}", Dataset(imgs, labels))
    ds = load_dataset(path)
    np.testing.assert_array_equal(ds.images, imgs)
    np.testing.assert_array_equal(ds.labels, labels)
    assert ds.images.dtype == np.float32 and ds.labels.dtype == np.int64
    assert not list(tmp_path.glob(".*tmp")), "atomic write left a temp file"


def test_accepts_torch_tensors_from_competition_file(tmp_path):
    imgs, labels = good()
    p = write_pt(tmp_path / "aux.pt", {"images": torch.from_numpy(imgs), "labels": torch.from_numpy(labels)})
    assert len(load_dataset(p)) == 30


def bad_cases():
    imgs, labels = good()
    return {
        "missing images": ({"labels": labels}, "images", "missing key"),
        "missing labels": ({"images": imgs}, "labels", "missing key"),
        "rank": ({"images": imgs[:, 0], "labels": labels}, "images", "rank 4"),
        "int images": ({"images": (imgs * 10).astype(np.int32), "labels": labels}, "images", "float"),
        "nan": ({"images": np.where(imgs > 0.99, np.nan, imgs), "labels": labels}, "images", "NaN or inf"),
        "inf": ({"images": np.where(imgs > 0.99, np.inf, imgs), "labels": labels}, "images", "NaN or inf"),
        "range": ({"images": imgs * 2, "labels": labels}, "images", r"\[0, 1\]"),
        "negative": ({"images": imgs - 0.5, "labels": labels}, "images", r"\[0, 1\]"),
        "float labels": ({"images": imgs, "labels": labels.astype(np.float32)}, "labels", "integer"),
        "label range": ({"images": imgs, "labels": np.where(labels == 9, 10, labels)}, "labels", r"0\.\.9"),
        "negative label": ({"images": imgs, "labels": np.where(labels == 9, -1, labels)}, "labels", r"0\.\.9"),
        "length": ({"images": imgs, "labels": labels[:-1]}, "labels", "does not match"),
        "label rank": ({"images": imgs, "labels": labels[:, None]}, "labels", "rank 1"),
        "small class": ({"images": imgs[2:], "labels": labels[2:]}, "labels", "at least 2"),
        "uint8 unasked": ({"images": (imgs * 255).astype(np.uint8), "labels": labels}, "images", "uint8"),
    }


@pytest.mark.parametrize("case", list(bad_cases()))
@pytest.mark.parametrize("suffix", [".pt", ".npz"])
def test_bad_files_name_file_field_problem(tmp_path, case, suffix):
    obj, field, problem = bad_cases()[case]
    path = tmp_path / f"bad{suffix}"
    if suffix == ".npz":
        np.savez(path, **obj)
    else:
        write_pt(path, {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in obj.items()})
    with pytest.raises(DatasetError, match=problem) as exc:
        load_dataset(path)
    assert str(path) in str(exc.value)
    assert exc.value.field == field


def test_uint8_converted_only_with_flag(tmp_path):
    imgs, labels = good()
    u8 = (imgs * 255).round().astype(np.uint8)
    path = tmp_path / "u8.npz"
    np.savez(path, images=u8, labels=labels)
    ds = load_dataset(path, convert_uint8=True)
    np.testing.assert_allclose(ds.images, u8 / 255.0, atol=1e-7)


def test_refuses_unsafe_pickle(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        torch.save({"images": Evil(), "labels": torch.zeros(3)}, fh, pickle_module=pickle)
    with pytest.raises(DatasetError, match="unsafe") as exc:
        load_dataset(path)
    assert str(path) in str(exc.value)


def test_refuses_object_npz(tmp_path):
    path = tmp_path / "obj.npz"
    np.savez(path, images=np.array([object()], dtype=object), labels=np.zeros(1))
    with pytest.raises(DatasetError, match="unpickling"):
        load_dataset(path)


def test_not_a_dict_and_missing_and_garbage(tmp_path):
    p = write_pt(tmp_path / "list.pt", [torch.zeros(1)])
    with pytest.raises(DatasetError, match="expected a dict"):
        load_dataset(p)
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(DatasetError, match="not a readable torch file"):
        load_dataset(tmp_path / "junk.pt")
