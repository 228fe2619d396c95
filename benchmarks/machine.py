"""Where a figure comes from: the CPU (model, ISA flags), the load, the accelerator and its peak.

Every benchmark prints `describe()` first, so figures from different machines or
loads are never compared by mistake.
"""
import datetime
import os

# The CPU features that decide XLA:CPU's and oneDNN's matmul speed.
ISA_FLAGS = ('avx2', 'avx512f', 'avx512_bf16', 'amx_tile', 'amx_bf16')
# Dense (no sparsity) bf16 peak FLOP/s by accelerator; the first key found in
# jax's device_kind wins, so the specific names come first.
PEAK_BF16_FLOPS = (
    ('H100 PCIe', 756e12), ('H100 NVL', 835e12), ('H100', 989e12), ('H200', 989e12),
    ('B200', 2250e12), ('A100', 312e12), ('L40S', 362e12), ('L4', 121e12),
    ('TPU v6 lite', 918e12), ('TPU v5 lite', 197e12), ('TPU v5p', 459e12),
    ('TPU v4', 275e12),
)


def cpu() -> dict:
  """Model name, usable cores and which of ISA_FLAGS the CPU has (Linux /proc/cpuinfo)."""
  model, flags = 'unknown CPU', set()
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        key, _, value = line.partition(':')
        if key.strip() == 'model name' and model == 'unknown CPU':
          model = value.strip()
        elif key.strip() == 'flags' and not flags:
          flags = set(value.split())
  except OSError:
    pass
  return {'model': model, 'cores': len(os.sched_getaffinity(0)),
          'isa': [f for f in ISA_FLAGS if f in flags]}


def load() -> float:
  """The 1-minute load average; ~the benchmark's own threads on an otherwise idle host."""
  return os.getloadavg()[0]


def peak_flops(device) -> float | None:
  """The device's dense bf16 peak FLOP/s, or None (a CPU, or a kind not in the table)."""
  if device.platform == 'cpu':
    return None
  return next((v for k, v in PEAK_BF16_FLOPS if k in device.device_kind), None)


def describe() -> str:
  """One line: date, CPU, ISA flags, load, jax and its first device."""
  import jax  # pylint: disable=g-import-not-at-top
  c = cpu()
  missing = [f for f in ISA_FLAGS if f not in c['isa']]
  isa = ' '.join(c['isa']) + (f"; no {'/'.join(missing)}" if missing else '')
  device = jax.devices()[0]
  now = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')
  return (f'{now}; CPU {c["model"]} x{c["cores"]} ({isa}); load average {load():.1f}; '
          f'jax {jax.__version__} on {device.device_kind} ({jax.device_count()} device(s))')
