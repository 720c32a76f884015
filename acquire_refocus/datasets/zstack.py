"""Z-stacks on disk, laid out like the Broad BBBC006 benchmark: one folder per focal plane, one TIFF per field.

`read_zstack_folders` reads real BBBC006-style trees (`BBBC006_v1_images_z_00/ ... z_33/`, files like
`mcf-z-stacks-03212011_a01_s1_w1<hash>.tif`), where the user says which plane is in focus and how far apart the
planes are, and the simulated datasets `acquire-refocus simulate` writes in the same layout
(`sim.dataset.write_simulated_dataset`), whose `dataset.json` records the defocus of every plane and a noiseless
in-focus ground truth.

Defocus follows the project convention: defocus_um = stage Z of the plane - stage Z of the in-focus plane,
positive = focal plane deeper into the sample (further from the coverslip).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np
import tifffile

from acquire_refocus.errors import InputError
from acquire_refocus.logs import kv

log = logging.getLogger(__name__)

DATASET_FORMAT = "acquire-refocus/zstack"
DATASET_VERSION = 1
MANIFEST_NAME = "dataset.json"
GROUND_TRUTH_FOLDER = "ground_truth"
_TIFF_SUFFIXES = (".tif", ".tiff")

ZOrder = Literal["increasing", "decreasing"]


@dataclass(frozen=True, eq=False)
class ZStackField:
    """One field of view through focus."""

    name: str
    planes: np.ndarray  # uint16 [Z, H, W], raw camera counts
    defocus_um: np.ndarray  # float64 [Z], per plane, project sign convention
    ground_truth: np.ndarray  # float32 [H, W]: the noiseless in-focus image (simulated) or the in-focus plane (real)
    pixel_size_um: float | None  # at the sample; None when the user did not give it for real data
    in_focus_index: int | None  # which plane is in focus; None for a simulated stack without a 0 um plane


@dataclass(frozen=True)
class _FieldFiles:
    name: str
    plane_paths: tuple[Path, ...]
    ground_truth_path: Path | None


@dataclass(frozen=True, eq=False)
class ZStackDataset(Sequence[ZStackField]):
    """Fields of a z-stack dataset, read from disk one at a time when indexed (a whole dataset can be many GB)."""

    root: Path
    plane_folders: tuple[Path, ...]
    defocus_um: np.ndarray  # float64 [Z], shared by every field
    in_focus_index: int | None
    pixel_size_um: float | None
    simulated: bool
    files: tuple[_FieldFiles, ...] = field(repr=False)
    manifest: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def field_names(self) -> list[str]:
        return [f.name for f in self.files]

    def __len__(self) -> int:
        return len(self.files)

    @overload
    def __getitem__(self, index: int) -> ZStackField: ...
    @overload
    def __getitem__(self, index: slice) -> list[ZStackField]: ...
    def __getitem__(self, index: int | slice) -> ZStackField | list[ZStackField]:
        if isinstance(index, slice):
            return [self._load(f) for f in self.files[index]]
        return self._load(self.files[index])

    def __iter__(self) -> Iterator[ZStackField]:
        return (self._load(f) for f in self.files)

    def describe(self) -> str:
        """One line saying what was found, for logs and CLI output."""
        step = np.diff(self.defocus_um)
        if not step.size:
            spacing = "single plane"
        else:
            spacing = f"{step[0]:g} um" if np.allclose(step, step[0]) else "uneven"
        return (
            f"{self.root}: {len(self)} fields x {len(self.plane_folders)} planes "
            f"(defocus {self.defocus_um.min():g} .. {self.defocus_um.max():g} um, spacing {spacing}, "
            f"in-focus plane {self.in_focus_index}, pixel size "
            f"{'unknown' if self.pixel_size_um is None else f'{self.pixel_size_um:g} um'}, "
            f"{'simulated' if self.simulated else 'stored'})"
        )

    def _load(self, files: _FieldFiles) -> ZStackField:
        planes = [_read_plane(path) for path in files.plane_paths]
        first_shape = planes[0].shape
        for path, plane in zip(files.plane_paths, planes, strict=True):
            if plane.shape != first_shape:
                raise InputError(
                    f"field {files.name!r}: {path} is {plane.shape[1]}x{plane.shape[0]} px but "
                    f"{files.plane_paths[0]} is {first_shape[1]}x{first_shape[0]} px; every plane of a field "
                    "must have the same size"
                )
        stack = np.stack(planes)
        if files.ground_truth_path is not None:
            ground_truth = _read_tiff(files.ground_truth_path).astype(np.float32, copy=False)
            if ground_truth.shape != first_shape:
                raise InputError(
                    f"field {files.name!r}: ground truth {files.ground_truth_path} has shape {ground_truth.shape}, "
                    f"the planes {first_shape}"
                )
        else:
            assert self.in_focus_index is not None, "real data always has an in-focus plane"
            ground_truth = stack[self.in_focus_index].astype(np.float32)
        return ZStackField(
            name=files.name,
            planes=stack,
            defocus_um=self.defocus_um.copy(),
            ground_truth=ground_truth,
            pixel_size_um=self.pixel_size_um,
            in_focus_index=self.in_focus_index,
        )


def _read_tiff(path: Path) -> np.ndarray:
    try:
        image = tifffile.imread(path)
    # not a TIFF, a damaged header, or (imagecodecs' RuntimeErrors) compressed data that does not decode
    except (tifffile.TiffFileError, ValueError, OSError, KeyError, RuntimeError) as exc:
        raise InputError(f"{path}: cannot read as a TIFF image ({exc})") from None
    if image.size == 0:
        raise InputError(f"{path}: cannot read as a TIFF image (no image data; truncated file?)")
    image = np.squeeze(image)
    if image.ndim != 2:
        raise InputError(f"{path}: expected one 2-D grey-scale image, got an array of shape {image.shape}")
    return image


def _read_plane(path: Path) -> np.ndarray:
    image = _read_tiff(path)
    if image.dtype == np.uint16:
        return image
    if image.dtype == np.uint8:
        return image.astype(np.uint16)
    raise InputError(f"{path}: expected 8- or 16-bit unsigned camera counts, got {image.dtype}")


def _tiffs_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _TIFF_SUFFIXES)


_TRAILING_NUMBER = re.compile(r"(\d+)$")
# MetaXpress / ImageXpress names as in BBBC006: <plate>_<well>_s<site>_w<wavelength><per-file hash>.tif
_WELL_SITE_WAVELENGTH = re.compile(r"_(?P<well>[A-Pa-p]\d{1,2})_s(?P<site>\d+)(?:_w(?P<wavelength>\d))?")
_HASH_SUFFIX = re.compile(r"[-_]?[0-9A-Fa-f]{8}(?:-?[0-9A-Fa-f]{4}){3}-?[0-9A-Fa-f]{12}$|[-_]?[0-9A-Fa-f]{16,}$")
_Z_TOKEN = re.compile(r"(?:^|[_\-. ])z[_\-]?\d+(?=$|[_\-. ])", re.IGNORECASE)


def field_key(file_name: str) -> str:
    """The part of a file name that names the field (well, site, wavelength), without the plane-specific parts.

    BBBC006 names the same field differently in each plane folder only through a trailing hash, so
    `mcf-z-stacks-03212011_a01_s1_w1e8d5d6a4-....tif` in every z folder gives `a01_s1_w1`. Other names fall
    back to the stem without a z token (`z05`, `_z_05`) and without a trailing hexadecimal hash.
    """
    stem = Path(file_name).stem
    match = _WELL_SITE_WAVELENGTH.search(stem)
    if match:
        key = f"{match['well'].lower()}_s{match['site']}"
        return key + (f"_w{match['wavelength']}" if match["wavelength"] else "")
    stem = _HASH_SUFFIX.sub("", stem)
    return _Z_TOKEN.sub("", stem) or stem


def _plane_folders(root: Path) -> list[Path]:
    """Subfolders named with a trailing plane number, in plane order; other folders are skipped and logged."""
    numbered: list[tuple[int, Path]] = []
    skipped: list[str] = []
    for child in sorted(root.iterdir()):
        if not child.is_dir():
            continue
        match = _TRAILING_NUMBER.search(child.name)
        if match and child.name != GROUND_TRUTH_FOLDER:
            numbered.append((int(match.group(1)), child))
        else:
            skipped.append(child.name)
    if skipped:
        log.info(kv("zstack_folders_skipped", root=root, folders=",".join(skipped), reason="no trailing plane number"))
    numbers = [n for n, _ in numbered]
    duplicates = sorted({n for n in numbers if numbers.count(n) > 1})
    if duplicates:
        names = [p.name for n, p in numbered if n in duplicates]
        raise InputError(f"{root}: several folders claim the same plane number {duplicates}: {names}")
    return [p for _, p in sorted(numbered)]


def read_zstack_folders(
    root: str | Path,
    in_focus_index: int | None = None,
    z_step_um: float | None = None,
    pixel_size_um: float | None = None,
    *,
    z_order: ZOrder = "increasing",
    file_pattern: str | None = None,
) -> ZStackDataset:
    """Open a folder-per-plane z-stack dataset (ours or BBBC006-style); fields are read when indexed.

    For our simulated datasets everything comes from `dataset.json`; arguments given must agree with it.
    For real data:
      in_focus_index: position of the in-focus plane in folder order (BBBC006's description names z_16).
      z_step_um: stage step between consecutive planes (BBBC006: 2 um).
      pixel_size_um: at the sample, if known; None leaves it to the caller.
      z_order: "increasing" (default) when higher folder numbers were taken at higher stage Z, i.e. deeper into
        the sample, as Micro-Manager numbers a z-stack from its bottom; "decreasing" for the other way round.
      file_pattern: glob on file names to pick one channel, e.g. "*_w1*" for BBBC006's Hoechst images.
    Files are matched across planes by `field_key`; fields missing from some plane are skipped and logged.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: z-stack folder not found" if not root.exists() else f"{root}: not a folder")
    if (root / MANIFEST_NAME).is_file():
        return _read_simulated(root, in_focus_index, z_step_um, pixel_size_um)
    return _read_real(root, in_focus_index, z_step_um, pixel_size_um, z_order, file_pattern)


def _read_real(
    root: Path,
    in_focus_index: int | None,
    z_step_um: float | None,
    pixel_size_um: float | None,
    z_order: ZOrder,
    file_pattern: str | None,
) -> ZStackDataset:
    folders = _plane_folders(root)
    if not folders:
        raise InputError(
            f"{root}: no plane folders found; expected one subfolder per focal plane named with its plane "
            "number (e.g. BBBC006_v1_images_z_00 ... z_33), or a dataset.json written by 'acquire-refocus simulate'"
        )
    if in_focus_index is None or z_step_um is None:
        raise InputError(
            f"{root}: stored real data needs the in-focus plane index and the z step between planes "
            "(training.in_focus_index and training.z_step_um; BBBC006: 16 and 2.0)"
        )
    if not 0 <= in_focus_index < len(folders):
        raise InputError(
            f"{root}: in_focus_index {in_focus_index} is out of range: found {len(folders)} plane folders, "
            f"so it must be 0 .. {len(folders) - 1} ({folders[0].name} .. {folders[-1].name})"
        )
    if not z_step_um > 0:
        raise InputError(f"{root}: z_step_um must be positive, got {z_step_um}")
    if pixel_size_um is not None and not pixel_size_um > 0:
        raise InputError(f"{root}: pixel_size_um must be positive, got {pixel_size_um}")
    if z_order not in ("increasing", "decreasing"):
        raise InputError(f"z_order must be 'increasing' or 'decreasing', got {z_order!r}")

    per_plane: list[dict[str, Path]] = []
    for folder in folders:
        tiffs = _tiffs_in(folder)
        if file_pattern is not None:
            tiffs = [p for p in tiffs if p.match(file_pattern)]
        if not tiffs:
            what = "TIFF files" if file_pattern is None else f"TIFF files matching {file_pattern!r}"
            raise InputError(f"{folder}: no {what} in this plane folder")
        keyed: dict[str, Path] = {}
        for path in tiffs:
            key = field_key(path.name)
            if key in keyed:
                raise InputError(
                    f"{folder}: {keyed[key].name} and {path.name} both look like field {key!r}; "
                    "use file_pattern to pick one channel, or rename the files"
                )
            keyed[key] = path
        per_plane.append(keyed)

    common = set(per_plane[0]).intersection(*per_plane[1:])
    if not common:
        raise InputError(
            f"{root}: no field appears in every plane folder; e.g. {folders[0].name} has "
            f"{sorted(per_plane[0])[:3]} and {folders[-1].name} has {sorted(per_plane[-1])[:3]} "
            "(fields are matched by well/site/wavelength, or by the file name without z number and hash)"
        )
    incomplete = set().union(*per_plane) - common
    if incomplete:
        examples = ",".join(sorted(incomplete)[:5])
        log.warning(kv("zstack_fields_incomplete", root=root, skipped=len(incomplete), examples=examples))
    sign = 1.0 if z_order == "increasing" else -1.0
    defocus_um = sign * (np.arange(len(folders), dtype=np.float64) - in_focus_index) * float(z_step_um)
    files = tuple(
        _FieldFiles(name=key, plane_paths=tuple(plane[key] for plane in per_plane), ground_truth_path=None)
        for key in sorted(common)
    )
    dataset = ZStackDataset(
        root=root,
        plane_folders=tuple(folders),
        defocus_um=defocus_um,
        in_focus_index=in_focus_index,
        pixel_size_um=pixel_size_um,
        simulated=False,
        files=files,
    )
    log.info(
        kv(
            "zstack_matched",
            root=root,
            planes=len(folders),
            first=folders[0].name,
            last=folders[-1].name,
            fields=len(files),
            skipped_fields=len(incomplete),
            in_focus=folders[in_focus_index].name,
            z_order=z_order,
        )
    )
    return dataset


def _read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != DATASET_FORMAT:
        raise InputError(f"{path}: not an acquire-refocus z-stack dataset (expected format {DATASET_FORMAT!r})")
    if manifest.get("version") != DATASET_VERSION:
        raise InputError(
            f"{path}: dataset version {manifest.get('version')!r}; this acquire-refocus reads version {DATASET_VERSION}"
        )
    return manifest


def _read_simulated(
    root: Path, in_focus_index: int | None, z_step_um: float | None, pixel_size_um: float | None
) -> ZStackDataset:
    manifest = _read_manifest(root)
    try:
        planes = manifest["planes"]
        defocus_um = np.array([float(p["defocus_um"]) for p in planes], dtype=np.float64)
        folders = tuple(root / p["folder"] for p in planes)
        recorded_focus = manifest["in_focus_index"]
        recorded_pixel = float(manifest["pixel_size_um"])
        fields = manifest["fields"]
        gt_folder = root / manifest["ground_truth_folder"]
        files = tuple(
            _FieldFiles(
                name=f["name"],
                plane_paths=tuple(folder / f["file"] for folder in folders),
                ground_truth_path=gt_folder / f["file"],
            )
            for f in fields
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{root / MANIFEST_NAME}: incomplete or damaged manifest ({exc!r})") from None

    conflicts = []
    if in_focus_index is not None and in_focus_index != recorded_focus:
        conflicts.append(f"in_focus_index {in_focus_index} (recorded: {recorded_focus})")
    if z_step_um is not None:
        steps = np.diff(defocus_um)
        if not (steps.size and np.allclose(steps, z_step_um)):
            conflicts.append(f"z_step_um {z_step_um} (recorded defocus: {defocus_um.tolist()})")
    if pixel_size_um is not None and not np.isclose(pixel_size_um, recorded_pixel):
        conflicts.append(f"pixel_size_um {pixel_size_um} (recorded: {recorded_pixel})")
    if conflicts:
        raise InputError(
            f"{root}: this simulated dataset records its own geometry in {MANIFEST_NAME}; the given "
            + "; ".join(conflicts)
            + " disagree. Leave them unset for simulated data."
        )
    for folder in (*folders, gt_folder):
        if not folder.is_dir():
            raise InputError(f"{folder}: folder listed in {root / MANIFEST_NAME} is missing")
    return ZStackDataset(
        root=root,
        plane_folders=folders,
        defocus_um=defocus_um,
        in_focus_index=recorded_focus,
        pixel_size_um=recorded_pixel,
        simulated=True,
        files=files,
        manifest=manifest,
    )
