"""Does a model help, do nothing, or harm at each distance from focus? And what the daemon does about it.

Every evaluation suite (held-out simulated specimens, the out-of-distribution sets, a user's own z-stack) ends in
the same plain verdict per range of |defocus|: **helps** (PSNR gain >= +1 dB over the raw frame), **neutral**
(-0.3 to +1 dB) or **harms** (< -0.3 dB). A range is a run of neighbouring distances with the same verdict.

`acquire-refocus evaluate --record` keeps the verdicts in `<weights>.evaluation.json` beside the weights (for the
shipped model, which may sit in a read-only install, in the user's data directory), with the weights' sha256, so
a verdict follows the weights to the scope PC and a stale one (the weights changed since) is ignored. The daemon
and `correct` read it: a model that harms at some distance in any recorded evaluation is not allowed to publish or
save refocused frames unless the user opts in.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from platformdirs import user_data_path

from acquire_refocus.cache_dirs import APP_NAME
from acquire_refocus.errors import UserError
from acquire_refocus.logs import kv

log = logging.getLogger(__name__)

Verdict = Literal["helps", "neutral", "harms"]
HELPS_MIN_GAIN_DB = 1.0
HARMS_BELOW_GAIN_DB = -0.3
RECORD_SUFFIX = ".evaluation.json"
RECORD_FORMAT = "acquire-refocus evaluation 1"


def verdict(gain_db: float) -> Verdict:
    """helps (>= +1 dB), neutral (-0.3 to +1 dB) or harms (< -0.3 dB); NaN (no data) is refused."""
    if math.isnan(gain_db):
        raise ValueError("no PSNR gain to judge (NaN)")
    if gain_db >= HELPS_MIN_GAIN_DB:
        return "helps"
    return "neutral" if gain_db >= HARMS_BELOW_GAIN_DB else "harms"


@dataclass(frozen=True)
class RangeVerdict:
    """Neighbouring distances (um, |defocus|) with one verdict, and the gains seen there."""

    from_um: float
    to_um: float
    verdict: Verdict
    min_gain_db: float
    max_gain_db: float

    def line(self) -> str:
        where = f"{self.from_um:g} um" if self.from_um == self.to_um else f"{self.from_um:g}-{self.to_um:g} um"
        gains = (
            f"{self.min_gain_db:+.2f} dB"
            if self.min_gain_db == self.max_gain_db
            else f"{self.min_gain_db:+.2f} to {self.max_gain_db:+.2f} dB"
        )
        return f"{where}: {self.verdict} ({gains})"


def range_verdicts(gain_db_by_distance_um: Mapping[float, float]) -> list[RangeVerdict]:
    """The verdict per distance, merged into runs of neighbouring distances that share it (NaN gains skipped)."""
    ranges: list[RangeVerdict] = []
    for distance_um in sorted(gain_db_by_distance_um):
        gain_db = float(gain_db_by_distance_um[distance_um])
        if math.isnan(gain_db):
            continue
        judged = verdict(gain_db)
        last = ranges[-1] if ranges else None
        if last is not None and last.verdict == judged:
            ranges[-1] = RangeVerdict(
                last.from_um, distance_um, judged, min(last.min_gain_db, gain_db), max(last.max_gain_db, gain_db)
            )
        else:
            ranges.append(RangeVerdict(distance_um, distance_um, judged, gain_db, gain_db))
    return ranges


def overall(ranges: Sequence[RangeVerdict]) -> Verdict:
    """harms if it harms anywhere, else helps if it helps anywhere, else neutral."""
    found = {r.verdict for r in ranges}
    return "harms" if "harms" in found else ("helps" if "helps" in found else "neutral")


def verdict_lines(title: str, ranges: Sequence[RangeVerdict]) -> list[str]:
    """`title: VERDICT` and one indented line per range, for the terminal and the reports."""
    if not ranges:
        return [f"{title}: no distance with a PSNR gain to judge"]
    head = {
        "harms": "HARMS at some distance: do not rely on its refocused frames there",
        "helps": "helps",
        "neutral": "neutral (no distance gains 1 dB)",
    }[overall(ranges)]
    return [f"{title}: {head}"] + [f"  {r.line()}" for r in ranges]


# ----------------------------------------------------------------------------- records beside the weights
def record_path(weights: Path) -> Path:
    """Where the evaluation of these weights is recorded: beside them, or, for the shipped model, in the user's
    data directory (an installed package's folder is read-only and replaced on upgrade)."""
    from acquire_refocus.model.checkpoint import DEFAULT_WEIGHTS

    if weights.resolve() == DEFAULT_WEIGHTS.resolve():
        folder = user_data_path(APP_NAME, appauthor=False) / "evaluations"
        return folder / f"shipped-{DEFAULT_WEIGHTS.name}{RECORD_SUFFIX}"
    return weights.with_name(weights.name + RECORD_SUFFIX)


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass(frozen=True)
class Evaluation:
    """One recorded evaluation: which data, when, and its verdict per distance range."""

    source: str  # e.g. "stack nuclei.tif (reference plane 12)", "simulated held-out specimens, 60x/1.4 oil"
    recorded: str  # UTC, ISO 8601
    ranges: tuple[RangeVerdict, ...]

    @property
    def verdict(self) -> Verdict:
        return overall(self.ranges)


def record_evaluation(weights: Path, sha256: str, name: str, source: str, ranges: Sequence[RangeVerdict]) -> Path:
    """Add (or replace) the evaluation called `name` in the record of these weights; a record of other weights
    (another sha256) is started afresh. Returns the record's path."""
    path = record_path(weights)
    evaluations: dict[str, Any] = {}
    existing = _read(path)
    if existing is not None and existing.get("weights_sha256") == sha256:
        evaluations = dict(existing.get("evaluations") or {})
    evaluations[name] = {
        "source": source,
        "recorded": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "verdict": overall(ranges),
        "ranges": [asdict(r) for r in ranges],
    }
    text = (
        json.dumps(
            {"format": RECORD_FORMAT, "weights": str(weights), "weights_sha256": sha256, "evaluations": evaluations},
            indent=2,
        )
        + "\n"
    )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_text(text, encoding="utf-8")
        temporary.replace(path)
    except OSError as exc:
        raise UserError(f"--record: cannot write {path} ({exc.strerror or exc})") from None
    return path


def _read(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(
            f"{path}: not a readable evaluation record ({exc}); delete it and run "
            "'acquire-refocus evaluate --record' again"
        ) from None
    if not isinstance(data, dict) or data.get("format") != RECORD_FORMAT:
        raise UserError(
            f"{path}: not an acquire-refocus evaluation record; delete it and run "
            "'acquire-refocus evaluate --record' again"
        )
    return data


def recorded_evaluations(weights: Path, sha256: str) -> dict[str, Evaluation] | None:
    """The evaluations recorded for exactly these weights; None when there is no record, or it was made for
    other weights (logged as stale)."""
    path = record_path(weights)
    data = _read(path)
    if data is None:
        return None
    if data.get("weights_sha256") != sha256:
        log.warning(
            kv(
                "model_evaluation_stale",
                record=path,
                recorded_sha256=str(data.get("weights_sha256"))[:12],
                weights_sha256=sha256[:12],
                note="the weights changed since; this verdict is ignored",
            )
        )
        return None
    try:
        return {
            name: Evaluation(item["source"], item["recorded"], tuple(RangeVerdict(**r) for r in item["ranges"]))
            for name, item in (data.get("evaluations") or {}).items()
        }
    except (KeyError, TypeError) as exc:
        raise UserError(
            f"{path}: damaged evaluation record ({type(exc).__name__}: {exc}); delete it and run "
            "'acquire-refocus evaluate --record' again"
        ) from None


@dataclass(frozen=True)
class ModelCheck:
    """What a recorded evaluation means for using a model's refocused frames."""

    verdict: Verdict | Literal["not evaluated"]
    record: Path
    refusal: str | None  # why its refocused frames are withheld; None: they are used

    def status(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "record": str(self.record), "refocused_frames_withheld": self.refusal}


def check_model(weights: Path, sha256: str, allow_harmful: bool, opt_in: str) -> ModelCheck:
    """Read the recorded verdict of these weights and log it. A model that harms somewhere gets a refusal
    (naming where, and `opt_in`, how to use it anyway) unless `allow_harmful`."""
    path = record_path(weights)
    evaluations = recorded_evaluations(weights, sha256)
    if not evaluations:
        log.info(
            kv(
                "model_verdict",
                verdict="not evaluated",
                weights=weights,
                record=path,
                note="refocused frames are used; 'acquire-refocus evaluate --record' judges the model",
            )
        )
        return ModelCheck("not evaluated", path, None)
    harmful = [f"{name}: {r.line()}" for name, e in evaluations.items() for r in e.ranges if r.verdict == "harms"]
    if not harmful:
        judged = overall([r for e in evaluations.values() for r in e.ranges])
        log.info(kv("model_verdict", verdict=judged, weights=weights, record=path, evaluations=len(evaluations)))
        return ModelCheck(judged, path, None)
    where = "; ".join(harmful)
    note = (
        "refocused frames are used anyway (opted in)"
        if allow_harmful
        else "refocused frames withheld: frames are kept raw (status skipped)"
    )
    log.warning(kv("model_verdict", verdict="harms", weights=weights, record=path, where=where, note=note))
    if allow_harmful:
        return ModelCheck("harms", path, None)
    refusal = (
        f"the model's recorded evaluation ({path}) says it harms ({where}): its refocused frames are withheld; {opt_in}"
    )
    return ModelCheck("harms", path, refusal)


def check_corrector(corrector: object, allow_harmful: bool, opt_in: str) -> ModelCheck | None:
    """check_model for a corrector that carries its weights (a Refocuser); None for one that does not."""
    loaded = getattr(corrector, "loaded", None)
    path, sha256 = getattr(loaded, "path", None), getattr(loaded, "sha256", None)
    if not isinstance(path, Path) or not isinstance(sha256, str):
        return None
    return check_model(path, sha256, allow_harmful, opt_in)
