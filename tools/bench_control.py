"""How fast the control socket refuses requests over its limits (issue 17: <= 100 ms), and that it answers after.

    python tools/bench_control.py [--repeats 20]

Starts a daemon on the simulated microscope (a small untrained network on torch; the network does not take part
in a refusal) and times, from the client, the reply to each hostile request of the issue, then a status request.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from support import FAST_SIMULATOR, free_tcp_address

from acquire_refocus.config import OpticsConfig, UNetModelConfig, parse_config
from acquire_refocus.daemon import Daemon

REQUESTS: dict[str, bytes] = {
    "1000 x '['": b"[" * 1000,
    "200 KB nested 100k deep": b'{"command": "status", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "300 KB request": b'{"command": "run", "sequence": {"metadata": {"x": "' + b"a" * 300_000 + b'"}}}',
    "loops 1e8": json.dumps({"command": "run", "sequence": {"time_plan": {"interval": 0, "loops": 10**8}}}).encode(),
    "loops 1e12": json.dumps({"command": "run", "sequence": {"time_plan": {"interval": 0, "loops": 10**12}}}).encode(),
    "output ../../x": json.dumps(
        {"command": "run", "sequence": {"time_plan": {"interval": 0, "loops": 2}}, "output": "../../x"}
    ).encode(),
    "output 12345": json.dumps({"command": "run", "sequence": {}, "output": 12345}).encode(),
    "status": b'{"command": "status"}',
}


def timed(address: str, payload: bytes) -> tuple[float, dict[str, Any]]:
    socket = zmq.Context.instance().socket(zmq.REQ)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.RCVTIMEO, 60_000)
    socket.connect(address)
    try:
        t0 = time.perf_counter()
        socket.send(payload)
        reply = json.loads(socket.recv())
        return (time.perf_counter() - t0) * 1000.0, reply
    finally:
        socket.close(linger=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    import torch

    from acquire_refocus import Refocuser
    from acquire_refocus.model.checkpoint import save_weights
    from acquire_refocus.model.network import build_network

    with tempfile.TemporaryDirectory() as tmp:
        model = UNetModelConfig(base_channels=4, depth=2)
        weights = Path(tmp) / "tiny.pt"
        save_weights(weights, build_network(model), model, OpticsConfig(), {"purpose": "benchmark"})
        config = parse_config(
            {
                "simulator": FAST_SIMULATOR,
                "model": {"weights": str(weights)},
                "engine": {"backend": "torch", "num_threads": 1},
                "publishing": {"pub_address": free_tcp_address(), "control_address": free_tcp_address()},
            }
        )
        daemon = Daemon(config, output_dir=Path(tmp) / "out", corrector=Refocuser.load(weights, engine="torch"))
        server = threading.Thread(target=daemon.serve, kwargs={"handle_signals": False}, daemon=True)
        server.start()
        daemon.acquisition_core()
        address = config.publishing.control_address
        try:
            print(f"{'request':<26} {'ok':<5} {'p50 ms':>8} {'max ms':>8}  reply")
            for name, payload in REQUESTS.items():
                times, reply = [], {}
                for _ in range(args.repeats):
                    ms, reply = timed(address, payload)
                    times.append(ms)
                print(
                    f"{name:<26} {reply['ok']!s:<5} {statistics.median(times):8.2f} {max(times):8.2f}  "
                    f"{str(reply.get('error', reply.get('state')))[:70]}"
                )
        finally:
            daemon.request_stop("benchmark done")
            server.join(30)
            daemon.close()
    del torch


if __name__ == "__main__":
    main()
