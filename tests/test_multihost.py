"""Two processes x 4 CPU devices train exactly as one process x 8 devices.

Exercises `sharding.initialize_distributed`, the cross-process mesh and
process-local batch assembly (`make_array_from_process_local_data`) with CPU
collectives (gloo), using the worker of test_sharding.py: data parallel (8 x 1)
and data x tensor parallel (2 x 4, each process holding one 'model' group).
"""
from test_sharding import launch


def test_two_processes_reproduce_the_single_process_loss_curves():
  single = launch()[0]  # 1 process x 8 devices
  processes = launch(processes=2, devices_per_process=4)
  for runs in processes:  # every process sees the same global losses
    for reference, run in zip(single, runs, strict=True):
      assert run['mesh'] == reference['mesh']
      assert max(abs(a - b) for a, b in zip(reference['losses'], run['losses'])) < 1e-5
