"""The focus-quality report of a finished run, from DIR/focus.parquet: which frames are out of focus, and where.

DIR/qc/ gets: plate.png (a plate: |defocus| per well, each well a grid of its sites), trace.png (a time-lapse:
|defocus| over time, one line per position), histogram.png, worst.png (the worst frames, raw beside refocused),
reimage.csv (frames above the threshold, for re-imaging) and report.md linking them. |defocus| is the network's
unsigned estimate `defocus_magnitude_um`, which holds where the sign is a guess.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from acquire_refocus.errors import UserError

DEFAULT_THRESHOLD_UM = 5.0  # the shipped head reads 2-3 um on an in-focus frame (README, Known limits)
WORST_FRAMES = 8
_IDENTITY = ("t", "p", "c", "z", "position", "well", "site", "channel")


def _rows(out: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    path = out / "focus.parquet"
    if not path.is_file():
        raise UserError(
            f"{out}: no focus.parquet; run 'acquire-refocus correct DATASET --out {out}' first (a run "
            "that was interrupted: rerun it to finish)"
        )
    rows: list[dict[str, Any]] = pq.read_table(path).to_pylist()
    return rows


def _magnitude(row: dict[str, Any]) -> float:
    value = row.get("defocus_magnitude_um")
    return float(value) if row.get("status") == "refocused" and value is not None else math.nan


def _label(row: dict[str, Any]) -> str:
    return " ".join(f"{k}={row[k]}" for k in _IDENTITY if row.get(k) is not None)


def _plate_figure(rows: list[dict[str, Any]], path: Path) -> bool:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    wells = sorted({r["well"] for r in rows if r.get("well")})
    if not wells:
        return False
    letters = sorted({w[0] for w in wells})
    numbers = sorted({int(w[1:]) for w in wells})
    per_site: dict[tuple[str, int], list[float]] = defaultdict(list)
    for row in rows:
        if row.get("well"):
            per_site[(row["well"], int(row["site"] or 0))].append(_magnitude(row))
    sites = sorted({s for _, s in per_site})
    side = max(1, math.ceil(math.sqrt(len(sites))))
    grid = np.full((len(letters) * side, len(numbers) * side), np.nan)
    for (well, site), values in per_site.items():
        finite = [v for v in values if math.isfinite(v)]
        if finite:
            k = sites.index(site)
            grid[letters.index(well[0]) * side + k // side, numbers.index(int(well[1:])) * side + k % side] = float(
                np.median(finite)
            )
    figure, axes = plt.subplots(
        figsize=(max(4.0, 0.6 * len(numbers) * side + 2), max(3.0, 0.6 * len(letters) * side + 1))
    )
    colours = plt.get_cmap("magma").with_extremes(bad="lightgray")  # gray: a site without an estimate
    image = axes.imshow(np.ma.masked_invalid(grid), cmap=colours, interpolation="nearest")
    axes.set_xticks([i * side + (side - 1) / 2 for i in range(len(numbers))], [str(n) for n in numbers])
    axes.set_yticks([i * side + (side - 1) / 2 for i in range(len(letters))], letters)
    for i in range(1, len(numbers)):
        axes.axvline(i * side - 0.5, color="black", linewidth=2)
    for i in range(1, len(letters)):
        axes.axhline(i * side - 0.5, color="black", linewidth=2)
    axes.set_title("median |defocus| per site")
    axes.set_xlabel(f"column (each well: its sites in a {side}x{side} grid; gray: no estimate)", fontsize=8)
    colour_bar = figure.colorbar(image, ax=axes, label="|defocus| (um)")
    if isinstance(colour_bar.formatter, ScalarFormatter):  # a colour bar's default
        colour_bar.formatter.set_useOffset(False)  # plain micrometres, never "1e-6 + 7.57"
    colour_bar.update_ticks()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def _trace_figure(rows: list[dict[str, Any]], path: Path) -> bool:
    import matplotlib.pyplot as plt

    if not any(r.get("t") for r in rows):
        return False
    traces: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        traces[str(row.get("position", row.get("p", 0)))][int(row["t"])].append(_magnitude(row))
    figure, axes = plt.subplots(figsize=(8, 4))
    for name, by_t in sorted(traces.items()):
        times = sorted(by_t)
        axes.plot(
            times,
            [np.nanmedian(by_t[t]) if any(math.isfinite(v) for v in by_t[t]) else np.nan for t in times],
            marker=".",
            label=f"position {name}",
        )
    axes.set_xlabel("time point")
    axes.set_ylabel("median |defocus| (um)")
    if len(traces) <= 12:
        axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def _histogram(magnitudes: list[float], threshold_um: float, path: Path) -> None:
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    axes.hist(magnitudes, bins=min(50, max(5, len(magnitudes) // 4)), color="steelblue")
    axes.axvline(threshold_um, color="crimson", linestyle="--", label=f"threshold {threshold_um:g} um")
    axes.set_xlabel("|defocus| (um)")
    axes.set_ylabel("frames")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _display(image: np.ndarray) -> npt.NDArray[np.float32]:
    low, high = np.percentile(image, [0.5, 99.5])
    shown: npt.NDArray[np.float32] = np.clip((image.astype(np.float32) - low) / max(float(high - low), 1e-6), 0, 1)
    return shown


def _worst_montage(out: Path, worst: list[dict[str, Any]], path: Path) -> bool:
    """Raw beside refocused for the worst frames (raw alone after --no-images); False when the dataset is gone."""
    import matplotlib.pyplot as plt
    import zarr

    from acquire_refocus.reprocess.dataset import open_dataset, open_reader
    from acquire_refocus.reprocess.output import ARRAY

    record = json.loads((out / "reprocess.json").read_text())
    try:
        info = open_dataset(Path(record["dataset"]))
    except UserError:
        return False
    store = out / "refocused.ome.zarr"
    columns = 2 if store.is_dir() else 1
    figure, axes = plt.subplots(len(worst), columns, figsize=(3 * columns, 3 * len(worst)), squeeze=False)
    reader = open_reader(info)
    for k, row in enumerate(worst):
        position = int(row.get("p") or 0)
        index = tuple(int(row[a]) for a in info.plane_axes)
        axes[k][0].imshow(_display(reader.read(position, index)), cmap="gray")
        axes[k][0].set_title(f"{_label(row)}\n|d| = {row['defocus_magnitude_um']:.1f} um", fontsize=8)
        if columns == 2:
            group = info.positions[position].group
            refocused = zarr.open_array(str(store), mode="r", path=f"{group}/{ARRAY}".strip("/"))[index]
            axes[k][1].imshow(_display(np.asarray(refocused)), cmap="gray")
            axes[k][1].set_title("refocused", fontsize=8)
    reader.close()
    for axis in axes.flat:
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return True


def write_report(out: Path, threshold_um: float | None = None) -> Path:
    """Write DIR/qc/ from DIR/focus.parquet; the path of report.md."""
    import matplotlib

    matplotlib.use("Agg")
    threshold = DEFAULT_THRESHOLD_UM if threshold_um is None else float(threshold_um)
    if not (math.isfinite(threshold) and threshold > 0):
        raise UserError(f"--threshold-um must be a positive number of micrometres, got {threshold_um}")
    rows = _rows(out)
    folder = out / "qc"
    try:
        folder.mkdir(exist_ok=True)
    except OSError as exc:
        raise UserError(f"{folder}: cannot create the report folder ({exc.strerror or exc})") from None
    measured = [r for r in rows if math.isfinite(_magnitude(r))]
    magnitudes = [_magnitude(r) for r in measured]
    above = sorted((r for r in measured if _magnitude(r) > threshold), key=_magnitude, reverse=True)
    with (folder / "reimage.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        keys = [k for k in _IDENTITY if any(r.get(k) is not None for r in rows)]
        writer.writerow([*keys, "defocus_magnitude_um", "defocus_um", "confidence"])
        for row in above:
            writer.writerow(
                [
                    *(row.get(k) for k in keys),
                    f"{row['defocus_magnitude_um']:.2f}",
                    f"{row['defocus_um']:.2f}",
                    f"{row['confidence']:.2f}",
                ]
            )
    lines = [
        f"# Focus quality: {out}",
        "",
        f"{len(rows)} frames: {len(measured)} with an estimate, "
        f"{sum(r['status'] == 'failed' for r in rows)} failed, "
        f"{sum(r['status'] == 'skipped' for r in rows)} skipped.",
        "",
    ]
    if magnitudes:
        lines += [
            f"|defocus| median {np.median(magnitudes):.2f} um, 90th percentile "
            f"{np.percentile(magnitudes, 90):.2f} um, max {max(magnitudes):.2f} um.",
            "",
            f"**{len(above)} frame(s) above {threshold:g} um**: [reimage.csv](reimage.csv).",
            "",
        ]
        _histogram(magnitudes, threshold, folder / "histogram.png")
        lines += ["![histogram of |defocus|](histogram.png)", ""]
    if _plate_figure(rows, folder / "plate.png"):
        lines += ["## Plate", "", "![median |defocus| per site](plate.png)", ""]
    if _trace_figure(rows, folder / "trace.png"):
        lines += ["## Over time", "", "![|defocus| per position over time](trace.png)", ""]
    worst = sorted(measured, key=_magnitude, reverse=True)[:WORST_FRAMES]
    if worst and _worst_montage(out, worst, folder / "worst.png"):
        lines += ["## Worst frames", "", "![worst frames, raw and refocused](worst.png)", ""]
    lines += [
        "|defocus| is the network's unsigned estimate (`defocus_magnitude_um`); the shipped model reads "
        "2-3 um on in-focus frames, so values below that say 'in focus'.",
        "",
    ]
    (folder / "report.md").write_text("\n".join(lines))
    return folder / "report.md"
