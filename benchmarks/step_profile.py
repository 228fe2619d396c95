"""Where a train step's time goes: a few profiled steps, their time by kind of operation.

jax.profiler traces the steps; every traced operation names the HLO instruction that
ran it (`args.hlo_op`), which the compiled program's text maps to a kind (matmul,
attention, elementwise, ...) and to the model code it came from (its `op_name`).
On the CPU the operations are XLA:CPU's thunks; on a GPU, the kernels on the
`/device:GPU:N` tracks — take those with `XLA_FLAGS=--xla_gpu_enable_command_buffer=`
(as gpu_check's profile part does), since a CUDA graph reports its own name instead
of its kernels'.

  python benchmarks/step_profile.py [--preset vit_b16] [--tuning adaptformer] [--batch 8]
"""
import argparse
import collections
import glob
import gzip
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax

# Kinds, checked in this order on the ops an instruction runs (fusion bodies included).
KINDS = ('attention (cuDNN)', 'attention matmul', 'Pallas kernel', 'matmul', 'convolution',
         'reduce', 'copy/transpose', 'elementwise')
# Their time is their bodies' (traced themselves).
CONTAINERS = {'while', 'call', 'conditional', 'async-start', 'async-done'}
_COMPUTATION = re.compile(r'^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = (.*)$')
_OPCODE = re.compile(r'^.*?\s([a-z][a-z0-9\-_]*)\(')


def instructions(hlo_text: str) -> dict[str, tuple[str, str, list[str], str]]:
  """{instruction name: (opcode, rest of its line, [computations it calls], its computation)}."""
  result, computation = {}, None
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header and not line.startswith(' '):
      computation = header.group(1)
      continue
    m = _INSTRUCTION.match(line)
    if m and computation:
      rhs = m.group(2)
      opcode = _OPCODE.match(' ' + rhs)
      called = re.findall(r'(?:calls|to_apply|body|condition)=%?([\w.\-]+)', rhs)
      result[m.group(1)] = (opcode.group(1) if opcode else '', rhs, called, computation)
  return result


def instruction_kinds(hlo_text: str) -> dict[str, tuple[str | None, str]]:
  """{instruction name: (kind, op_name)} for every instruction of a compiled program."""
  instrs = instructions(hlo_text)
  bodies = collections.defaultdict(list)
  for name, (_, _, _, computation) in instrs.items():
    bodies[computation].append(name)

  def ops(name, depth=0):
    opcode, rhs, called, _ = instrs[name]
    found = [(opcode, rhs)]
    for c in called if depth < 4 else ():
      for inner in bodies.get(c, ()):
        found += ops(inner, depth + 1)
    return found

  def kind(name):
    found = ops(name)
    targets = ' '.join(re.findall(r'custom_call_target="([^"]*)"', ' '.join(r for _, r in found)))
    dots = [r for o, r in found if o == 'dot']
    if 'fmha' in targets or 'dot_product_attention' in targets.lower():
      return 'attention (cuDNN)'
    matmuls = dots + [r for o, r in found if o == 'custom-call' and re.search(
        r'custom_call_target="[^"]*(gemm|matmul)', r)]
    # Batched matmuls are attention's (QK^T, PV); dense layers fold batch into rows.
    if any(re.search(r'lhs_batch_dims=\{\d|"lhs_batch_dimensions":\["', r) for r in matmuls):
      return 'attention matmul'
    if 'triton' in targets:  # a pallas_call (models/kernels.py); XLA's own are fusions
      return 'Pallas kernel'
    if matmuls:
      return 'matmul'
    opcodes = {o for o, _ in found}
    if 'convolution' in opcodes or 'conv' in targets:
      return 'convolution'
    if opcodes & {'reduce', 'reduce-window'}:
      return 'reduce'
    if opcodes <= {'copy', 'transpose', 'bitcast', 'parameter', 'fusion', 'slice',
                   'dynamic-slice', 'concatenate', 'pad', 'reshape', 'broadcast', 'tuple',
                   'get-tuple-element', 'constant'}:
      return 'copy/transpose'
    return 'elementwise'

  result = {}
  for name, (opcode, rhs, _, _) in instrs.items():
    op_name = re.search(r'op_name="([^"]*)"', rhs)
    result[name] = (None if opcode in CONTAINERS else kind(name),
                    op_name.group(1) if op_name else '')
  return result


def trace_file(logdir: str) -> str:
  return sorted(glob.glob(os.path.join(logdir, '**', '*.trace.json.gz'), recursive=True))[-1]


def trace_events(run_steps: Callable[[], None], logdir: str) -> tuple[list[dict], float]:
  """(events, wall seconds) of `run_steps()` under jax.profiler (it must wait for its results)."""
  with jax.profiler.trace(logdir, create_perfetto_trace=True):
    start = time.perf_counter()
    run_steps()
    wall = time.perf_counter() - start
  with gzip.open(trace_file(logdir), 'rt') as f:
    trace = json.load(f)
  return (trace['traceEvents'] if isinstance(trace, dict) else trace), wall


def model_part(op_name: str) -> str:
  """'backward block*/mlp/fc2' of 'jit(train_step)/transpose(jvp(ViT))/block3/mlp/fc2/dot'."""
  path = op_name.split('/')[1:-1]
  direction = 'backward' if any(p.startswith('transpose(') for p in path) else 'forward'
  path = [re.sub(r'^block\d+$', 'block*', p) for p in path if '(' not in p]
  return f"{direction} {'/'.join(path[:3])}" if path else 'outside the model (loss, update)'


def summarize(events: list[dict], kinds: dict[str, tuple[str | None, str]], num_steps: int,
              wall: float, top_ops: int = 30) -> dict[str, Any]:
  """Time per step by kind, the busy share of the wall time, the heaviest model parts
  (`model_part`: all blocks together, forward and backward apart) and the heaviest
  instructions (`top_ops` of them, each with its calls per step and its op_name).

  Device tracks (`/device:GPU:N`) where there are any, else every track (XLA:CPU runs
  thunks on host threads); an event counts when its `hlo_op` is an instruction of the
  program. `busy` is the union of those events' intervals over the wall time.
  """
  names = {e['pid']: e.get('args', {}).get('name', '') for e in events
           if e.get('ph') == 'M' and e.get('name') == 'process_name'}
  devices = {p for p, n in names.items() if re.search(r'/device:GPU:\d+$', n)}
  per_kind, per_part, intervals, unmatched = collections.Counter(), collections.Counter(), [], 0.0
  per_op, calls = collections.Counter(), collections.Counter()
  part_kinds = collections.defaultdict(collections.Counter)
  for e in events:
    if e.get('ph') != 'X' or 'dur' not in e or (devices and e.get('pid') not in devices):
      continue
    op = e.get('args', {}).get('hlo_op') or e.get('name', '')
    kind = kinds.get(op, ('', ''))[0]
    if kind is None:  # a while/call thunk: its body's thunks are traced themselves
      continue
    if not kind:
      if devices:  # memcpy/memset and kernels of no instruction, on the device
        unmatched += e['dur']
      continue
    part = model_part(kinds[op][1])
    per_kind[kind] += e['dur']
    per_part[part] += e['dur']
    per_op[op] += e['dur']
    calls[op] += 1
    part_kinds[part][kind] += e['dur']
    intervals.append((e['ts'], e['ts'] + e['dur']))
  busy, end = 0.0, float('-inf')
  for s, t in sorted(intervals):
    busy += max(0.0, t - max(s, end))
    end = max(end, t)
  ms = lambda us: round(us / 1e3 / num_steps, 3)
  return {'wall_ms': round(wall * 1e3 / num_steps, 3), 'busy_ms': ms(busy),
          'kinds_ms': {k: ms(per_kind[k]) for k in KINDS if per_kind[k]},
          'unmatched_device_ms': ms(unmatched),
          'parts': [{'part': part, 'ms': ms(t),
                     'kinds': [k for k, _ in part_kinds[part].most_common(2)]}
                    for part, t in per_part.most_common(15)],
          'ops': [{'op': op, 'ms': ms(t), 'calls': calls[op] / num_steps, 'kind': kinds[op][0],
                   'op_name': kinds[op][1]} for op, t in per_op.most_common(top_ops)]}


def profile(compiled_text: str, run_steps: Callable[[], None], num_steps: int,
            keep_trace: str | None = None) -> dict[str, Any]:
  """summarize() of `run_steps()` (which runs `num_steps` steps of the compiled program);
  the trace (perfetto JSON, gzipped) is copied to `keep_trace` where given."""
  with tempfile.TemporaryDirectory() as logdir:
    events, wall = trace_events(run_steps, logdir)
    if keep_trace:
      shutil.copy(trace_file(logdir), keep_trace)
  return summarize(events, instruction_kinds(compiled_text), num_steps, wall)


def report(summary: dict[str, Any]) -> str:
  """The summary as lines of text."""
  total = sum(summary['kinds_ms'].values())
  lines = [f"{summary['wall_ms']:.1f} ms/step wall, {summary['busy_ms']:.1f} ms busy "
           f"(operations counted: {total:.1f} ms; on a CPU threads overlap, so up to cores x wall)"]
  for kind, ms in summary['kinds_ms'].items():
    lines.append(f'  {kind:20s} {ms:9.1f} ms  {ms / total:6.1%}')
  if summary['unmatched_device_ms']:
    lines.append(f"  {'(no instruction)':20s} {summary['unmatched_device_ms']:9.1f} ms")
  lines.append('heaviest model parts (all blocks):')
  for p in summary['parts']:
    kinds = ', '.join(p['kinds'])
    lines.append(f"  {p['ms']:8.1f} ms  {p['part']:40s} {kinds}")
  lines.append('heaviest instructions:')
  for o in summary['ops'][:15]:
    lines.append(f"  {o['ms']:8.1f} ms  {o['calls']:5.0f} calls  {o['kind']:16s} {o['op']} "
                 f"({model_part(o['op_name'])})")
  return '\n'.join(lines)


def main():
  import machine  # pylint: disable=g-import-not-at-top
  import steps  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--preset', default='vit_b16')
  parser.add_argument('--tuning', default='adaptformer')
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--steps', type=int, default=2)
  args = parser.parse_args()
  print(machine.describe())
  trainer = steps.make_trainer(steps.model_config(args.preset, tuning=args.tuning), args.batch)
  compiled = steps.lower_step(trainer, args.batch).compile()
  run_steps = steps.step_runner(trainer, compiled, args.steps)
  run_steps()  # warm-up
  print(f'{args.preset} {args.tuning} train step, batch {args.batch}, {args.steps} steps profiled')
  print(report(profile(compiled.as_text(), run_steps, args.steps)))


if __name__ == '__main__':
  main()
