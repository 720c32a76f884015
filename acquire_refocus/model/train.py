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
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from acquire_refocus.config import AppConfig, ModelConfig, dump_config
from acquire_refocus.errors import ConfigError, WeightsError
from acquire_refocus.logs import kv
from acquire_refocus.model import data as training_data
from acquire_refocus.model.checkpoint import DEFAULT_WEIGHTS, checkpoint_payload, read_payload, write_payload
from acquire_refocus.model.envelope import measured_snr_range
from acquire_refocus.model.fusion import magnitude_margin_um
from acquire_refocus.model.losses import RefocusLoss, defocus_loss
from acquire_refocus.model.network import LOG_SIGMA_ROW, SIGN_LOGIT_ROW, build_network, parameter_count
from acquire_refocus.model.normalization import NormalizationParams
from acquire_refocus.outputs import output_folder

log = logging.getLogger(__name__)

WARMUP_FRACTION = 0.03
FINAL_LR_FRACTION = 0.05
POOL_WINDOWS = 12
PLANES_PER_WINDOW = 8
REFRESH_EVERY_STEPS = 12
SIGN_CALIBRATION_MIN_UM = 1.0


@dataclass
class ValidationResult:
    step: int
    loss: float
    psnr_input_db: float
    psnr_output_db: float
    defocus_mae_um: float

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


def validate(
    network: torch.nn.Module,
    criterion: RefocusLoss,
    batch: training_data.PatchBatch,
    device: torch.device,
    step: int,
    chunk: int = 16,
    train_mode: str = "all",
) -> ValidationResult:
    """Loss, PSNR of input and output against the target, and defocus MAE on a fixed batch (eval mode)."""
    network.eval()
    losses, psnr_in, psnr_out, errors = [], [], [], []
    with torch.no_grad():
        for start in range(0, len(batch.inputs), chunk):
            x = torch.from_numpy(batch.inputs[start : start + chunk]).to(device)
            y = torch.from_numpy(batch.targets[start : start + chunk]).to(device)
            d = torch.from_numpy(batch.defocus_um[start : start + chunk]).to(device)
            outputs, focus = network.forward_train(x)
            losses.append(float(criterion(outputs, focus, y, d).total) * len(x))
            psnr_in.append(psnr_db(x, y))
            psnr_out.append(psnr_db(outputs[-1], y))
            errors.append((focus[:, 0] - d).abs())
    _set_train_mode(network, train_mode)
    count = len(batch.inputs)
    return ValidationResult(
        step=step,
        loss=sum(losses) / count,
        psnr_input_db=float(torch.cat(psnr_in).mean()),
        psnr_output_db=float(torch.cat(psnr_out).mean()),
        defocus_mae_um=float(torch.cat(errors).mean()),
    )


def _trained_part(network: torch.nn.Module, train_only: str) -> torch.nn.Module:
    """The modules `training.train_only` names: the whole network, its focus head, or its image decoder."""
    if train_only == "focus_head":
        return network.focus_head
    if train_only == "decoder":
        return network.image_decoder()
    return network


def _set_train_mode(network: torch.nn.Module, train_only: str) -> None:
    """Training mode for what is trained; a frozen part keeps its batch-norm statistics (eval mode)."""
    network.eval()
    _trained_part(network, train_only).train()


def calibrate_focus_head(
    network: torch.nn.Module, batch: training_data.PatchBatch, device: torch.device, chunk: int = 16
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
        losses = torch.stack([F.binary_cross_entropy_with_logits(logit[away] / t, target) for t in temperatures])
        temperature = float(temperatures[int(torch.argmin(losses))])
    estimate_um = magnitude_um * torch.tanh(0.5 * logit / temperature)
    sigma_scale = float(torch.sqrt(((estimate_um - defocus_um) / torch.exp(log_sigma_um)).pow(2).mean()))
    last = network.focus_head.fc[-1]
    with torch.no_grad():
        last.weight[SIGN_LOGIT_ROW] /= temperature
        last.bias[SIGN_LOGIT_ROW] /= temperature
        last.bias[LOG_SIGMA_ROW] += math.log(sigma_scale)
    return temperature, sigma_scale, magnitude_margin_um(magnitude_um.tolist(), defocus_um.tolist())


def _load_initial_weights(network: torch.nn.Module, path: Path, model_config: ModelConfig) -> dict[str, Any]:
    """Start from another run's weights: same architecture settings required; parameters whose shape differs
    (a focus head of another design) keep their fresh initialisation, and the log says which. Returns what the
    new weights' metadata records about where they started."""
    payload, sha256 = read_payload(path)
    _require_same_model(payload, model_config, f"training.initial_weights {path}")
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
    shipped = ModelConfig.model_validate(read_payload(DEFAULT_WEIGHTS)[0]["model_config"])
    given = {
        name: getattr(config.model, name)
        for name in config.model.model_fields_set
        if name not in ("weights", "weights_per_channel", "pretrained_encoder")
    }
    if shipped.model_copy(update=given) != shipped:
        log.info(
            kv(
                "initial_weights_fresh",
                reason="the model section differs from the shipped model's architecture",
                given=",".join(f"{name}:{value}" for name, value in sorted(given.items())),
                shipped=shipped.model_dump_json(exclude={"weights", "weights_per_channel", "pretrained_encoder"}),
            )
        )
        return config, None
    model = shipped.model_copy(
        update={"weights": config.model.weights, "pretrained_encoder": config.model.pretrained_encoder}
    )
    return config.model_copy(update={"model": model}), DEFAULT_WEIGHTS


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


def _require_same_model(payload: dict[str, Any], model_config: ModelConfig, source: str) -> None:
    """ConfigError unless the file's network settings are the config's (files store them without weight paths)."""
    saved = ModelConfig.model_validate(payload["model_config"])
    current = model_config.model_copy(update={"weights": None, "pretrained_encoder": None})
    if saved != current:
        raise ConfigError(
            f"{source}: was trained with model settings {saved.model_dump(mode='json')}, "
            f"the config asks for {current.model_dump(mode='json')}"
        )


def train(
    config: AppConfig,
    out_dir: Path | None = None,
    steps: int | None = None,
    resume: Path | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train per `config` (model, loss, training, optics, simulator sections) and write the run folder."""
    config, start_from = _resolve_initial_weights(config)
    training = config.training
    total_steps = int(steps if steps is not None else training.steps)
    out_dir = (
        output_folder(out_dir, "--out")
        if out_dir is not None
        else output_folder(training.checkpoint_dir, "training.checkpoint_dir")
    )
    (out_dir / "config.yaml").write_text(dump_config(config), encoding="utf-8")
    if training.num_threads is not None:
        torch.set_num_threads(training.num_threads)
    device = pick_device(training.device)
    _seed_everything(training.seed)

    network = build_network(config.model).to(device)
    initial_weights = None
    if start_from is not None:
        initial_weights = _load_initial_weights(network, start_from, config.model)
    head_only = training.train_only == "focus_head"
    if training.train_only != "all":
        network.requires_grad_(False)
        _trained_part(network, training.train_only).requires_grad_(True)
    criterion = RefocusLoss(config.loss).to(device)
    trainable = [p for p in network.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=training.learning_rate, weight_decay=1e-4)
    normalization = NormalizationParams()
    start_step = 0
    history: list[ValidationResult] = []
    previous_wall_s = 0.0
    if resume is not None:
        state = _resume_state(Path(resume), config.model)
        network.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        start_step = int(state["step"])
        previous_wall_s = float(state.get("metadata", {}).get("training", {}).get("wall_time_s", 0.0))
        history = [ValidationResult(**row) for row in state.get("history", [])]
        log.info(kv("training_resumed", checkpoint=resume, step=start_step))

    patch_px = training.patch_size_px
    if training.data == "simulated" and training.randomization is not None:
        source, validation_windows = training_data.randomized_sources(config, window_px=2 * patch_px)
        source.planes_per_window = PLANES_PER_WINDOW
        data_description = {
            "source": "simulated, domain-randomised",
            "train_specimen_seeds": [source.seeds[0], source.seeds[-1]],
            "train_fields": len(source.fields),
            "families": sorted({draw.family for draw in source.draws.values()}),
            "envelope": training.randomization.model_dump(mode="json"),
            "optics_variants": [o.model_dump(mode="json") for o in source.optics_variants],
        }
    elif training.data == "simulated":
        source, validation_windows = training_data.simulated_sources(config, window_px=2 * patch_px)
        source.planes_per_window = PLANES_PER_WINDOW
        data_description = {
            "source": "simulated",
            "train_specimen_seeds": sorted({f.seed for f in source.fields}),
            "train_fields": len(source.fields),
            "validation_specimen_seeds": sorted(
                {
                    training_data.VALIDATION_SEED_BASE + i
                    for i in range(math.ceil(training.validation_fields / training_data.FIELDS_PER_SPECIMEN))
                }
            ),
        }
    else:
        source, validation_windows = training_data.stored_sources(config)
        data_description = {"source": "stored", "dataset_dir": str(training.dataset_dir)}
    validation_batch = training_data.fixed_batch(validation_windows, patch_px, normalization)
    # what brightness the model sees in training, so frames far outside it are flagged (model/envelope.py)
    snr_range = measured_snr_range([plane for window in validation_windows for plane in window.planes])
    # A data stream that continues differently after a resume, but reproducibly for a given (seed, step).
    rng = np.random.default_rng(np.random.SeedSequence([training.seed, start_step]))
    pool = training_data.PatchPool(source, POOL_WINDOWS, patch_px, normalization, rng)

    log.info(
        kv(
            "training_started",
            architecture=config.model.architecture,
            parameters=parameter_count(network),
            device=device,
            steps=total_steps,
            start_step=start_step,
            patch_px=patch_px,
            batch=training.batch_size,
            threads=torch.get_num_threads(),
            out=out_dir,
        )
    )
    checkpoint_path = out_dir / "checkpoint.pt"
    weights_path = out_dir / "weights.pt"
    history_path = out_dir / "history.csv"
    started = time.monotonic()

    def metadata(step: int) -> dict[str, Any]:
        last = history[-1] if history else None
        return {
            "training": {
                "steps": step,
                "batch_size": training.batch_size,
                "patch_size_px": patch_px,
                "learning_rate": training.learning_rate,
                "defocus_range_um": list(training.defocus_range_um),
                "seed": training.seed,
                "device": str(device),
                "threads": torch.get_num_threads(),
                "wall_time_s": round(previous_wall_s + time.monotonic() - started, 1),
                "parameters": parameter_count(network),
                "data": data_description,
                "loss": config.loss.model_dump(mode="json"),
                "train_only": training.train_only,
                "envelope_snr_range": [round(snr_range[0], 2), round(snr_range[1], 2)],
                "initial_weights": initial_weights,
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

    def save(step: int) -> None:
        payload = checkpoint_payload(network, config.model, config.optics, metadata(step), normalization)
        payload["optimizer"] = optimizer.state_dict()
        payload["step"] = step
        payload["history"] = [vars(row) for row in history]
        write_payload(checkpoint_path, payload)

    def run_validation(step: int) -> None:
        result = validate(network, criterion, validation_batch, device, step, train_mode=training.train_only)
        history.append(result)
        with history_path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["step", "loss", "psnr_input_db", "psnr_output_db", "psnr_gain_db", "defocus_mae_um"])
            for row in history:
                writer.writerow(
                    [
                        row.step,
                        f"{row.loss:.5f}",
                        f"{row.psnr_input_db:.3f}",
                        f"{row.psnr_output_db:.3f}",
                        f"{row.psnr_gain_db:.3f}",
                        f"{row.defocus_mae_um:.3f}",
                    ]
                )
        log.info(
            kv(
                "validation",
                step=step,
                loss=f"{result.loss:.4f}",
                psnr_gain_db=f"{result.psnr_gain_db:.2f}",
                defocus_mae_um=f"{result.defocus_mae_um:.2f}",
                train_loss=f"{running.get('loss', float('nan')):.4f}",
                elapsed_s=round(time.monotonic() - started),
            )
        )
        save(step)

    _set_train_mode(network, training.train_only)
    running: dict[str, float] = {}
    bar = tqdm(
        range(start_step, total_steps),
        initial=start_step,
        total=total_steps,
        disable=not progress,
        desc="train",
        unit="step",
        dynamic_ncols=True,
    )
    budget_s = None if training.max_wall_time_min is None else training.max_wall_time_min * 60.0
    done = start_step
    for step in bar:
        elapsed_s = previous_wall_s + time.monotonic() - started
        progress_fraction = step / total_steps if budget_s is None else max(step / total_steps, elapsed_s / budget_s)
        if progress_fraction >= 1.0:
            log.info(
                kv("training_time_limit", step=step, elapsed_s=round(elapsed_s), limit_min=training.max_wall_time_min)
            )
            break
        if step > start_step and step % REFRESH_EVERY_STEPS == 0:
            pool.refresh()
        batch = pool.batch(training.batch_size)
        x = torch.from_numpy(batch.inputs).to(device)
        y = torch.from_numpy(batch.targets).to(device)
        d = torch.from_numpy(batch.defocus_um).to(device)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(progress_fraction, training.learning_rate)
        if head_only:  # the image loss cannot change: skip the decoder and train on the focus loss alone
            total = defocus_loss(network.forward_focus(x), d, config.loss.defocus_huber_delta_um)
            parts: dict[str, float] = {}
        else:
            outputs, focus = network.forward_train(x)
            terms = criterion(outputs, focus, y, d)
            total, parts = terms.total, terms.parts
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 5.0)
        optimizer.step()
        for name, value in {"loss": float(total.detach()), **parts}.items():
            running[name] = value if name not in running else 0.95 * running[name] + 0.05 * value
        done = step + 1
        if done % training.validation_every == 0 or done == total_steps:
            run_validation(done)
        bar.set_postfix({k: f"{v:.3f}" for k, v in running.items()}, refresh=False)
    bar.close()
    if not history or history[-1].step != done:
        run_validation(done)

    final_metadata = metadata(done)
    if training.train_only != "decoder":  # the focus head was trained: calibrate it on validation specimens
        temperature, sigma_scale, margin_um = calibrate_focus_head(network, validation_batch, device)
        final_metadata["training"]["focus_calibration"] = {
            "sign_temperature": round(temperature, 4),
            "sigma_scale": round(sigma_scale, 4),
            "magnitude_margin_um": round(margin_um, 3),
        }
        log.info(kv("focus_head_calibrated", sign_temperature=f"{temperature:.3g}", sigma_scale=f"{sigma_scale:.3g}"))
    final_payload = checkpoint_payload(network, config.model, config.optics, final_metadata, normalization)
    write_payload(weights_path, final_payload)
    wall = previous_wall_s + time.monotonic() - started
    log.info(kv("training_finished", steps=done, wall_time_s=round(wall, 1), weights=weights_path))
    return TrainResult(weights_path, checkpoint_path, done, wall, history)
