"""The package's module graph: no module imports itself back, even through a function-level import
(an import moved into a function to dodge a cycle is a cycle all the same)."""
import ast
import pathlib

import jax_nlu_ppo

PACKAGE_DIR = pathlib.Path(jax_nlu_ppo.__file__).parent
PACKAGE = "jax_nlu_ppo"

# Import edges (importer, imported) left out of the cycle check while their fix lands.


def _module_name(path: pathlib.Path) -> str:
  parts = (PACKAGE,) + path.relative_to(PACKAGE_DIR).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.AST, module: str, is_package: bool, modules: set[str]) -> set[str]:
  """Every package module `tree` imports, at any depth (module level, functions, branches)."""
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = module.split(".")[:len(module.split(".")) - node.level + is_package]
        base = ".".join(anchor + ([base] if base else []))
      # `from pkg import name`: the submodule pkg.name if there is one, else pkg itself.
      names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
               for alias in node.names]
    else:
      continue
    for name in names:
      while name and name not in modules:      # `import a.b.c` of a name inside a.b: a.b
        name = name.rpartition(".")[0]
      if name.startswith(PACKAGE) and name != module:
        found.add(name)
  return found


def import_graph() -> dict[str, set[str]]:
  paths = {_module_name(p): p for p in PACKAGE_DIR.rglob("*.py")}
  modules = set(paths)
  return {name: _imports(ast.parse(path.read_text()), name, path.name == "__init__.py", modules)
          for name, path in paths.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle as [a, b, ..., a], or None (depth-first search, colouring the modules)."""
  state: dict[str, str] = {}
  stack: list[str] = []

  def visit(node: str) -> list[str] | None:
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == "open":
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        cycle = visit(nxt)
        if cycle:
          return cycle
    stack.pop()
    state[node] = "done"
    return None

  for node in sorted(graph):
    if node not in state:
      cycle = visit(node)
      if cycle:
        return cycle
  return None


def test_the_graph_sees_module_and_function_level_imports():
  graph = import_graph()
  assert "jax_nlu_ppo.nlu.tasks" in graph["jax_nlu_ppo.nlu.data"]          # module level
  assert "jax_nlu_ppo.tools.report" in graph["jax_nlu_ppo.cli"]            # in a function
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
  cycle = find_cycle(import_graph())
  assert cycle is None, "import cycle: " + " -> ".join(cycle)
