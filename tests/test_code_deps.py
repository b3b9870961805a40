"""Each stage's `code` deps in dvc.yaml are derived from the import closure of its body, so a change to a helper
(the shard writer, say) reruns exactly the stages that load it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from rain_tasks.pipeline.imports import function_imports
from rain_tasks.pipeline.stages import STAGES, get_stage

#: stages that write safetensors through rain_tasks.io.checkpoint (the shard writer, the streamed tensor files)
WRITES_TENSORS = ("zoo", "task_vectors", "features", "projection", "attention_stats", "alpha", "merge", "ablations",
                  "paper_preset", "baselines")


@pytest.mark.parametrize("name", WRITES_TENSORS)
def test_a_change_to_the_shard_writer_reruns_the_stages_that_write_tensors(name):
    assert "rain_tasks/io/checkpoint.py" in get_stage(name).code


def test_code_deps_name_the_stage_module_and_not_the_registry():
    code = {s.name: s.code for s in STAGES}
    assert "rain_tasks/stage1/projection.py" in code["projection"]
    assert "rain_tasks/stage1/projection.py" not in code["attention_stats"]  # Stage 2 reads Δ⊥ files, not the projection code
    assert "rain_tasks/methods/ops.py" in code["baselines"] and "rain_tasks/zoo/build.py" in code["zoo"]
    assert all("rain_tasks/pipeline/stages.py" not in c for c in code.values())


@pytest.mark.parametrize("name", ["task_vectors", "merge", "evaluate"])
def test_code_deps_cover_every_library_module_the_body_loads(name):
    """Import what the body imports in a fresh interpreter: every library module that gets loaded is in its code deps."""
    start = sorted(function_imports("rain_tasks.pipeline.stages", get_stage(name).run.__name__))
    script = (f"import importlib, json, sys\nfor m in {start!r}: importlib.import_module(m)\n"
              "print(json.dumps(sorted(getattr(m, '__file__', None) or '' for n, m in sys.modules.items() if n.startswith('rain_tasks'))))")
    loaded = json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout)
    files = {f.split("/rain_tasks/", 1)[1] for f in loaded if "/rain_tasks/" in f and not f.endswith("__init__.py")}
    assert files, "the body loads no library module"
    assert sorted(f"rain_tasks/{f}" for f in files) == sorted(c for c in get_stage(name).code if not c.endswith("__init__.py"))
