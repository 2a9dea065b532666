"""runstate as a user gets it: a wheel installed with ``[torch,cli]`` into a fresh virtualenv.

The rest of the suite imports runstate from ``src/`` (an editable install, or ``PYTHONPATH``), so it
cannot see what only a real install shows: a file left out of the wheel, a module the extras do not
pull in (``runstate demo`` without matplotlib), an example that works only from the repository root.
This test builds a wheel from a copy of the source tree, installs ``runstate[torch,cli]`` from it,
non-editable, into a new virtualenv, and runs from an empty directory outside the repository:

1. the README quickstart exactly as printed, then ``runstate ls`` and ``runstate verify`` on its run;
2. ``runstate demo`` through the installed ``runstate`` executable;
3. ``import runstate`` (no torch imported, the module file inside the new virtualenv);
4. a check that the installed package ships ``py.typed``.

Dependencies resolve against the pins of ``requirements-dev.txt`` (torch 2.13.0, the CPU build on
this machine's disk) and, for packages that file does not name, the versions installed next to
the running interpreter, so the new environment holds the releases the suite is tested with and
never a CUDA build of torch. pip is the running interpreter's, pointed at the new environment with
``--python``; byte-compilation is left to the first import (``--no-compile``), which is where most
of the install time would otherwise go. The durations of each phase are printed (``-rP`` shows them).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest

from tests.test_readme import quickstart

ROOT = Path(__file__).resolve().parents[1]
DEMO_ARGS = ["--steps", "240", "--seed", "3"]  # as tests/test_demo.py: the SIGKILL lands after a checkpoint
PICTURE_HINT = "pip install 'runstate[demo]'"


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _constraints(path: Path) -> str:
    """Write pip's pins to ``path``: requirements-dev.txt first, then every other distribution installed here.

    Returns:
        The pinned torch version.
    """
    pins: dict[str, str] = {}
    for line in (ROOT / "requirements-dev.txt").read_text().splitlines():
        req = line.split("#", 1)[0].strip()
        if req:
            name, sep, version = req.partition("==")
            assert sep, f"requirements-dev.txt: {req!r} is not pinned with =="
            name = re.sub(r"\[.*\]", "", name).strip()  # constraints take no extras (moto[server])
            pins[_canonical(name)] = f"{name}=={version.strip()}"
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name and _canonical(name) not in pins and _canonical(name) != "runstate":
            pins[_canonical(name)] = f"{name}=={dist.version}"
    path.write_text("\n".join(sorted(pins.values())) + "\n")
    return pins["torch"].partition("==")[2]


def _build_wheel(tmp: Path) -> Path:
    """Build the wheel from a copy of what an sdist holds, so no build/ or egg-info lands in the tree."""
    src = tmp / "source"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc"))
    out = tmp / "dist"
    _ok(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(src), "-w", str(out)],
        timeout=600,
    )
    (wheel,) = out.glob("runstate-*.whl")
    return wheel


def _ok(
    cmd: list[str], *, timeout: float, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd``; fail the test with its output unless it exits 0."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _user_env(venv: Path) -> dict[str, str]:
    """The environment of a user who activated the new virtualenv: none of the test run's PYTHON* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k != "VIRTUAL_ENV"}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    return env


@pytest.mark.e2e
def test_wheel_in_a_fresh_virtualenv_runs_the_quickstart_and_the_demo(tmp_path: Path) -> None:
    times: dict[str, float] = {}
    t = time.monotonic()
    wheel = _build_wheel(tmp_path)
    times["wheel"] = time.monotonic() - t

    venv = tmp_path / "venv"
    try:
        t = time.monotonic()
        _ok([sys.executable, "-m", "venv", "--without-pip", str(venv)], timeout=300)
        py = venv / "bin" / "python"
        constraints = tmp_path / "constraints.txt"
        torch_pin = _constraints(constraints)
        pip = [sys.executable, "-m", "pip", "--python", str(py), "install", "--no-compile", "-c", str(constraints)]
        env = _user_env(venv)  # also for pip: a PYTHONPATH=src would show it src/runstate.egg-info as installed
        _ok([*pip, f"runstate[torch,cli] @ {wheel.as_uri()}"], timeout=1200, env=env)
        times["venv + install"] = time.monotonic() - t

        work = tmp_path / "user"  # empty, outside the repository: the source tree is not importable from here
        work.mkdir()
        (work / "demo").mkdir()
        t = time.monotonic()
        demo = subprocess.Popen(
            [str(venv / "bin" / "runstate"), "demo", *DEMO_ARGS, "--out", "out"],
            cwd=work / "demo",
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            # 3 and 4: a non-editable install inside the new environment, torch not imported, py.typed shipped.
            probe = _ok(
                [
                    str(py), "-c",
                    "import importlib.metadata as m, importlib.util, pathlib, sys, runstate;"
                    "assert 'torch' not in sys.modules, 'import runstate imported torch';"
                    "pkg = pathlib.Path(runstate.__file__).resolve().parent;"
                    "print(pkg); print((pkg / 'py.typed').is_file()); print(m.version('torch'));"
                    "print(sorted(d.metadata['Name'] for d in m.distributions() if d.metadata['Name'].startswith('nvidia')));"
                    "print(importlib.util.find_spec('matplotlib') is None)",
                ],
                cwd=work, env=env, timeout=300,
            ).stdout.splitlines()  # fmt: skip
            package, typed, torch_version, nvidia, no_matplotlib = probe
            assert Path(package).is_relative_to(venv.resolve() / "lib"), package
            assert not Path(package).is_relative_to(ROOT), package
            assert typed == "True", f"py.typed is missing from the installed package {package}"
            assert torch_version.split("+")[0] == torch_pin, f"torch {torch_version} installed, {torch_pin} pinned"
            assert nvidia == "[]", f"a CUDA build of torch came in: {nvidia}"
            assert no_matplotlib == "True"  # what [torch,cli] leaves out: the demo must do without it

            # 1: the quickstart exactly as README.md prints it; it prints nothing, and leaves three checkpoints.
            (work / "quickstart.py").write_text(quickstart())
            t_quick = time.monotonic()
            run = _ok([str(py), "quickstart.py"], cwd=work, env=env, timeout=900)
            assert run.stdout == "" and run.stderr == "", run.stdout + run.stderr
            ls = _ok([str(venv / "bin" / "runstate"), "ls", "runs/exp1"], cwd=work, env=env, timeout=300)
            assert "latest step 300" in ls.stdout and "Traceback" not in ls.stdout + ls.stderr, ls.stdout + ls.stderr
            verify = _ok(
                [str(venv / "bin" / "runstate"), "verify", "runs/exp1", "--step", "latest"],
                cwd=work, env=env, timeout=300,
            )  # fmt: skip
            assert verify.stdout.startswith("OK") and "step-000000000300" in verify.stdout, verify.stdout
            times["quickstart + ls + verify"] = time.monotonic() - t_quick

            # 2: the demo, started above, runs next to the checks and finishes by its own verdict.
            out, err = demo.communicate(timeout=1200)
        finally:
            if demo.poll() is None:
                demo.kill()
                demo.communicate()
        times["demo (alongside the checks)"] = time.monotonic() - t
        assert demo.returncode == 0, out + err
        assert "Traceback" not in out + err, out + err
        assert "OK: (b) is bit-identical to (a)" in out, out
        assert PICTURE_HINT in out and not (work / "demo" / "out" / "loss.png").exists(), out
    finally:
        shutil.rmtree(venv, ignore_errors=True)  # about 1 GB, mostly torch
    print("install test durations: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
