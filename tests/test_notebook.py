"""notebooks/inspect.ipynb runs top to bottom on a tiny saved run (nbclient, the venv's python3 kernel)."""
import os

import jax
import nbformat
from nbclient import NotebookClient

from tests.run_helpers import REPO, write_tiny_run

NOTEBOOK = os.path.join(REPO, "notebooks", "inspect.ipynb")
CELL_TIMEOUT_S = 120


def test_inspect_notebook_shows_tower_param_counts_and_an_attention_heatmap(tmp_path):
    workdir = str(tmp_path / "run")
    _, params = write_tiny_run(workdir)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # the kernel inherits conftest's CPU settings; MPLBACKEND=Agg would keep the inline backend from drawing
    env = {**{k: v for k, v in os.environ.items() if k != "MPLBACKEND"}, "LLAVA_RUN": workdir,
           "JAX_PLATFORMS": "cpu"}
    env.pop("LLAVA_IMAGE", None)
    env.pop("LLAVA_QUESTION", None)
    client = NotebookClient(notebook, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                            resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}})
    client.execute(env=env)   # raises CellExecutionError (with the traceback) if a cell fails

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    printed = "".join(output.get("text", "") for output in outputs if output.output_type == "stream")
    for tower in ("vision_tower", "projector", "language_model"):
        count = sum(leaf.size for leaf in jax.tree.leaves(params[tower]))
        assert f"{tower:<16}{count:>16,}" in printed, f"no parameter count {count:,} for {tower}:\n{printed}"
    assert any("image/png" in output.get("data", {}) for output in outputs), "the notebook drew no figure"

