"""The replica builder and the `recon-challenge build/score` commands, on tiny pools."""

import json
import subprocess
import sys

import numpy as np
import pytest
from helpers import tiny_pool

from recon import challenge_cli
from recon.classifier import accuracy
from recon.dataset_io import Dataset, load_dataset, save_dataset
from recon.replica import ReplicaError, build_replica, load_replica, sha256_file, split_pool
from recon.submission import write_submission


@pytest.fixture(scope="module")
def replica(tmp_path_factory):
    out = tmp_path_factory.mktemp("rep")
    return build_replica(out, pool=tiny_pool(12), pool_name="tiny", aux_per_class=5, targets_per_class=2, epochs=2)


def test_layout_and_meta(replica):
    root = replica.root
    for rel in ("auxiliary_dataset.pt", "hidden/train.pt", "hidden/targets.pt", "hidden/model.pt", "meta.json"):
        assert (root / rel).is_file(), rel
    meta = json.loads((root / "meta.json").read_text())
    assert meta["sizes"] == {"aux": 50, "train": 70, "targets": 20}
    assert meta["rule"] == "matching" and meta["task_id"] == "12-data-reconstruction"
    for rel, digest in meta["files"].items():
        assert sha256_file(root / rel) == digest
    assert 0.0 <= meta["classifier"]["heldout_accuracy"] <= 1.0
    # the recorded accuracies are those of the saved model
    assert meta["classifier"]["train_accuracy"] == accuracy(replica.model, replica.train.images, replica.train.labels)
    assert meta["recon_version"]


def test_split_is_disjoint_per_class_and_targets_come_from_train(replica):
    aux, train, tgt = replica.aux, replica.train, replica.targets
    flat = lambda d: {x.tobytes() for x in d.images}  # noqa: E731
    assert not flat(aux) & flat(train)
    assert flat(tgt) <= flat(train)
    assert np.bincount(tgt.labels).tolist() == [2] * 10
    assert np.bincount(aux.labels).tolist() == [5] * 10
    assert (np.diff(aux.labels) < 0).any(), "aux must not be sorted by class"


def test_build_is_deterministic(tmp_path, replica):
    again = build_replica(tmp_path, pool=tiny_pool(12), pool_name="tiny", aux_per_class=5, targets_per_class=2,
                          epochs=2)
    assert again.meta["files"] == replica.meta["files"]
    assert again.id == replica.id


def test_tampered_replica_is_refused(tmp_path):
    rep = build_replica(tmp_path, pool=tiny_pool(4), aux_per_class=2, targets_per_class=1, epochs=1)
    save_dataset(rep.root / "hidden/targets.pt", Dataset(rep.targets.images * 0.5, rep.targets.labels))
    with pytest.raises(ReplicaError, match="sha256 does not match"):
        load_replica(rep.root)


def test_pool_too_small_gives_clear_message():
    with pytest.raises(ReplicaError, match=r"class 0 has only 12 images, but --aux-per-class 10 \+ "
                                           r"--train-per-class 5 needs 15"):
        split_pool(tiny_pool(12), aux_per_class=10, train_per_class=5, seed=0, pool_name="tiny")


def test_too_few_train_for_targets(tmp_path):
    with pytest.raises(ReplicaError, match="fewer than --targets-per-class 10"):
        build_replica(tmp_path, pool=tiny_pool(12), aux_per_class=5, targets_per_class=10, epochs=1)


def test_logits_shape_and_score_of_targets_is_zero(replica):
    logits = replica.logits(replica.aux.images[:7])
    assert logits.shape == (7, 10) and logits.dtype == np.float32
    assert all(v == pytest.approx(0.0, abs=1e-6) for v in replica.score_all(replica.targets.images).values())


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "recon.challenge_cli", *args], capture_output=True, text=True)


def test_cli_build_from_explicit_files_and_score(tmp_path):
    pool = tiny_pool(10, seed=3)
    aux, train = split_pool(pool, aux_per_class=4, train_per_class=None, seed=1)
    save_dataset(tmp_path / "A.pt", aux)
    save_dataset(tmp_path / "T.npz", train)
    res = run_cli("build", "--aux", str(tmp_path / "A.pt"), "--train", str(tmp_path / "T.npz"),
                  "--out", str(tmp_path / "rep"), "--targets-per-class", "3", "--epochs", "1", "--rule", "coverage")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["sizes"] == {"aux": 40, "train": 60, "targets": 30} and summary["rule"] == "coverage"
    np.testing.assert_array_equal(load_dataset(tmp_path / "rep/auxiliary_dataset.pt").images, aux.images)

    rep = load_replica(tmp_path / "rep")
    sub = np.random.default_rng(0).random(rep.targets.images.shape, dtype=np.float32)
    write_submission(tmp_path / "sub.npz", sub, rep.targets.images.shape)
    res = run_cli("score", str(tmp_path / "rep"), str(tmp_path / "sub.npz"), "--all-rules")
    assert res.returncode == 0, res.stderr
    scores = json.loads(res.stdout)["scores"]
    # independent reference: explicit broadcasting and a brute min / scipy-free greedy check
    d_t = ((sub[:, None].astype(np.float64) - rep.train.images[None]) ** 2).mean(axis=(2, 3, 4))
    d_g = ((sub[:, None].astype(np.float64) - rep.targets.images[None]) ** 2).mean(axis=(2, 3, 4))
    assert scores["nearest"] == pytest.approx(d_t.min(1).mean(), abs=1e-6)
    assert scores["coverage"] == pytest.approx(d_g.min(0).mean(), abs=1e-6)
    assert scores["matching"] >= d_g.min(1).mean() - 1e-9  # an assignment can't beat free choice
    one = json.loads(run_cli("score", str(tmp_path / "rep"), str(tmp_path / "sub.npz")).stdout)
    assert one["rule"] == "coverage" and one["score"] == pytest.approx(scores["coverage"], abs=1e-12)
    over = json.loads(run_cli("score", str(tmp_path / "rep"), str(tmp_path / "sub.npz"), "--rule", "matching").stdout)
    assert over["score"] == pytest.approx(scores["matching"], abs=1e-12)


def test_cli_errors_are_clear(tmp_path):
    (tmp_path / "A.pt").write_bytes(b"junk")
    res = run_cli("build", "--aux", str(tmp_path / "A.pt"), "--train", str(tmp_path / "A.pt"),
                  "--out", str(tmp_path / "rep"))
    assert res.returncode == 2
    assert "A.pt" in res.stderr and "not a readable torch file" in res.stderr
    res = run_cli("score", str(tmp_path / "missing"), str(tmp_path / "x.npz"))
    assert res.returncode == 2 and "not a replica directory" in res.stderr


def test_main_returns_code_in_process(tmp_path, capsys):
    assert challenge_cli.main(["score", str(tmp_path), str(tmp_path / "s.npz")]) == 2
    assert "not a replica directory" in capsys.readouterr().err
