"""Screenshot what a person opens from a sweep in the MLflow UI, with a headless browser (the pictures in docs/).

    .venv/bin/python scripts/screenshot_ui.py outputs/sweeps/<time> [--out-dir docs] [--pages table,run,parent,report]

Starts `mlflow ui` (one worker, 127.0.0.1, a free port) on the sweep's store, opens the links arcfold printed and
tagged, pointed at this server, in headless Chromium, waits for the page's scripts, saves one PNG per page and
stops the server:

    table   the sweep's runs table (the parent's arcfold.ui_link tag)   -> sweep_runs_table.png
    run     the leading configuration's first run (its run link)       -> ui_run_page.png
    parent  the sweep's parent run (its run link)                      -> ui_parent_page.png
    report  the comparison report (the parent's arcfold.report_link)   -> ui_report.png

Needs a Chromium (Debian: apt-get install chromium).
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

PAGES = {
    "table": ("sweep_runs_table.png", "2000,640"),
    "run": ("ui_run_page.png", "1600,1300"),
    "parent": ("ui_parent_page.png", "1600,1300"),
    "report": ("ui_report.png", "1600,1500"),
}


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


def links(sweep_dir: Path) -> tuple[str, dict[str, str]]:
    """The sweep's store and the links arcfold printed or tagged for each page."""
    from mlflow.tracking import MlflowClient

    from arcfold.track.links import run_link

    parent = json.loads((sweep_dir / "mlflow_parent.json").read_text())
    client = MlflowClient(tracking_uri=parent["uri"])
    run = client.get_run(parent["run_id"])
    tags = run.data.tags
    if "arcfold.ui_link" not in tags:
        raise SystemExit("the sweep's parent run has no arcfold.ui_link tag: run python -m arcfold.cli.compare on it")
    first = tags["leading_runs"].split(",")[0]
    exp = run.info.experiment_id
    return parent["uri"], {
        "table": tags["arcfold.ui_link"],
        "run": run_link(parent["uri"], exp, first),
        "parent": run_link(parent["uri"], exp, parent["run_id"]),
        "report": tags["arcfold.report_link"],
    }


def shoot(chromium: str, page: str, out: Path, size: str) -> None:
    with tempfile.TemporaryDirectory() as profile:  # a fresh profile: no saved view state of the user's
        subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                f"--window-size={size}",
                "--virtual-time-budget=20000",
                f"--screenshot={out.resolve()}",
                page,
            ],
            check=True,
            capture_output=True,
            timeout=180,
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sweep_dir", type=Path, help="a sweep directory (it holds mlflow_parent.json)")
    p.add_argument("--out-dir", type=Path, default=Path("docs"))
    p.add_argument("--pages", default=",".join(PAGES), help=f"which pages (default: all of {', '.join(PAGES)})")
    p.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser") or "chromium")
    args = p.parse_args(argv)

    uri, pages = links(args.sweep_dir)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    mlflow = Path(sys.executable).with_name("mlflow")
    server = subprocess.Popen(
        [str(mlflow), "ui", "--workers", "1", "--host", "127.0.0.1", "--port", str(port), "--backend-store-uri", uri],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_healthy(url, server)
        args.out_dir.mkdir(parents=True, exist_ok=True)
        for name in args.pages.split(","):
            link = pages[name]
            page = url + link[link.index("/#/") :]  # the printed link, pointed at this server
            filename, size = PAGES[name]
            shoot(args.chromium, page, args.out_dir / filename, size)
            print(f"{args.out_dir / filename} <- {page}")
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the ui and the worker it started
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
