"""An object's interpreter stays reachable under its private /tmp (a checkout under /tmp,
as CI clones one, has its virtual environment there)."""

from __future__ import annotations

from pathlib import Path

from agent.hosting.sandbox import SandboxSpec, interpreter_paths


def _venv(root: Path) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "pyvenv.cfg").write_text("home = /usr/bin\n")
    python = root / "bin" / "python"
    python.symlink_to("/usr/bin/python3")
    return python


def test_a_venv_interpreter_exposes_its_whole_environment(tmp_path: Path) -> None:
    python = _venv(tmp_path / ".venv")
    assert interpreter_paths([str(python), "-m", "x"]) == [str(tmp_path / ".venv")]


def test_a_plain_program_exposes_itself_and_a_bare_name_nothing(tmp_path: Path) -> None:
    tool = tmp_path / "tool"
    tool.write_text("#!/bin/sh\n")
    assert interpreter_paths([str(tool)]) == [str(tool)]
    assert interpreter_paths(["python3"]) == []
    assert interpreter_paths([]) == []


def test_the_launch_spec_exposes_the_interpreters_environment(tmp_path: Path) -> None:
    python = _venv(tmp_path / ".venv")
    spec = SandboxSpec(workdir=tmp_path / "w", uid=620001, gid=620001)
    doc = spec.launch_spec([str(python), "-m", "agent.hosting.runner"], None)
    assert str(tmp_path / ".venv") in doc["expose"]


def test_the_objects_pythonpath_holds_the_repository_root() -> None:
    """Objects import ``agent`` and ``packets`` from the checkout, not through the venv."""
    from agent.hosting.runtime import REPO

    assert (REPO / "agent" / "sdk.py").is_file() and (REPO / "packets").is_dir()
