"""Executes notebooks/adaptformer_jax.ipynb top to bottom in fast mode; any failing cell fails."""
import pathlib

import pytest

nbformat = pytest.importorskip('nbformat')
nbclient = pytest.importorskip('nbclient')
kernelspec = pytest.importorskip('ipykernel.kernelspec')
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402
from jupyter_client.manager import KernelManager  # noqa: E402

NOTEBOOK = pathlib.Path(__file__).resolve().parent.parent / 'notebooks' / 'adaptformer_jax.ipynb'
KERNEL = 'adaptformer-test-python'


def _kernel_manager(tmp_path):
  """A kernel on this interpreter (sys.executable), whatever kernelspecs are installed."""
  kernels = tmp_path / 'kernels'
  kernelspec.write_kernel_spec(kernels / KERNEL)
  return KernelManager(kernel_name=KERNEL,
                       kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)]))


def test_committed_notebook_has_no_outputs_or_local_paths():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  for cell in nb.cells:
    if cell.cell_type == 'code':
      assert not cell.outputs and cell.execution_count is None, cell.source[:60]
  assert str(NOTEBOOK.parent.parent) not in NOTEBOOK.read_text()


@pytest.mark.slow
@pytest.mark.timeout(900)  # a hang guard; on an idle 2-core CPU it takes well under 3 min
def test_notebook_runs_end_to_end(tmp_path, monkeypatch, data_dir):
  # The kernel inherits this environment and runs in a temporary directory, so its
  # runs/ stay out of the repo.
  monkeypatch.setenv('ADAPTFORMER_NOTEBOOK_FAST', '1')
  monkeypatch.setenv('TFDS_DATA_DIR', data_dir)
  work = tmp_path / 'work'
  work.mkdir()
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(
      nb, km=_kernel_manager(tmp_path), timeout=600, allow_errors=False,
      resources={'metadata': {'path': str(work)}})
  client.execute()  # raises CellExecutionError naming the failing cell

  runs = list((work / 'runs' / 'notebook').iterdir())  # the notebook's default RUNS
  assert len(runs) == 1
  for job in ('adaptformer', 'linear'):
    assert (runs[0] / job / 'metrics.jsonl').is_file(), job
  assert (runs[0] / 'exported_adapter' / 'adapter.safetensors').is_file()
