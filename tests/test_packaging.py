"""The built wheel, installed for real into a fresh virtualenv next to a foreign top-level ``tasks``.

The repository keeps ``blocks/``, ``tasks/``, ``flows/`` and ``testing/`` at its root and pyproject.toml
installs them as ``comfy_pipeline.blocks``, ``comfy_pipeline.tasks``, ``comfy_pipeline.flows`` and
``comfy_pipeline.testing`` (the stand-in ComfyUI with the JSON files it reads). These
tests build the wheel (not editable) from a copy of the repository, check that nothing but
``comfy_pipeline/`` and its ``.dist-info/`` lands in site-packages, and install it into a new
virtualenv beside a dummy distribution that owns a top-level ``tasks`` package: both must import
in one process, and uninstalling the dummy must leave every file of ours in place.

Everything runs offline: the wheel is built without build isolation, and the fresh virtualenv
sees the dependencies (Prefect, typer, ...) and the build tools of the interpreter running the
tests through a ``.pth`` file that lists its site-packages, instead of installing them again.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DIST_NAME = "comfy-pipeline"
SUBPACKAGES = {"blocks": "comfy_pipeline.blocks", "tasks": "comfy_pipeline.tasks", "flows": "comfy_pipeline.flows",
               "testing": "comfy_pipeline.testing"}

# Not copied for the build: VCS data, virtualenvs (CI's .ci-venv lives in the repository root),
# earlier build output and caches.
_COPY_IGNORE = shutil.ignore_patterns(
    ".git", ".venv", ".ci-venv", "venv", "build", "dist", "out", "output", "*.egg-info",
    "__pycache__", "*.pyc", ".pytest_cache", ".mypy_cache", ".ruff_cache", ".tox", ".nox",
)

pytestmark = pytest.mark.timeout(300)


def _env(tmp: Path) -> dict[str, str]:
    """The environment of every subprocess: nothing from the caller's PYTHONPATH, no user
    site-packages, no package index (all installs are local), a private Prefect home."""
    env = {k: v for k, v in os.environ.items()
           if k not in {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONSAFEPATH", "VIRTUAL_ENV"}}
    env.update(
        PYTHONNOUSERSITE="1",
        PYTHONDONTWRITEBYTECODE="1",
        PIP_NO_INDEX="1",
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        PIP_NO_INPUT="1",
        PREFECT_HOME=str(tmp / "prefect-home"),
        COLUMNS="120",
        NO_COLOR="1",
        TERM="dumb",
    )
    return env


def _run(cmd: list, cwd: Path, *, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    """Runs ``cmd`` in ``cwd`` (never the repository root) and, unless ``check`` is false,
    fails the test with its output when it exits non-zero."""
    cmd = [str(c) for c in cmd]
    proc = subprocess.run(cmd, cwd=cwd, env=_env(cwd), capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, _explain(proc)
    return proc


def _explain(proc: subprocess.CompletedProcess) -> str:
    return (f"`{' '.join(proc.args)}` exited {proc.returncode}\n"
            f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}")


def _source_files() -> dict[str, str]:
    """Wheel path -> repository path of every file under the package folders."""
    files = {}
    for folder, package in SUBPACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*")):
            rel = path.relative_to(ROOT / folder)
            if path.is_file() and "__pycache__" not in rel.parts and path.suffix not in {".pyc", ".pyo"}:
                files["/".join([*package.split("."), *rel.parts])] = f"{folder}/{rel.as_posix()}"
    return files


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built without isolation from a copy of the repository (so no ``build/`` or
    ``*.egg-info`` lands in the working tree)."""
    work = tmp_path_factory.mktemp("wheel-build")
    src = work / "src"
    shutil.copytree(ROOT, src, ignore=_COPY_IGNORE, symlinks=True)
    out = work / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
          "--wheel-dir", out, src], cwd=work, timeout=180)
    wheels = list(out.glob("*.whl"))
    assert len(wheels) == 1, f"expected one wheel in {out}, found {[w.name for w in wheels]}"
    return wheels[0]


def test_wheel_holds_only_the_comfy_pipeline_namespace(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if not n.endswith("/")]
        dist_infos = {n.split("/", 1)[0] for n in names if n.split("/", 1)[0].endswith(".dist-info")}
        assert len(dist_infos) == 1, f"expected one .dist-info folder, got {sorted(dist_infos)}"
        dist_info = dist_infos.pop()
        entry_points = zf.read(f"{dist_info}/entry_points.txt").decode()
        metadata = zf.read(f"{dist_info}/METADATA").decode()

    stray = sorted(n for n in names if not n.startswith(("comfy_pipeline/", f"{dist_info}/")))
    assert not stray, f"files outside comfy_pipeline/ and {dist_info}/ in {wheel.name}: {stray}"
    # comfy_pipeline stays an implicit namespace package: an __init__.py here would clash with
    # any other distribution that installs into comfy_pipeline.*.
    assert "comfy_pipeline/__init__.py" not in names
    for package in SUBPACKAGES.values():
        assert f"{package.replace('.', '/')}/__init__.py" in names, f"{package} missing from {sorted(names)}"

    # Every file of the package folders ships (a data file, such as the stand-in's JSON, would be
    # dropped silently without package-data), and nothing else does.
    expected = _source_files()
    shipped = {n for n in names if n.startswith("comfy_pipeline/")}
    missing = sorted(f"{expected[n]} (as {n})" for n in set(expected) - shipped)
    assert not missing, f"repository files missing from {wheel.name}: {missing}"
    extra = sorted(shipped - set(expected))
    assert not extra, f"files in {wheel.name} that are not in {', '.join(SUBPACKAGES)}: {extra}"

    assert re.search(r"(?m)^comfy-pipeline\s*=\s*comfy_pipeline\.flows\.cli:main\s*$", entry_points), entry_points
    assert re.search(r"(?m)^Name: comfy-pipeline$", metadata), metadata[:500]
    for dep in ("prefect", "typer", "websocket-client", "requests", "pydantic", "python-slugify"):
        assert re.search(rf"(?mi)^Requires-Dist: {re.escape(dep)}\b(?!.*extra ==)", metadata), \
            f"{dep} is not a runtime dependency in METADATA:\n{metadata[:3000]}"
    # The stand-in's aiohttp comes with the `demo` extra (--server demo), never with a plain install.
    assert re.search(r"(?m)^Provides-Extra: demo$", metadata), metadata[:3000]
    assert re.search(r"(?mi)^Requires-Dist: aiohttp\b.*extra == .demo.", metadata), metadata[:3000]
    assert not re.search(r"(?mi)^Requires-Dist: aiohttp\b(?!.*extra ==)", metadata), metadata[:3000]


# Run inside the fresh virtualenv: where did everything come from?
_PROBE = textwrap.dedent("""
    import importlib.util, json, sys
    spec = importlib.util.find_spec("comfy_pipeline")
    print(json.dumps({
        "comfy_pipeline": None if spec is None else list(spec.submodule_search_locations or []),
        "prefect": importlib.util.find_spec("prefect").origin,
        "sys_path": sys.path,
    }))
""")

_IMPORT_BOTH = textwrap.dedent("""
    import json
    import tasks
    assert tasks.MARKER == "dummy", tasks.MARKER
    import comfy_pipeline, comfy_pipeline.tasks, comfy_pipeline.blocks, comfy_pipeline.flows
    import comfy_pipeline.flows.generate_content, comfy_pipeline.flows.cli
    ns = {}
    exec("from comfy_pipeline.blocks import *", ns)
    assert "ComfyUIServer" in ns and "ComfyUIWorkflow" in ns, sorted(ns)
    print(json.dumps({
        "tasks": tasks.__file__,
        "namespace": list(comfy_pipeline.__path__),
        "modules": {m.__name__: m.__file__ for m in (comfy_pipeline.tasks, comfy_pipeline.blocks,
                                                     comfy_pipeline.flows, comfy_pipeline.flows.cli)},
    }))
""")

_IMPORT_OURS = textwrap.dedent("""
    import importlib.util, json
    import comfy_pipeline.tasks, comfy_pipeline.blocks, comfy_pipeline.flows
    import comfy_pipeline.flows.generate_content
    from comfy_pipeline.tasks import generate
    ns = {}
    exec("from comfy_pipeline.blocks import *", ns)
    print(json.dumps({"tasks": importlib.util.find_spec("tasks") is not None,
                      "file": comfy_pipeline.tasks.__file__}))
""")


def _json(proc: subprocess.CompletedProcess) -> dict:
    import json

    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        pytest.fail(f"no JSON on the last line of stdout\n{_explain(proc)}")


def _assert_help(script: Path, cwd: Path) -> None:
    proc = _run([script, "--help"], cwd=cwd, timeout=120)
    for command in ("run", "check"):
        assert re.search(rf"(?m)^\W*{command}\s", proc.stdout), f"`{command}` not listed\n{_explain(proc)}"


def test_wheel_installs_beside_a_foreign_top_level_tasks(wheel, tmp_path):
    venv = tmp_path / "venv"
    # Without pip: pip, setuptools and the dependencies come from the .pth below, which keeps
    # the fresh environment small and the test offline.
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp_path, timeout=120)
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    python = bin_dir / ("python.exe" if os.name == "nt" else "python")
    fresh_sp = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         cwd=tmp_path).stdout.strip())
    assert fresh_sp.is_dir() and fresh_sp.resolve().is_relative_to(venv.resolve()), fresh_sp

    # Lines of a .pth are appended to sys.path, but .pth files inside those directories are not
    # processed: the outer environment's editable-install finder (which maps comfy_pipeline to
    # this repository) stays out.
    outer = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"],
                           *site.getsitepackages()])
    (fresh_sp / "outer-site-packages.pth").write_text("".join(f"{p}\n" for p in outer if Path(p).is_dir()))

    before = _json(_run([python, "-c", _PROBE], cwd=tmp_path))
    assert before["comfy_pipeline"] is None, (
        f"comfy_pipeline importable before installing the wheel (from {before['comfy_pipeline']}): "
        f"the outer environment leaks in; sys.path={before['sys_path']}")
    assert not Path(before["prefect"]).resolve().is_relative_to(venv.resolve())
    assert not any(Path(p).resolve() == ROOT for p in before["sys_path"] if p), before["sys_path"]

    # A foreign distribution with a top-level ``tasks`` package.
    dummy = tmp_path / "dummy-src"
    (dummy / "tasks").mkdir(parents=True)
    (dummy / "tasks" / "__init__.py").write_text('MARKER = "dummy"\n')
    (dummy / "pyproject.toml").write_text(textwrap.dedent("""
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "dummy-tasks"
        version = "1.0"

        [tool.setuptools]
        packages = ["tasks"]
    """))
    pip = [python, "-m", "pip"]
    _run([*pip, "install", "--no-deps", "--no-build-isolation", dummy], cwd=tmp_path, timeout=180)
    # --ignore-installed: the outer environment's comfy-pipeline is visible through the .pth;
    # never let pip consider it for an upgrade or uninstall.
    _run([*pip, "install", "--no-deps", "--ignore-installed", wheel], cwd=tmp_path, timeout=180)

    # Both in one process, each from the fresh site-packages.
    both = _json(_run([python, "-c", _IMPORT_BOTH], cwd=tmp_path))
    fresh = fresh_sp.resolve()
    assert Path(both["tasks"]).resolve() == fresh / "tasks" / "__init__.py", both
    assert [Path(p).resolve() for p in both["namespace"]] == [fresh / "comfy_pipeline"], both
    for module, file in both["modules"].items():
        assert Path(file).resolve().is_relative_to(fresh / "comfy_pipeline"), (module, file)

    script = bin_dir / ("comfy-pipeline.exe" if os.name == "nt" else "comfy-pipeline")
    assert script.is_file(), f"no console script in {bin_dir}: {sorted(p.name for p in bin_dir.iterdir())}"
    _assert_help(script, tmp_path)

    # Removing the foreign distribution removes only its own files.
    _run([*pip, "uninstall", "-y", "dummy-tasks"], cwd=tmp_path, timeout=120)
    after = _json(_run([python, "-c", _IMPORT_OURS], cwd=tmp_path))
    assert after["tasks"] is False, "the dummy's tasks package is still importable after uninstalling it"
    assert Path(after["file"]).resolve().is_relative_to(fresh / "comfy_pipeline"), after
    _assert_help(script, tmp_path)

    records = list(fresh_sp.glob("comfy_pipeline-*.dist-info/RECORD"))
    assert len(records) == 1, records
    with records[0].open(newline="") as fh:
        recorded = [row[0] for row in csv.reader(fh) if row]
    gone = [p for p in recorded if not (fresh_sp / p).exists()]
    assert not gone, f"files of {DIST_NAME} gone after uninstalling dummy-tasks: {gone}"
    assert any(p.startswith("comfy_pipeline/tasks/") for p in recorded), recorded
