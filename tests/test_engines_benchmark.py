"""`acquire-refocus benchmark` and `build-engine` end to end on a tiny network (speed is not asserted here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from acquire_refocus.cli import main

REQUIRED = {"kind", "engine", "precision", "device", "size", "batch", "p50_ms", "p99_ms", "fps"}


@pytest.fixture(scope="module")
def engines_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("engines")


@pytest.fixture
def tiny_config(tmp_path: Path, engines_dir: Path) -> Path:
    """A tiny network, with the ONNX cache shared by this module's tests (one export, then reuse)."""
    config = {
        "model": {"base_channels": 4, "depth": 2},
        "engine": {
            "cache_dir": str(engines_dir),
            "min_size_px": 16,
            "opt_size_px": 32,
            "max_size_px": 64,
            "max_batch": 2,
            "tile_overlap_px": 8,
            "num_threads": 1,
        },
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_benchmark_writes_interleaved_records(
    tiny_config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench.json"
    code = main(
        [
            "benchmark",
            "--config",
            str(tiny_config),
            "--untrained",
            "--sizes",
            "32,64",
            "--engines",
            "onnxruntime,torch",
            "--repeats",
            "2",
            "--parts",
            "engine",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    records = json.loads(out.read_text())
    assert isinstance(records, list) and records
    for record in records:
        assert REQUIRED <= record.keys()
        assert record["kind"] == "engine" and record["repeats"] == 2
        assert record["machine"]["cpu"] and record["machine"]["torch"]
        assert record["p50_ms"] > 0 and record["p99_ms"] >= record["p50_ms"] and record["fps"] > 0
    groups: dict[tuple[int, int], dict[str, list[float]]] = {}
    for record in records:
        groups.setdefault((record["size"], record["batch"]), {})[record["engine"]] = record["round_start_s"]
    assert {size for size, _ in groups} == {32, 64} and {batch for _, batch in groups} == {1, 2}
    for starts in groups.values():
        assert set(starts) == {"onnxruntime", "torch"}
        # Round-robin: every engine's call in round r starts before any engine's call in round r + 1.
        for r in range(len(starts["torch"]) - 1):
            assert max(s[r] for s in starts.values()) < min(s[r + 1] for s in starts.values())
    table = capsys.readouterr().out
    assert "p50_ms" in table and "onnxruntime" in table and "torch" in table


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        ("30", "not multiples of the network stride (4 px)"),
        ("32,128", "[128] exceed engine.max_size_px (64)"),
    ],
)
def test_benchmark_rejects_sizes_it_cannot_measure(
    tiny_config: Path, sizes: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["benchmark", "--config", str(tiny_config), "--untrained", "--sizes", sizes, "--parts", "engine"])
    assert code == 2
    assert message in capsys.readouterr().err


def test_build_engine_reports_where_files_went(
    tiny_config: Path, engines_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["build-engine", "--config", str(tiny_config), "--untrained", "--backend", "onnxruntime"])
    assert code == 0
    out = capsys.readouterr().out
    built = list(engines_dir.glob("*.onnx"))
    assert len(built) == 1 and f"onnxruntime: {built[0]}" in out
