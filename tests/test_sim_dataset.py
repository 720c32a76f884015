"""Z-stack datasets on disk: simulated ones round-trip exactly; BBBC006-style trees are matched and read."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from acquire_refocus import cli
from acquire_refocus.config import AppConfig, parse_config
from acquire_refocus.datasets.zstack import field_key, read_zstack_folders
from acquire_refocus.errors import InputError
from acquire_refocus.sim.dataset import write_simulated_dataset

pytestmark = pytest.mark.usefixtures("restore_logging")


# ------------------------------------------------------------------------------------ BBBC006-like trees

PLANES = 5
IN_FOCUS = 2
FIELDS = ("a01_s1", "a01_s2", "b12_s1")


def _hash(rng: np.random.Generator) -> str:
    """A GUID like the ones BBBC006 appends to every file name, different in every plane folder."""
    h = "".join(rng.choice(list("0123456789abcdef"), size=32))
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _bbbc006_tree(root: Path, shape: tuple[int, int] = (40, 48), missing: str | None = None) -> dict[str, np.ndarray]:
    """Plane folders BBBC006_v1_images_z_00.. with LZW-compressed 16-bit TIFFs for w1 and w2; returns w1 stacks."""
    rng = np.random.default_rng(3)
    stacks: dict[str, np.ndarray] = {}
    for site in FIELDS:
        stacks[f"{site}_w1"] = rng.integers(0, 65535, size=(PLANES, *shape), dtype=np.uint16)
    for z in range(PLANES):
        folder = root / f"BBBC006_v1_images_z_{z:02d}"
        folder.mkdir(parents=True)
        for site in FIELDS:
            for wavelength in ("w1", "w2"):
                name = f"mcf-z-stacks-03212011_{site}_{wavelength}{_hash(rng)}.tif"
                if missing == f"{site}_{wavelength}" and z == 3:
                    continue
                image = stacks[f"{site}_w1"][z] if wavelength == "w1" else rng.integers(0, 4095, shape, dtype=np.uint16)
                tifffile.imwrite(folder / name, image, compression="lzw")
    (root / "BBBC006_v1_labels").mkdir()  # the download also has other folders; they must be skipped
    return stacks


def test_bbbc006_tree_is_matched_by_well_site_wavelength(tmp_path: Path) -> None:
    stacks = _bbbc006_tree(tmp_path)
    dataset = read_zstack_folders(
        tmp_path, in_focus_index=IN_FOCUS, z_step_um=2.0, pixel_size_um=0.65, file_pattern="*_w1*"
    )
    assert dataset.field_names == sorted(stacks)
    assert [p.name for p in dataset.plane_folders] == [f"BBBC006_v1_images_z_{z:02d}" for z in range(PLANES)]
    assert not dataset.simulated and "3 fields x 5 planes" in dataset.describe()
    for field in dataset:
        assert field.planes.dtype == np.uint16 and field.planes.shape == (PLANES, 40, 48)
        np.testing.assert_array_equal(field.planes, stacks[field.name])
        np.testing.assert_array_equal(field.defocus_um, [-4.0, -2.0, 0.0, 2.0, 4.0])
        assert field.ground_truth.dtype == np.float32
        np.testing.assert_array_equal(field.ground_truth, stacks[field.name][IN_FOCUS].astype(np.float32))
        assert field.pixel_size_um == 0.65 and field.in_focus_index == IN_FOCUS


def test_folder_order_direction_sets_the_defocus_sign(tmp_path: Path) -> None:
    _bbbc006_tree(tmp_path)
    down = read_zstack_folders(tmp_path, IN_FOCUS, 2.0, z_order="decreasing", file_pattern="*_w1*")
    np.testing.assert_array_equal(down.defocus_um, [4.0, 2.0, 0.0, -2.0, -4.0])
    assert down.pixel_size_um is None


def test_both_channels_are_separate_fields_and_incomplete_fields_are_skipped(tmp_path: Path) -> None:
    _bbbc006_tree(tmp_path, missing="a01_s2_w2")
    dataset = read_zstack_folders(tmp_path, IN_FOCUS, 2.0)
    assert dataset.field_names == ["a01_s1_w1", "a01_s1_w2", "a01_s2_w1", "b12_s1_w1", "b12_s1_w2"]


def test_field_key_strips_plane_specific_parts() -> None:
    assert field_key("mcf-z-stacks-03212011_a01_s1_w1e8d5d6a4-0e02-4ad5-8b59-f8e1cf8dac4b.tif") == "a01_s1_w1"
    assert field_key("mcf-z-stacks-03212011_P24_s2_w2ABCDEF12-0000-1111-2222-333344445555.TIF") == "p24_s2_w2"
    assert field_key("cells_z05_pos3.tif") == "cells_pos3"
    assert field_key("cells_pos3_z_12.tif") == "cells_pos3"
    assert field_key("img_0123456789abcdef0123.tif") == "img"


def test_simple_numbered_folders_with_plain_names(tmp_path: Path) -> None:
    for z in range(3):
        (tmp_path / f"z{z}").mkdir()
        tifffile.imwrite(tmp_path / f"z{z}" / f"pos1_z{z:02d}.tif", np.full((8, 9), z, np.uint8))
    dataset = read_zstack_folders(tmp_path, 0, 1.5)
    field = dataset[0]
    assert dataset.field_names == ["pos1"]
    assert field.planes.dtype == np.uint16
    np.testing.assert_array_equal(field.planes[:, 0, 0], [0, 1, 2])
    np.testing.assert_array_equal(field.defocus_um, [0.0, 1.5, 3.0])


# ------------------------------------------------------------------------------------ bad input


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="z-stack folder not found"):
        read_zstack_folders(tmp_path / "nowhere", 0, 1.0)


def test_no_plane_folders(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    with pytest.raises(InputError, match="no plane folders found"):
        read_zstack_folders(tmp_path, 0, 1.0)


def test_plane_folder_without_tiffs(tmp_path: Path) -> None:
    _bbbc006_tree(tmp_path)
    empty = tmp_path / "BBBC006_v1_images_z_05"
    empty.mkdir()
    (empty / "notes.txt").write_text("nothing here")
    with pytest.raises(InputError, match=r"BBBC006_v1_images_z_05: no TIFF files"):
        read_zstack_folders(tmp_path, IN_FOCUS, 2.0)


def test_pattern_that_matches_nothing(tmp_path: Path) -> None:
    _bbbc006_tree(tmp_path)
    with pytest.raises(InputError, match=r"no TIFF files matching '\*_w9\*'"):
        read_zstack_folders(tmp_path, IN_FOCUS, 2.0, file_pattern="*_w9*")


@pytest.mark.parametrize("index", [-1, PLANES])
def test_in_focus_index_out_of_range(tmp_path: Path, index: int) -> None:
    _bbbc006_tree(tmp_path)
    with pytest.raises(InputError, match=rf"in_focus_index {index} is out of range.*0 \.\. {PLANES - 1}"):
        read_zstack_folders(tmp_path, index, 2.0)


def test_real_data_needs_focus_index_and_step(tmp_path: Path) -> None:
    _bbbc006_tree(tmp_path)
    with pytest.raises(InputError, match="in-focus plane index and the z step"):
        read_zstack_folders(tmp_path)


def test_mismatched_plane_shapes(tmp_path: Path) -> None:
    _bbbc006_tree(tmp_path)
    victim = sorted((tmp_path / "BBBC006_v1_images_z_03").glob("*_a01_s1_w1*"))[0]
    tifffile.imwrite(victim, np.zeros((20, 48), np.uint16), compression="lzw")
    dataset = read_zstack_folders(tmp_path, IN_FOCUS, 2.0, file_pattern="*_w1*")
    with pytest.raises(InputError, match=r"a01_s1_w1.*is 48x20 px.*48x40 px"):
        dataset[0]


def test_unreadable_tiff(tmp_path: Path) -> None:
    _bbbc006_tree(tmp_path)
    victim = sorted((tmp_path / "BBBC006_v1_images_z_01").glob("*_b12_s1_w1*"))[0]
    victim.write_text("this is not an image")
    dataset = read_zstack_folders(tmp_path, IN_FOCUS, 2.0, file_pattern="*_w1*")
    with pytest.raises(InputError, match=rf"{victim.name}: cannot read as a TIFF image"):
        dataset[2]


def test_float_tiff_is_refused(tmp_path: Path) -> None:
    for z in range(2):
        (tmp_path / f"z{z}").mkdir()
        tifffile.imwrite(tmp_path / f"z{z}" / "f.tif", np.zeros((8, 8), np.float32))
    with pytest.raises(InputError, match="expected 8- or 16-bit unsigned camera counts, got float32"):
        read_zstack_folders(tmp_path, 0, 1.0)[0]


def test_no_field_common_to_all_planes(tmp_path: Path) -> None:
    for z, name in enumerate(["a.tif", "b.tif"]):
        (tmp_path / f"z{z}").mkdir()
        tifffile.imwrite(tmp_path / f"z{z}" / name, np.zeros((8, 8), np.uint16))
    with pytest.raises(InputError, match="no field appears in every plane folder"):
        read_zstack_folders(tmp_path, 0, 1.0)


def test_two_files_for_one_field(tmp_path: Path) -> None:
    (tmp_path / "z0").mkdir()
    for suffix in ("0123456789abcdef0123", "fedcba98765432100123"):
        tifffile.imwrite(tmp_path / "z0" / f"x_a01_s1_w1{suffix}.tif", np.zeros((8, 8), np.uint16))
    with pytest.raises(InputError, match="both look like field 'a01_s1_w1'"):
        read_zstack_folders(tmp_path, 0, 1.0)


# ------------------------------------------------------------------------------------ simulated datasets


@pytest.fixture(scope="module")
def small_config() -> AppConfig:
    # small, bright and dense: a 64x64 frame always holds well-lit nuclei, and the specimen builds quickly
    specimen = {"field_size_um": [120, 120], "photons_per_um3": 1500, "nuclei_per_mm2": 5000}
    return parse_config({"simulator": {"camera": {"width_px": 64, "height_px": 64}, "specimen": specimen, "seed": 5}})


@pytest.fixture(scope="module")
def simulated(tmp_path_factory: pytest.TempPathFactory, small_config: AppConfig) -> Path:
    out = tmp_path_factory.mktemp("sim") / "ds"
    write_simulated_dataset(
        out, small_config.optics, small_config.simulator, fields=3, defocus_um=[6, -6, 0, 2], seed=11
    )
    return out


def test_simulated_dataset_round_trip(simulated: Path, small_config: AppConfig) -> None:
    manifest = json.loads((simulated / "dataset.json").read_text())
    assert manifest["seed"] == 11 and manifest["in_focus_index"] == 1
    assert [p["defocus_um"] for p in manifest["planes"]] == [-6.0, 0.0, 2.0, 6.0]  # sorted: folder order = stage Z
    assert [p["folder"] for p in manifest["planes"]] == ["z00", "z01", "z02", "z03"]
    assert manifest["pixel_size_um"] == pytest.approx(small_config.optics.pixel_size_um)
    assert parse_config({"optics": manifest["optics"], "simulator": manifest["simulator"]}) == small_config
    dataset = read_zstack_folders(simulated)
    assert dataset.simulated and len(dataset) == 3 and dataset.field_names == ["field0000", "field0001", "field0002"]
    for field in dataset:
        assert field.planes.shape == (4, 64, 64) and field.planes.dtype == np.uint16
        np.testing.assert_array_equal(field.defocus_um, [-6.0, 0.0, 2.0, 6.0])
        assert field.ground_truth.dtype == np.float32 and field.ground_truth.shape == (64, 64)
        assert field.in_focus_index == 1 and field.pixel_size_um == pytest.approx(0.325)
        for z, folder in enumerate(["z00", "z01", "z02", "z03"]):
            on_disk = tifffile.imread(simulated / folder / f"{field.name}.tif")
            np.testing.assert_array_equal(field.planes[z], on_disk)
            with tifffile.TiffFile(simulated / folder / f"{field.name}.tif") as tif:
                assert tif.pages[0].compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        np.testing.assert_array_equal(
            field.ground_truth, tifffile.imread(simulated / "ground_truth" / f"{field.name}.tif")
        )
    first, second = dataset[0], dataset[1]
    assert not np.array_equal(first.ground_truth, second.ground_truth), "fields must show different specimen areas"


def test_simulated_planes_blur_away_from_focus(simulated: Path) -> None:
    # the specimen has sparse regions; judge blur on the field with the most cells
    field = max(read_zstack_folders(simulated), key=lambda f: float(f.ground_truth.std()))
    assert field.ground_truth.max() > 1000
    errors = [np.abs(plane.astype(np.float64) - field.ground_truth).mean() for plane in field.planes]
    assert int(np.argmin(errors)) == 1, f"the 0 um plane must be closest to the ground truth, errors {errors}"
    assert errors[3] > errors[2] > errors[1]


def test_same_seed_reproduces_the_dataset(simulated: Path, tmp_path: Path, small_config: AppConfig) -> None:
    again = tmp_path / "again"
    write_simulated_dataset(again, small_config.optics, small_config.simulator, 3, [6, -6, 0, 2], seed=11)
    for path in sorted(simulated.rglob("*.tif")):
        np.testing.assert_array_equal(tifffile.imread(path), tifffile.imread(again / path.relative_to(simulated)))
    other = tmp_path / "other"
    write_simulated_dataset(other, small_config.optics, small_config.simulator, 1, [0], seed=12)
    assert not np.array_equal(
        tifffile.imread(other / "z00/field0000.tif"), tifffile.imread(again / "z01/field0000.tif")
    )


def test_simulated_dataset_refuses_conflicting_geometry(simulated: Path) -> None:
    assert read_zstack_folders(simulated, in_focus_index=1).in_focus_index == 1
    with pytest.raises(InputError, match=r"in_focus_index 2 \(recorded: 1\).*Leave them unset"):
        read_zstack_folders(simulated, in_focus_index=2)
    with pytest.raises(InputError, match=r"pixel_size_um 1\.0"):
        read_zstack_folders(simulated, pixel_size_um=1.0)


def test_damaged_manifest(tmp_path: Path) -> None:
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(InputError, match=r"dataset\.json: not valid JSON"):
        read_zstack_folders(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(InputError, match="not an acquire-refocus z-stack dataset"):
        read_zstack_folders(tmp_path)


def test_writer_refuses_bad_requests(tmp_path: Path, small_config: AppConfig) -> None:
    optics, simulator = small_config.optics, small_config.simulator
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("precious")
    with pytest.raises(InputError, match="not an empty folder"):
        write_simulated_dataset(tmp_path / "full", optics, simulator, 1, [0], seed=0)
    with pytest.raises(InputError, match=r"beyond the simulated PSF range \+/-40 um"):
        write_simulated_dataset(tmp_path / "a", optics, simulator, 1, [0, 45], seed=0)
    with pytest.raises(InputError, match="distinct"):
        write_simulated_dataset(tmp_path / "b", optics, simulator, 1, [0, 0], seed=0)
    with pytest.raises(InputError, match="at least 1 field"):
        write_simulated_dataset(tmp_path / "c", optics, simulator, 0, [0], seed=0)
    assert not any((tmp_path / name).exists() for name in "abc")


def test_simulate_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "small.yaml"
    config.write_text("simulator:\n  camera: {width_px: 64, height_px: 64}\n  specimen: {field_size_um: [100, 100]}\n")
    out = tmp_path / "cli"
    code = cli.main(
        [
            "simulate",
            "--config",
            str(config),
            "--out",
            str(out),
            "--fields",
            "2",
            "--defocus-um",
            "-4:4:4",
            "--seed",
            "3",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    assert "2 fields x 3 planes, 64x64 px" in printed and "in focus: plane 1" in printed
    dataset = read_zstack_folders(out)
    np.testing.assert_array_equal(dataset.defocus_um, [-4.0, 0.0, 4.0])
    assert json.loads((out / "dataset.json").read_text())["seed"] == 3


@pytest.mark.parametrize("text", ["4:-4:1", "-4:4:0", "a,b", "1:2"])
def test_simulate_command_bad_defocus(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str) -> None:
    code = cli.main(["simulate", "--out", str(tmp_path / "x"), f"--defocus-um={text}"])
    err = capsys.readouterr().err
    assert code == 2 and "--defocus-um" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_simulate_command_negative_seed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["simulate", "--out", str(tmp_path / "x"), "--defocus-um=0", "--seed", "-1"])
    err = capsys.readouterr().err
    assert code == 2 and "--seed must be 0 or more" in err and "Traceback" not in err


@pytest.mark.parametrize("keep", [8, 100, "half"])
@pytest.mark.parametrize("compression", ["lzw", "zlib", None])
def test_truncated_tiff(tmp_path: Path, compression: str | None, keep: int | str) -> None:
    for z in range(2):
        (tmp_path / f"z{z}").mkdir()
        image = np.random.default_rng(z).integers(0, 60000, (128, 128), dtype=np.uint16)
        tifffile.imwrite(tmp_path / f"z{z}" / "f.tif", image, compression=compression)
    victim = tmp_path / "z1" / "f.tif"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2 if keep == "half" else keep])
    with pytest.raises(InputError, match=r"z1/f.tif: cannot read as a TIFF image"):
        read_zstack_folders(tmp_path, 0, 1.0)[0]


def test_training_on_a_bbbc006_tree_splits_by_site_keeps_one_channel_and_records_its_pixel_size(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from acquire_refocus.errors import ConfigError
    from acquire_refocus.model.checkpoint import load_weights
    from acquire_refocus.model.data import split_field_names
    from acquire_refocus.model.train import train

    _bbbc006_tree(tmp_path / "bbbc", shape=(96, 96))
    names = [f"{site}_{w}" for site in FIELDS for w in ("w1", "w2")]
    for seed in range(20):  # a site's channels are always on the same side
        training_names, validation_names = split_field_names(names, 0.34, seed)
        assert {n[:-3] for n in training_names}.isdisjoint({n[:-3] for n in validation_names})
        assert len(validation_names) == 2

    def config(magnification: float) -> AppConfig:
        return parse_config(
            {
                "optics": {"magnification": magnification},
                "model": {"architecture": "unet", "base_channels": 4, "depth": 3},
                "training": {
                    "data": "stored",
                    "dataset_dir": str(tmp_path / "bbbc"),
                    "in_focus_index": IN_FOCUS,
                    "z_step_um": 2.0,
                    "pixel_size_um": 0.65,
                    "file_pattern": "*_w1*",
                    "z_order": "decreasing",
                    "patch_size_px": 64,
                    "batch_size": 2,
                    "validation_fields": 1,
                    "num_threads": 1,
                },
            }
        )

    with pytest.raises(
        ConfigError, match=r"its pixels are 0.65 um at the sample, but the optics section gives 0.325 um"
    ):
        train(config(20.0), out_dir=tmp_path / "refused", steps=1, progress=False)
    with caplog.at_level("INFO", logger="acquire_refocus.model.data"):
        result = train(config(10.0), out_dir=tmp_path / "run", steps=2, progress=False)
    assert "train_fields=2 validation_fields=1" in caplog.text  # the three w1 sites only
    weights = load_weights(result.weights_path)
    assert weights.pixel_size_um == pytest.approx(0.65)
    assert weights.metadata["training"]["data"] == {"source": "stored", "dataset_dir": str(tmp_path / "bbbc")}
