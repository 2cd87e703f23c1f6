"""Start W gloo CPU processes of tests/unit/train/dist_worker.py (or another worker script) on one spec and return
rank 0's result."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
WORKER = Path(__file__).with_name("dist_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(spec: dict, world: int, tmp: Path, tag: str, worker: Path = WORKER) -> dict:
    spec = {**spec, "out": str(tmp / f"{tag}.result.json")}
    path = tmp / f"{tag}.spec.json"
    path.write_text(json.dumps(spec))
    port = _free_port()
    procs = []
    for r in range(world):
        env = dict(
            os.environ,
            OMP_NUM_THREADS="1",
            PYTHONPATH=str(ROOT),
            RANK=str(r),
            LOCAL_RANK=str(r),
            WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, str(worker), str(path)], env=env, stderr=subprocess.PIPE, text=True
            )
        )
    try:  # generous: a shared CI machine may run these at a fraction of a core each
        errs = [p.communicate(timeout=900)[1] for p in procs]
    finally:  # never leave ranks behind (a rank that failed leaves the others waiting in a collective)
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, err in zip(procs, errs, strict=True):
        assert p.returncode == 0, err[-4000:]
    return json.loads(Path(spec["out"]).read_text())
