"""Small simulated datasets for the reprocessing tests, each written with its format's real writer: ome-writers (as
the daemon writes raw.ome.zarr), zarr-python (OME-NGFF v0.4 on Zarr v2), ndstorage (NDTiff), tifffile (OME-TIFF,
BBBC-style single-plane files). Frames are 64 x 64 uint16 blurred noise: structure for the network, varied by seed."""

from __future__ import annotations

import gc
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from scipy.ndimage import gaussian_filter

FRAME_PX = 64
PIXEL_SIZE_UM = 0.65
CHANNELS = ("DAPI", "GFP")


def frame(seed: int, px: int = FRAME_PX) -> np.ndarray:
    rng = np.random.default_rng(seed)
    blobs = gaussian_filter(rng.random((px, px)), 2.0 + seed % 3)
    return (blobs / blobs.max() * 3000 + rng.poisson(100, (px, px))).astype(np.uint16)


def frames_tpcz(t: int, p: int, c: int, z: int, px: int = FRAME_PX) -> np.ndarray:
    """Array (t, p, c, z, y, x) of distinct frames."""
    out = np.empty((t, p, c, z, px, px), np.uint16)
    for seed, index in enumerate(np.ndindex(t, p, c, z)):
        out[index] = frame(seed, px)
    return out


def write_ome_writers(path: Path, data: np.ndarray, pixel_size_um: float = PIXEL_SIZE_UM) -> None:
    """As the daemon's raw.ome.zarr: ome-writers with the settings storage.py builds from a useq sequence."""
    import useq
    from ome_writers import create_stream

    from acquire_refocus.storage import raw_store_settings

    t, p, c, z = data.shape[:4]
    sequence = useq.MDASequence(
        time_plan={"interval": 1, "loops": t},
        stage_positions=[(i * 10.0, 0.0, 0.0) for i in range(p)],
        channels=list(CHANNELS[:c]),
        z_plan={"range": z - 1, "step": 1},
        axis_order="tpcz",
    )
    px = data.shape[-1]
    stream = create_stream(raw_store_settings(path, sequence, px, px, "uint16", pixel_size_um))
    for event in sequence:
        index = event.index
        stream.append(data[index.get("t", 0), index.get("p", 0), index.get("c", 0), index.get("z", 0)])
    stream.close()


def write_ome_zarr_v04(path: Path, data: np.ndarray) -> None:
    """One image (t, c, z, y, x) as OME-NGFF v0.4 on Zarr v2, chunks of 2 z-planes."""
    import zarr

    image = data[:, 0]
    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    root.create_array("0", shape=image.shape, chunks=(1, 1, 2, FRAME_PX, FRAME_PX), dtype=image.dtype)[...] = image
    axes: list[dict[str, Any]] = [
        {"name": "t", "type": "time"},
        {"name": "c", "type": "channel"},
        *({"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"),
    ]
    root.attrs.put(
        {
            "multiscales": [
                {
                    "version": "0.4",
                    "axes": axes,
                    "datasets": [
                        {
                            "path": "0",
                            "coordinateTransformations": [
                                {"type": "scale", "scale": [1.0, 1.0, 1.0, PIXEL_SIZE_UM, PIXEL_SIZE_UM]}
                            ],
                        }
                    ],
                }
            ],
            "omero": {"channels": [{"label": name} for name in CHANNELS[: image.shape[1]]]},
        }
    )


def write_ndtiff(path: Path, data: np.ndarray) -> Path:
    import ndstorage

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)  # ndstorage's finish() drops a reader without closing it
        dataset = ndstorage.NDTiffDataset(str(path), summary_metadata={"PixelSize_um": PIXEL_SIZE_UM}, writable=True)
        for t, p, c, z in np.ndindex(*data.shape[:4]):
            dataset.put_image(
                {"time": t, "position": p, "channel": CHANNELS[c], "z": z},
                data[t, p, c, z],
                {"PixelSizeUm": PIXEL_SIZE_UM},
            )
        dataset.finish()
        dataset.close()
        del dataset
        gc.collect()
    return path


def write_ome_tiff(path: Path, data: np.ndarray) -> None:
    """One OME image per position, axes TCZYX."""
    with tifffile.TiffWriter(path, ome=True) as writer:
        for p in range(data.shape[1]):
            writer.write(
                data[:, p],
                photometric="minisblack",
                metadata={
                    "axes": "TCZYX",
                    "PhysicalSizeX": PIXEL_SIZE_UM,
                    "PhysicalSizeY": PIXEL_SIZE_UM,
                    "Channel": {"Name": list(CHANNELS[: data.shape[2]])},
                },
            )


def write_bbbc_folder(path: Path, wells: list[str], sites: int, channels: int) -> dict[tuple[str, int, int], Path]:
    """BBBC006-style names, one plane per file; (well, site, channel index) -> file."""
    path.mkdir(parents=True)
    files = {}
    seed = 0
    for well in wells:
        for site in range(1, sites + 1):
            for channel in range(channels):
                file = path / f"plate-20110321_{well.lower()}_s{site}_w{channel + 1}ABCDEF.tif"
                tifffile.imwrite(
                    file,
                    frame(seed),
                    resolution=(1 / PIXEL_SIZE_UM, 1 / PIXEL_SIZE_UM),
                    imagej=True,
                    metadata={"unit": "um"},
                )
                files[(well, site, channel)] = file
                seed += 1
    return files
