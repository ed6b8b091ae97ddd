"""The architecture, held by tests: which package may import which (docs/architecture.md), no
import cycles, no private names across packages, a lazy public API, and every command the
README names answers ``--help``. Imports are read with ``ast``, so nothing is imported to check.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIRST_PARTY = ("scan_core", "app", "tools")

# Rank of each part of scan_core: a module may import a lower rank, or its own part; never a
# higher or an equal one (sampling and datasets do not know each other). The longest prefix
# names a module's part. docs/architecture.md shows the same table.
RANKS = {
    "scan_core.files": 0,
    "scan_core.images": 0,
    "scan_core.model": 1,
    "scan_core.tokenizer": 2,
    "scan_core.checkpoint": 3,
    "scan_core.sampling": 4,
    "scan_core.datasets": 4,
    "scan_core.training": 5,
    "scan_core.evaluation": 6,
    "scan_core.__main__": 7,  # the command table: it names modules, imports them on demand
    "scan_core": 7,  # the public API (scan_core/__init__.py)
}
NEVER_IN_CORE = ("app", "tools", "gradio")


@cache
def modules() -> dict[str, Path]:
    """Every first-party module name -> its file (``pkg/__init__.py`` is ``pkg``)."""
    found = {"app_launcher": ROOT / "app.py"}
    for top in FIRST_PARTY:
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def import_nodes(tree: ast.AST):
    """Import statements anywhere (functions included), except under ``if TYPE_CHECKING``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def absolute(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    is_package = modules()[module].name == "__init__.py"
    base = module.split(".")[: len(module.split(".")) - node.level + is_package]
    return ".".join(base + ([node.module] if node.module else []))


@cache
def imports(module: str) -> tuple[tuple[str, str | None, int], ...]:
    """(imported module, imported name or None, line) for every import in ``module``; a name
    that is itself a module (``from scan_core import files``) is reported as that module."""
    tree = ast.parse(modules()[module].read_text(), str(modules()[module]))
    found = []
    for node in import_nodes(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names]
            continue
        source = absolute(module, node)
        for alias in node.names:
            if f"{source}.{alias.name}" in modules():
                found.append((f"{source}.{alias.name}", None, node.lineno))
            else:
                found.append((source, alias.name, node.lineno))
    return tuple(found)


def where(module: str, line: int) -> str:
    return f"{modules()[module].relative_to(ROOT)}:{line}"


def part(module: str) -> str:
    """The longest RANKS key that ``module`` is or lies under."""
    keys = [k for k in RANKS if module == k or module.startswith(k + ".")]
    return max(keys, key=len)


def package(module: str) -> str:
    """The package a module belongs to for privacy: scan_core's parts, else the top folder."""
    return part(module) if module.startswith("scan_core") else module.split(".")[0]


def core_modules() -> list[str]:
    return [m for m in modules() if m == "scan_core" or m.startswith("scan_core.")]


def test_the_rank_table_covers_every_module():
    assert all(part(m) for m in core_modules())
    assert {m.split(".")[1] for m in core_modules() if "." in m} == {
        k.split(".")[1] for k in RANKS if "." in k
    }, "a new part of scan_core needs a rank (here and in docs/architecture.md)"


def test_imports_flow_down_the_ranks():
    wrong = []
    for module in core_modules():
        for target, _, line in imports(module):
            if target.split(".")[0] in NEVER_IN_CORE:
                wrong.append(f"{where(module, line)}: {module} imports {target}")
            elif target.startswith("scan_core") and target in modules():
                own, other = part(module), part(target)
                if own != other and RANKS[other] >= RANKS[own]:
                    wrong.append(
                        f"{where(module, line)}: {module} ({own}, rank {RANKS[own]}) imports "
                        f"{target} ({other}, rank {RANKS[other]})"
                    )
    assert not wrong, "imports against the layering:\n" + "\n".join(sorted(wrong))


def test_the_studio_never_imports_the_tools():
    studio = [m for m in modules() if m.split(".")[0] in ("app", "app_launcher")]
    wrong = [
        f"{where(module, line)}: {module} imports {target}"
        for module in studio
        for target, _, line in imports(module)
        if target.split(".")[0] == "tools"
    ]
    assert not wrong, "the studio imports a measuring tool:\n" + "\n".join(sorted(wrong))


def test_the_studio_uses_only_the_public_api():
    """app/ and app.py reach scan_core through ``scan_core`` and its PUBLIC_MODULES only, so the
    packages can be rearranged without touching the studio."""
    import scan_core

    allowed = {"scan_core", *scan_core.PUBLIC_MODULES}
    studio = [m for m in modules() if m.split(".")[0] in ("app", "app_launcher")]
    wrong = {
        f"{where(module, line)}: {module} imports {target}"
        for module in studio
        for target, _, line in imports(module)
        if target.split(".")[0] == "scan_core" and target not in allowed
    }
    assert not wrong, "the studio reaches past the public API:\n" + "\n".join(sorted(wrong))


def first_party_graph() -> dict[str, set[str]]:
    return {
        module: {t for t, _, _ in imports(module) if t in modules() and t != module}
        for module in modules()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path (first node repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [node, nxt] if nxt in path else [node, nxt]
            if nxt not in state and (found := visit(nxt, path + [node])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [])):
            return found
    return None


def test_find_cycle_reports_a_cycle_and_accepts_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles():
    """Imports inside functions count: a cycle broken only by a late import is still one."""
    cycle = find_cycle(first_party_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def private_uses(module: str):
    """(line, owner module, private name) for each ``from X import _name`` and each
    ``alias._name`` on an imported first-party module."""
    tree = ast.parse(modules()[module].read_text())
    aliases: dict[str, str] = {}
    for node in import_nodes(tree):
        for alias in node.names:
            if isinstance(node, ast.Import):
                if alias.asname:
                    aliases[alias.asname] = alias.name
                continue
            source = absolute(module, node)
            if f"{source}.{alias.name}" in modules():
                aliases[alias.asname or alias.name] = f"{source}.{alias.name}"
            elif alias.name.startswith("_") and source in modules():
                yield node.lineno, source, alias.name
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            yield node.lineno, aliases[node.value.id], node.attr


def test_no_private_names_cross_packages():
    wrong = [
        f"{where(module, line)}: {module} uses {owner}.{name}"
        for module in modules()
        for line, owner, name in private_uses(module)
        if owner in modules() and package(owner) != package(module)
    ]
    assert not wrong, "private names used from another package:\n" + "\n".join(sorted(wrong))


def test_the_public_api_is_lazy_and_complete():
    import scan_core

    homes = scan_core._HOMES  # the table under test
    assert sorted(scan_core.__all__) == sorted(homes)
    code = (
        "import sys, scan_core\n"
        "heavy = sorted(m for m in ('torch', 'numpy', 'PIL', 'gradio') if m in sys.modules)\n"
        "assert not heavy, f'import scan_core loaded {heavy}'\n"
        "missing = [n for n in scan_core.__all__ if getattr(scan_core, n, None) is None]\n"
        "assert not missing, missing\n"
        "import scan_core.sampling.sampler as s\n"
        "assert scan_core.ScanSampler is s.ScanSampler\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


README = (ROOT / "README.md").read_text()

# Runs each command line in one interpreter (importing torch once, not once per command) and
# prints {"argv joined": [exit code, output]} as JSON.
HELP_RUNNER = """
import contextlib, io, json, runpy, sys, warnings
warnings.simplefilter("ignore")
results = {}
for argv in json.loads(sys.argv[1]):
    out = io.StringIO()
    sys.argv = [argv[0]] + argv[1:]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            runpy.run_module(argv[0], run_name="__main__", alter_sys=False)
            code = 0
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
    results[" ".join(argv)] = [code, out.getvalue()]
print(json.dumps(results))
"""


def readme_commands() -> set[tuple[str, ...]]:
    """``python -m scan_core CMD [SUB]`` and ``python -m tools.NAME`` named in the README, as
    argv lists; placeholders in capitals (COMMAND, NAME) are skipped."""
    found: set[tuple[str, ...]] = set()
    for command, sub in re.findall(r"-m scan_core\s+([a-z_]+)(?:\s+([a-z_]+)\b(?!\.))?", README):
        found.add(("scan_core", command, sub) if sub else ("scan_core", command))
    for name in re.findall(r"-m tools\.([a-z_]+)", README):
        found.add((f"tools.{name}",))
    # "python -m tools.NAME (`timing`, `load_test`, ...)": the names listed after the placeholder
    listed = re.search(r"-m tools\.NAME`?\s*\(([^)]*)\)", README)
    for name in re.findall(r"`([a-z_]+)`", listed.group(1) if listed else ""):
        found.add((f"tools.{name}",))
    return found


@pytest.fixture(scope="module")
def answers() -> dict[str, list]:
    from scan_core.__main__ import COMMANDS

    runs = [["scan_core"], ["scan_core", "no_such_command"]]
    runs += [["scan_core", name, "--help"] for name in COMMANDS]
    runs += [[*argv, "--help"] for argv in sorted(readme_commands())]
    done = subprocess.run(
        [sys.executable, "-c", HELP_RUNNER, json.dumps(runs)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_command_table_lists_every_command_and_refuses_unknown_ones(answers):
    from scan_core.__main__ import COMMANDS

    code, listing = answers["scan_core"]
    assert code == 0 and all(name in listing for name in COMMANDS), listing
    code, output = answers["scan_core no_such_command"]
    assert code == 2 and "unknown command" in output, output


def test_every_command_answers_help(answers):
    from scan_core.__main__ import COMMANDS

    wrong = {
        name: answers[f"scan_core {name} --help"]
        for name in COMMANDS
        if answers[f"scan_core {name} --help"][0] != 0
        or "usage" not in answers[f"scan_core {name} --help"][1]
    }
    assert not wrong, json.dumps(wrong, indent=1)[-4000:]


def test_every_command_in_the_readme_answers_help(answers):
    named = readme_commands()
    assert ("scan_core", "generate") in named and any(a[0].startswith("tools.") for a in named)
    wrong = {}
    for argv in named:
        code, output = answers[" ".join(argv) + " --help"]
        if code != 0 or "usage" not in output:
            wrong[" ".join(argv)] = [code, output[-1500:]]
    assert not wrong, json.dumps(wrong, indent=1)


def readme_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)
    examples = [b for b in blocks if re.search(r"^from scan_core import", b, flags=re.M)]
    assert len(examples) == 1, "README should hold one Python example importing from scan_core"
    return examples[0]


def test_the_readme_example_runs_as_written(tmp_path):
    """In a scratch folder that sees the repository's checkpoints, so what it writes stays out
    of the checkout; the relative paths resolve as they would at the repository root."""
    (tmp_path / "checkpoints").symlink_to(ROOT / "checkpoints")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", readme_example()],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    written = sorted(p.name for p in tmp_path.iterdir() if p.name != "checkpoints")
    assert written, "the example should write its picture"
