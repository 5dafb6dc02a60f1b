"""Compress one model with one method under the shared calibration protocol, evaluate, record.

    python run.py                                   # SAES-SVD on the embedded SmolLM2-135M, ratio 0.2
    python run.py model=smollm2_135m method=svd ratio=0.4
    python run.py method=saes method.aces.enabled=false method.alpha=1.0      # CEALC, fixed alpha
    python run.py -m method=saes method.aces.beta_min=0,0.25 ratio=0.2,0.4   # a sweep
    python run.py model=llama7b method=saes ratio=0.4                        # GPU + network
    python run.py model=llama7b model.path=/data/llama-7b                    # local weights

One JSON record per run under ``results/runs/`` (skipped if it exists; ``force=true``
reruns), mirrored to W&B (``logger.mode=offline`` by default, ``online`` to sync).
"""

import hydra
from omegaconf import DictConfig

from saes.runs.pipeline import run


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
