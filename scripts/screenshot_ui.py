"""Screenshot a sweep's runs table in the MLflow UI with a headless browser (the picture in README.md).

    .venv/bin/python scripts/screenshot_ui.py outputs/sweeps/<time> [--out docs/sweep_runs_table.png]

Starts `mlflow ui` (one worker, 127.0.0.1, a free port) on the sweep's store, opens the link the sweep printed
(its parent run's arcfold.ui_link tag, pointed at this server) in headless Chromium, waits for the page's
scripts, saves the PNG and stops the server. Needs a Chromium (Debian: apt-get install chromium).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, server: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"mlflow ui exited with {server.returncode}")
        try:
            if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"mlflow ui did not answer on {url} within {seconds:.0f} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sweep_dir", type=Path, help="a sweep directory (it holds mlflow_parent.json)")
    p.add_argument("--out", type=Path, default=Path("docs/sweep_runs_table.png"))
    p.add_argument("--size", default="2000,640", help="browser window WIDTH,HEIGHT (default 2000,640)")
    p.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser") or "chromium")
    args = p.parse_args(argv)

    from mlflow.tracking import MlflowClient

    parent = json.loads((args.sweep_dir / "mlflow_parent.json").read_text())
    link = MlflowClient(tracking_uri=parent["uri"]).get_run(parent["run_id"]).data.tags.get("arcfold.ui_link")
    if not link:
        raise SystemExit("the sweep's parent run has no arcfold.ui_link tag: run python -m arcfold.cli.compare on it")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    mlflow = Path(sys.executable).with_name("mlflow")
    server = subprocess.Popen(
        [
            str(mlflow),
            "ui",
            "--workers",
            "1",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            parent["uri"],
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_healthy(url, server)
        page = url + link[link.index("/#/") :]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as profile:  # a fresh profile: no saved view state of the user's
            subprocess.run(
                [
                    args.chromium,
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--hide-scrollbars",
                    f"--user-data-dir={profile}",
                    f"--window-size={args.size}",
                    "--virtual-time-budget=20000",
                    f"--screenshot={args.out.resolve()}",
                    page,
                ],
                check=True,
                capture_output=True,
                timeout=180,
            )
        print(f"{args.out} <- {page}")
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the ui and the worker it started
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
