"""The library's import graph (rain_dev.import_graph, read with ast from every import, module level or not):
no circle, and no module imports a layer above its own."""

from __future__ import annotations

from rain_dev import import_graph


def test_every_library_module_is_in_a_layer():
    outside = [m for m in import_graph.modules() if import_graph.layer(m) is None and m != "rain_tasks"]
    assert outside == [], f"modules outside every layer of rain_dev.import_graph.LAYERS: {outside}"


def test_no_module_imports_a_layer_above_it():
    assert import_graph.upward(import_graph.graph()) == []


def test_no_import_circle():
    assert import_graph.cycles(import_graph.graph()) == []


def test_the_checks_see_a_circle_and_an_upward_import(tmp_path):
    """The graph is read from the files: a planted circle through an import inside a function is found."""
    pkg = tmp_path / "rain_tasks"
    for rel, text in {"__init__.py": "", "io/__init__.py": "", "io/a.py": "def f():\n    from rain_tasks.pipeline import b\n",
                      "pipeline/__init__.py": "", "pipeline/b.py": "from rain_tasks.io.a import f\n"}.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    edges = import_graph.graph(tmp_path)
    assert import_graph.cycles(edges) == [["rain_tasks.io.a", "rain_tasks.pipeline.b"]]
    assert import_graph.upward(edges) == [("rain_tasks.io.a", "rain_tasks.pipeline.b")]
