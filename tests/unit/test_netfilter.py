"""topologies.netfilter's decisions against a fake machine (sysctl files + an iptables that
keeps a FORWARD chain in memory): nothing to do, add rules, refuse with what to change, and
cleanup removing exactly the run's rules. tests/netns/test_netfilter_host.py does it for real."""

from __future__ import annotations

import logging
import shlex
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from topologies import netfilter
from topologies.errors import TopologyError
from topologies.netfilter import BridgeFilterError, open_bridges, plan, remove_run_rules, run_tag
from topologies.run import Run, clean_run

BRIDGES = ["s12", "s14", "s16"]
RUN_ID = "1201120000-ab12"


class FakeIptables:
    """``iptables`` (and ``iptables-legacy``) with one FORWARD chain each, in memory."""

    def __init__(self, policy: str = "ACCEPT", installed: bool = True, fail_insert: str = "",
                 fail_list: str = "", legacy_policy: str | None = None) -> None:
        self.chains: dict[str, dict] = {"iptables": {"policy": policy, "rules": []}}
        if legacy_policy is not None:
            self.chains["iptables-legacy"] = {"policy": legacy_policy, "rules": []}
        self.installed = installed
        self.fail_insert = fail_insert
        self.fail_list = fail_list
        self.calls: list[list[str]] = []

    def __call__(self, argv: Sequence[str]) -> subprocess.CompletedProcess:
        argv = list(argv)
        self.calls.append(argv)
        tool = argv[0]
        if not self.installed or tool not in self.chains:
            raise FileNotFoundError(2, "No such file or directory", tool)
        chain = self.chains[tool]
        args = argv[1:]
        if args[:2] == ["-w", netfilter.LOCK_WAIT]:
            args = args[2:]
        if args == ["-V"]:
            variant = "legacy" if tool.endswith("legacy") else "nf_tables"
            return self._done(argv, 0, f"iptables v1.8.9 ({variant})\n")
        if args == ["-S", "FORWARD"]:
            if self.fail_list:
                return self._done(argv, 4, "", self.fail_list)
            lines = [f"-P FORWARD {chain['policy']}"]
            lines += ["-A FORWARD " + " ".join(shlex.quote(p) if " " in p else
                                               (f'"{p}"' if p.startswith("moat-run:") else p)
                                               for p in rule) for rule in chain["rules"]]
            return self._done(argv, 0, "\n".join(lines) + "\n")
        op, name, *rule = args
        assert name == "FORWARD"
        if op == "-I":
            if self.fail_insert and len(chain["rules"]) >= 1:
                return self._done(argv, 2, "", self.fail_insert)
            chain["rules"].insert(0, rule)
            return self._done(argv, 0)
        if op == "-D":
            if rule in chain["rules"]:
                chain["rules"].remove(rule)
                return self._done(argv, 0)
            return self._done(argv, 1, "", "iptables: Bad rule (does a matching rule exist?).")
        raise AssertionError(f"unexpected call {argv}")

    @staticmethod
    def _done(argv: list[str], rc: int, out: str = "", err: str = "") -> subprocess.CompletedProcess:
        return subprocess.CompletedProcess(argv, rc, out, err)

    def rules(self, tool: str = "iptables") -> list[list[str]]:
        return self.chains[tool]["rules"]


def _proc(tmp_path: Path, value: str | None) -> Path:
    """A fake /proc/sys/net/bridge (no file at all: br_netfilter not loaded)."""
    d = tmp_path / "bridge"
    d.mkdir(exist_ok=True)
    if value is not None:
        (d / "bridge-nf-call-iptables").write_text(value + "\n")
    return d


def _legacy(tmp_path: Path, loaded: bool) -> Path:
    path = tmp_path / "ip_tables_names"
    if loaded:
        path.write_text("filter\n")
    return path


def _open(tmp_path: Path, nf: str | None, fake: FakeIptables, legacy: bool = False,
          recorded: list | None = None) -> netfilter.Plan:
    sink = recorded if recorded is not None else []
    return open_bridges(BRIDGES, RUN_ID, sink.extend, proc_bridge=_proc(tmp_path, nf),
                        runner=fake, legacy_tables=_legacy(tmp_path, legacy))


# --- nothing to do ---------------------------------------------------------------------------


@pytest.mark.parametrize("nf, policy", [(None, "DROP"), ("0", "DROP"), ("1", "ACCEPT")])
def test_nothing_to_do(tmp_path: Path, nf: str | None, policy: str) -> None:
    fake = FakeIptables(policy)
    recorded: list = []
    decision = _open(tmp_path, nf, fake, recorded=recorded)
    assert decision.action == "nothing"
    assert recorded == [] and fake.rules() == []
    assert not any(c[1:4] == ["-w", netfilter.LOCK_WAIT, "-I"] for c in fake.calls)


def test_no_br_netfilter_does_not_even_run_iptables(tmp_path: Path) -> None:
    fake = FakeIptables("DROP")
    assert _open(tmp_path, None, fake).action == "nothing"
    assert fake.calls == []


def test_iptables_not_installed_is_nothing_to_do_and_says_so(tmp_path: Path) -> None:
    decision = _open(tmp_path, "1", FakeIptables(installed=False))
    assert decision.action == "nothing"
    assert "iptables is not installed" in decision.message


# --- add rules -------------------------------------------------------------------------------


def test_drop_policy_adds_one_tagged_rule_per_bridge_recorded_first(tmp_path: Path) -> None:
    fake = FakeIptables("DROP")
    recorded: list = []
    order: list[str] = []

    def record(rules: list[dict]) -> None:
        order.append(f"recorded with {len(fake.rules())} rules in the chain")
        recorded.extend(rules)

    decision = open_bridges(BRIDGES, RUN_ID, record, proc_bridge=_proc(tmp_path, "1"),
                            runner=fake, legacy_tables=_legacy(tmp_path, False))
    assert decision.action == "accept"
    assert order == ["recorded with 0 rules in the chain"]
    assert len(fake.rules()) == 3
    for bridge in BRIDGES:
        rule = ["-i", bridge, "-o", bridge, "-m", "comment", "--comment", run_tag(RUN_ID),
                "-j", "ACCEPT"]
        assert rule in fake.rules()
        assert {"tool": "iptables", "rule": rule} in recorded
    assert fake.chains["iptables"]["policy"] == "DROP"  # never changed


def test_legacy_tables_next_to_nft_are_checked_too(tmp_path: Path) -> None:
    fake = FakeIptables("ACCEPT", legacy_policy="DROP")
    decision = _open(tmp_path, "1", fake, legacy=True)
    assert decision.action == "accept"
    assert fake.rules("iptables") == [] and len(fake.rules("iptables-legacy")) == 3


def test_legacy_tables_not_loaded_are_not_touched(tmp_path: Path) -> None:
    fake = FakeIptables("ACCEPT", legacy_policy="DROP")
    assert _open(tmp_path, "1", fake, legacy=False).action == "nothing"
    assert not any(c[0] == "iptables-legacy" for c in fake.calls)


def test_accepting_logs_exactly_one_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="topologies.netfilter"):
        _open(tmp_path, "1", FakeIptables("DROP"))
    lines = [r for r in caplog.records if r.name == "topologies.netfilter"]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    text = lines[0].getMessage()
    assert "bridge-nf-call-iptables = 1" in text and "DROP" in text
    assert "s12 s14 s16" in text and run_tag(RUN_ID) in text


# --- refuse ----------------------------------------------------------------------------------


def test_insert_failure_refuses_with_what_to_change_and_leaves_no_rule(tmp_path: Path) -> None:
    fake = FakeIptables("DROP", fail_insert="iptables: No chain/target/match by that name.")
    with pytest.raises(BridgeFilterError) as info:
        _open(tmp_path, "1", fake)
    assert isinstance(info.value, TopologyError)
    text = str(info.value)
    assert "No chain/target/match" in text
    assert "bridge-nf-call-iptables=0" in text and "iptables -P FORWARD ACCEPT" in text
    assert fake.rules() == []  # the one added before the failure was removed


def test_unreadable_policy_refuses(tmp_path: Path) -> None:
    fake = FakeIptables("DROP", fail_list="table `filter' is incompatible, use 'nft' tool.")
    with pytest.raises(BridgeFilterError, match="incompatible.*bridge-nf-call-iptables=0"):
        _open(tmp_path, "1", fake)


def test_plan_is_pure() -> None:
    states = [netfilter.ForwardState("iptables", "DROP")]
    assert plan(True, states, ["s1"], "r").rules == [
        {"tool": "iptables", "rule": ["-i", "s1", "-o", "s1", "-m", "comment", "--comment",
                                      "moat-run:r", "-j", "ACCEPT"]}]
    assert plan(False, states, ["s1"], "r").action == "nothing"


# --- cleanup ---------------------------------------------------------------------------------


def test_cleanup_removes_exactly_the_runs_rules(tmp_path: Path) -> None:
    fake = FakeIptables("DROP")
    other = ["-i", "docker0", "-o", "docker0", "-j", "ACCEPT"]
    other_run = ["-i", "s12", "-o", "s12", "-m", "comment", "--comment",
                 run_tag("1201120000-ffff"), "-j", "ACCEPT"]
    fake.rules().extend([other, other_run])
    recorded: list = []
    _open(tmp_path, "1", fake, recorded=recorded)
    assert len(fake.rules()) == 5
    removed = remove_run_rules(RUN_ID, recorded, runner=fake, tools=["iptables"])
    assert len(removed) == 3
    assert fake.rules() == [other, other_run]
    assert remove_run_rules(RUN_ID, recorded, runner=fake, tools=["iptables"]) == []  # repeatable


def test_cleanup_finds_tagged_rules_without_a_record(tmp_path: Path) -> None:
    fake = FakeIptables("DROP")
    _open(tmp_path, "1", fake)
    removed = remove_run_rules(RUN_ID, [], runner=fake, tools=["iptables"])
    assert len(removed) == 3 and fake.rules() == []


def test_cleanup_ignores_a_record_of_another_run() -> None:
    fake = FakeIptables("DROP")
    rule = ["-i", "s12", "-o", "s12", "-m", "comment", "--comment", run_tag("other"),
            "-j", "ACCEPT"]
    fake.rules().append(rule)
    assert remove_run_rules(RUN_ID, [{"tool": "iptables", "rule": rule}], runner=fake,
                            tools=["iptables"]) == []
    assert fake.rules() == [rule]


def test_cleanup_without_iptables_is_quiet() -> None:
    assert remove_run_rules(RUN_ID, [], runner=FakeIptables(installed=False),
                            tools=["iptables"]) == []


def test_clean_run_removes_the_recorded_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """moat clean / down: clean_run reads run.json's forward_rules and deletes them."""
    fake = FakeIptables("DROP")
    run = Run(RUN_ID, tmp_path / "runs").create()
    _open(tmp_path, "1", fake, recorded=run.state.forward_rules)
    run.save()
    assert Run.load(RUN_ID, tmp_path / "runs").state.forward_rules == run.state.forward_rules
    seen: list = []

    def fake_remove(run_id: str, recorded: list, **kw: object) -> list[str]:
        seen.append((run_id, recorded))
        return remove_run_rules(run_id, recorded, runner=fake, tools=["iptables"])

    monkeypatch.setattr("topologies.run.remove_run_rules", fake_remove)
    monkeypatch.setattr("topologies.run.processes_of_run", lambda run_id: [])
    removed = clean_run(RUN_ID, tmp_path / "runs")
    assert seen == [(RUN_ID, run.state.forward_rules)]
    assert sum("FORWARD rule" in line for line in removed) == 3
    assert fake.rules() == []
