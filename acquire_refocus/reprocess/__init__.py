"""Offline reprocessing of whole datasets and plates on a Dask cluster (`acquire-refocus correct DATASET`).

dataset.py   what a dataset is (axes, positions, pixel size, channels) and `open_dataset` for any path
ome_zarr.py, ndtiff.py, tiff.py, folder.py   one reader per format, each over a maintained library
batches.py   frames grouped into tasks along the output's chunks, so no two tasks write one chunk
output.py    the refocused OME-Zarr (same axes, chunks and metadata as the input), written by region
table.py     the focus table: one Parquet part per finished task, merged at the end (resume = parts present)
work.py      the Dask side: a worker plugin holding one Refocuser per worker, the task, the submit loop
report.py    the plate / time-lapse focus-quality report (PNG + Markdown)
"""
