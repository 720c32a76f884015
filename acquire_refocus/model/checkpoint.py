"""The weights file: network parameters plus everything needed to use them correctly.

A weights file is a `torch.save`d dict with a format marker and version, the ModelConfig that builds the network,
the optics and pixel size it was trained for (frames at another pixel size are resampled to it), the intensity
normalisation, free-form metadata (training summary) and the state dict. It is read with
`torch.load(weights_only=True)`, so opening a file never executes code from it. Training checkpoints use the same
format with the optimizer state and step added, so any checkpoint is also a usable weights file.
"""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from acquire_refocus.config import CONFIG_VERSION, ModelConfig, OpticsConfig, parse_model_section
from acquire_refocus.errors import ConfigError, WeightsError
from acquire_refocus.logs import kv
from acquire_refocus.model.network import build_network
from acquire_refocus.model.normalization import NormalizationParams

log = logging.getLogger(__name__)

FORMAT_MARKER = "acquire-refocus-weights"
TENSORS_SHA256 = "tensors_sha256"  # the payload key holding `tensors_sha256(state_dict)`
FORMAT_VERSION = 1
CONFIG_VERSION_KEY = "config_version"  # the schema version of the embedded sections (absent: 1, acquire_refocus.config)
DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "weights" / "default.pt"


@dataclass
class LoadedModel:
    """A network ready for inference (eval mode, CPU, FP32) and what it was trained for."""

    network: nn.Module
    model_config: ModelConfig
    optics: OpticsConfig
    pixel_size_um: float
    normalization: NormalizationParams
    sha256: str
    path: Path
    metadata: dict[str, Any] = field(default_factory=dict)


def _plain(value: Any) -> Any:
    """Metadata restricted to what weights_only loading accepts: str, int, float, bool, None, lists, dicts."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"metadata value of type {type(value).__name__} cannot be stored in a weights file")


def checkpoint_payload(
    network: nn.Module,
    model_config: ModelConfig,
    optics: OpticsConfig,
    metadata: dict[str, Any],
    normalization: NormalizationParams | None = None,
) -> dict[str, Any]:
    """The dict written by save_weights (training adds optimizer state to it)."""
    config = model_config.model_dump(mode="json")
    config["weights"] = None
    if "pretrained_encoder" in config:
        config["pretrained_encoder"] = None  # the encoder weights are inside the state dict now
    return {
        "format": FORMAT_MARKER,
        "version": FORMAT_VERSION,
        CONFIG_VERSION_KEY: CONFIG_VERSION,
        "model_config": config,
        "optics": optics.model_dump(mode="json"),
        "pixel_size_um": float(optics.pixel_size_um),
        "normalization": (normalization or NormalizationParams()).to_dict(),
        "metadata": _plain(metadata),
        "state_dict": {k: v.detach().cpu().clone() for k, v in network.state_dict().items()},
    }


def tensors_sha256(state_dict: dict[str, Any]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order: what a damaged file changes (torch
    loads a file whose tensor bytes were overwritten without complaint, and the network then computes something
    else)."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name]
        if not isinstance(tensor, torch.Tensor):
            raise WeightsError(f"state_dict entry {name!r} is a {type(tensor).__name__}, not a tensor")
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def write_payload(path: str | Path, payload: dict[str, Any]) -> None:
    """Write atomically (temporary file + rename), so an interrupted save never leaves a truncated file, with the
    checksum of its tensors (`TENSORS_SHA256`) that `read_payload` verifies."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    torch.save({**payload, TENSORS_SHA256: tensors_sha256(payload["state_dict"])}, temporary)
    temporary.replace(path)


def save_weights(
    path: str | Path,
    network: nn.Module,
    model_config: ModelConfig,
    optics: OpticsConfig,
    metadata: dict[str, Any],
    normalization: NormalizationParams | None = None,
) -> None:
    """Save a weights file for `network` trained with `optics` (its pixel size is recorded)."""
    write_payload(path, checkpoint_payload(network, model_config, optics, metadata, normalization))


def read_payload(path: str | Path) -> tuple[dict[str, Any], str]:
    """The checked dict of a weights/checkpoint file and the file's sha256; WeightsError when it is not ours."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    data = path.read_bytes()
    sha256 = hashlib.sha256(data).hexdigest()
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for damaged or foreign files
        detail = str(exc).strip()
        first_line = f"{type(exc).__name__}: {detail.splitlines()[0]}" if detail else type(exc).__name__
        raise WeightsError(
            f"{path}: not a readable acquire-refocus weights file (truncated, damaged or not a PyTorch file: "
            f"{first_line[:200]})"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_MARKER:
        raise WeightsError(
            f"{path}: a PyTorch file, but not an acquire-refocus weights file (no '{FORMAT_MARKER}' marker); "
            "train one with 'acquire-refocus train' or leave model.weights empty for the shipped model"
        )
    version = payload.get("version")
    if version != FORMAT_VERSION:
        raise WeightsError(
            f"{path}: weights format version {version!r}, this acquire-refocus reads version {FORMAT_VERSION}"
        )
    for key in ("model_config", "optics", "pixel_size_um", "normalization", "state_dict"):
        if key not in payload:
            raise WeightsError(f"{path}: weights file is missing its '{key}' entry (damaged)")
    if not isinstance(payload["state_dict"], dict):
        raise WeightsError(f"{path}: weights file has no parameter table (damaged)")
    _verify_tensors(path, payload)
    return payload, sha256


def _verify_tensors(path: Path, payload: dict[str, Any]) -> None:
    """WeightsError when the tensors differ from the checksum written with them. A file written before checksums
    existed loads, with a warning in the log: weights trained then stay usable, but unverified."""
    recorded = payload.get(TENSORS_SHA256)
    try:
        actual = tensors_sha256(payload["state_dict"])
    except WeightsError as exc:
        raise WeightsError(f"{path}: {exc} (damaged)") from None
    if recorded is None:
        log.warning(
            kv(
                "weights_unverified",
                path=path,
                tensors_sha256=actual[:16],
                reason="written before weights files carried a checksum; re-save it to verify it from now on",
            )
        )
        return
    if recorded != actual:
        raise WeightsError(
            f"{path}: damaged: its parameters do not match the checksum written with them "
            f"({TENSORS_SHA256} {str(recorded)[:16]}..., the tensors give {actual[:16]}...); restore "
            "the file from a copy, or retrain"
        )


def payload_model_config(payload: dict[str, Any]) -> ModelConfig:
    """The model section a weights file or checkpoint embeds, of the schema version it was written with. Raises
    pydantic's ValidationError, or KeyError where there is none."""
    return parse_model_section(payload["model_config"], int(payload.get(CONFIG_VERSION_KEY, 1)))


def load_weights(path: str | Path | None = None) -> LoadedModel:
    """Load a weights file (None: the shipped default model) into an eval-mode CPU network."""
    path = DEFAULT_WEIGHTS if path is None else Path(path)
    payload, sha256 = read_payload(path)
    try:
        model_config = payload_model_config(payload)
        optics = OpticsConfig.model_validate(payload["optics"])
        normalization = NormalizationParams.from_dict(payload["normalization"])
    except (ValidationError, KeyError, TypeError, ValueError) as exc:
        raise WeightsError(f"{path}: weights file has an invalid model/optics description: {exc}") from None
    try:
        network = build_network(model_config, load_pretrained=False)
    except ConfigError as exc:
        raise WeightsError(f"{path}: {exc}") from None
    try:
        network.load_state_dict(payload["state_dict"])
    except (RuntimeError, TypeError, AttributeError) as exc:
        first_line = str(exc).strip().splitlines()[0]
        raise WeightsError(f"{path}: parameters do not match the recorded architecture ({first_line})") from None
    network.eval()
    metadata = payload.get("metadata") or {}
    return LoadedModel(
        network=network,
        model_config=model_config,
        optics=optics,
        pixel_size_um=float(payload["pixel_size_um"]),
        normalization=normalization,
        sha256=sha256,
        path=path,
        metadata=dict(metadata) if isinstance(metadata, dict) else {},
    )
