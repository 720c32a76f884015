"""Train the refocus network: patches from the simulator (or stored z-stacks), AdamW with warm-up and cosine decay,
periodic validation on fields never trained on, checkpoints that double as weights files, and resume.

Outputs in the run folder: `checkpoint.pt` (latest, with optimizer state: resume from it), `weights.pt` (final
weights, no optimizer: ship or load this), `history.csv` (one validation row per `validation_every` steps) and
`config.yaml` (the configuration that ran). A run that trains the focus head calibrates it on the validation
fields at the end (calibrate_focus_head); that calibration is in `weights.pt`, not in `checkpoint.pt`, so a resumed
run calibrates afresh.
"""

from __future__ import annotations

import csv
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch.nn import functional
from tqdm import tqdm

from acquire_refocus.config import AppConfig, ModelConfig, SimulatedTrainingConfig, dump_config, replace
from acquire_refocus.errors import ConfigError, WeightsError
from acquire_refocus.logs import kv
from acquire_refocus.model import data as training_data
from acquire_refocus.model.checkpoint import (
    DEFAULT_WEIGHTS,
    checkpoint_payload,
    payload_model_config,
    read_payload,
    write_payload,
)
from acquire_refocus.model.envelope import measured_snr_range
from acquire_refocus.model.fusion import magnitude_margin_um
from acquire_refocus.model.losses import RefocusLoss, defocus_loss
from acquire_refocus.model.network import (
    LOG_SIGMA_ROW,
    SIGN_LOGIT_ROW,
    RefocusNetwork,
    build_network,
    parameter_count,
)
from acquire_refocus.model.normalization import NormalizationParams
from acquire_refocus.outputs import output_folder

log = logging.getLogger(__name__)

WARMUP_FRACTION = 0.03
FINAL_LR_FRACTION = 0.05
POOL_WINDOWS = 12
PLANES_PER_WINDOW = 8
REFRESH_EVERY_STEPS = 12
SIGN_CALIBRATION_MIN_UM = 1.0
_WEIGHT_PATHS = frozenset({"weights", "pretrained_encoder"})  # model settings that name files, not the network
# Model settings that only choose the focus head's design: initial weights with another head start the new head fresh.
_HEAD_SETTINGS = frozenset({"focus_input"})


@dataclass
class ValidationResult:
    step: int
    loss: float
    psnr_input_db: float
    psnr_output_db: float
    defocus_mae_um: float
    magnitude_mae_um: float = math.nan  # of the unsigned estimate |d| (NaN in checkpoints from before it)

    @property
    def psnr_gain_db(self) -> float:
        return self.psnr_output_db - self.psnr_input_db


@dataclass
class TrainResult:
    weights_path: Path
    checkpoint_path: Path
    steps: int
    wall_time_s: float
    history: list[ValidationResult] = field(default_factory=list)


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("training.device is 'cuda' but PyTorch sees no CUDA device here")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def learning_rate(progress: float, peak: float) -> float:
    """Linear warm-up over the first WARMUP_FRACTION of training, then cosine decay to FINAL_LR_FRACTION of the
    peak; `progress` in [0, 1] is the fraction of training done (by steps or by wall time)."""
    if progress < WARMUP_FRACTION:
        return peak * max(progress, 1e-3) / WARMUP_FRACTION
    decay = min(1.0, (progress - WARMUP_FRACTION) / (1.0 - WARMUP_FRACTION))
    return peak * (FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * decay)))


def psnr_db(estimate: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR with data_range = the target's own max - min."""
    dims = tuple(range(1, target.ndim))
    data_range = target.amax(dim=dims) - target.amin(dim=dims)
    mse = ((estimate - target) ** 2).mean(dim=dims).clamp_min(1e-12)
    return 10.0 * torch.log10(data_range.clamp_min(1e-6) ** 2 / mse)


def validation_metrics(
    network: RefocusNetwork,
    criterion: RefocusLoss,
    batch: training_data.PatchBatch,
    device: torch.device,
    step: int,
    chunk: int = 16,
    train_mode: str = "all",
) -> ValidationResult:
    """Loss, PSNR of input and output against the target, and defocus MAE on a fixed batch (eval mode)."""
    network.eval()
    losses, psnr_in, psnr_out, errors, magnitude_errors = [], [], [], [], []
    with torch.no_grad():
        for start in range(0, len(batch.inputs), chunk):
            x = torch.from_numpy(batch.inputs[start : start + chunk]).to(device)
            y = torch.from_numpy(batch.targets[start : start + chunk]).to(device)
            d = torch.from_numpy(batch.defocus_um[start : start + chunk]).to(device)
            outputs, focus = network.forward_train(x)
            losses.append(float(criterion(outputs, focus, y, d, x).total) * len(x))
            psnr_in.append(psnr_db(x, y))
            psnr_out.append(psnr_db(outputs[-1], y))
            errors.append((focus[:, 0] - d).abs())
            magnitude_errors.append((focus[:, 2] - d.abs()).abs())
    _set_train_mode(network, train_mode)
    count = len(batch.inputs)
    return ValidationResult(
        step=step,
        loss=sum(losses) / count,
        psnr_input_db=float(torch.cat(psnr_in).mean()),
        psnr_output_db=float(torch.cat(psnr_out).mean()),
        defocus_mae_um=float(torch.cat(errors).mean()),
        magnitude_mae_um=float(torch.cat(magnitude_errors).mean()),
    )


def _trained_part(network: RefocusNetwork, train_only: str) -> torch.nn.Module:
    """The modules `training.train_only` names: the whole network, its focus head, or its image decoder."""
    if train_only == "focus_head":
        return network.focus_head
    if train_only == "decoder":
        return network.image_decoder()
    return network


def _set_train_mode(network: RefocusNetwork, train_only: str) -> None:
    """Training mode for what is trained; a frozen part keeps its batch-norm statistics (eval mode)."""
    network.eval()
    _trained_part(network, train_only).train()


def calibrate_focus_head(
    network: RefocusNetwork, batch: training_data.PatchBatch, device: torch.device, chunk: int = 16
) -> tuple[float, float, float]:
    """Calibrate the focus head on held-out frames (validation specimens), folding both results into its last
    layer:

    1. Temperature-scale the sign logit: the T that minimises the sign's log loss, so P(d > 0) is as sure as the
       sign has proved on specimens the head never saw. A coin-toss sign gets a large T and the head reports
       defocus near 0 (magnitude x (2P - 1)) instead of a confident wrong side.
    2. Scale sigma so the Gaussian likelihood of the calibrated estimate's errors is highest (s^2 = mean of
       (error / sigma)^2): sigma was learnt for the estimate before step 1, and the closed loop trusts a frame
       by its confidence, exp(-sigma / 2 um).

    3. Measure the margin of the unsigned estimate (model/fusion.py: the 90th percentile of its excess over the
       true |d|), which the physics-informed fusion subtracts before bounding the image.

    Returns (T, s, margin_um)."""
    network.eval()
    outputs, labels = [], []
    with torch.no_grad():
        for start in range(0, len(batch.inputs), chunk):
            x = torch.from_numpy(batch.inputs[start : start + chunk]).to(device)
            outputs.append(network.forward_focus(x).cpu())
            labels.append(torch.from_numpy(batch.defocus_um[start : start + chunk]))
    focus, defocus_um = torch.cat(outputs), torch.cat(labels)
    logit, magnitude_um, log_sigma_um = focus[:, 3], focus[:, 2], focus[:, 1]
    temperature = 1.0
    away = defocus_um.abs() >= SIGN_CALIBRATION_MIN_UM  # the side of focus means little closer than this
    if bool(away.any()):
        target = (defocus_um[away] > 0).to(logit.dtype)
        temperatures = torch.logspace(math.log10(0.25), 3.0, 200)
        losses = torch.stack(
            [functional.binary_cross_entropy_with_logits(logit[away] / t, target) for t in temperatures]
        )
        temperature = float(temperatures[int(torch.argmin(losses))])
    estimate_um = magnitude_um * torch.tanh(0.5 * logit / temperature)
    sigma_scale = float(torch.sqrt(((estimate_um - defocus_um) / torch.exp(log_sigma_um)).pow(2).mean()))
    last = cast(torch.nn.Linear, network.focus_head.fc[-1])  # FocusHead builds it so
    with torch.no_grad():
        last.weight[SIGN_LOGIT_ROW] /= temperature
        last.bias[SIGN_LOGIT_ROW] /= temperature
        last.bias[LOG_SIGMA_ROW] += math.log(sigma_scale)
    return temperature, sigma_scale, magnitude_margin_um(magnitude_um.tolist(), defocus_um.tolist())


def _load_initial_weights(network: RefocusNetwork, path: Path, model_config: ModelConfig) -> dict[str, Any]:
    """Start from another run's weights: same architecture settings required; parameters whose shape differs
    (a focus head of another design) keep their fresh initialisation, and the log says which. Returns what the
    new weights' metadata records about where they started."""
    payload, sha256 = read_payload(path)
    _require_same_model(payload, model_config, f"training.initial_weights {path}", ignore=_HEAD_SETTINGS)
    own = network.state_dict()
    usable = {k: v for k, v in payload["state_dict"].items() if k in own and own[k].shape == v.shape}
    fresh = sorted(k for k in own if k not in usable)
    network.load_state_dict(usable, strict=False)
    log.info(kv("initial_weights", path=path, loaded=len(usable), fresh=",".join(fresh) or "-"))
    return {
        "file": path.name,
        "sha256": sha256,
        "fresh_parameters": fresh,
        "training": payload.get("metadata", {}).get("training"),
    }


def _resolve_initial_weights(config: AppConfig) -> tuple[AppConfig, Path | None]:
    """The config to train and the weights to start from. 'shipped' fine-tunes the packaged model, so that a
    model for new optics does not start from scratch: the network takes the shipped architecture, which the model
    section may restate but not contradict; a model section that differs starts fresh, and the log says so."""
    setting = config.training.initial_weights
    if setting != "shipped":
        return config, None if setting is None else Path(setting)
    shipped = payload_model_config(read_payload(DEFAULT_WEIGHTS)[0])
    kept = _WEIGHT_PATHS | _HEAD_SETTINGS
    given = {
        name: getattr(config.model, name)
        for name in config.model.model_fields_set
        if name not in kept and name != "weights_per_channel"
    }
    shipped_settings = shipped.model_dump(exclude={*kept, "weights_per_channel"})
    if type(config.model) is not type(shipped) or any(shipped_settings[k] != v for k, v in given.items()):
        log.info(
            kv(
                "initial_weights_fresh",
                reason="the model section differs from the shipped model's architecture",
                given=",".join(f"{name}:{value}" for name, value in sorted(given.items())),
                shipped=shipped.model_dump_json(exclude={*_WEIGHT_PATHS, "weights_per_channel"}),
            )
        )
        return config, None
    model = replace(shipped, **{name: getattr(config.model, name) for name in config.model.model_fields_set & kept})
    return replace(config, model=model), DEFAULT_WEIGHTS


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _resume_state(path: Path, model_config: ModelConfig) -> dict[str, Any]:
    payload, _ = read_payload(path)
    if "optimizer" not in payload or "step" not in payload:
        raise WeightsError(f"{path}: a weights file without optimizer state; resume needs a training checkpoint.pt")
    _require_same_model(payload, model_config, str(path))
    return payload


def _require_same_model(
    payload: dict[str, Any], model_config: ModelConfig, source: str, ignore: frozenset[str] = frozenset()
) -> None:
    """ConfigError unless the file's network settings are the config's (files store them without weight paths),
    settings in `ignore` aside."""
    saved = payload_model_config(payload).model_dump(mode="json", exclude={*_WEIGHT_PATHS, *ignore})
    current = model_config.model_dump(mode="json", exclude={*_WEIGHT_PATHS, *ignore})
    if saved != current:
        raise ConfigError(f"{source}: was trained with model settings {saved}, the config asks for {current}")


@dataclass
class _TrainingData:
    """The training source, the fixed validation windows, and what the weights' metadata says about them."""

    source: training_data.WindowSource
    validation_windows: list[training_data.Window]
    description: dict[str, Any]


def _training_data(config: AppConfig, patch_px: int) -> _TrainingData:
    """The data `training.data` names: simulated (with or without domain randomisation) or stored."""
    training = config.training
    if isinstance(training, SimulatedTrainingConfig) and training.randomization is not None:
        randomized, validation_windows = training_data.randomized_sources(config, window_px=2 * patch_px)
        randomized.planes_per_window = PLANES_PER_WINDOW
        return _TrainingData(
            randomized,
            validation_windows,
            {
                "source": "simulated, domain-randomised",
                "train_specimen_seeds": [randomized.seeds[0], randomized.seeds[-1]],
                "train_fields": len(randomized.fields),
                "families": sorted({draw.family for draw in randomized.draws.values()}),
                "envelope": training.randomization.model_dump(mode="json"),
                "optics_variants": [o.model_dump(mode="json") for o in randomized.optics_variants],
            },
        )
    if isinstance(training, SimulatedTrainingConfig):
        simulated, validation_windows = training_data.simulated_sources(config, window_px=2 * patch_px)
        simulated.planes_per_window = PLANES_PER_WINDOW
        validation_specimens = math.ceil(training.validation_fields / training_data.FIELDS_PER_SPECIMEN)
        return _TrainingData(
            simulated,
            validation_windows,
            {
                "source": "simulated",
                "train_specimen_seeds": sorted({f.seed for f in simulated.fields}),
                "train_fields": len(simulated.fields),
                "validation_specimen_seeds": sorted(
                    {training_data.VALIDATION_SEED_BASE + i for i in range(validation_specimens)}
                ),
            },
        )
    stored, validation_windows = training_data.stored_sources(config)
    return _TrainingData(stored, validation_windows, {"source": "stored", "dataset_dir": str(training.dataset_dir)})


def _write_history(path: Path, history: list[ValidationResult]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["step", "loss", "psnr_input_db", "psnr_output_db", "psnr_gain_db", "defocus_mae_um", "magnitude_mae_um"]
        )
        for row in history:
            writer.writerow(
                [
                    row.step,
                    f"{row.loss:.5f}",
                    f"{row.psnr_input_db:.3f}",
                    f"{row.psnr_output_db:.3f}",
                    f"{row.psnr_gain_db:.3f}",
                    f"{row.defocus_mae_um:.3f}",
                    f"{row.magnitude_mae_um:.3f}",
                ]
            )


class Trainer:
    """One training run: built from the config (and a checkpoint to resume), advanced by `step`, validated by
    `validate` (history.csv and checkpoint.pt), written by `finish` (weights.pt). `run` is the loop that `train`
    runs: its learning-rate schedule follows steps or wall time, whichever is further along."""

    def __init__(
        self, config: AppConfig, out_dir: Path | None = None, steps: int | None = None, resume: Path | None = None
    ) -> None:
        config, start_from = _resolve_initial_weights(config)
        self.config = config
        training = config.training
        self.total_steps = int(steps if steps is not None else training.steps)
        self.out_dir = (
            output_folder(out_dir, "--out")
            if out_dir is not None
            else output_folder(training.checkpoint_dir, "training.checkpoint_dir")
        )
        (self.out_dir / "config.yaml").write_text(dump_config(config), encoding="utf-8")
        if training.num_threads is not None:
            torch.set_num_threads(training.num_threads)
        self.device = pick_device(training.device)
        _seed_everything(training.seed)

        self.network = build_network(config.model).to(self.device)
        self.initial_weights = None
        if start_from is not None:
            self.initial_weights = _load_initial_weights(self.network, start_from, config.model)
        if training.train_only != "all":
            self.network.requires_grad_(False)
            _trained_part(self.network, training.train_only).requires_grad_(True)
        self.criterion = RefocusLoss(config.loss).to(self.device)
        self.trainable = [p for p in self.network.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=training.learning_rate, weight_decay=1e-4)
        self.normalization = NormalizationParams()
        self.start_step = 0
        self.history: list[ValidationResult] = []
        self.previous_wall_s = 0.0
        if resume is not None:
            state = _resume_state(Path(resume), config.model)
            self.network.load_state_dict(state["state_dict"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.start_step = int(state["step"])
            self.previous_wall_s = float(state.get("metadata", {}).get("training", {}).get("wall_time_s", 0.0))
            self.history = [ValidationResult(**row) for row in state.get("history", [])]
            log.info(kv("training_resumed", checkpoint=resume, step=self.start_step))
        self.done = self.start_step

        patch_px = training.patch_size_px
        self.data = _training_data(config, patch_px)
        self.validation_batch = training_data.fixed_batch(self.data.validation_windows, patch_px, self.normalization)
        # what brightness the model sees in training, so frames far outside it are flagged (model/envelope.py)
        planes = [plane for window in self.data.validation_windows for plane in window.planes]
        self.snr_range = measured_snr_range(planes)
        # A data stream that continues differently after a resume, but reproducibly for a given (seed, step).
        rng = np.random.default_rng(np.random.SeedSequence([training.seed, self.start_step]))
        self.pool = training_data.PatchPool(self.data.source, POOL_WINDOWS, patch_px, self.normalization, rng)
        self.running: dict[str, float] = {}  # exponential moving averages of the training loss terms

        log.info(
            kv(
                "training_started",
                architecture=config.model.architecture,
                parameters=parameter_count(self.network),
                device=self.device,
                steps=self.total_steps,
                start_step=self.start_step,
                patch_px=patch_px,
                batch=training.batch_size,
                threads=torch.get_num_threads(),
                out=self.out_dir,
            )
        )
        self.checkpoint_path = self.out_dir / "checkpoint.pt"
        self.weights_path = self.out_dir / "weights.pt"
        self.history_path = self.out_dir / "history.csv"
        self.started = time.monotonic()
        _set_train_mode(self.network, training.train_only)

    def elapsed_s(self) -> float:
        """Training wall time, the resumed run's included."""
        return self.previous_wall_s + time.monotonic() - self.started

    def progress(self, step: int) -> float:
        """Fraction of training done at `step`: by steps, or by wall time where that is further along."""
        max_wall_time_min = self.config.training.max_wall_time_min
        by_steps = step / self.total_steps
        return by_steps if max_wall_time_min is None else max(by_steps, self.elapsed_s() / (max_wall_time_min * 60.0))

    def step(self, step: int, progress: float) -> None:
        """One optimisation step on a fresh batch (`step` counts from 0; `progress` sets the learning rate)."""
        training, loss = self.config.training, self.config.loss
        if step > self.start_step and step % REFRESH_EVERY_STEPS == 0:
            self.pool.refresh()
        batch = self.pool.batch(training.batch_size)
        x = torch.from_numpy(batch.inputs).to(self.device)
        y = torch.from_numpy(batch.targets).to(self.device)
        d = torch.from_numpy(batch.defocus_um).to(self.device)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(progress, training.learning_rate)
        if training.train_only == "focus_head":  # the image loss cannot change: skip the decoder, train the focus
            total = defocus_loss(
                self.network.forward_focus(x), d, loss.defocus_huber_delta_um, loss.defocus_magnitude_loss
            )
            parts: dict[str, float] = {}
        else:
            outputs, focus = self.network.forward_train(x)
            terms = self.criterion(outputs, focus, y, d, x)
            total, parts = terms.total, terms.parts
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()  # type: ignore[no-untyped-call]  # torch leaves Tensor.backward unannotated
        torch.nn.utils.clip_grad_norm_(self.trainable, 5.0)
        self.optimizer.step()
        for name, value in {"loss": float(total.detach()), **parts}.items():
            self.running[name] = value if name not in self.running else 0.95 * self.running[name] + 0.05 * value
        self.done = step + 1

    def validate(self) -> ValidationResult:
        """Validate after the steps done: a row of history.csv, a log line, and checkpoint.pt."""
        training = self.config.training
        result = validation_metrics(
            self.network,
            self.criterion,
            self.validation_batch,
            self.device,
            self.done,
            train_mode=training.train_only,
        )
        self.history.append(result)
        _write_history(self.history_path, self.history)
        log.info(
            kv(
                "validation",
                step=self.done,
                loss=f"{result.loss:.4f}",
                psnr_gain_db=f"{result.psnr_gain_db:.2f}",
                defocus_mae_um=f"{result.defocus_mae_um:.2f}",
                magnitude_mae_um=f"{result.magnitude_mae_um:.2f}",
                train_loss=f"{self.running.get('loss', float('nan')):.4f}",
                elapsed_s=round(time.monotonic() - self.started),
            )
        )
        payload = checkpoint_payload(
            self.network, self.config.model, self.config.optics, self.metadata(), self.normalization
        )
        payload["optimizer"] = self.optimizer.state_dict()
        payload["step"] = self.done
        payload["history"] = [vars(row) for row in self.history]
        write_payload(self.checkpoint_path, payload)
        return result

    def metadata(self) -> dict[str, Any]:
        """What the weights record about their training, after the steps done."""
        training = self.config.training
        last = self.history[-1] if self.history else None
        return {
            "training": {
                "steps": self.done,
                "batch_size": training.batch_size,
                "patch_size_px": training.patch_size_px,
                "learning_rate": training.learning_rate,
                "defocus_range_um": list(training.defocus_range_um),
                "seed": training.seed,
                "device": str(self.device),
                "threads": torch.get_num_threads(),
                "wall_time_s": round(self.elapsed_s(), 1),
                "parameters": parameter_count(self.network),
                "data": self.data.description,
                "loss": self.config.loss.model_dump(mode="json"),
                "train_only": training.train_only,
                "envelope_snr_range": [round(self.snr_range[0], 2), round(self.snr_range[1], 2)],
                "initial_weights": self.initial_weights,
                "validation": None
                if last is None
                else {
                    "step": last.step,
                    "psnr_gain_db": round(last.psnr_gain_db, 3),
                    "psnr_output_db": round(last.psnr_output_db, 3),
                    "defocus_mae_um": round(last.defocus_mae_um, 3),
                },
            }
        }

    def finish(self) -> TrainResult:
        """Validate the last step (unless just done), calibrate a trained focus head, and write weights.pt."""
        if not self.history or self.history[-1].step != self.done:
            self.validate()
        final_metadata = self.metadata()
        if self.config.training.train_only != "decoder":  # the focus head was trained: calibrate it
            temperature, sigma_scale, margin_um = calibrate_focus_head(self.network, self.validation_batch, self.device)
            extra_um = self.config.training.fusion_margin_extra_um
            final_metadata["training"]["focus_calibration"] = {
                "sign_temperature": round(temperature, 4),
                "sigma_scale": round(sigma_scale, 4),
                "magnitude_margin_um": round(margin_um + extra_um, 3),  # what the fusion subtracts
                "magnitude_margin_measured_um": round(margin_um, 3),
                "magnitude_margin_extra_um": extra_um,
            }
            log.info(
                kv("focus_head_calibrated", sign_temperature=f"{temperature:.3g}", sigma_scale=f"{sigma_scale:.3g}")
            )
        final_payload = checkpoint_payload(
            self.network, self.config.model, self.config.optics, final_metadata, self.normalization
        )
        write_payload(self.weights_path, final_payload)
        wall_s = self.elapsed_s()
        log.info(kv("training_finished", steps=self.done, wall_time_s=round(wall_s, 1), weights=self.weights_path))
        return TrainResult(self.weights_path, self.checkpoint_path, self.done, wall_s, self.history)

    def run(self, progress: bool = True) -> TrainResult:
        """Step up to the total (or the time limit), validating every `validation_every` steps, then finish."""
        training = self.config.training
        bar = tqdm(
            range(self.start_step, self.total_steps),
            initial=self.start_step,
            total=self.total_steps,
            disable=not progress,
            desc="train",
            unit="step",
            dynamic_ncols=True,
        )
        for step in bar:
            fraction = self.progress(step)
            if fraction >= 1.0:
                log.info(
                    kv(
                        "training_time_limit",
                        step=step,
                        elapsed_s=round(self.elapsed_s()),
                        limit_min=training.max_wall_time_min,
                    )
                )
                break
            self.step(step, fraction)
            if self.done % training.validation_every == 0 or self.done == self.total_steps:
                self.validate()
            bar.set_postfix({k: f"{v:.3f}" for k, v in self.running.items()}, refresh=False)
        bar.close()
        return self.finish()


def train(
    config: AppConfig,
    out_dir: Path | None = None,
    steps: int | None = None,
    resume: Path | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train per `config` (model, loss, training, optics, simulator sections) and write the run folder."""
    return Trainer(config, out_dir, steps, resume).run(progress)
