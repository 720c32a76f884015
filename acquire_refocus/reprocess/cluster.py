"""Where the work runs: an existing Dask cluster (`--scheduler tcp://HOST:PORT`, started with `dask scheduler` /
`dask worker` or by dask-jobqueue), or an embedded LocalCluster of worker processes sized to this machine."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from acquire_refocus.errors import UserError

if TYPE_CHECKING:
    from distributed import Client

CONNECT_TIMEOUT_S = 20


def machine_cores() -> int:
    """Cores this process may use (the affinity mask, not the machine's count, under a batch scheduler)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def local_layout(workers: int | None) -> tuple[int, int]:
    """(worker processes, threads each) for the embedded cluster: by default one process per 4 cores, so each
    engine gets several threads, and the cores shared out so that no two workers compete for one."""
    cores = machine_cores()
    count = workers if workers is not None else max(1, cores // 4)
    return count, max(1, cores // count)


@contextmanager
def dask_client(scheduler: str | None, workers: int | None) -> Iterator[Client]:
    """A distributed.Client on the cluster at `scheduler`, or on an embedded LocalCluster; both closed after."""
    from distributed import Client, LocalCluster

    if scheduler is not None:
        try:
            client = Client(scheduler, timeout=f"{CONNECT_TIMEOUT_S}s")
        except (OSError, TimeoutError, ValueError) as exc:
            raise UserError(
                f"--scheduler {scheduler}: cannot reach a Dask scheduler there ({exc}); start one with "
                "'dask scheduler' and workers with 'dask worker ADDRESS'"
            ) from None
        try:
            try:
                client.wait_for_workers(1, timeout=CONNECT_TIMEOUT_S)
            except TimeoutError:
                raise UserError(
                    f"--scheduler {scheduler}: no worker connected to it within {CONNECT_TIMEOUT_S} s; "
                    f"start one with 'dask worker {scheduler}'"
                ) from None
            yield client
        finally:
            client.close()
        return
    count, threads = local_layout(workers)
    with (
        LocalCluster(
            n_workers=count,
            threads_per_worker=threads,
            processes=True,
            dashboard_address=":0",
            silence_logs=logging.WARNING,
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


def worker_threads(client: Client) -> int:
    """Dask threads over all workers now connected (at least 1)."""
    threads: dict[str, int] = client.nthreads()
    return max(1, sum(threads.values()))
