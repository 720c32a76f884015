"""Scoring the evaluation's methods on the held-out frames: each method's image against the in-focus ground truth,
PSNR (dB) and SSIM from skimage.metrics, in ADU, with data_range = max(truth) - min(truth) of each frame, and its
defocus estimate; the networks run as the daemon runs them (`network_method`). One `Row` per method and frame,
written to metrics.csv.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from acquire_refocus.config import AppConfig, EngineConfig
from acquire_refocus.logs import kv
from acquire_refocus.model.baselines import Method
from acquire_refocus.model.held_out import HeldOutSet, Sample

log = logging.getLogger(__name__)


@dataclass
class Row:
    method: str
    setting: str
    field: str
    defocus_um: float
    psnr_db: float
    ssim: float
    estimate_um: float  # NaN for methods without a defocus estimate
    sigma_um: float
    seconds: float
    magnitude_um: float = math.nan  # the focus head's |d| factor (networks only)
    p_positive: float = math.nan  # the focus head's P(d > 0) (networks only)


def scoring_engine(
    num_threads: int | None = None, physics_fusion: bool = True, physics_path: bool = True
) -> EngineConfig:
    """The engine every evaluation scores a network on: PyTorch in FP32, with the daemon's fusion and physics-path
    switches (model/fusion.py, model/physics_path.py), so that scores do not depend on the backend a config names."""
    return EngineConfig(
        backend="torch",
        precision="fp32",
        num_threads=num_threads,
        physics_fusion=physics_fusion,
        physics_path=physics_path,
    )


def network_method(
    weights: Path | None,
    pixel_size_um: float,
    num_threads: int | None = None,
    physics_fusion: bool = True,
    physics_path: bool = True,
) -> tuple[Method, dict[str, Any]]:
    """The network as `Refocuser` runs it on `scoring_engine`, told the test frames' pixel size (a model trained
    at another one resamples them, as it would on a scope)."""
    from acquire_refocus.refocuser import Refocuser

    refocuser = Refocuser.load(weights, engine=scoring_engine(num_threads, physics_fusion, physics_path))

    last: dict[int, tuple[float, float]] = {}  # id(sample) -> the factors of its result, until factors() asks

    def run(sample: Sample) -> tuple[np.ndarray, float, float]:
        result = refocuser(sample.raw, pixel_size_um=pixel_size_um)
        last[id(sample)] = (result.defocus_um, result.defocus_magnitude_um)
        return result.image, result.defocus_um, result.sigma_um

    def factors(sample: Sample) -> tuple[float, float]:
        """The focus head's two factors of the frame `run` just did: |d| and P(d > 0). The head makes
        defocus = |d| * tanh(logit / 2) = |d| * (2 P - 1), so P follows from the two outputs of the contract."""
        defocus_um, magnitude_um = last.pop(id(sample))
        p_positive = 0.5 * (1.0 + defocus_um / magnitude_um) if magnitude_um > 0 else 0.5
        return magnitude_um, p_positive

    info = {
        "sha256": refocuser.model_sha256,
        "metadata": refocuser.loaded.metadata,
        "architecture": refocuser.loaded.model_config.architecture,
        "parameters": sum(p.numel() for p in refocuser.loaded.network.parameters()),
        "factors": factors,
        "fusion": refocuser.fusion is not None,  # how its images were made, for the report
        "physics_path": refocuser.physics_path is not None,
    }
    return run, info


def network_methods(
    config: AppConfig, weights: Sequence[tuple[str, Path | None]]
) -> tuple[dict[str, Method], dict[str, dict[str, Any]]]:
    """Each labelled network as `network_method` runs it, with its info: the first (the candidate) as the daemon
    of this config runs it (engine.physics_fusion and engine.physics_path) and, when the fusion is on, also alone
    as "LABEL, network alone", to show what the fusion adds; the others alone, for comparison."""
    methods: dict[str, Method] = {}
    networks: dict[str, dict[str, Any]] = {}
    pixel_size_um, threads = config.optics.pixel_size_um, config.engine.num_threads
    for index, (label, path) in enumerate(weights):
        fused = config.engine.physics_fusion and index == 0
        methods[label], networks[label] = network_method(
            path, pixel_size_um, threads, physics_fusion=fused, physics_path=config.engine.physics_path
        )
        if fused:
            alone = f"{label}, network alone"
            methods[alone], networks[alone] = network_method(path, pixel_size_um, threads, physics_fusion=False)
    return methods, networks


def evaluate_methods(
    test_set: HeldOutSet,
    methods: dict[str, Method],
    factors: dict[str, Callable[[Sample], tuple[float, float]]] | None = None,
) -> list[Row]:
    rows = []
    for name, method in methods.items():
        started = time.monotonic()
        for sample in test_set.samples:
            if sample.setting == "tilt" and name.startswith("Wiener"):
                continue  # the tilt setting compares the input, RL and the networks only (time)
            t0 = time.perf_counter()
            image, estimate, sigma = method(sample)
            seconds = time.perf_counter() - t0
            data_range = float(sample.truth.max() - sample.truth.min())
            rows.append(
                Row(
                    method=name,
                    setting=sample.setting,
                    field=sample.field,
                    defocus_um=sample.defocus_um,
                    psnr_db=float(peak_signal_noise_ratio(sample.truth, image, data_range=data_range)),
                    ssim=float(structural_similarity(sample.truth, image, data_range=data_range)),
                    estimate_um=float(estimate),
                    sigma_um=float(sigma),
                    seconds=seconds,
                )
            )
            if factors and name in factors:
                rows[-1].magnitude_um, rows[-1].p_positive = factors[name](sample)
        log.info(kv("evaluated", method=name, frames=len(test_set.samples), seconds=round(time.monotonic() - started)))
    return rows


def write_csv(rows: Sequence[Row], path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            [
                "method",
                "setting",
                "field",
                "defocus_um",
                "psnr_db",
                "ssim",
                "estimate_um",
                "sigma_um",
                "magnitude_um",
                "p_positive",
                "seconds",
            ]
        )
        for r in rows:
            writer.writerow(
                [
                    r.method,
                    r.setting,
                    r.field,
                    f"{r.defocus_um:.3f}",
                    f"{r.psnr_db:.3f}",
                    f"{r.ssim:.4f}",
                    # 6 significant digits: the sign of an estimate near 0 must survive (sign accuracy)
                    "" if math.isnan(r.estimate_um) else f"{r.estimate_um:.6g}",
                    "" if math.isnan(r.sigma_um) else f"{r.sigma_um:.3f}",
                    "" if math.isnan(r.magnitude_um) else f"{r.magnitude_um:.3f}",
                    "" if math.isnan(r.p_positive) else f"{r.p_positive:.6g}",
                    f"{r.seconds:.3f}",
                ]
            )
