"""`recon` / `python -m recon`: a thin Hydra wrapper over `recon.pipeline.run`."""

from __future__ import annotations

import logging

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from recon.config import CONF_DIR, register_resolvers

register_resolvers()
log = logging.getLogger("recon")


def _is_multirun() -> bool:
    return HydraConfig.initialized() and str(HydraConfig.get().mode) == "RunMode.MULTIRUN"


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> dict | None:
    from recon.pipeline import run

    try:
        return run(cfg)
    except Exception as e:
        if not _is_multirun():
            raise
        # In a sweep, one failed job must not stop the others or the summary: its MLflow run is already
        # FAILED with the traceback; the sweep callback reports the failure and sets the exit status.
        log.error("job failed: %s: %s", type(e).__name__, e)
        return {"status": "FAILED", "error": f"{type(e).__name__}: {e}"}


if __name__ == "__main__":
    main()
