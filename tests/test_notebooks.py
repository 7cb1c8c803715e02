"""Execute every notebook in notebooks/ from start to end; any cell error fails the test.

The kernel is this interpreter (``sys.executable``): a kernelspec pointing at it is written into a
temporary directory, so nothing installed outside the virtual environment (a user-level
``python3`` kernelspec, say) can redirect the notebooks to another Python. The notebooks carry
their own assertions, so wrong numbers fail as well as exceptions.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from ipykernel.kernelspec import write_kernel_spec  # noqa: E402
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402
from jupyter_client.manager import KernelManager  # noqa: E402

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
KERNEL_NAME = "numpyro-nnef-test"
CELL_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def kernel_spec_manager(tmp_path_factory) -> KernelSpecManager:
    """A kernelspec manager that knows one kernel only: ipykernel on sys.executable."""
    kernels = tmp_path_factory.mktemp("kernels")
    write_kernel_spec(kernels / KERNEL_NAME)
    return KernelSpecManager(kernel_dirs=[str(kernels)], ensure_native_kernel=False)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path: Path, tmp_path: Path, kernel_spec_manager: KernelSpecManager):
    nb = nbformat.read(path, as_version=4)
    km = KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=kernel_spec_manager)
    client = nbclient.NotebookClient(
        nb,
        km=km,
        kernel_name=KERNEL_NAME,
        timeout=CELL_TIMEOUT_S,
        allow_errors=False,
        resources={"metadata": {"path": str(tmp_path)}},  # the kernel's working directory
    )
    env = dict(os.environ, MPLBACKEND="Agg", XLA_PYTHON_CLIENT_PREALLOCATE="false")
    client.execute(env=env)  # raises CellExecutionError naming the failing cell


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_committed_executed(path: Path):
    """Notebooks are committed executed (``make notebooks``), so that a repository browser and
    the docs show their results: every code cell ran once, in order, without an error, and the
    notebook opens with a markdown cell saying how long it runs."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1)), (
        f"{path.name}: execute it from the start (make notebooks)")
    errors = [i for i, cell in enumerate(code)
              if any(out.output_type == "error" for out in cell.outputs)]
    assert not errors, f"{path.name}: code cells {errors} stored an error"
    first = nb.cells[0]
    assert first.cell_type == "markdown" and re.search(r"runs on CPU in \w+ \w+", first.source), (
        f"{path.name}: the first cell must say what it shows and how long it runs")


def test_kernel_is_this_interpreter(kernel_spec_manager: KernelSpecManager):
    spec = kernel_spec_manager.get_kernel_spec(KERNEL_NAME)
    assert spec.argv[0] == sys.executable
