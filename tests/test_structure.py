"""The package's import graph: the privacy boundary, no cycles, short functions."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / 'bnsynth_jax'
PUBLIC = ('synthesis', 'relabel', 'student', 'synthetic_data')   # never reach the private sources
PRIVATE_SOURCES = 'sources'


def import_graph() -> dict[str, set[str]]:
  """module -> the bnsynth_jax modules it imports, at module level or inside functions; a
  subpackage (privacy/, synthesis/) is one node, its files' imports together."""
  graph = {}
  files = [(p.stem, p) for p in PACKAGE.glob('*.py')]
  files += [(p.parent.name, p) for p in PACKAGE.glob('*/*.py')
            if (p.parent / '__init__.py').exists()]
  for name, path in files:
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ImportFrom) and node.module:
        if node.module == 'bnsynth_jax':
          deps.update(alias.name for alias in node.names)
        elif node.module.startswith('bnsynth_jax.'):
          deps.add(node.module.split('.')[1])
      elif isinstance(node, ast.Import):
        deps.update(a.name.split('.')[1] for a in node.names if a.name.startswith('bnsynth_jax.'))
    graph[name] = graph.get(name, set()) | (deps - {name})
  return graph


def reachable(graph, start: str) -> set[str]:
  seen, todo = set(), [start]
  while todo:
    for dep in graph.get(todo.pop(), ()):
      if dep not in seen:
        seen.add(dep)
        todo.append(dep)
  return seen


def test_the_graph_is_read_correctly():
  graph = import_graph()
  # Known edges, so that the checks below cannot pass on an empty or wrong graph.
  assert 'sources' in graph['teacher'] and 'workdir' in graph['synthesis']
  assert 'models' in graph['synthesis'] and 'models' in graph['privacy']   # package files too
  assert 'sources' in reachable(graph, 'pipeline')


def test_public_stages_cannot_import_the_private_sources():
  graph = import_graph()
  for module in PUBLIC:
    assert PRIVATE_SOURCES not in reachable(graph, module), (
        f'{module} reaches bnsynth_jax.{PRIVATE_SOURCES}: {sorted(reachable(graph, module))}')
    assert 'pipeline' not in reachable(graph, module)


def test_no_import_cycles():
  graph = import_graph()
  cycles = [m for m in graph if m in reachable(graph, m)]
  assert cycles == [], f'modules on an import cycle: {sorted(cycles)}'


def test_stage_modules_do_not_import_the_pipeline():
  graph = import_graph()
  for module in ('teacher', 'stats', 'synthesis', 'student', 'evaluation', 'audit', 'preflight'):
    assert 'pipeline' not in graph[module], module


def test_no_function_over_80_lines():
  allowed = {('config_lib', 'default_config')}    # a config table, one field per line
  long = []
  for path in PACKAGE.glob('*.py'):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        length = node.end_lineno - node.lineno + 1
        if length > 80 and (path.stem, node.name) not in allowed:
          long.append(f'{path.stem}.{node.name}: {length} lines')
  assert long == []


def test_stages_after_stats_find_the_teacher_through_synthesis_teacher_dir():
  """Only the teacher and stats stages (the owner's, on the private data) read WORKDIR/teacher
  directly; every later stage uses workdir.teacher_dir, which honours synthesis.teacher_dir
  (a workdir holding a generator or a third party's synthesis has no teacher of its own)."""
  direct = sorted(p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob('*.py')
                  if "stage_dir(workdir, 'teacher')" in p.read_text())
  assert direct == ['stats.py', 'teacher.py', 'workdir.py'], direct


def test_teacher_dir_honours_the_config(tmp_path):
  from bnsynth_jax import config_lib, workdir
  config = config_lib.default_config()
  assert workdir.teacher_dir(config, tmp_path) == tmp_path / 'teacher'
  config.synthesis.teacher_dir = str(tmp_path / 'received')
  assert workdir.teacher_dir(config, tmp_path / 'w') == tmp_path / 'received'
  config.synthesis.stats_dir = str(tmp_path / 'got_stats')
  assert workdir.stats_dir(config, tmp_path / 'w') == tmp_path / 'got_stats'
