"""The screenshots in docs/OPERATIONS.md, taken as a new user would see the pages: `keye up` on a scratch
workspace, `prefect deploy --all`, two tiny pipeline runs triggered through the deployment (the second changes one
eval setting, so the earlier stages are cached and the compare view has a difference to show), then headless
Chromium (the Debian `chromium` package) on the Prefect flow-run page, the MLflow runs table and compare view,
and the eval report. Everything stays on 127.0.0.1; `keye down` at the end.

    apt-get install -y chromium
    python scripts/screenshots.py                  # writes docs/img/*.png
    python scripts/screenshots.py --keep           # leaves the servers up (stop them: keye down -w <workspace>)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from keye import services  # noqa: E402

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


def tiny_config(path: Path, workspace: Path) -> Path:
    """The e2e test's pipeline: four short synthetic videos (two held out), three SFT steps, a small eval."""
    config = {
        "name": "tiny",
        "workspace": str(workspace),
        "stages": ["ingest", "caption", "shard", "pack", "train", "eval"],
        "sources": [
            {
                "kind": "synthetic",
                "n_videos": 4,
                "n_long": 0,
                "seed": 3,
                "heldout_fraction": 0.5,
                "max_objects": 1,
            }
        ],
        "shard": {"target_bytes": 2_000_000, "max_side": 112, "fps": 4},
        "pack": {"max_tokens": 1024, "tokenizer": {"path": None, "vocab_size": 512}},
        "train": {
            "preset": "tiny",
            "stages": [
                {
                    "name": "sft",
                    "kind": "sft",
                    "steps": 8,
                    "lr": 1e-3,
                    "warmup_steps": 1,
                    "tokens_per_step": 1024,
                }
            ],
        },
        "eval": {"batch_size": 8, "limit": 8, "max_new_tokens": 4},
        "runner": {"kind": "thread", "max_workers": 1},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def trigger(api: str, parameters: dict, timeout_s: float = 900) -> str:
    """Create a run of pipeline/pipeline (what the UI's Run button does) and wait until it is final."""
    dep = httpx.get(f"{api}/deployments/name/pipeline/pipeline", timeout=30).json()
    run = httpx.post(
        f"{api}/deployments/{dep['id']}/create_flow_run", json={"parameters": parameters}, timeout=30
    ).json()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = httpx.get(f"{api}/flow_runs/{run['id']}", timeout=30).json()["state"]
        if state and state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            if state["type"] != "COMPLETED":
                raise SystemExit(f"flow run {run['id']} ended {state['type']}: {state.get('message')}")
            return run["id"]
        time.sleep(2)
    raise SystemExit(f"flow run {run['id']} did not finish in {timeout_s} s")


def _flow_name(api: str, flow_run: dict) -> str:
    return httpx.get(f"{api}/flows/{flow_run['flow_id']}", timeout=30).json()["name"]


def shoot(chromium: str, url: str, out: Path, size: tuple[int, int], budget_ms: int = 20000) -> None:
    """One page as PNG; the JavaScript apps get `budget_ms` of virtual time to fetch and render."""
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                chromium,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={profile}",
                f"--window-size={size[0]},{size[1]}",
                f"--virtual-time-budget={budget_ms}",
                f"--screenshot={out}",
                url,
            ],
            check=True,
            capture_output=True,
            timeout=180,
        )
    shrink(out)
    print(f"{out.relative_to(REPO)}: {out.stat().st_size // 1024} KB  <- {url}")


def shrink(path: Path, limit: int = 300_000) -> None:
    """Palette PNG (text stays sharp); halve the colours until the file is under `limit` bytes."""
    img = Image.open(path).convert("RGB")
    for colors in (256, 128, 64, 32):
        img.quantize(colors=colors, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
        if path.stat().st_size < limit:
            return


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workspace", type=Path, default=Path(tempfile.mkdtemp(prefix="keye-shots-")) / "ws")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "img")
    ap.add_argument("--prefect-port", type=int, default=4300)
    ap.add_argument("--mlflow-port", type=int, default=5300)
    ap.add_argument("--keep", action="store_true", help="leave the servers running")
    ap.add_argument("--reuse", action="store_true", help="photograph the runs already in --workspace")
    args = ap.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("no chromium on PATH; fix: apt-get install -y chromium")
    args.out.mkdir(parents=True, exist_ok=True)
    ws = args.workspace.resolve()
    urls = services.up(ws, prefect_port=args.prefect_port, mlflow_port=args.mlflow_port, auto_port=True)
    try:
        api, mlflow = urls["prefect_api"], urls["mlflow"]
        env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_HOME": str(ws / "prefect")}
        if not args.reuse:
            subprocess.run(
                [services.console_script("prefect"), "--no-prompt", "deploy", "--all"],
                cwd=REPO,
                env=env,
                check=True,
                capture_output=True,
            )
        if args.reuse:
            flow_run = httpx.post(
                f"{api}/flow_runs/filter",
                json={"flows": {"name": {"any_": ["pipeline"]}}, "sort": "START_TIME_DESC", "limit": 1},
            ).json()[0]["id"]
        else:
            config = tiny_config(ws.parent / "tiny.yaml", ws)
            params = {"config_path": str(config), "workspace": str(ws)}
            trigger(api, params)
            flow_run = trigger(api, {**params, "overrides": {"eval.max_new_tokens": "6"}})

        exp = httpx.get(
            f"{mlflow}/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name": "keye"}
        )
        exp_id = exp.json()["experiment"]["experiment_id"]
        runs = httpx.post(
            f"{mlflow}/api/2.0/mlflow/runs/search",
            json={"experiment_ids": [exp_id], "filter": "tags.`keye.pipeline` = 'tiny'"},
        ).json()["runs"]
        parents = [r["info"]["run_id"] for r in runs]
        report = next((ws / "reports").rglob("report.html"))
        if len(list((ws / "reports").rglob("report.html"))) > 1:
            report = max((ws / "reports").rglob("report.html"), key=lambda p: p.stat().st_mtime)

        prefect = urls["prefect"]
        # Prefect's V2 UI (/v2) honours ?tab= in a flow run's address; V1 always opens on Logs
        ui = f"{prefect}/v2"
        arts = httpx.post(f"{api}/artifacts/filter", json={"flow_runs": {"id": {"any_": [flow_run]}}}).json()
        summary = next(a["id"] for a in arts if a["key"] == "pipeline-summary")
        children = httpx.post(
            f"{api}/flow_runs/filter", json={"flow_runs": {"parent_flow_run_id": {"any_": [flow_run]}}}
        ).json()
        ingest = next(c["id"] for c in children if _flow_name(api, c) == "ingest")
        shoot(
            chromium,
            f"{ui}/runs/flow-run/{flow_run}?tab=Artifacts",
            args.out / "prefect-flow-run.png",
            (1400, 800),
        )
        shoot(chromium, f"{ui}/artifacts/artifact/{summary}", args.out / "prefect-summary.png", (1400, 900))
        shoot(
            chromium,
            f"{ui}/runs/flow-run/{ingest}?tab=Artifacts",
            args.out / "prefect-ingest-run.png",
            (1400, 800),
        )
        shoot(
            chromium,
            f"{ui}/runs/flow-run/{ingest}?tab=Logs",
            args.out / "prefect-ingest-logs.png",
            (1400, 800),
        )
        shoot(chromium, f"{mlflow}/#/experiments/{exp_id}/runs", args.out / "mlflow-runs.png", (1600, 420))
        train = httpx.post(
            f"{mlflow}/api/2.0/mlflow/runs/search",
            json={
                "experiment_ids": [exp_id],
                "filter": "attributes.run_name = 'train:sft' and tags.cached = 'false'",
                "order_by": ["attributes.start_time DESC"],
            },
        ).json()["runs"][0]["info"]["run_id"]
        run_page = f"{mlflow}/#/experiments/{exp_id}/runs/{train}"
        shoot(chromium, run_page, args.out / "mlflow-train-run.png", (1600, 1100), budget_ms=40000)
        compare = f"{mlflow}/#/compare-runs?runs={json.dumps(parents)}&experiments={json.dumps([exp_id])}"
        shoot(chromium, compare.replace(" ", ""), args.out / "mlflow-compare.png", (1500, 1100))
        shoot(chromium, report.as_uri(), args.out / "report.png", (1200, 2200), budget_ms=3000)
    finally:
        if not args.keep:
            services.down(ws)


if __name__ == "__main__":
    main()
