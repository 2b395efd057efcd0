"""A MOAT run: its id, its directory, and exactly what it created, so it can be removed.

Every process a run starts (Mininet's node shells, agent daemons, object processes)
carries ``MOAT_RUN_ID=<id>`` in its environment, every root-namespace interface the run
creates (bridges, switch-side veth ends) carries the run's tag (``m3f9c-s16``, reserved in
``<run root>/tags/``, :mod:`topologies.naming`) and is recorded in ``run.json`` before it is
built, as
is every FORWARD rule it adds for its bridges (each also commented ``moat-run:<run-id>``), and
every cgroup it makes is named ``moat-<run-id>-...``. ``moat clean`` therefore finds a run's leftovers by its id even after the process
that made them was killed with SIGKILL, and never touches anything by a broad name.

Layout::

    $MOAT_RUN_ROOT (default /tmp/moat, root's, 0755)/
        tags/<tag> -> <run-id>  the run's tag for its root-namespace names (a symlink: made
                              atomically, so two runs never get the same tag)
        <run-id>/             0700 root: everything the run writes, secrets included
            run.json          what was created (pids, interfaces, sockets)
            <node>.json       an agent's configuration
            <node>.sock       an agent's control socket
            <node>.log        an agent's log
            captures/         pcaps (0700; files 0600, written by root)
            objects -> ../sandbox/<run-id>/objects
            vm      -> ../sandbox/<run-id>/vm
        sandbox/<run-id>/     0755 root: only what sandboxed objects must reach (their
                              working directories, the VMs' installed code); no secret

The run directory is root-only from its creation (``os.mkdir(path, 0o700)``: the mode is
given to the system call, never widened by a umask and never set by a ``chmod`` after), so
no other user, a sandboxed object included, can enter it, and every file MOAT writes in it
is made 0600 from creation as well (:func:`write_private_file`, :func:`private_umask`).
Objects run as other users and must reach their working directories and code, so those
live beside it, in the run's sandbox directory; the two links keep the agents' paths
(``<run>/objects``, ``<run>/vm/<router>``) working for root, while an object is only ever
given the resolved path.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import stat
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from agent.core.wait import WaitTimeout, wait_until
from topologies.naming import choose_tag, is_tag
from topologies.netfilter import remove_run_rules

log = logging.getLogger(__name__)

ENV_RUN_ID = "MOAT_RUN_ID"
ENV_RUN_ROOT = "MOAT_RUN_ROOT"
DEFAULT_RUN_ROOT = "/tmp/moat"
STATE_FILE = "run.json"
#: ``<run root>/sandbox/<run-id>``: what the run's sandboxed objects may reach (no secret).
SANDBOX_DIR = "sandbox"
#: ``<run root>/tags/<tag>``: a symlink to the run id that holds the tag (see reserve_tag).
TAGS_DIR = "tags"
#: Names under the run root that are not runs.
NOT_RUNS = (SANDBOX_DIR, TAGS_DIR)
SYS_CLASS_NET = Path("/sys/class/net")
#: Links in the run directory to the run's sandbox directory (see the module docstring).
SANDBOX_LINKS = ("objects", "vm")
#: A private file or directory of a run: read and written by its owner (root) only.
PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700


class RunDirError(OSError):
    """A run directory (or the run root above it) that is not safe to keep secrets in."""


def run_root() -> Path:
    return Path(os.environ.get(ENV_RUN_ROOT, DEFAULT_RUN_ROOT))


@contextlib.contextmanager
def private_umask() -> Iterator[None]:
    """Run the block with umask 077: files and directories it creates (through code that
    does not give a mode, e.g. ``Path.write_text``, ``mkdir()``, a key generator) are owner-
    only from creation. The umask is per process, so keep the block short and free of
    threads that must create shared files."""
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def write_private_file(path: Path, data: str | bytes, mode: int = PRIVATE_FILE_MODE,
                       group: int | None = None) -> Path:
    """Write ``path`` atomically with ``mode`` from creation: a new temporary file beside it
    is made with ``mode`` by ``open(O_CREAT | O_EXCL | O_NOFOLLOW)`` (optionally given to
    ``group`` before anything is written), filled, flushed and renamed over ``path``. No
    reader ever sees it with wider permissions or half written; nothing is chmod-ed after."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        if group is not None:
            os.fchown(fd, -1, group)
        if os.fstat(fd).st_mode & 0o777 != mode:
            os.fchmod(fd, mode)  # a umask took bits away; never adds more than ``mode``
        with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as fh:
            fd = -1
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    return path


def make_private_dir(path: Path) -> Path:
    """``os.mkdir(path, 0o700)``: owner-only from creation (a umask can only take bits away
    from 0700). An existing directory must be a real one (not a link), ours, and private."""
    path = Path(path)
    try:
        os.mkdir(path, PRIVATE_DIR_MODE)
    except FileExistsError:
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise RunDirError(f"{path} exists and is not a private directory of uid "
                              f"{os.geteuid()} (mode {oct(stat.S_IMODE(st.st_mode))})") from None
    return path


def ensure_run_root(base: Path) -> Path:
    """The run root (``/tmp/moat``): made 0755 if missing; an existing one must be a real
    directory of ours that nobody else can write (else another user could swap a run's
    directory or its sandbox directory for a link of their own)."""
    base = Path(base)
    try:
        os.mkdir(base, 0o755)
    except FileExistsError:
        pass
    st = os.lstat(base)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise RunDirError(f"run root {base} must be a directory owned by uid {os.geteuid()} "
                          f"and writable by it only (mode {oct(stat.S_IMODE(st.st_mode))})")
    return base


def new_run_id() -> str:
    """Short, unique enough to tell runs apart in `ps` and file names."""
    return time.strftime("%m%d%H%M%S") + "-" + secrets.token_hex(2)


@dataclass
class RunState:
    """What ``run.json`` holds."""

    run_id: str
    topo: str = ""
    owner_pid: int = 0
    started: float = field(default_factory=time.time)
    status: str = "starting"
    agents: dict[str, str] = field(default_factory=dict)  # node -> control socket
    root_links: list[str] = field(default_factory=list)  # root-namespace interfaces
    bridges: list[str] = field(default_factory=list)
    node_pids: dict[str, int] = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    #: FORWARD rules letting the bridges' traffic through (topologies.netfilter), recorded
    #: before they are added: ``{"tool": "iptables", "rule": [...]}``.
    forward_rules: list[dict] = field(default_factory=list)
    #: The run's tag (``m3f9c``): every root-namespace name it creates starts ``<tag>-``.
    tag: str = ""


class Run:
    """One run's directory and state file."""

    def __init__(self, run_id: str | None = None, root: Path | None = None) -> None:
        self.run_id = run_id or new_run_id()
        if not self.run_id or "/" in self.run_id or self.run_id.startswith(".") \
                or self.run_id in NOT_RUNS:
            raise ValueError(f"bad run id {self.run_id!r}")
        self.root = root or run_root()
        self.dir = self.root / self.run_id
        #: What the run's sandboxed objects may reach (see the module docstring).
        self.sandbox_dir = self.root / SANDBOX_DIR / self.run_id
        self.state = RunState(self.run_id)

    @classmethod
    def load(cls, run_id: str, root: Path | None = None) -> "Run":
        run = cls(run_id, root)
        data = json.loads((run.dir / STATE_FILE).read_text())
        run.state = RunState(**data)
        return run

    def create(self) -> "Run":
        """Make the run directory root-only (0700) from its creation, its ``captures``
        (0700), its sandbox directory (0755, for the objects) and the links to it."""
        ensure_run_root(self.root)
        os.mkdir(self.dir, PRIVATE_DIR_MODE)  # FileExistsError: never reuse a directory
        make_private_dir(self.dir / "captures")
        ensure_run_root(self.root / SANDBOX_DIR)
        os.mkdir(self.sandbox_dir, 0o755)
        for name in SANDBOX_LINKS:
            os.mkdir(self.sandbox_dir / name, 0o755)
            os.symlink(self.sandbox_dir / name, self.dir / name)
        self.state.owner_pid = os.getpid()
        self.save()
        return self

    def reserve_tag(self, interfaces: Iterable[str] | None = None) -> str:
        """Choose and hold the run's tag for its root-namespace names (once; saved in
        ``run.json``). Held by ``os.symlink(<run-id>, <run root>/tags/<tag>)``, which fails
        if another run holds that tag, so two runs starting at once never share one; a tag
        an existing interface carries (``<tag>-...``) is never chosen. Released by
        :func:`clean_run`."""
        if self.state.tag:
            return self.state.tag
        tags = ensure_run_root(self.root / TAGS_DIR)

        def taken(tag: str) -> bool:
            try:
                os.symlink(self.run_id, tags / tag)
            except FileExistsError:
                return True
            return False

        self.state.tag = choose_tag(_interfaces() if interfaces is None else interfaces, taken)
        self.save()
        return self.state.tag

    def save(self) -> None:
        write_private_file(self.dir / STATE_FILE, json.dumps(asdict(self.state), indent=2))

    def write_private(self, stem: str, text: str) -> Path:
        """A new file ``<stem>-<random>.json`` in the run directory that only root can read
        (a message that carries keys, for a child process: a command line is visible to
        every user). The caller removes it."""
        if not stem.isidentifier():
            raise ValueError(f"bad file stem {stem!r}")
        path = self.dir / f"{stem}-{secrets.token_hex(6)}.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, PRIVATE_FILE_MODE)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        return path

    def socket(self, node: str) -> Path:
        return self.dir / f"{node}.sock"


def list_runs(root: Path | None = None) -> list[Run]:
    """Runs with a readable state file, newest first."""
    base = root or run_root()
    runs = []
    if base.is_dir():
        for d in base.iterdir():
            if d.name in NOT_RUNS:
                continue
            try:
                runs.append(Run.load(d.name, base))
            except (OSError, ValueError, TypeError):
                continue
    return sorted(runs, key=lambda r: -r.state.started)


def live_runs(root: Path | None = None) -> list[Run]:
    return [r for r in list_runs(root) if r.state.status == "up" and pid_alive(r.state.owner_pid)]


def stop_child(proc: subprocess.Popen, timeout: float = 5.0, terminate: bool = True) -> int:
    """End a child this run started: SIGTERM (unless it is already on its way out:
    ``terminate=False``), wait up to ``timeout`` s, then SIGKILL. Returns its status."""
    if terminate and proc.poll() is None:
        proc.terminate()
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _run_ids_by_pid() -> dict[int, str]:
    """``{pid: run id}`` for every process started with ``MOAT_RUN_ID`` in its environment.

    ``/proc/<pid>/environ`` shows the environment a process was *started* with, so a process
    that sets ``os.environ[MOAT_RUN_ID]`` to pass it to its children (the run's owner, a test)
    is not listed itself; only the children are.
    """
    prefix = f"{ENV_RUN_ID}=".encode()
    me = os.getpid()
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            env = (entry / "environ").read_bytes()
        except OSError:
            continue
        for var in env.split(b"\0"):
            if var.startswith(prefix):
                found[int(entry.name)] = var[len(prefix):].decode(errors="replace")
                break
    return found


def _run_ids_by_cmdline() -> dict[int, str]:
    """``{pid: run id}`` for processes whose command line names a run directory.

    Some daemons rewrite their argv/environ area to show a status (sshd's "[listener]"),
    which erases ``MOAT_RUN_ID`` from ``/proc/<pid>/environ``; the configuration path they
    were started with (``<run root>/<run-id>/...``) stays in the command line."""
    root = str(run_root()).rstrip("/") + "/"
    me = os.getpid()
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        at = cmdline.find(root)
        if at >= 0:
            run_id = cmdline[at + len(root):].split("/", 1)[0].split(" ", 1)[0]
            if run_id:
                found[int(entry.name)] = run_id
    return found


def processes_of_run(run_id: str) -> list[int]:
    """PIDs of run ``run_id``, found by environment or by a command line naming the run's
    directory — never by process name."""
    by_env = [pid for pid, rid in _run_ids_by_pid().items() if rid == run_id]
    by_cmdline = [pid for pid, rid in _run_ids_by_cmdline().items() if rid == run_id]
    return sorted(set(by_env) | set(by_cmdline))


def _kill_all(pids: Iterable[int], timeout: float = 3.0) -> None:
    pids = list(pids)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    try:
        wait_until(lambda: not any(pid_alive(p) for p in pids), timeout, interval=0.05,
                   what="the run's processes gone after SIGTERM")
    except WaitTimeout:
        pass  # what ignored SIGTERM gets SIGKILL below
    for pid in pids:
        if pid_alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _link_exists(name: str) -> bool:
    return (SYS_CLASS_NET / name).exists()


def _interfaces() -> list[str]:
    try:
        return os.listdir(SYS_CLASS_NET)
    except OSError:
        return []


def _tags_of(run_id: str, base: Path) -> list[str]:
    """The tags ``<run root>/tags/`` holds for ``run_id`` (its run.json may be gone)."""
    tags = base / TAGS_DIR
    found = []
    try:
        entries = list(tags.iterdir())
    except OSError:
        return []
    for entry in entries:
        try:
            if is_tag(entry.name) and os.readlink(entry) == run_id:
                found.append(entry.name)
        except OSError:
            continue
    return found


def _names_of_other_runs(run_id: str, base: Path) -> set[str]:
    """Root-namespace names recorded by every other run under ``base``."""
    names: set[str] = set()
    for run in list_runs(base):
        if run.run_id != run_id:
            names.update(run.state.root_links, run.state.bridges)
    return names


def run_links(run_id: str, state: "RunState | None", tags: Iterable[str],
              existing: Iterable[str], others: set[str]) -> tuple[list[str], list[str]]:
    """Which root-namespace interfaces are run ``run_id``'s to remove (pure): those it
    recorded and those that exist carrying one of its ``tags``; never one another run
    recorded, and, for a run with a tag, never a recorded name without it. Returns
    (to remove, refused)."""
    existing = set(existing)
    prefixes = tuple(f"{t}-" for t in tags)
    recorded = [] if state is None else [*state.root_links, *state.bridges]
    tagged = sorted(n for n in existing if prefixes and n.startswith(prefixes))
    remove: list[str] = []
    refused: list[str] = []
    for name in dict.fromkeys([*recorded, *tagged]):
        if name in others or (state is not None and state.tag
                              and not name.startswith(f"{state.tag}-")):
            refused.append(name)
        elif name in existing:
            remove.append(name)
    return remove, refused


#: Where a run's eBPF tunnels pin their programs and maps (agent.mobility.tunnel.ebpf_loader):
#: ``<BPF_PIN_ROOT>/<run-id>/...``.
BPF_PIN_ROOT = Path("/sys/fs/bpf/moat")


#: ``moat up`` writes its holder's output to ``<UP_LOG_DIR>/moat-up-<run-id>.log`` until the
#: run's directory exists (experiments/cli.py); a start that failed leaves it for the user.
UP_LOG_DIR = Path("/tmp")


def remove_bpf_pins(run_id: str, pin_root: Path = BPF_PIN_ROOT) -> list[str]:
    """Unpin what run ``run_id``'s eBPF tunnels left under ``<pin_root>/<run-id>`` (an agent
    killed with SIGKILL does not unpin); nothing of another run. Returns what went."""
    if not run_id or "/" in run_id or run_id.startswith("."):
        return []
    top = pin_root / run_id
    if not top.is_dir() or top.is_symlink():
        return []
    for dirpath, dirnames, filenames in os.walk(top, topdown=False):
        for name in filenames:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(dirpath, name))
        with contextlib.suppress(OSError):
            os.rmdir(dirpath)
    return [] if top.exists() else [f"bpf pins {top}"]


def clean_run(run_id: str, root: Path | None = None, keep_dir: bool = False) -> list[str]:
    """Remove everything run ``run_id`` made; return what was removed. Safe to repeat.

    ``keep_dir`` keeps the run directory (logs, captures) after an orderly stop.
    """
    base = root or run_root()
    removed: list[str] = []
    pids = processes_of_run(run_id)
    if pids:
        _kill_all(pids)
        removed.append(f"processes {sorted(pids)}")
    state: RunState | None = None
    try:
        state = Run.load(run_id, base).state
    except (OSError, ValueError, TypeError):
        pass
    try:
        from agent.hosting.cgroups import CgroupError, clean_run as clean_cgroups

        cg_removed, cg_kept = clean_cgroups(run_id)
        removed += [f"cgroup {d}" for d in cg_removed]
        for d in cg_kept:
            log.warning("clean %s: kept cgroup %s (it holds processes that are not MOAT's)", run_id, d)
    except (CgroupError, OSError) as exc:
        log.warning("clean %s: cgroups not cleaned: %s", run_id, exc)
    tags = sorted({*_tags_of(run_id, base), *([state.tag] if state and state.tag else [])})
    links, refused = run_links(run_id, state, tags, _interfaces(),
                               _names_of_other_runs(run_id, base))
    for name in refused:
        log.warning("clean %s: left interface %s alone (another run's, or not of this run's "
                    "tag)", run_id, name)
    for name in links:
        if _link_exists(name):  # a port goes with its bridge's peer; check again
            subprocess.run(["ip", "link", "del", name], capture_output=True, timeout=10)
            removed.append(f"link {name}")
    removed += remove_bpf_pins(run_id)
    # The recorded rules, and any other rule tagged with this run id (run.json gone).
    removed += remove_run_rules(run_id, state.forward_rules if state is not None else [])
    run_dir = base / run_id
    if run_dir.exists() and not keep_dir:
        shutil.rmtree(run_dir, ignore_errors=True)
        removed.append(f"dir {run_dir}")
    sandbox = base / SANDBOX_DIR / run_id
    if run_id not in NOT_RUNS and "/" not in run_id and sandbox.exists() and not keep_dir:
        shutil.rmtree(sandbox, ignore_errors=True)
        removed.append(f"dir {sandbox}")
    up_log = UP_LOG_DIR / f"moat-up-{run_id}.log"
    if run_id not in NOT_RUNS and "/" not in run_id and up_log.is_file() and not keep_dir:
        up_log.unlink(missing_ok=True)
        removed.append(f"file {up_log}")
    if not keep_dir:  # the tag stays held while the run's directory (and run.json) stays
        for tag in tags:
            with contextlib.suppress(OSError):
                if os.readlink(base / TAGS_DIR / tag) == run_id:
                    (base / TAGS_DIR / tag).unlink()
                    removed.append(f"tag {tag}")
    for line in removed:
        log.info("clean %s: removed %s", run_id, line)
    return removed


def clean_all(root: Path | None = None) -> dict[str, list[str]]:
    """Clean every run: those with a directory under the run root, and those whose
    processes still carry a run id after their directory was removed."""
    base = root or run_root()
    ids = set(_run_ids_by_pid().values()) | set(_run_ids_by_cmdline().values())
    if base.is_dir():
        ids |= {d.name for d in base.iterdir() if d.is_dir() and d.name not in NOT_RUNS}
    if (base / SANDBOX_DIR).is_dir():
        ids |= {d.name for d in (base / SANDBOX_DIR).iterdir() if d.is_dir()}
    if (base / TAGS_DIR).is_dir():
        for entry in (base / TAGS_DIR).iterdir():
            with contextlib.suppress(OSError):
                ids.add(os.readlink(entry))
    ids -= set(NOT_RUNS)
    ids = {i for i in ids if i and "/" not in i and not i.startswith(".")}
    return {rid: clean_run(rid, base) for rid in sorted(ids)}
