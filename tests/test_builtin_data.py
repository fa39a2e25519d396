import collections
import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.datasets import load_digits
from sklearn.metrics import silhouette_score

from recon.builtin_data import load_cifar10, load_digits_pool, load_pool, make_synthetic
from recon.dataset_io import DatasetError

# ------------------------------------------------------------------------------------------------ digits


def test_digits_pool_shape_range_and_classes():
    ds = load_digits_pool()
    assert ds.images.shape == (1797, 3, 32, 32)
    assert ds.images.dtype == np.float32 and ds.labels.dtype == np.int64
    assert ds.images.min() >= 0.0 and ds.images.max() <= 1.0
    assert ds.images.max() > 0.9  # scaled by 16, not by 255
    assert np.array_equal(np.unique(ds.labels), np.arange(10))
    assert np.array_equal(ds.images[:, 0], ds.images[:, 1])
    assert np.array_equal(ds.images[:, 0], ds.images[:, 2])


def test_digits_upscale_preserves_the_digit():
    ds = load_digits_pool()
    original = load_digits().images / 16.0  # (N, 8, 8)
    pooled = ds.images[:, 0].reshape(-1, 8, 4, 8, 4).mean(axis=(2, 4))
    assert np.array_equal(ds.labels, load_digits().target)
    corr = np.corrcoef(pooled.ravel(), original.ravel())[0, 1]
    assert corr > 0.95


def test_digits_pool_cannot_be_corrupted_by_callers():
    ds = load_digits_pool()
    ds.images[0] = 0.5
    ds.labels[0] = 9
    again = load_digits_pool()
    assert not np.all(again.images[0] == 0.5)
    assert again.labels[0] == load_digits().target[0]


# --------------------------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_per_seed():
    a, b = make_synthetic(20, seed=5), make_synthetic(20, seed=5)
    assert a.images.tobytes() == b.images.tobytes()
    assert a.labels.tobytes() == b.labels.tobytes()
    c = make_synthetic(20, seed=6)
    assert a.images.tobytes() != c.images.tobytes()


def test_synthetic_shape_dtype_range_and_balanced_shuffled_labels():
    ds = make_synthetic(30, num_classes=4, styles_per_class=2, seed=1, size=16)
    assert ds.images.shape == (120, 3, 16, 16)
    assert ds.images.dtype == np.float32 and ds.labels.dtype == np.int64
    assert ds.images.min() >= 0.0 and ds.images.max() <= 1.0
    assert ds.images.std() > 0.1  # not a constant image
    assert np.array_equal(np.bincount(ds.labels), [30, 30, 30, 30])
    assert np.any(np.diff(ds.labels) < 0)  # not sorted by class
    assert len(set(ds.labels[:30].tolist())) > 1


def test_synthetic_rejects_bad_arguments():
    with pytest.raises(ValueError, match="n_per_class"):
        make_synthetic(0)
    with pytest.raises(ValueError, match="seed"):
        make_synthetic(2, seed=-1)


def _style_features(images: np.ndarray) -> np.ndarray:
    """Colour statistics that ignore stripe/texture phase and small shifts: mean, spread, border colour."""
    border = np.concatenate([images[:, :, :2].reshape(len(images), 3, -1),
                             images[:, :, -2:].reshape(len(images), 3, -1),
                             images[:, :, :, :2].reshape(len(images), 3, -1),
                             images[:, :, :, -2:].reshape(len(images), 3, -1)], axis=2)
    return np.concatenate([images.mean(axis=(2, 3)), images.std(axis=(2, 3)), border.mean(axis=2)], axis=1)


def test_synthetic_sub_styles_are_distinct_modes():
    multi = make_synthetic(60, styles_per_class=3, seed=0)
    single = make_synthetic(60, styles_per_class=1, seed=0)
    ratios = []
    for c in range(10):
        feats = _style_features(multi.of_class(c))
        clusters = KMeans(3, n_init=10, random_state=0).fit_predict(feats)
        assert silhouette_score(feats, clusters) > 0.3, f"class {c}: styles do not form clear clusters"
        ratios.append(feats.var(axis=0).sum() / _style_features(single.of_class(c)).var(axis=0).sum())
    assert np.median(ratios) > 3.0  # three styles spread a class far more than one style does


def test_synthetic_classes_are_separable_by_nearest_class_mean():
    ds = make_synthetic(100, seed=3)
    x, y = ds.images.reshape(len(ds), -1), ds.labels
    half = len(ds) // 2
    means = np.stack([x[:half][y[:half] == c].mean(axis=0) for c in range(10)])
    dists = (x[half:] ** 2).sum(1)[:, None] - 2 * x[half:] @ means.T + (means**2).sum(1)[None]
    accuracy = (dists.argmin(axis=1) == y[half:]).mean()
    assert accuracy > 0.6


def test_synthetic_scales_without_per_image_python_work():
    start = time.perf_counter()
    ds = make_synthetic(600)
    elapsed = time.perf_counter() - start
    assert len(ds) == 6000
    assert elapsed < 5.0, f"make_synthetic(600) took {elapsed:.2f}s"


# ---------------------------------------------------------------------------------------------- cifar10


def _write_batch(path: Path, data: np.ndarray, labels, *, protocol: int = pickle.DEFAULT_PROTOCOL,
                 drop: tuple = (), str_keys: bool = False) -> None:
    entry = {b"batch_label": b"training batch 1 of 5", b"data": data, b"labels": list(labels),
             b"filenames": [f"img_{i}.png".encode() for i in range(len(data))]}
    entry = {k: v for k, v in entry.items() if k.decode() not in drop}
    if str_keys:
        entry = {k.decode(): v for k, v in entry.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        pickle.dump(entry, fh, protocol=protocol)


def _fake_batch(seed: int, n: int = 20) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8), rng.permutation(np.arange(n) % 10)


@pytest.fixture
def cifar_root(tmp_path):
    directory = tmp_path / "cifar-10-batches-py"
    names = ["data_batch_1", "data_batch_2", "test_batch"]
    batches = {name: _fake_batch(i) for i, name in enumerate(names)}
    for name, (data, labels) in batches.items():
        _write_batch(directory / name, data, labels)
    return tmp_path, batches


def _expected(batches, names):
    data = np.concatenate([batches[n][0] for n in names])
    labels = np.concatenate([batches[n][1] for n in names])
    return data.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0, labels


def test_cifar10_splits_load_values_labels_in_order(cifar_root):
    root, batches = cifar_root
    for split, names in [("train", ["data_batch_1", "data_batch_2"]), ("test", ["test_batch"]),
                         ("all", ["data_batch_1", "data_batch_2", "test_batch"])]:
        ds = load_cifar10(root, split=split)
        images, labels = _expected(batches, names)
        assert ds.images.dtype == np.float32 and ds.images.shape == images.shape
        np.testing.assert_allclose(ds.images, images, rtol=0, atol=1e-7)
        assert np.array_equal(ds.labels, labels)
    same = load_cifar10(root / "cifar-10-batches-py")  # the directory itself works as well as its parent
    assert same.images.tobytes() == load_cifar10(root).images.tobytes()


def test_cifar10_channel_major_layout(tmp_path):
    data, labels = _fake_batch(0)
    data[0] = 0
    data[0, 0 * 1024 + 2 * 32 + 5] = 255  # R, row 2, col 5
    data[0, 1 * 1024 + 7 * 32 + 1] = 128  # G, row 7, col 1
    data[0, 2 * 1024 + 31 * 32 + 0] = 51  # B, row 31, col 0
    _write_batch(tmp_path / "data_batch_1", data, labels)
    img = load_cifar10(tmp_path).images[0]
    assert img[0, 2, 5] == 1.0
    assert img[1, 7, 1] == pytest.approx(128 / 255)
    assert img[2, 31, 0] == pytest.approx(0.2)
    assert np.count_nonzero(img) == 3


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_reads_any_pickle_protocol_and_str_keys(tmp_path, protocol):
    data, labels = _fake_batch(1)
    _write_batch(tmp_path / "data_batch_3", data, labels, protocol=protocol, str_keys=protocol == 4)
    ds = load_cifar10(tmp_path)  # only data_batch_3 exists: partial copies load
    assert np.array_equal(ds.labels, labels)
    assert np.array_equal(np.rint(ds.images * 255).astype(np.uint8).reshape(len(ds), -1), data)


class _RunsShell:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_cifar10_refuses_code_running_pickle(tmp_path):
    marker = tmp_path / "pwned"
    data, labels = _fake_batch(0)
    with open(tmp_path / "data_batch_1", "wb") as fh:
        pickle.dump({b"data": data, b"labels": list(labels), b"x": _RunsShell(marker)}, fh)
    with pytest.raises(DatasetError, match=r"refuses to unpickle (posix|nt|os)\.system") as info:
        load_cifar10(tmp_path)
    assert info.value.source.endswith("data_batch_1")
    assert not marker.exists()


def test_cifar10_refuses_non_numpy_globals(tmp_path):
    data, labels = _fake_batch(0)
    with open(tmp_path / "data_batch_1", "wb") as fh:
        pickle.dump(collections.OrderedDict([(b"data", data), (b"labels", list(labels))]), fh)
    with pytest.raises(DatasetError, match=r"refuses to unpickle collections\.OrderedDict"):
        load_cifar10(tmp_path)


def test_cifar10_missing_directory_and_batches(tmp_path):
    with pytest.raises(DatasetError, match="not found") as info:
        load_cifar10(tmp_path / "absent")
    assert info.value.field == "<dir>"
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(DatasetError, match="data_batch_1.*data_batch_5"):
        load_cifar10(tmp_path)
    data, labels = _fake_batch(0)
    _write_batch(tmp_path / "cifar-10-batches-py" / "data_batch_1", data, labels)
    with pytest.raises(DatasetError, match="test_batch"):
        load_cifar10(tmp_path, split="test")
    with pytest.raises(ValueError, match="split"):
        load_cifar10(tmp_path, split="validation")


def test_cifar10_missing_key_and_bad_fields_name_the_file(tmp_path):
    data, labels = _fake_batch(0)
    _write_batch(tmp_path / "data_batch_1", data, labels, drop=("labels",))
    with pytest.raises(DatasetError, match="missing key") as info:
        load_cifar10(tmp_path)
    assert info.value.field == "labels" and info.value.source.endswith("data_batch_1")

    _write_batch(tmp_path / "data_batch_1", data[:, :3000], labels)
    with pytest.raises(DatasetError, match=r"\(N, 3072\)") as info:
        load_cifar10(tmp_path)
    assert info.value.field == "data"

    _write_batch(tmp_path / "data_batch_1", data, labels[:-1])
    with pytest.raises(DatasetError) as info:
        load_cifar10(tmp_path)
    assert info.value.field == "labels"

    (tmp_path / "data_batch_1").write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match="not a readable"):
        load_cifar10(tmp_path)


# --------------------------------------------------------------------------------------------- load_pool


def test_load_pool_dispatches(cifar_root):
    root, batches = cifar_root
    assert load_pool("synthetic", n_per_class=5, seed=2).images.tobytes() == \
        make_synthetic(5, seed=2).images.tobytes()
    assert len(load_pool("cifar10", root=root, split="test")) == len(batches["test_batch"][1])
    assert len(load_pool("digits")) == 1797


def test_load_pool_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown pool 'mnist'") as info:
        load_pool("mnist")
    assert all(name in str(info.value) for name in ("digits", "synthetic", "cifar10"))
