"""The package's layering: imports flow one way (config -> data + model -> step ->
checkpoints -> eval/export/predict), no module is too big, public functions are typed."""
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


def reachable(graph, start):
  """The modules `start` imports, directly or through others."""
  seen, todo = set(), [start]
  while todo:
    for nxt in graph[todo.pop()] - seen:
      seen.add(nxt)
      todo.append(nxt)
  return seen


P = 'adaptformer_jax.'


def test_tuning_methods_are_a_leaf():
  assert import_graph()[P + 'models.tuning'] <= {P + 'errors'}


def test_data_knows_no_model():
  """The input pipeline imports nothing from models/, the schema, weights or training."""
  graph = import_graph()
  for name in [m for m in graph if m.startswith(P + 'data')]:
    assert reachable(graph, name) <= {P + 'errors', P + 'sharding'} | {
        m for m in graph if m.startswith(P + 'data')}, name


def test_models_know_no_weights_data_or_jobs():
  graph = import_graph()
  allowed = {P + 'errors', P + 'schema', P + 'data', P + 'data.views'}
  for name in [m for m in graph if m.startswith(P + 'models')]:
    outside = {m for m in reachable(graph, name) if not m.startswith(P + 'models')}
    assert outside <= allowed, (name, outside - allowed)


def test_reading_a_trained_model_never_imports_training():
  """Eval, export, predict (jobs), the runtime and the weights work without train.py."""
  graph = import_graph()
  for name in [P + 'jobs', P + 'runtime', P + 'predict', P + 'evaluate', P + 'weights',
               P + 'pretrained', P + 'peft', P + 'schema'] + [
                   m for m in graph if m.startswith(P + 'weights.')]:
    assert P + 'train' not in reachable(graph, name), name


def test_weights_sit_below_the_runtime():
  graph = import_graph()
  above = {P + m for m in ('runtime', 'train', 'jobs', 'demo', 'main', 'evaluate', 'predict')}
  for name in [m for m in graph if m.startswith(P + 'weights')]:
    assert not reachable(graph, name) & above, name


def test_the_layering_tests_see_a_violation():
  graph = {'a.data.x': {'a.models.y'}, 'a.models.y': set()}
  assert reachable(graph, 'a.data.x') == {'a.models.y'}


def test_no_package_module_is_over_400_lines():
  sizes = {p.relative_to(PACKAGE).as_posix(): len(p.read_text().splitlines())
           for p in PACKAGE.rglob('*.py')}
  assert max(sizes.values()) <= 400, sorted(sizes.items(), key=lambda kv: -kv[1])[:3]


def _public_functions():
  """(name, typed) for every public module- and class-level function of the package."""
  found = []
  for path in PACKAGE.rglob('*.py'):
    tree = ast.parse(path.read_text())
    scopes = [tree.body] + [n.body for n in tree.body if isinstance(n, ast.ClassDef)
                            and not n.name.startswith('_')]
    for body in scopes:
      for node in body:
        if not isinstance(node, ast.FunctionDef) or node.name.startswith('_'):
          continue
        args = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
        args = [a for a in args if a.arg not in ('self', 'cls')]
        typed = node.returns is not None and all(a.annotation is not None for a in args)
        found.append((f'{path.relative_to(PACKAGE)}:{node.name}', typed))
  return found


def test_public_functions_are_typed():
  found = _public_functions()
  untyped = [name for name, typed in found if not typed]
  assert len(found) > 100 and len(untyped) <= 0.05 * len(found), untyped
