"""The package's imports flow one way: no module imports one that (indirectly) imports it."""
import ast
import pathlib

import adaptformer_jax

PACKAGE = pathlib.Path(adaptformer_jax.__file__).parent


def _module_name(path):
  parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def import_graph():
  """{module: modules of ours it imports}, counting imports inside functions too.

  `from pkg import name` is an edge to `pkg.name` when that is a module of ours,
  else to `pkg`.
  """
  modules = {_module_name(p): p for p in PACKAGE.rglob('*.py')}
  graph = {}
  for name, path in modules.items():
    edges = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        edges |= {a.name for a in node.names if a.name in modules}
      elif isinstance(node, ast.ImportFrom) and node.module in modules:
        for alias in node.names:
          sub = f'{node.module}.{alias.name}'
          edges.add(sub if sub in modules else node.module)
    graph[name] = edges - {name}
  return graph


def find_cycle(graph):
  """A list of modules forming an import circle, or None."""
  state = {}

  def visit(node, stack):
    state[node] = 'open'
    for nxt in sorted(graph[node]):
      if state.get(nxt) == 'open':
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        cycle = visit(nxt, stack + [nxt])
        if cycle:
          return cycle
    state[node] = 'done'
    return None

  for node in sorted(graph):
    if node not in state:
      cycle = visit(node, [node])
      if cycle:
        return cycle
  return None


def test_the_package_has_no_import_circle():
  graph = import_graph()
  assert 'adaptformer_jax.models.vit' in graph and graph['adaptformer_jax.train']
  assert find_cycle(graph) is None, ' -> '.join(find_cycle(graph))


def test_the_cycle_finder_finds_a_circle():
  graph = {'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}
  assert find_cycle(graph) == ['a', 'b', 'c', 'a']
  assert find_cycle({'a': {'b'}, 'b': set()}) is None


def test_tuning_methods_are_a_leaf():
  assert import_graph()['adaptformer_jax.models.methods'] <= {'adaptformer_jax.errors'}
