"""Every notebook in notebooks/ runs top to bottom in quick mode, and says what it claims.

Each ``notebooks/*.ipynb`` is picked up automatically. Its code cells are
executed in one namespace, in this process (no Jupyter kernel: faster, and
JAX is imported once), with ``NEURALDE_NOTEBOOK_QUICK=1``, the working
directory set to notebooks/ and matplotlib's non-interactive Agg backend.
Then, where a notebook has an entry in ``CHECKS``, its results are checked
against what the notebook's prose claims.

Also checked without running anything: the committed notebook was executed
(it carries outputs, so plots show on GitHub), and its code cells are exactly
those of its builder script ``build_<name>.py`` (a builder edited without
re-running it would leave a stale notebook).
"""
from __future__ import annotations

import gc
import importlib.util
import json
import pathlib
import sys

import numpy as np
import pytest

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))


def _code_cells(notebook: dict) -> list[str]:
    cells = []
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            source = cell["source"]
            cells.append("".join(source) if isinstance(source, list) else source)
    return cells


def run_notebook(path: pathlib.Path, monkeypatch) -> dict:
    """Execute the code cells of ``path`` in quick mode; return the namespace."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    monkeypatch.setenv("NEURALDE_NOTEBOOK_QUICK", "1")
    monkeypatch.chdir(path.parent)
    # plt.show() in a notebook displays a figure; here it only releases it.
    monkeypatch.setattr(plt, "show", lambda *args, **kwargs: plt.close("all"))
    namespace = {"__name__": "__main__", "display": print}
    for index, source in enumerate(_code_cells(json.loads(path.read_text()))):
        if any(line.lstrip().startswith(("%", "!")) for line in source.splitlines()):
            raise AssertionError(f"{path.name}, code cell {index}: IPython magics cannot run outside Jupyter")
        exec(compile(source, f"{path.name}, code cell {index}", "exec"), namespace)
    plt.close("all")
    return namespace


# ------------------------------------------------------ what each notebook claims


def check_choosing_a_gradient_method(ns):
    # Forward mode's cost grows with the number of parameters, the adjoint's does not.
    ratios = np.array(ns["scaling"]["ForwardMode"]) / np.array(ns["scaling"]["CheckpointAdjoint"])
    assert ratios[-1] > 3 * ratios[0], ratios
    # Lorenz: at the longest span checkpointing stays accurate while backsolve does not.
    last = ns["rows"][-1]
    assert last["checkpoint"] < 1e-4
    assert not last["backsolve"] < 1e-2  # large or NaN


def check_lotka_volterra_fitting(ns):
    for name, diff in ns["rel_diff"].items():
        assert diff < (1e-4 if name == "BacksolveAdjoint" else 1e-12), (name, diff)
    for name, history in ns["histories"].items():
        assert history[-1] < history[0] / 10, (name, history[0], history[-1])


def check_neural_ode_spiral(ns):
    # Quick mode (40 iterations) measured ~8x; the full run (800) ~7800x.
    assert ns["losses"][-1] < ns["losses"][0] / 5, (ns["losses"][0], ns["losses"][-1])


def check_odenet_vs_resnet(ns):
    for name, history in ns["histories"].items():
        assert history[-1] < history[0] / 10, (name, history[0], history[-1])
    rows = ns["rows"]  # loosest tolerance first
    assert rows[0]["nfev"] < rows[-1]["nfev"]
    assert rows[-1]["solver_err"] < 1e-6 < rows[0]["solver_err"]


def check_universal_differential_equation(ns):
    losses = ns["losses"]
    assert losses[-1] < losses[0] / 1e3, (losses[0], losses[-1])
    # The network recovers the missing interaction term (quick mode measured 21%; full run 6%).
    assert ns["term_error"] < 0.5, ns["term_error"]
    assert abs(ns["beta_hat"] - 0.9) < 0.3 and abs(ns["gamma_hat"] - 0.8) < 0.3, (ns["beta_hat"], ns["gamma_hat"])


def check_ode_block_digits(ns):
    # Chance is 10%; quick mode (512 images, 3 epochs) measured 78%; the full run 97.8%.
    assert ns["test_accuracy"] > 0.5, ns["test_accuracy"]


def check_stiff_rober(ns):
    import neuralde as nde

    # Tsit5 reports failure (not garbage); Kvaerno5 reaches t = 1e5.
    assert int(ns["explicit"].status) == nde.Status.MAX_STEPS_REACHED
    assert int(ns["implicit"].status) == nde.Status.SUCCESS
    assert np.all(np.isfinite(np.asarray(ns["implicit"].ys)))
    # The rates start a factor e^0.7 off; the fit brings them closer (full run: 0.1%).
    start = np.abs(np.asarray(ns["log_k_start"] - ns["log_k_true"]))
    end = np.abs(np.asarray(ns["log_k"] - ns["log_k_true"]))
    assert np.all(end < start / 2), (start, end)


def check_neural_sde(ns):
    # Quick mode (15 single-path + 5 mean iterations) measured: loss 161 -> 42, ensemble-mean error
    # 216 -> 33 (7x); the full run 236 -> 0.44.
    losses = ns["losses"]
    assert losses[-5:].mean() < losses[:5].mean() / 2, losses
    assert ns["err_after"] < ns["err_before"] / 3, (ns["err_before"], ns["err_after"])
    # The true drift at the model's loose tolerance reproduces the data's spread (measured 0.79 with
    # 30 paths; 0.93 with 400), the trained model's paths spread less (quick 0.18, full run 0.39).
    assert 0.6 < ns["spread_control"] < 1.4, ns["spread_control"]
    assert ns["spread_trained"] < 0.7 * ns["spread_control"], (ns["spread_trained"], ns["spread_control"])


def check_neural_dde(ns):
    # The delay Lotka-Volterra fit brings the loss down (the notebook asserts 5x; quick mode measured ~19x).
    assert ns["losses_lv"][-1] < ns["losses_lv"][0] / 5, (ns["losses_lv"][0], ns["losses_lv"][-1])
    # The parametric Hutchinson fit recovers rate and lag from noisy data (quick mode measured
    # r = 1.8026, lag = 0.9999 from a start at 1.0 and 0.5).
    r, lag = float(ns["params"][0]), float(ns["params"][1])
    assert abs(r - 1.8) < 0.05 and abs(lag - 1.0) < 0.05, (r, lag)
    # The neural DDE's loss falls (its learned lag is reported, not asserted, by the notebook).
    assert ns["trace_nn"][-1][0] < ns["trace_nn"][0][0], (ns["trace_nn"][0][0], ns["trace_nn"][-1][0])


CHECKS = {
    "neural_dde": check_neural_dde,
    "stiff_rober": check_stiff_rober,
    "neural_sde": check_neural_sde,
    "universal_differential_equation": check_universal_differential_equation,
    "ode_block_digits": check_ode_block_digits,
    "odenet_vs_resnet": check_odenet_vs_resnet,
    "neural_ode_spiral": check_neural_ode_spiral,
    "choosing_a_gradient_method": check_choosing_a_gradient_method,
    "lotka_volterra_fitting": check_lotka_volterra_fitting,
}


def test_notebooks_found():
    assert NOTEBOOKS, f"no notebooks in {NOTEBOOK_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_in_quick_mode(path, monkeypatch):
    namespace = run_notebook(path, monkeypatch)
    try:
        assert namespace["QUICK"] is True
        if path.stem in CHECKS:
            CHECKS[path.stem](namespace)
    finally:
        # The namespace holds reference cycles to compiled executables (each
        # with its memory mappings); a full run once neared the process's
        # mapping limit. Release them now rather than at some later collection.
        namespace.clear()
        gc.collect()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_notebook_is_built_and_executed(path, monkeypatch):
    notebook = json.loads(path.read_text())
    code = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    assert code and all(c.get("execution_count") for c in code), f"{path.name} is not fully executed"
    assert any("image/png" in o.get("data", {}) for c in code for o in c.get("outputs", [])), f"{path.name}: no plot"
    assert not any(o.get("output_type") == "error" for c in code for o in c.get("outputs", [])), path.name

    builder = NOTEBOOK_DIR / f"build_{path.stem}.py"
    assert builder.exists(), f"{path.name} has no builder script {builder.name}"
    monkeypatch.syspath_prepend(str(NOTEBOOK_DIR))
    spec = importlib.util.spec_from_file_location(f"_builder_{path.stem}", builder)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # notebooks/_build.py's NotebookBuilder keeps (kind, source) pairs in `nb.cells`; builders
    # written before it in a module-level `CELLS` list (they import nbformat, a test dependency).
    cells = module.nb.cells if hasattr(module, "nb") else module.CELLS
    built = [source for kind, source in cells if kind == "code"]
    assert built == _code_cells(notebook), f"{path.name} is stale: re-run python notebooks/{builder.name}"
    sys.modules.pop(spec.name, None)
