"""`run(cfg)`: the whole job, from config to a scored, tracked submission. Tests call it directly."""

from __future__ import annotations

import hashlib
import time
import uuid
from contextlib import contextmanager
from dataclasses import replace
from functools import cache
from pathlib import Path

import mlflow
import numpy as np
from joblib import Memory
from omegaconf import DictConfig, OmegaConf

from recon import scoring
from recon.atomic import atomic_write_json, atomic_write_text
from recon.candidates import Candidates, class_candidates
from recon.config import as_plain, resolved_container
from recon.dataset_io import Dataset, load_dataset
from recon.logits_client import ReplicaLogits
from recon.metrics import diversity, holdout_scores, proxy_mse
from recon.plots import image_grid
from recon.reconstruct import Params, parse_k, parse_seeds, reconstruct
from recon.refine import light_optimize, logits_swap
from recon.replica import build_replica, load_replica, replica_exists
from recon.solvers import SolverSpec, fixed, solve
from recon.submission import write_submission
from recon.tracking import params_from, tracked_run

PARENT_FILE = "mlflow_parent_run_id"


def params_from_cfg(cfg: DictConfig) -> Params:
    p = cfg.pipeline
    ratio = p.medoid_ratio
    return Params(
        k=parse_k(as_plain(p.k)),
        seeds=parse_seeds(as_plain(p.seeds)),
        per_class=int(p.per_class),
        medoid_ratio=None if ratio is None else float(ratio),
        dedup_threshold=float(p.dedup_threshold),
        ranking=str(p.ranking),
        medoid_kind=str(p.medoid_kind),
        centroid_preference=float(p.centroid_preference),
        global_seed=int(cfg.seed),
    )


def objective_of(cfg: DictConfig, replica) -> tuple[str, int | None]:
    """The rule to optimise (the replica's, or matching for a server of unknown rule) and |T| per class."""
    rule = cfg.objective.rule or (replica.rule if replica is not None else "matching")
    scoring.check_rule(rule)
    tpc = cfg.objective.train_per_class
    if tpc is None:
        tpc = replica.meta["sizes"]["train"] // replica.meta["num_classes"] if replica is not None else 500
    return rule, int(tpc)


def spec_from_cfg(cfg: DictConfig, rule: str, train_per_class: int | None) -> SolverSpec:
    sv = {k: as_plain(v) for k, v in cfg.solver.items() if k not in ("name", "fit_on", "folds")}
    for k in ("alpha", "m", "min_sep", "select"):
        if k in sv and not isinstance(sv[k], list):
            sv[k] = [sv[k]]
    folds = cfg.solver.get("folds") or cfg.proxy.folds  # the solver's own choices may use a different split
    return SolverSpec(name=str(cfg.solver.name), rule=rule, per_class=int(cfg.pipeline.per_class),
                      seed=int(cfg.seed), folds=int(folds), train_per_class=train_per_class,
                      **{k: tuple(v) if isinstance(v, list) else v for k, v in sv.items()})


def cached_candidates(cache_dir: str):
    """k-means results keyed by (images, k, seeds): folds, sweeps and re-runs share them."""
    return Memory(location=str(Path(cache_dir) / "kmeans"), verbose=0).cache(class_candidates)


FIT_ON = ("aux", "train", "more_data")


def fit_source(fit_on: str, aux: Dataset, replica, rule: str) -> Dataset:
    """What a solver is fitted on: aux (always, for a real submission) or, on a replica only, a reference.

    `train` is the oracle: the hidden train set, targets included, so it shows the headroom left.
    `more_data` is aux plus the hidden images that are not targets: 1.7x the data on digits, no sight of the
    targets, so it shows how much of the oracle's lead more data would buy and how much is having seen G."""
    if fit_on not in FIT_ON:
        raise ValueError(f"solver.fit_on={fit_on!r}: choose one of {', '.join(FIT_ON)}")
    if fit_on == "aux":
        return aux
    if replica is None:
        raise ValueError(f"solver.fit_on={fit_on} needs challenge=replica: it fits on the hidden train set")
    if fit_on == "train":
        return replica.train
    if rule not in scoring.TARGET_RULES:
        raise ValueError(f"solver.fit_on=more_data with objective.rule={rule}: {rule} is scored on all of T, so "
                         "fitting on T would be scored on its own images; use it with matching or coverage")
    rest = replica.train_without_targets()
    return Dataset(np.concatenate([aux.images, rest.images]), np.concatenate([aux.labels, rest.labels]))


def ensure_replica(cfg: DictConfig):
    ch = cfg.challenge
    if not replica_exists(ch.dir):
        b = ch.build
        print(f"recon: building the {b.pool} replica in {ch.dir} (first use) ...", flush=True)
        from recon.builtin_data import load_pool

        build_replica(
            ch.dir, pool=load_pool(b.pool), pool_name=b.pool, aux_per_class=b.aux_per_class,
            train_per_class=b.train_per_class, targets_per_class=b.targets_per_class, seed=b.seed,
            rule=b.rule, epochs=b.epochs,
        )
    return load_replica(ch.dir)


def output_dir(cfg: DictConfig) -> Path:
    """Hydra's job directory when Hydra runs us; otherwise a fresh one under paths.runs."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(cfg.paths.runs) / f"{time.strftime('%Y-%m-%d_%H-%M-%S')}-{uuid.uuid4().hex[:6]}"


def hydra_context() -> tuple[list[str], str | None]:
    """The job's overrides and, inside a sweep, the parent run id the sweep callback left for us."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return [], None
    hc = HydraConfig.get()
    overrides = list(hc.overrides.task)
    parent = None
    if str(hc.mode) == "RunMode.MULTIRUN":
        f = Path(hc.sweep.dir) / PARENT_FILE
        parent = f.read_text().strip() if f.is_file() else None
    return overrides, parent


class Timer:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[f"seconds_{name}"] = round(time.perf_counter() - t0, 4)


def run(cfg: DictConfig) -> dict:
    """Reconstruct, refine, write, score and log one submission; returns the summary dict."""
    OmegaConf.resolve(cfg.paths)  # the state root is fixed once, here
    out_dir = output_dir(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    overrides, parent = hydra_context()
    container = resolved_container(cfg)
    tr = cfg.tracking
    tags = {"hydra_overrides": " ".join(overrides)[:5000], **{k: str(v) for k, v in as_plain(tr.tags).items()}}
    parent = parent or tr.get("parent_run_id")
    with tracked_run(tr.uri, tr.experiment, tr.artifact_root, run_name=str(cfg.name), parent_run_id=parent,
                     tags=tags) as active:
        mlflow.log_params(params_from(container))
        atomic_write_text(out_dir / "config_resolved.yaml", OmegaConf.to_yaml(OmegaConf.create(container)))
        summary = _run_stages(cfg, out_dir, active.info.run_id)
        (out_dir / "summary.json").unlink(missing_ok=True)
        atomic_write_json(out_dir / "summary.json", summary)
        mlflow.log_artifact(str(out_dir / "config_resolved.yaml"))
        hydra_dir = out_dir / ".hydra"
        if hydra_dir.is_dir():
            mlflow.log_artifacts(str(hydra_dir), artifact_path=".hydra")
    print_summary(summary)
    return summary


def _run_stages(cfg: DictConfig, out_dir: Path, run_id: str) -> dict:
    timer = Timer()
    p = params_from_cfg(cfg)
    replica = None
    with timer.stage("load"):
        if cfg.challenge.kind == "replica":
            replica = ensure_replica(cfg)
            aux = replica.aux
            mlflow.set_tag("replica_id", replica.id)
            mlflow.set_tag("replica_rule", replica.rule)
        else:
            aux = load_dataset(cfg.challenge.aux_path)
    cand_fn = cached_candidates(cfg.paths.cache)
    rule, train_pc = objective_of(cfg, replica)
    mlflow.set_tags({"objective_rule": rule, "solver": str(cfg.solver.name)})
    fit_on = str(cfg.solver.get("fit_on", "aux"))
    with timer.stage("reconstruct"):
        if cfg.solver.name == "seed":
            if fit_on != "aux":
                raise ValueError("solver.fit_on: the seed recipes always fit on aux; choose a solver to fit elsewhere")
            rec = reconstruct(aux, p, candidate_fn=cand_fn)
            images, labels = rec.images, rec.labels
            n_medoids = int((rec.chosen.kind != "centroid").sum())

            def build(d):
                r = reconstruct(d, p, candidate_fn=cand_fn, progress=False)
                return r.images, r.labels
        else:
            spec = spec_from_cfg(cfg, rule, train_pc)
            source = fit_source(fit_on, aux, replica, rule)
            if fit_on != "aux":
                mlflow.set_tags({"fit_on": fit_on, **({"oracle": "true"} if fit_on == "train" else {})})
            sol = solve(source, spec)
            images, labels, n_medoids = sol.images, sol.labels, None
            chosen = {f"solver_{k}": v for k, v in sol.info.items() if not isinstance(v, dict)}
            mlflow.log_metrics({k: float(v) for k, v in chosen.items() if not isinstance(v, str)})
            mlflow.set_tags({k: v for k, v in chosen.items() if isinstance(v, str)})
            frozen = fixed(spec, sol.info)  # the held-out metric re-fits with the chosen settings on each fold

            def build(d):
                r = solve(d, frozen)
                return r.images, r.labels
    client = None
    with timer.stage("refine"):
        rname = cfg.refine.name
        if rname != "none":
            client = make_logits_client(cfg, replica)
        if rname == "logits_swap":
            rf = cfg.refine
            swap_p = replace(p, k=parse_k(as_plain(rf.pool_k)), seeds=parse_seeds(as_plain(rf.pool_seeds)))
            images, info = logits_swap(images, labels, _swap_pool(aux, swap_p), client, n_swap=int(rf.n_swap),
                                       min_mse_to_class=float(rf.min_mse_to_class), medoid_kind=p.medoid_kind)
        elif rname == "light_optimize":
            rf = cfg.refine
            images, info = light_optimize(images, labels, client, rounds=int(rf.rounds), sigma=float(rf.sigma),
                                          max_drift_mse=float(rf.max_drift_mse), seed=int(cfg.seed))
        elif rname == "none":
            info = {}
        else:
            raise ValueError(f"refine={rname!r}: choose none, logits_swap or light_optimize")
    with timer.stage("submission"):
        sub_path = write_submission(out_dir / "submission.npz", images, images.shape)
        sha = hashlib.sha256(sub_path.read_bytes()).hexdigest()
        image_grid(images, labels, out_dir / "submission_grid.png")
    metrics: dict[str, float] = {}
    with timer.stage("metrics"):
        metrics.update(proxy_mse(images, labels, aux))
        metrics.update(diversity(images, labels))
    if cfg.proxy.enabled:
        with timer.stage("holdout"):
            metrics.update(holdout_scores(aux, build, per_class=p.per_class, folds=int(cfg.proxy.folds),
                                          seed=int(cfg.seed), train_per_class=train_pc,
                                          repeats=int(cfg.proxy.get("repeats", 1)),
                                          pooled=cfg.solver.get("allocation", "per_class") == "global"))
    with timer.stage("score"):
        if replica is not None:
            all_scores = replica.score_all(images)
            metrics.update({f"score_{r}": v for r, v in all_scores.items()})
            metrics.update({f"score_{r}_redrawn": v for r, v in replica.redrawn_scores(images).items()})
            metrics["submission_score"] = all_scores[replica.rule]
        elif cfg.challenge.submit:
            client = client or make_logits_client(cfg, None)
            response = client.submit(sub_path)
            mlflow.set_tag("submission_id", str(response.get("submission_id")))
            if isinstance(response.get("score"), (int, float)):
                metrics["submission_score"] = float(response["score"])
    metrics["n_logits_queries"] = float(client.n_queries if client else 0)
    metrics["n_logits_images"] = float(client.n_images if client else 0)
    metrics["n_logits_cached"] = float(client.n_cached if client else 0)
    metrics.update({f"refine_{k}": float(v) for k, v in info.items()})
    metrics.update(timer.seconds)
    mlflow.log_metrics(metrics)
    mlflow.set_tag("submission_sha256", sha)
    mlflow.log_artifact(str(sub_path))
    mlflow.log_artifact(str(out_dir / "submission_grid.png"))
    return {
        "run_id": run_id,
        "submission": str(sub_path),
        "submission_sha256": sha,
        "rule": replica.rule if replica else None,
        "replica_id": replica.id if replica else None,
        "n_medoids": n_medoids,
        "objective_rule": rule,
        "metrics": metrics,
    }


def _swap_pool(aux, p: Params):
    """Recipe final's swap pool, built per class on demand and not cached on disk: over 200 seeds and 4 k it
    is hundreds of MB per class, and only the classes that get a swap need it."""
    @cache
    def pool_for(c: int) -> Candidates:
        cand = class_candidates(aux.of_class(c), cls=c, ks=p.k, seeds=p.seeds, global_seed=p.global_seed,
                                progress_desc=f"swap pool, class {c}: {len(p.seeds)} seeds x k={list(p.k)}")
        keep = np.flatnonzero((cand.kind == "centroid") | (cand.kind == p.medoid_kind))
        cand = cand.take(keep)
        is_member = np.flatnonzero(cand.member >= 0)  # the same aux image recurs across seeds and k: once
        _, first = np.unique(cand.member[is_member], return_index=True)
        return cand.take(np.concatenate([np.flatnonzero(cand.member < 0), is_member[first]]))

    return pool_for


def make_logits_client(cfg: DictConfig, replica):
    """In-process logits for a local replica; the HTTP client (with its ledger) for a server."""
    if replica is not None:
        return ReplicaLogits(replica)
    from recon.client import client_from_cfg

    return client_from_cfg(cfg.challenge)


def print_summary(s: dict) -> None:
    m = s["metrics"]
    lines = [f"recon run {s['run_id']}"]
    if "submission_score" in m:
        where = f"replica {s['replica_id']}" if s["replica_id"] else "server"
        lines.append(f"  score ({s['rule'] or 'server rule'}, {where}): {m['submission_score']:.6f}")
    if "score_matching" in m:
        lines.append("  all rules: " + "  ".join(f"{r}={m[f'score_{r}']:.5f}" for r in scoring.RULES))
    if "holdout_matching" in m:
        lines.append("  holdout:   " + "  ".join(f"{r}={m[f'holdout_{r}']:.5f}" for r in scoring.RULES))
    lines.append(f"  objective={s['objective_rule']}  proxy_mse={m['proxy_mse']:.5f}  "
                 f"diversity mean={m['diversity_mean_pairwise_mse']:.5f} min={m['diversity_min_pairwise_mse']:.5f}"
                 + (f"  medoids={s['n_medoids']}" if s["n_medoids"] is not None else ""))
    lines.append(f"  logits calls={int(m['n_logits_queries'])}  seconds: "
                 + " ".join(f"{k[8:]}={v:.1f}" for k, v in m.items() if k.startswith("seconds_")))
    lines.append(f"  submission: {s['submission']}")
    lines.append(f"  sha256: {s['submission_sha256']}")
    print("\n".join(lines), flush=True)
