"""`acquire-refocus demo`: the whole daemon on the simulated microscope, closed loop on, in one command."""

from __future__ import annotations

import argparse
import datetime
import math
import shutil
import statistics
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from acquire_refocus.channels import refocus_policy
from acquire_refocus.config import PROJECT_ROOT, AppConfig, load_config, parse_config, replace
from acquire_refocus.errors import UserError
from acquire_refocus.focus import channel_z_offset_um
from acquire_refocus.outputs import output_folder
from acquire_refocus.sequence import event_axes

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt
    import useq

    from acquire_refocus.sim.devices import ClockedMicroscope

_DESCRIPTION = """\
Run the daemon on the simulated microscope, no hardware needed: a multi-position time-lapse of
Hoechst-stained nuclei while the focus drifts (thermal drift by default), closed-loop focus correction on,
every frame refocused by the network, published over ZeroMQ and saved beside the raw data.

It ends with a summary: frames, rates, frames skipped, the focus error (RMS, from the simulator's ground
truth) with the correction and what it would have been without it (the stage left at its planned Z, same
drift, same instants; with z-stacks also for the stacks' centre planes), per position the error's mean and
spread (the plane the loop held, and how steadily), and where the data and the plot (focus_trace.png) are.
"""

_EPILOG = """\
examples:
  acquire-refocus demo                              # ./demo-output
  acquire-refocus demo --output /tmp/demo --loops 10
  acquire-refocus demo --config configs/simulator.yaml --drift steps
  acquire-refocus demo --config configs/simulator-multichannel.yaml --output /tmp/two-channels
"""

DEMO_MARKER = ".acquire-refocus-demo"
PLOT_NAME = "focus_trace.png"
DEMO_CONFIG = PROJECT_ROOT / "configs" / "simulator.yaml"
# The same settings as configs/simulator.yaml, for installs without the repository's configs/ folder.
_DEMO_DEFAULTS: dict[str, Any] = {
    "simulator": {
        "drift": {"model": "thermal", "amplitude_um": 8, "time_constant_s": 120},
        "time_per_frame_s": 2.0,
    },
    "focus": {"mode": "correct", "window_frames": 3, "z_limits_um": [50, 150]},
    "acquisition": {
        "backend": "simulator",
        "sequence": {
            "time_plan": {"interval": 0, "loops": 20},
            "stage_positions": [{"x": 0, "y": 0, "z": 100}, {"x": 200, "y": 100, "z": 100}],
            "axis_order": "tp",
        },
    },
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = _DESCRIPTION
    parser.epilog = _EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "--config", metavar="FILE", help="config (default: configs/simulator.yaml; its backend must be 'simulator')"
    )
    parser.add_argument(
        "--output",
        metavar="DIR",
        type=Path,
        default=Path("demo-output"),
        help="where to save (default ./demo-output; a previous demo there is replaced, "
        "any other non-empty folder is refused)",
    )
    parser.add_argument(
        "--loops",
        "--frames",
        dest="loops",
        type=int,
        metavar="N",
        help="time points per position (default: the config's time_plan)",
    )
    parser.add_argument(
        "--drift", choices=["none", "linear", "thermal", "random_walk", "steps"], help="override simulator.drift.model"
    )
    parser.add_argument("--mode", choices=["off", "observe", "correct"], help="override focus.mode")


def _demo_config(args: argparse.Namespace) -> AppConfig:
    if args.config:
        config = load_config(args.config)
    elif DEMO_CONFIG.is_file():
        config = load_config(DEMO_CONFIG)
    else:
        config = parse_config(_DEMO_DEFAULTS, source="built-in demo settings")
    if config.acquisition.backend != "simulator":
        raise UserError(
            f"the demo runs on the simulated microscope; {args.config} has acquisition.backend "
            f"{config.acquisition.backend!r} (use 'acquire-refocus serve' for hardware)"
        )
    if config.acquisition.sequence is None:
        config = replace(
            config, acquisition=replace(config.acquisition, sequence=_DEMO_DEFAULTS["acquisition"]["sequence"])
        )
    if args.drift:
        simulator = config.simulator
        config = replace(config, simulator=replace(simulator, drift=replace(simulator.drift, model=args.drift)))
    if args.mode:
        config = replace(config, focus=replace(config.focus, mode=args.mode))
    if args.loops is not None:
        if args.loops < 1:
            raise UserError("--loops must be at least 1")
    return config


def prepare_output(output: Path) -> None:
    """Make `output` an empty folder marked as a demo's. A previous demo's files are removed only when its marker
    is there and nothing else is: a `serve` run's data or the user's own files in that folder are never deleted."""
    from acquire_refocus.storage import FOCUS_LOG, RAW_FRAME_LOG, RAW_STORE, REFOCUSED_STORE, RUN_RECORD

    # Everything a demo writes; run.json.tmp is left when a crash interrupts write_run_record.
    demo_names = {
        DEMO_MARKER,
        RAW_STORE,
        RAW_FRAME_LOG,
        REFOCUSED_STORE,
        FOCUS_LOG,
        RUN_RECORD,
        f"{RUN_RECORD}.tmp",
        PLOT_NAME,
    }
    output_folder(output, "--output")  # created when new; a file or an unusable path is refused here
    try:
        present = list(output.iterdir())
        names = {entry.name for entry in present}
        if present and (DEMO_MARKER not in names or not names <= demo_names):
            raise UserError(
                f"{output} exists and is not a previous demo's output; choose another --output (a demo "
                f"marks its folder with {DEMO_MARKER}; delete one from an older version, which has no "
                "mark, yourself)"
            )
        for entry in present:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            elif entry.name != DEMO_MARKER:  # kept until the end: an interrupted clean-up can be redone
                entry.unlink()
        (output / DEMO_MARKER).write_text(
            "written by 'acquire-refocus demo': a later demo into this folder replaces the demo's files here\n",
            encoding="utf-8",
        )
    except OSError as exc:
        raise UserError(f"cannot prepare --output {output}: {exc.strerror or exc}; choose another --output") from None


def _free_address(address: str) -> str:
    """The configured address, or a free port on the same interface when a daemon already uses it."""
    import zmq

    probe: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.PUB)
    probe.setsockopt(zmq.LINGER, 0)
    try:
        probe.bind(address)
        return address
    except zmq.ZMQError:
        host = address.rsplit(":", 1)[0]
        port = probe.bind_to_random_port(host)
        return f"{host}:{port}"
    finally:
        probe.close(linger=0)


class TruthRow(TypedDict):
    """One frame's ground truth; errors are stage Z (less the channel's offset) minus the in-focus Z. `plane_um`:
    the frame's planned Z relative to its z-stack's centre (0 without a relative z-plan), so error_um - plane_um
    is the error of the stack's centre plane."""

    p: int
    t_index: int
    t_s: float
    stage_z_um: float
    channel: str | None
    focus_z_um: float
    plane_um: float
    error_um: float
    uncorrected_error_um: float


class FocusTruth:
    """frameReady listener recording, per frame, the simulator's true in-focus Z at that frame's instant, and the
    frame's channel (its focus Z is its stage Z minus the channel's Z offset in the sequence)."""

    def __init__(
        self,
        scope: ClockedMicroscope,
        time_per_frame_s: float | None,
        nominal_z_um: Mapping[int, float],
        plane_offsets_um: Sequence[float] = (),
    ) -> None:
        """`nominal_z_um`: each position's planned Z; `plane_offsets_um`: a relative z-plan's planes (by z index),
        which the planned Z of each frame, and so its error without correction, includes."""
        self._scope = scope
        self._dt = time_per_frame_s or 0.0
        self._nominal = nominal_z_um
        self._plane_offsets_um = tuple(plane_offsets_um)
        self.rows: list[TruthRow] = []

    def frameReady(  # noqa: N802 - named after the pymmcore-plus signal it listens to
        self, image: npt.NDArray[np.generic], event: useq.MDAEvent, meta: Mapping[str, Any]
    ) -> None:
        index = event_axes(event)
        position = index.get("p", 0)
        pos: Mapping[str, Any] = meta.get("position") or {}
        xy = (float(pos.get("x", event.x_pos or 0.0)), float(pos.get("y", event.y_pos or 0.0)))
        stage_z = float(pos.get("z", event.z_pos))
        t_s = self._scope.clock_s() - self._dt  # the clock advanced once when this frame was exposed
        focus_z = self._scope.focus_z_um(xy, t_s)
        channel_offset_um = channel_z_offset_um(event)
        plane = index.get("z", 0)
        plane_um = self._plane_offsets_um[plane] if plane < len(self._plane_offsets_um) else 0.0
        planned_um = self._nominal[position] + plane_um if position in self._nominal else stage_z - channel_offset_um
        self.rows.append(
            {
                "p": position,
                "t_index": index.get("t", 0),
                "t_s": t_s,
                "stage_z_um": stage_z,
                "channel": event.channel.config if event.channel is not None else None,
                "focus_z_um": focus_z,
                "plane_um": plane_um,
                "error_um": stage_z - channel_offset_um - focus_z,
                "uncorrected_error_um": planned_um - focus_z,
            }
        )

    def of_channel(self, channel: str | None) -> list[TruthRow]:
        """The rows of one channel (all rows for None)."""
        return [r for r in self.rows if channel is None or r["channel"] == channel]


def _rms(values: list[float]) -> float:
    return math.sqrt(sum(v * v for v in values) / len(values)) if values else math.nan


def _relative_planes_um(sequence: useq.MDASequence) -> list[float]:
    """The planes of a relative z-plan (stage Z relative to the position's), by z index; [] for none or absolute."""
    plan = sequence.z_plan
    return [float(z) for z in plan] if plan is not None and plan.is_relative else []


def _mean_sd(values: list[float]) -> str:
    """'+mean / sd um' of a position's errors: an offset held steadily is a different failure from a loop that
    wanders (the sharpest plane of a thick specimen need not be the simulator's in-focus mid-plane)."""
    if not values:
        return "-"
    return f"{statistics.fmean(values):+.2f} / {statistics.pstdev(values):.2f} um"


def _plot(path: Path, truth: FocusTruth, estimates: list[dict[str, Any]], title: str, channel: str | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_err, ax_z) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    positions = sorted({row["p"] for row in truth.rows})
    for position in positions:
        rows = [r for r in truth.of_channel(channel) if r["p"] == position]
        t = [r["t_s"] for r in rows]
        ax_err.plot(t, [r["uncorrected_error_um"] for r in rows], "--", label=f"p{position} without correction")
        ax_err.plot(t, [r["error_um"] for r in rows], "-o", ms=3, label=f"p{position} with correction")
        by_frame = {e["frame"]: e for e in estimates}
        est = [
            (r["t_s"], by_frame[k]["defocus_um"])
            for k, r in enumerate(truth.rows)
            if r["p"] == position
            and (channel is None or r["channel"] == channel)
            and k in by_frame
            and by_frame[k]["refocused"]
            and math.isfinite(by_frame[k]["defocus_um"])
        ]
        if est:
            ax_err.plot(*zip(*est, strict=True), "x", ms=4, label=f"p{position} network estimate")
        ax_z.plot(t, [r["focus_z_um"] for r in rows], "--", label=f"p{position} true in-focus Z")
        ax_z.plot(t, [r["stage_z_um"] for r in rows], "-o", ms=3, label=f"p{position} stage Z")
    ax_err.axhline(0.0, color="k", lw=0.5)
    ax_err.set_ylabel("focus error = stage Z - in-focus Z (um)")
    ax_err.legend(fontsize=7, ncol=2)
    ax_err.set_title(title)
    ax_z.set_xlabel("simulated time (s)")
    ax_z.set_ylabel("Z (um)")
    ax_z.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    import useq

    from acquire_refocus.client import Subscriber
    from acquire_refocus.daemon import Daemon
    from acquire_refocus.focus.controller import check_hold
    from acquire_refocus.sequence import parse_sequence, z_planes
    from acquire_refocus.storage import FOCUS_LOG, RAW_STORE, REFOCUSED_STORE, RUN_RECORD, read_focus_log

    t_start = time.perf_counter()
    config = _demo_config(args)
    sequence = parse_sequence(config.acquisition.sequence)
    if args.loops is not None:
        sequence = sequence.model_copy(
            update={"time_plan": useq.TIntervalLoops(interval=datetime.timedelta(0), loops=args.loops)}
        )
    check_hold(config.focus, z_planes(sequence))  # before the output folder is touched
    output = args.output.resolve()
    prepare_output(output)
    publishing = config.publishing
    config = replace(
        config,
        publishing=replace(
            publishing,
            pub_address=_free_address(publishing.pub_address),
            control_address=_free_address(publishing.control_address),
        ),
    )
    nominal = {i: float(p.z) for i, p in enumerate(sequence.stage_positions) if p.z is not None}

    received: dict[str, int] = {"raw": 0, "refocused": 0, "focus": 0}
    listening = threading.Event()
    done = threading.Event()

    def listen(address: str) -> None:
        with Subscriber(address, timeout_s=0.2) as sub:
            listening.set()
            while not done.is_set():
                message = sub.receive()
                if message is not None:
                    received[message[0]["topic"]] += 1
            while (message := sub.receive(0.5)) is not None:
                received[message[0]["topic"]] += 1

    print(
        f"acquire-refocus demo: simulated microscope, drift {config.simulator.drift.model}, "
        f"focus {config.focus.mode}; writing to {output}",
        flush=True,
    )
    with Daemon(config, output_dir=output, control=True) as daemon:
        listener = (
            threading.Thread(target=listen, args=(daemon.publisher.address,), daemon=True) if daemon.publisher else None
        )
        if listener is not None:
            listener.start()
            listening.wait(5.0)
        core = daemon.acquisition_core()
        if daemon.scope is None:  # the simulator backend (the only one _demo_config allows) loads it with the core
            raise RuntimeError("the simulator backend loaded no simulated microscope")
        truth = FocusTruth(daemon.scope, config.simulator.time_per_frame_s, nominal, _relative_planes_um(sequence))
        core.mda.events.frameReady.connect(truth.frameReady)
        try:
            summary = daemon.run(sequence, output)
        finally:
            core.mda.events.frameReady.disconnect(truth.frameReady)
            done.set()
            if listener is not None:
                listener.join(5.0)
    wall_s = time.perf_counter() - t_start

    rows = read_focus_log(output / FOCUS_LOG)
    counts = summary.counts()
    channel = summary.focus.get("channel")  # the channel that drives the loop: its frames measure the error
    loop_rows = truth.of_channel(channel)  # the frames of the channel that drives the loop
    rms_with, rms_without = (
        _rms([r["error_um"] for r in loop_rows]),
        _rms([r["uncorrected_error_um"] for r in loop_rows]),
    )
    stacks = any(r["plane_um"] != 0 for r in truth.rows)
    held = "the z-stacks' centres" if stacks else "focus"

    def centre_errors(position: int | None = None) -> list[float]:
        """Errors of the z-stacks' centre planes (of every frame without z-stacks), of one position or all."""
        return [r["error_um"] - r["plane_um"] for r in loop_rows if position is None or r["p"] == position]

    mode_word = "with correction" if config.focus.mode == "correct" else f"focus mode {config.focus.mode}"
    stack_lines = (
        [
            f"  stack centre RMS      {_rms(centre_errors()):.2f} um {mode_word}, "
            f"{_rms([r['uncorrected_error_um'] - r['plane_um'] for r in loop_rows]):.2f} um "
            "without (each z-stack's planned centre plane; the line above counts every plane)"
        ]
        if stacks
        else []
    )
    dof_um = config.optics.depth_of_field_um
    plot_path = output / PLOT_NAME
    _plot(
        plot_path,
        truth,
        rows,
        f"{config.simulator.drift.model} drift, focus {config.focus.mode}: RMS error {rms_with:.2f} um "
        f"(without correction {rms_without:.2f} um; depth of field {dof_um:.2f} um)"
        + (f", channel {channel}" if channel else ""),
        channel,
    )
    acquired_fps = counts.get("seen", 0) / summary.wall_s if summary.wall_s else math.nan
    latencies = sorted(r["latency_ms"] for r in rows if r["refocused"])
    p50 = latencies[len(latencies) // 2] if latencies else math.nan
    policy = refocus_policy(config.pipeline, config.optics, daemon.corrector, daemon.channel_correctors)
    outside = sum(1 for r in truth.rows if policy(r["channel"]))
    not_refocused = f" ({outside} of them of channels kept raw: pipeline.channels)" if outside else ""
    loop_channel = f"; frames of channel {channel}, which drives the loop" if channel else ""
    released = (
        f" ({counts['pixels_released']} of them without pixels: the sinks were behind)"
        if counts.get("pixels_released")
        else ""
    )
    print(
        "\n".join(
            [
                "",
                "demo summary",
                f"  engine                {daemon.engine_name}",
                f"  frames                {counts.get('seen', 0)} acquired, {counts.get('refocused', 0)} refocused, "
                f"{counts.get('skipped', 0)} skipped{released}{not_refocused}, {counts.get('failed', 0)} failed",
                f"  rates                 {acquired_fps:.1f} frames/s over the run; refocus latency p50 {p50:.0f} ms",
                f"  published             {summary.publisher.get('published', 0)} messages, "
                f"dropped {summary.publisher.get('dropped', 0)}; demo subscriber received "
                f"raw {received['raw']}, refocused {received['refocused']}, focus {received['focus']}",
                f"  focus error RMS       {rms_with:.2f} um {mode_word}, {rms_without:.2f} um without correction "
                f"(depth of field {dof_um:.2f} um{loop_channel})",
                "  per position          "
                + ", ".join(
                    f"p{p} {_rms([r['error_um'] for r in loop_rows if r['p'] == p]):.2f} um"
                    for p in sorted({r["p"] for r in truth.rows})
                ),
                *stack_lines,
                "  error mean / sd       "
                + ", ".join(f"p{p} {_mean_sd(centre_errors(p))}" for p in sorted({r["p"] for r in truth.rows}))
                + f" (where the loop held {held} against the simulator's in-focus plane, and how steadily)",
                f"  focus moves           {summary.focus.get('moves', 0)} {summary.focus.get('moves_by_source', {})}, "
                f"offsets_um {summary.focus.get('offsets_um', {})}; network estimates used "
                f"{summary.focus.get('estimates_accepted', 0)}, rejected {summary.focus.get('estimates_rejected', 0)} "
                f"(confidence < {config.focus.min_confidence:g}, non-finite, or not refocused); sharpness of "
                f"{summary.focus.get('sharpness_measured', 0)} frames ({summary.focus.get('sharpness_restarts', 0)} "
                "restarts)",
                f"  raw data              {output / RAW_STORE}",
                f"  refocused             {output / REFOCUSED_STORE}",
                f"  focus log             {output / FOCUS_LOG}",
                f"  run record            {output / RUN_RECORD}",
                f"  plot                  {plot_path}",
                f"  wall time             {wall_s:.1f} s",
            ]
        ),
        flush=True,
    )
    return 1 if summary.error else 0
