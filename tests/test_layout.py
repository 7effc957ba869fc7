"""The architecture the folders claim (docs/layout.md), checked from outside the package:

* ``core/``, ``analysis/``, ``api/`` and ``cli/`` import with LLaMA-Factory made unimportable, and
  ``core/`` imports neither ``plugin/`` nor ``analysis/``;
* only the modules of ``plugin/lf/`` import LLaMA-Factory;
* the start-up hook's import path (``plugin.startup``, what the ``.pth`` imports) loads the
  standard library only;
* every module, name and file the docs, scripts, benchmarks and the GPU check mention exists (no
  test runs benchmarks/ or tests/gpu/, so a move would otherwise break them silently), and those
  scripts import as modules.
"""

import ast
import importlib
import importlib.util
import json
import re
import subprocess
import sys

import pytest
from helpers.process import REPO

PACKAGE = REPO / "llamafactory_macdrop"
NAME = "llamafactory_macdrop"

#: a meta-path finder that makes LLaMA-Factory unimportable, as on a machine without it
BLOCK_LF = """
import importlib.abc, sys
class NoLlamaFactory(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "llamafactory" or name.startswith("llamafactory."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the layout test)")
        return None
sys.meta_path.insert(0, NoLlamaFactory())
"""


def _modules(sub: str) -> list[str]:
    out = []
    for path in sorted((PACKAGE / sub).rglob("*.py")):
        if path.stem == "__main__":  # runs the command when imported
            continue
        rel = path.relative_to(REPO).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out.append(".".join(parts))
    return out


def _python(code: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *flags, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={"PATH": "/usr/bin:/bin", "MACDROP_AUTOLOAD": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"},
    )


def test_core_and_analysis_import_without_llamafactory():
    mods = (
        _modules("core")
        + _modules("analysis")
        + _modules("api")
        + _modules("cli")
        + _modules("integrations/transformers")
    )
    code = (
        BLOCK_LF
        + f"""
import importlib, json
mods = {mods!r}
for m in mods:
    importlib.import_module(m)
loaded = sorted(sys.modules)
print(json.dumps(loaded))
"""
    )
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not [m for m in loaded if m == "llamafactory" or m.startswith("llamafactory.")]
    assert len(mods) > 25
    assert set(mods) <= set(loaded)

    # the core stands alone: nothing of plugin/ or analysis/ comes with it
    code = (
        BLOCK_LF
        + f"""
import importlib, json
for m in {_modules("core")!r}:
    importlib.import_module(m)
print(json.dumps(sorted(m for m in sys.modules if m.startswith("{NAME}."))))
"""
    )
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    hook = {f"{NAME}.plugin", f"{NAME}.plugin.startup"}  # the .pth loads these first (and core.values)
    shared = {f"{NAME}.errors"}  # the stdlib-only error family every layer derives from
    assert [m for m in loaded if not m.startswith(f"{NAME}.core") and m not in hook | shared] == [], loaded


def _imported(tree: ast.AST) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def test_only_the_seam_imports_llamafactory():
    importers = []
    for path in sorted(PACKAGE.rglob("*.py")):
        names = _imported(ast.parse(path.read_text(), str(path)))
        if any(n == "llamafactory" or n.startswith("llamafactory.") for n in names):
            importers.append(str(path.relative_to(PACKAGE)))
    outside = [p for p in importers if not p.startswith("plugin/lf/")]
    assert not outside, f"only plugin/lf/ may import LLaMA-Factory: {outside}"
    assert {"plugin/lf/arguments.py", "plugin/lf/patches.py", "plugin/lf/templates.py"} <= set(importers)


#: what integrations/ may use of plugin/: the keys and the checks, which know no host
HOST_FREE_PLUGIN = {f"{NAME}.plugin.{m}" for m in ("keys", "checks", "run_args", "prequantized")}


def _package_imports(path) -> list[str]:
    """The modules (and imported names, as ``module.name``) ``path`` imports, relative imports resolved."""
    package = list(path.relative_to(REPO).with_suffix("").parts[:-1])  # a module's, or an __init__'s own
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            out += [module] + [f"{module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names]
    return out


def test_integrations_use_only_the_host_free_plugin_modules():
    """integrations/ -> the keys and checks of plugin/ -> core/, and plugin/lf/ -> integrations/: no cycle,
    and axolotl is imported in integrations/axolotl/ alone."""
    for path in sorted((PACKAGE / "integrations").rglob("*.py")):
        used = {m for m in _package_imports(path) if m.startswith(f"{NAME}.plugin.")}
        used = {m for m in used if not any(m.startswith(h + ".") for h in HOST_FREE_PLUGIN)}
        assert used <= HOST_FREE_PLUGIN, f"{path.relative_to(PACKAGE)} uses {sorted(used - HOST_FREE_PLUGIN)}"
    for name in HOST_FREE_PLUGIN:
        path = PACKAGE / "plugin" / (name.rsplit(".", 1)[1] + ".py")
        assert not [m for m in _package_imports(path) if m.startswith(f"{NAME}.integrations")], path
    for path in sorted(PACKAGE.rglob("*.py")):
        if any(n == "axolotl" or n.startswith("axolotl.") for n in _imported(ast.parse(path.read_text()))):
            assert path.is_relative_to(PACKAGE / "integrations" / "axolotl"), path


#: what each analysis/ folder may import of the others: measuring (inspect) and evaluating (evaluate)
#: stand alone, the sweep machinery evaluates, attacks and quantization sweep, compare uses the
#: attacks; models/ (loading, identity) and the figures are shared by all
ANALYSIS_USES = {
    "inspect": set(),
    "evaluate": set(),
    "models": set(),
    "sweep": {"evaluate", "models"},
    "attack": {"inspect", "evaluate", "models", "sweep"},
    "quantize": {"attack", "evaluate", "models", "sweep"},
    "compare": {"inspect", "evaluate", "models", "sweep", "attack"},
}


def test_analysis_imports_point_one_way_and_never_up():
    """analysis/ imports neither api/ nor cli/, its folders only in the direction ANALYSIS_USES gives
    (no cycle, no lazy import around one), and api/ takes of cli/ its option parsers alone."""
    for path in sorted((PACKAGE / "analysis").rglob("*.py")):
        rel = path.relative_to(PACKAGE / "analysis")
        used = _package_imports(path)
        up = [m for m in used if m.startswith((f"{NAME}.api", f"{NAME}.cli", f"{NAME}.plugin", f"{NAME}.integrations"))]
        assert not up, f"analysis/{rel} imports {up}"
        if len(rel.parts) < 2:
            continue
        mine = rel.parts[0]
        others = {m.split(".")[2] for m in used if m.startswith(f"{NAME}.analysis.") and len(m.split(".")) > 3}
        others -= {mine, "figures"}
        assert others <= ANALYSIS_USES[mine], f"analysis/{rel} imports analysis/{sorted(others - ANALYSIS_USES[mine])}"
    for path in sorted((PACKAGE / "api").rglob("*.py")):
        cli = [m for m in _package_imports(path) if m.startswith(f"{NAME}.cli")]
        assert not cli or path.name == "options.py", f"api/{path.name} imports {cli}"


def test_the_startup_hook_loads_the_standard_library_only():
    # -S: no site-packages and no .pth, so only what the import itself pulls in is measured
    code = f"""
import sys, json
sys.path.insert(0, {str(REPO)!r})
before = set(sys.modules)
import {NAME}.plugin.startup
new = sorted(set(sys.modules) - before)
print(json.dumps(new))
print(any(type(f).__name__ == "_LlamaFactoryFinder" for f in sys.meta_path))
"""
    proc = _python(code, "-S")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    new, registered = json.loads(lines[-2]), lines[-1] == "True"
    ours = {NAME, f"{NAME}.plugin", f"{NAME}.plugin.startup", f"{NAME}.core", f"{NAME}.core.values"}
    foreign = [m for m in new if m not in ours and m.split(".")[0] not in sys.stdlib_module_names]
    assert foreign == []
    assert ours <= set(new)
    assert registered


#: the files that mention module paths and that no test imports
MENTIONING = [
    "README.md",
    "docs/*.md",
    "benchmarks/*.py",
    "tests/gpu/*.py",
    "scripts/*.sh",
    "examples/*.py",
    "examples/hosts/*.py",
    "examples/hosts/*.yml",
    "pyproject.toml",
    "Makefile",
    "llamafactory_macdrop.pth",
    "yaml_configs/*.yaml",
]
FROM_IMPORT = re.compile(r"from[ \t]+(" + NAME + r"(?:\.\w+)*)[ \t]+import[ \t]+(?:\(([^)]*)\)|([\w \t,]+))")
DOTTED = re.compile(r"\b" + NAME + r"(?:\.[A-Za-z_]\w*)+")
FILE = re.compile(r"\b((?:" + NAME + r"|tests|benchmarks|scripts|examples|yaml_configs)/[\w./-]*\w)(?![\w*])")


def _mentioning_files():
    out = []
    for pattern in MENTIONING:
        out += sorted(REPO.glob(pattern))
    return out


def _axolotl_installed() -> bool:
    """axolotl the package (tests/axolotl/ on the path is only a namespace folder of that name)."""
    spec = importlib.util.find_spec("axolotl")
    return spec is not None and spec.origin is not None and spec.origin.endswith("__init__.py")


def _defined_in_source(dotted: str) -> bool:
    """``dotted`` under integrations/axolotl/ (which imports axolotl) read from the source: a module
    file, or a name its module defines or imports at the top level."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        base = REPO.joinpath(*parts[:cut])
        path = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
        if not path.is_file():
            continue
        rest = parts[cut:]
        if len(rest) != 1:
            return not rest
        names = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
                names.add(node.name)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names |= {(a.asname or a.name).split(".")[0] for a in node.names}
            elif isinstance(node, ast.Assign):
                names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        return rest[0] in names
    return False


def _resolves(dotted: str) -> bool:
    """A module, or an attribute of the longest importable prefix (``x.y.activate``, ``x.cli:main``)."""
    if dotted.startswith(f"{NAME}.integrations.axolotl") and not _axolotl_installed():
        return _defined_in_source(dotted.replace(":", "."))
    parts = dotted.replace(":", ".").split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def test_every_module_name_and_file_mentioned_outside_the_tests_exists():
    missing = []
    for path in _mentioning_files():
        text = path.read_text()
        where = str(path.relative_to(REPO))
        for module, grouped, names in FROM_IMPORT.findall(text):
            for name in (n.split("#")[0].split(" as ")[0].strip() for n in (grouped or names).split(",")):
                if name and not _resolves(f"{module}.{name}"):
                    missing.append(f"{where}: from {module} import {name}")
        for dotted in DOTTED.findall(text):
            if dotted != f"{NAME}.pth" and not _resolves(dotted.rstrip(".")):
                missing.append(f"{where}: {dotted}")
        for entry in re.findall(r'"(' + NAME + r'[\w.]*:\w+)"', text):  # console scripts
            if not _resolves(entry):
                missing.append(f"{where}: {entry}")
        for file in FILE.findall(text) if path.suffix != ".yaml" else []:  # the YAMLs name LLaMA-Factory's files
            file = file.rstrip(".")
            if "*" in file or "<" in file:
                continue
            if not (REPO / file).exists() and not file.startswith(("tests/data/", "examples/data/")):
                missing.append(f"{where}: {file}")
    assert missing == []


@pytest.mark.parametrize(
    "script", sorted(str(p.relative_to(REPO)) for p in [*REPO.glob("benchmarks/*.py"), *REPO.glob("tests/gpu/*.py")])
)
def test_benchmark_and_gpu_scripts_import_as_modules(script, monkeypatch):
    path = REPO / script
    tree = ast.parse(path.read_text())
    guarded = any(isinstance(n, ast.If) and "__main__" in ast.unparse(n.test) for n in tree.body)
    assert guarded or path.stem == "benchlib", f"{script} runs at import: give it an if __name__ == '__main__' guard"
    monkeypatch.syspath_prepend(str(path.parent))
    spec = importlib.util.spec_from_file_location(f"_layout_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # what it imports from the package lazily (inside functions) resolves too
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith(NAME):
            for alias in node.names:
                assert _resolves(f"{node.module}.{alias.name}"), f"{script}: from {node.module} import {alias.name}"
