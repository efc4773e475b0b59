"""Shared machinery of the notebook builder scripts (``build_<name>.py``).

A builder collects markdown and code cells, then writes ``<name>.ipynb`` next
to itself and (by default) executes it with nbclient so that the committed
notebook carries its outputs (plots render on GitHub)::

    python notebooks/build_<name>.py              # full run, writes the committed notebook
    python notebooks/build_<name>.py --quick      # NEURALDE_NOTEBOOK_QUICK=1, writes a temp copy
    python notebooks/build_<name>.py --no-execute

Needs ``pip install nbformat nbclient ipykernel`` (not dependencies of neuralde).
"""
from __future__ import annotations

import argparse
import os
import pathlib
import tempfile
import time
from typing import Any, Optional, Sequence

HERE = pathlib.Path(__file__).resolve().parent
QUICK_ENV = "NEURALDE_NOTEBOOK_QUICK"

# The first code cell of every notebook: imports, float64, and a fallback to
# the checkout's package when neuralde is not installed.
PREAMBLE = r"""
import os
import pathlib
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import matplotlib.pyplot as plt
import numpy as np
import optax

jax.config.update("jax_enable_x64", True)

try:
    import neuralde as nde
except ImportError:  # a checkout without `pip install .`: use the package next to this folder
    sys.path.insert(0, str(pathlib.Path.cwd().parent))
    import neuralde as nde

QUICK = os.environ.get("NEURALDE_NOTEBOOK_QUICK") == "1"
NOTEBOOK_START = time.perf_counter()
print(f"neuralde {nde.__version__}, jax {jax.__version__}, equinox {eqx.__version__}; "
      f"backend {jax.default_backend()}, {os.cpu_count()} CPU cores; quick mode: {QUICK}")
""".strip("\n")


class NotebookBuilder:
    """Collects the cells of one notebook; ``main()`` is the builder's command line."""

    def __init__(self, name: str, description: str = ""):
        self.name = name
        self.path = HERE / f"{name}.ipynb"
        self.description = description
        self.cells: list[tuple[str, str]] = []

    def md(self, source: str) -> None:
        self.cells.append(("md", source.strip("\n")))

    def code(self, source: str) -> None:
        self.cells.append(("code", source.strip("\n")))

    def notebook(self) -> Any:
        """The notebook as an unexecuted ``nbformat.NotebookNode``."""
        # nbformat is imported here, not at the top: the test suite reads
        # `cells` without needing nbformat.
        from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

        nb = new_notebook()
        nb.cells = [new_markdown_cell(src) if kind == "md" else new_code_cell(src) for kind, src in self.cells]
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nb.metadata["language_info"] = {"name": "python"}
        return nb

    def main(self, argv: Optional[Sequence[str]] = None) -> None:
        parser = argparse.ArgumentParser(
            description=self.description or f"Build (and execute) notebooks/{self.path.name}.",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        parser.add_argument("--quick", action="store_true",
                            help=f"set {QUICK_ENV}=1 (writes a temp copy unless --output)")
        parser.add_argument("--no-execute", action="store_true", help="write the notebook without running it")
        parser.add_argument("--output", type=pathlib.Path, default=None)
        parser.add_argument("--timeout", type=int, default=900, help="per-cell timeout in seconds")
        opts = parser.parse_args(argv)

        output = opts.output
        if output is None:
            output = pathlib.Path(tempfile.gettempdir()) / self.path.name if opts.quick else self.path
        nb = self.notebook()
        if not opts.no_execute:
            from nbclient import NotebookClient

            if opts.quick:
                os.environ[QUICK_ENV] = "1"
            else:
                os.environ.pop(QUICK_ENV, None)
            t0 = time.perf_counter()
            NotebookClient(nb, timeout=opts.timeout, kernel_name="python3",
                           resources={"metadata": {"path": str(HERE)}}).execute()
            print(f"executed in {time.perf_counter() - t0:.1f} s")
        import nbformat

        nbformat.write(nb, output)
        print(f"wrote {output}")
