"""The library apart from the application: import rules, torch-only import, the CLI without its extra."""

from __future__ import annotations

import ast
import json
import pathlib
import subprocess
import sys

import pytest

SRC = pathlib.Path(__file__).resolve().parents[1] / "src"
LIBRARY = SRC / "pwlu"
APP = LIBRARY / "app"

#: Packages the library must not need (the app's extra, the vision extra, the Triton backend).
OPTIONAL = ("numpy", "matplotlib", "torchvision", "timm", "tqdm", "triton")


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, path: pathlib.Path) -> list[tuple[str, int]]:
    """Absolute names (with line numbers) of everything ``source`` (the file ``path``) imports.

    ``from X import a, b`` yields ``X.a`` and ``X.b`` (the names may be submodules); relative
    imports are resolved against the file's package; ``importlib.import_module("...")`` and
    ``__import__("...")`` with a constant name count too.
    """
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source, str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            found.append((origin, node.lineno))
            found += [(f"{origin}.{alias.name}", node.lineno) for alias in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.args[0].value, node.lineno))
    return found


def _is_app(name: str) -> bool:
    return name == "pwlu.app" or name.startswith("pwlu.app.")


def app_imports(path: pathlib.Path, source: str | None = None) -> list[str]:
    source = path.read_text() if source is None else source
    return [f"{path.relative_to(SRC)}:{line}: {name}" for name, line in imported_modules(source, path) if _is_app(name)]


def _library_files() -> list[pathlib.Path]:
    return sorted(p for p in LIBRARY.rglob("*.py") if APP not in p.parents)


def test_the_import_checker_sees_every_form():
    fake = LIBRARY / "ops" / "fake.py"
    for source in ("import pwlu.app", "import pwlu.app.cli as c", "from pwlu.app import cli", "from pwlu import app",
                   "from ..app import cli", "from .. import app", "from ..app.launcher import main",
                   "importlib.import_module('pwlu.app.cli')", "def f():\n    from ..app import data"):  # fmt: skip
        assert app_imports(fake, source), source
    for source in ("import pwlu", "from pwlu import PWLU", "from . import app_like", "from .folded import app",
                   "from ..apply import x", "import importlib"):  # fmt: skip
        assert not app_imports(fake, source), source
    assert app_imports(LIBRARY / "__init__.py", "from .app import cli")
    assert not app_imports(LIBRARY / "ops" / "__init__.py", "from .app import cli")  # that is pwlu.ops.app


def test_the_library_never_imports_the_app():
    files = _library_files()
    assert len(files) > 10 and LIBRARY / "modules.py" in files
    offenders = []
    for path in files:
        found = app_imports(path)
        if path == LIBRARY / "__main__.py":
            # `python -m pwlu` runs the app (never imported by the library): through the launcher only
            if [f.rsplit(": ", 1)[1] for f in found] != ["pwlu.app.launcher", "pwlu.app.launcher.main"]:
                offenders += found or [f"{path.relative_to(SRC)}: does not start pwlu.app.launcher"]
            continue
        offenders += found
    assert not offenders, "library modules import the application:\n" + "\n".join(offenders)


def _public_names() -> set[str]:
    tree = ast.parse((LIBRARY / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return set(ast.literal_eval(node.value))
    raise AssertionError("pwlu/__init__.py has no __all__")


def test_the_app_uses_the_library_through_its_public_api():
    public = _public_names()
    assert {"PWLU", "BoundaryRealigner", "boundary_iou", "parameter_groups", "fix_init"} <= public
    problems = []
    for path in sorted(APP.rglob("*.py")):
        source = path.read_text()
        where = path.relative_to(SRC)
        for node in ast.walk(ast.parse(source, str(path))):
            if isinstance(node, ast.ImportFrom) and node.level > 1:
                problems.append(f"{where}:{node.lineno}: relative import out of pwlu.app")
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("pwlu."):
                if not _is_app(node.module):
                    names = sorted(a.name for a in node.names if a.name in public)
                    if names:
                        problems.append(f"{where}:{node.lineno}: import {', '.join(names)} from pwlu, not {node.module}")
        for name, line in imported_modules(source, path):
            if name == "pwlu.statistics" or name.startswith("pwlu.statistics."):
                problems.append(f"{where}:{line}: imports pwlu.statistics (use the standard library's statistics)")
    assert not problems, "\n".join(problems)


def _run(code: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout)


BLOCK = "import sys\nfor _name in {names!r}:\n    sys.modules[_name] = None  # `import _name` raises ImportError\n"


def test_import_pwlu_forward_backward_with_only_torch():
    code = BLOCK.format(names=OPTIONAL) + (
        "import json, torch\n"
        "import pwlu, pwlu.export\n"
        "m = pwlu.PWLU(4)\n"
        "x = torch.randn(2, 4, 3, 3, requires_grad=True)\n"
        "y = m(x)\n"
        "y.sum().backward()\n"
        "assert x.grad is not None and x.grad.shape == x.shape and m.points.grad is not None\n"
        f"loaded = sorted(k for k in sys.modules if k.split('.')[0] in {OPTIONAL!r} and sys.modules[k] is not None)\n"
        "print('PWLU-TORCH-ONLY-OK', json.dumps({'app': sorted(k for k in sys.modules if k.startswith('pwlu.app')),"
        " 'optional': loaded}))\n"
    )
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr
    marker = [line for line in proc.stdout.splitlines() if line.startswith("PWLU-TORCH-ONLY-OK ")]
    assert len(marker) == 1, proc.stdout
    seen = json.loads(marker[0].split(" ", 1)[1])
    assert seen == {"app": [], "optional": []}


def _assert_one_line_install_hint(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), proc.stderr
    assert "pip install" in lines[0] and "pwlu[app]" in lines[0] and "numpy" in lines[0], lines[0]


@pytest.mark.parametrize(
    "entry",
    [
        "runpy.run_module('pwlu', run_name='__main__', alter_sys=True)",  # python -m pwlu
        "runpy.run_module('pwlu.app', run_name='__main__', alter_sys=True)",  # python -m pwlu.app
        "runpy.run_module('pwlu.app.demo', run_name='__main__', alter_sys=True)",  # make demo
        # the `pwlu` console script, as installed (pyproject's [project.scripts])
        "sys.exit(importlib.metadata.entry_points(group='console_scripts', name='pwlu')['pwlu'].load()())",
    ],
)
def test_cli_without_its_extra_prints_one_line_and_exits_2(entry):
    code = BLOCK.format(names=("numpy",)) + f"import importlib.metadata, runpy\nsys.argv[1:] = ['--help']\n{entry}\n"
    _assert_one_line_install_hint(_run(code))


def test_cli_entry_point_is_the_launcher():
    from importlib.metadata import entry_points

    (script,) = entry_points(group="console_scripts", name="pwlu")
    assert script.value == "pwlu.app.launcher:main"


def test_a_lazily_imported_extra_is_one_line_too(tmp_path, monkeypatch, capsys):
    from pwlu.app import launcher
    from pwlu.app.cli import main
    from pwlu.app.config import TrainConfig
    from pwlu.app.train import train

    out = tmp_path / "run"
    train(TrainConfig(dataset="synthetic", epochs=1, warmup_epochs=0, batch_size=128, out=str(out), progress=False))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    assert main(["plot", str(out / "checkpoint.pt"), "--out", str(tmp_path / "plots"), "--batches", "1"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "matplotlib" in err[0] and "pip install 'pwlu[app]'" in err[0], err
    # the launcher's safety net: a module of the extra missing anywhere below the entry point
    monkeypatch.setitem(sys.modules, "tqdm", None)

    def needs_tqdm(argv):
        import tqdm  # noqa: F401

        return 0

    assert launcher.run(needs_tqdm, []) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "tqdm" in err[0] and "pwlu[app]" in err[0], err
    # ... but not one outside it: that is a bug, with its traceback
    monkeypatch.setitem(sys.modules, "not_an_app_module", None)

    def needs_other(argv):
        import not_an_app_module  # noqa: F401

    with pytest.raises(ModuleNotFoundError):
        launcher.run(needs_other, [])
