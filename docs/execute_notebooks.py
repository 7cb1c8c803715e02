"""Execute the notebooks in place, storing their outputs and figures (``make notebooks``).

Usage: ``python docs/execute_notebooks.py [notebooks/01_families_and_data.ipynb ...]`` (default:
every notebook in notebooks/). The kernel is this interpreter, run in a temporary working
directory so that the files a notebook writes stay out of the repository. Stored outputs are made
readable and stable: a progress bar's carriage-return updates are collapsed to their final
state, tqdm's "IProgress not found" warning is dropped, and no timing metadata is recorded. The
docs build renders these stored outputs and never executes a notebook.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time
from pathlib import Path

import nbclient
import nbformat
from ipykernel.kernelspec import write_kernel_spec
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager

ROOT = Path(__file__).resolve().parent.parent
KERNEL_NAME = "numpyro-nnef-docs"
CELL_TIMEOUT_S = 900
_NOISE = re.compile(r"^.*(TqdmWarning: IProgress not found|from \.autonotebook import).*\n?",
                    re.MULTILINE)


def collapse_carriage_returns(text: str) -> str:
    """Keep what a terminal would show: of each line, the part after its last carriage return."""
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.split("\n"))


def clean_outputs(nb) -> None:
    """Merge consecutive stream outputs of one stream (a progress bar sends one per update),
    collapse their carriage returns and drop the widget warning."""
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        merged = []
        for out in cell.outputs:
            if (out.output_type == "stream" and merged and merged[-1].output_type == "stream"
                    and merged[-1].name == out.name):
                merged[-1].text += out.text
            else:
                merged.append(out)
        for out in merged:
            if out.output_type == "stream":
                out.text = _NOISE.sub("", collapse_carriage_returns(out.text))
        cell.outputs = [out for out in merged
                        if out.output_type != "stream" or out.text.strip()]


def execute(path: Path, kernels: Path) -> float:
    """Execute one notebook in place; returns its wall time in seconds."""
    nb = nbformat.read(path, as_version=4)
    kernelspec = nb.metadata.get("kernelspec")  # keep the notebook's own, not this temporary one
    ksm = KernelSpecManager(kernel_dirs=[str(kernels)], ensure_native_kernel=False)
    km = KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=ksm)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as cwd:
        client = nbclient.NotebookClient(
            nb, km=km, kernel_name=KERNEL_NAME, timeout=CELL_TIMEOUT_S, allow_errors=False,
            record_timing=False, resources={"metadata": {"path": cwd}})
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        client.execute(env=env)
    clean_outputs(nb)
    if kernelspec is not None:
        nb.metadata["kernelspec"] = kernelspec
    nbformat.write(nb, path)
    return time.perf_counter() - start


def main(argv: list[str]) -> None:
    paths = [Path(p) for p in argv] or sorted((ROOT / "notebooks").glob("*.ipynb"))
    with tempfile.TemporaryDirectory() as kernels:
        write_kernel_spec(Path(kernels) / KERNEL_NAME)
        for path in paths:
            print(f"{path.name}: executing ...", flush=True)
            print(f"{path.name}: {execute(path, Path(kernels)):.0f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
