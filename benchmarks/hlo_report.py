"""What a compiled train step does around its matmuls and attention, read from its HLO text.

gpu_check prints this beside each variant of the headline step (issue #31's hygiene pass):
  gemms        the matmul calls by kind: cuBLAS (`__cublas$gemm`), cuBLASLt
               (`__cublas$lt$matmul`), XLA's Triton GEMM fusions, Pallas kernels, plain dots
  epilogues    every `"epilogue":"..."` value in the program (cuBLAS(Lt)'s fused bias/GELU
               epilogues; 'DEFAULT' = none) and how often the word occurs at all
  f32 / bf16   activation-sized arrays (first dimension the batch, or batch x tokens) that
               the program's top-level instructions write, by dtype: count and MiB
  converts     converts between bf16 and f32 of activation size, fused ones included
  attention    transposes and copies that feed or read attention (cuDNN's custom call, or
               XLA's batched matmuls), through bitcasts and tuple elements: count and MiB

  summary(hlo_text, batch, tokens) -> dict
"""
import collections
import math
import re
from typing import Any

import step_profile

_SHAPE = re.compile(r'\b(pred|s8|u8|s32|u32|s64|u64|bf16|f16|f32|f64)\[([\d,]*)\]')
_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 'bf16': 2, 'f16': 2, 's32': 4, 'u32': 4, 'f32': 4,
          's64': 8, 'u64': 8, 'f64': 8}
_PLUMBING = {'parameter', 'tuple', 'get-tuple-element', 'bitcast', 'constant'}
MIB = 2**20


def output_shapes(rhs: str) -> list[tuple[str, tuple[int, ...]]]:
  """(dtype, dims) of every array an instruction writes: the shapes before its opcode."""
  head = rhs.split('(', 1)[0] if not rhs.startswith('(') else rhs[:rhs.index(')') + 1]
  return [(t, tuple(int(d) for d in dims.split(',') if d)) for t, dims in _SHAPE.findall(head)]


def operands(rhs: str) -> list[str]:
  """Names of an instruction's operands: the %names inside its opcode's parentheses."""
  text = ' ' + rhs
  start = re.search(r'\s[a-z][a-z0-9\-_]*\(', text)
  if not start:
    return []
  depth, begin = 0, start.end() - 1
  for i, ch in enumerate(text[begin:], begin):
    depth += {'(': 1, ')': -1}.get(ch, 0)
    if depth == 0:
      return re.findall(r'%([\w.\-]+)', text[begin:i])
  return []


def summary(hlo_text: str, batch: int, tokens: int) -> dict[str, Any]:
  """The counts above for one compiled program (its text: `compiled.as_text()`)."""
  instrs = step_profile.instructions(hlo_text)
  kinds = step_profile.instruction_kinds(hlo_text)
  entry = re.search(r'^ENTRY %?([\w.\-]+)', hlo_text, re.M)
  entry = entry.group(1) if entry else None
  activation = lambda dims: bool(dims) and dims[0] in (batch, batch * tokens) and (
      len(dims) > 1 or dims[0] == batch * tokens)
  size = lambda dtype, dims: _BYTES[dtype] * math.prod(dims)

  gemms = collections.Counter()
  written = collections.defaultdict(lambda: [0, 0])
  converts = collections.Counter()
  users = collections.defaultdict(list)
  for name, (opcode, rhs, _, computation) in instrs.items():
    for operand in operands(rhs):
      users[operand].append(name)
    target = re.search(r'custom_call_target="([^"]*)"', rhs)
    if opcode == 'custom-call' and target and re.search(r'gemm|matmul', target.group(1)):
      gemms[target.group(1)] += 1
    elif opcode == 'custom-call' and target and 'triton' in target.group(1):
      gemms['Pallas/Triton kernel'] += 1
    elif opcode == 'fusion' and '__triton_gemm' in rhs:
      gemms['XLA Triton GEMM fusion'] += 1
    elif opcode == 'dot':
      gemms['dot'] += 1
    if opcode == 'convert':
      (dtype, dims), = output_shapes(rhs)[:1] or [('', ())]
      source = [t for o in operands(rhs)[:1] if o in instrs
                for t, _ in output_shapes(instrs[o][1])[:1]]
      if activation(dims) and {dtype, *source} == {'bf16', 'f32'}:
        converts[f'{source[0]}->{dtype}'] += 1
    if computation == entry and opcode not in _PLUMBING:
      for dtype, dims in output_shapes(rhs):
        if activation(dims):
          written[dtype][0] += 1
          written[dtype][1] += size(dtype, dims)

  def is_attention(name):
    return kinds.get(name, (None,))[0] in ('attention (cuDNN)', 'attention matmul')

  def is_layout(name):  # bitcasts move no data
    return instrs[name][0] in ('transpose', 'copy') or instrs[name][0] not in _PLUMBING and (
        kinds.get(name, (None,))[0] == 'copy/transpose')

  def hop(names, step):
    """`names` and what `step` reaches from them through bitcasts and tuple elements."""
    found = list(names)
    for _ in range(2):
      found += [n for f in found if instrs[f][0] in ('bitcast', 'get-tuple-element')
                for n in step(f) if n not in found]
    return found

  producers = lambda name: [o for o in operands(instrs[name][1]) if o in instrs]
  around = set()
  for name in instrs:
    if is_attention(name):
      near = hop(producers(name), producers) + hop(users[name], lambda n: users[n])
      around.update(n for n in near if is_layout(n))
  around_bytes = sum(size(t, d) for n in around for t, d in output_shapes(instrs[n][1]))
  return {
      'gemms': dict(gemms.most_common()),
      'epilogues': dict(collections.Counter(re.findall(r'"epilogue":"(\w+)"', hlo_text))),
      'epilogue_mentions': hlo_text.count('epilogue'),
      'activations_written': {t: {'count': n, 'mib': round(b / MIB, 3)}
                              for t, (n, b) in sorted(written.items())},
      'converts': dict(converts),
      'layout_ops_around_attention': {'count': len(around),
                                      'mib': round(around_bytes / MIB, 3)},
  }
