"""agent.core.config: JSON round trips and the errors a broken configuration must raise."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from agent.core.config import (
    AgentConfig,
    Credential,
    ForeignConfig,
    HomeConfig,
    HomeObject,
    Interface,
    ObjectConfig,
)
from agent.core.errors import AgentError, ConfigError


def full_config() -> AgentConfig:
    return AgentConfig(
        name="r1",
        run_dir="/tmp/moat-run-x",
        roles=["home", "foreign"],
        interfaces=[Interface("r1-eth0", "10.0.1.1", 24), Interface("r1-eth1", "10.9.0.1", 30, advertise=False)],
        advertise_interval=0.5,
        advertisement_lifetime=1800,
        home=HomeConfig(
            objects=[HomeObject("10.0.1.10", "cam@home.moat", Credential(0x1001, bytes(range(32))))],
            trusted_foas=[Credential(300, b"\x00\xff fh"), Credential(301, b"k2")],
            max_bindings=3,
            max_lifetime=120,
            replay_window=5.5,
            home_interface="r1-eth0",
        ),
        foreign=ForeignConfig(
            trusted_objects=[Credential(0x2002, b"mf")],
            foreign_home=Credential(300, b"\x00\xff fh"),
            max_visitors=10,
            max_lifetime=90,
        ),
        log_level="DEBUG",
        tunnel_backend="userspace",
    )


def as_json(cfg: AgentConfig) -> dict:
    """What a topology writes: the config through real JSON text."""
    return json.loads(json.dumps(cfg.to_json()))


def test_agent_config_round_trip() -> None:
    cfg = full_config()
    data = as_json(cfg)
    assert data["home"]["objects"][0]["mobile_home"] == {"spi": 0x1001, "key": bytes(range(32)).hex()}
    assert data["foreign"]["foreign_home"]["key"] == b"\x00\xff fh".hex()
    back = AgentConfig.from_json(data)
    assert back == cfg
    assert isinstance(back.home.objects[0].mobile_home.key, bytes)
    assert back.interfaces[1].advertise is False
    assert back.addresses == {"10.0.1.1", "10.9.0.1"}
    assert back.socket_path == Path("/tmp/moat-run-x/r1.sock")


def test_agent_config_write_load(tmp_path: Path) -> None:
    cfg = full_config()
    path = tmp_path / "r1.json"
    cfg.write(path)
    assert AgentConfig.load(path) == cfg


def test_minimal_foreign_only_config_round_trip() -> None:
    cfg = AgentConfig("r2", "/tmp/x", ["foreign"], [Interface("r2-eth0", "10.0.2.1")],
                      foreign=ForeignConfig(foreign_home=Credential(256, b"k")))
    back = AgentConfig.from_json(as_json(cfg))
    assert back == cfg
    assert back.home is None
    assert back.foreign.max_visitors == 64 and back.foreign.max_lifetime == 300


def test_defaults_when_optional_keys_absent() -> None:
    data = {"name": "r3", "run_dir": "/tmp/x", "roles": ["home"],
            "interfaces": [{"name": "e0", "address": "10.0.3.1"}],
            "home": {"objects": []}}
    cfg = AgentConfig.from_json(data)
    assert cfg.home.max_bindings == 4 and cfg.home.replay_window == 7.0
    assert cfg.interfaces[0].prefix == 24 and cfg.interfaces[0].advertise
    assert cfg.tunnel_backend == "auto" and cfg.advertise_interval == 1.0


def mutated(fn) -> dict:
    data = as_json(full_config())
    fn(data)
    return data


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda d: d.update(roles=["home", "broker-of-doom"]), id="unknown-role"),
        pytest.param(lambda d: d["home"]["trusted_foas"][0].update(spi=255), id="fh-spi-255"),
        pytest.param(lambda d: d["home"]["objects"][0]["mobile_home"].update(spi=0), id="mh-spi-0"),
        pytest.param(lambda d: d["foreign"]["trusted_objects"][0].update(spi=100), id="mf-spi-100"),
        pytest.param(lambda d: d["foreign"].pop("foreign_home"), id="no-foreign-home"),
        pytest.param(lambda d: d["foreign"].update(foreign_home=None), id="null-foreign-home"),
        pytest.param(lambda d: d.pop("foreign"), id="foreign-role-no-section"),
        pytest.param(lambda d: d.pop("home"), id="home-role-no-section"),
        pytest.param(lambda d: d["foreign"]["foreign_home"].update(key="zz11"), id="bad-hex"),
        pytest.param(lambda d: d["home"]["objects"][0]["mobile_home"].update(key="abc"), id="odd-hex"),
        pytest.param(lambda d: d["home"]["trusted_foas"][0].update(key=""), id="empty-key"),
        pytest.param(lambda d: d["home"]["trusted_foas"][0].update(key=42), id="key-not-str"),
        pytest.param(lambda d: d["home"]["trusted_foas"][0].pop("spi"), id="no-spi"),
        pytest.param(lambda d: d["home"]["trusted_foas"][0].update(spi="x"), id="spi-not-int"),
        pytest.param(lambda d: d.pop("name"), id="no-name"),
        pytest.param(lambda d: d.update(interfaces=[]), id="no-interfaces"),
        pytest.param(lambda d: d["interfaces"][0].update(bogus=1), id="interface-extra-key"),
        pytest.param(lambda d: d.update(advertise_interval=0), id="zero-interval"),
        pytest.param(lambda d: d.update(tunnel_backend="ovs"), id="bad-backend"),
        pytest.param(lambda d: d["home"].update(max_bindings="many"), id="max-bindings-not-int"),
    ],
)
def test_bad_agent_config_raises_config_error(mutate) -> None:
    with pytest.raises(ConfigError):
        AgentConfig.from_json(mutated(mutate))


def test_config_error_is_an_agent_error() -> None:
    assert issubclass(ConfigError, AgentError)


def test_unknown_role_message_names_it() -> None:
    with pytest.raises(ConfigError, match="broker-of-doom"):
        AgentConfig.from_json(mutated(lambda d: d.update(roles=["broker-of-doom"])))


def test_load_missing_or_garbled_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        AgentConfig.load(tmp_path / "absent.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError):
        AgentConfig.load(bad)


def test_credential_spi_boundary() -> None:
    assert Credential.from_json({"spi": 256, "key": "00"}) == Credential(256, b"\x00")
    with pytest.raises(ConfigError):
        Credential.from_json({"spi": 255, "key": "00"})
    assert Credential(300, b"ab").to_json() == {"spi": 300, "key": "6162"}


def object_config() -> ObjectConfig:
    return ObjectConfig(
        name="cam",
        home_address="10.0.1.10",
        home_agent="10.0.1.1",
        nai="cam@home.moat",
        mobile_home=Credential(0x1001, b"mh key"),
        mobile_foreign=Credential(0x2002, b"mf key"),
        lifetime=45,
        simultaneous=True,
        reverse_tunnel=True,
        preferred_agent="10.0.2.1",
    )


def test_object_config_round_trip() -> None:
    obj = object_config()
    data = json.loads(json.dumps(obj.to_json()))
    assert data["mobile_home"] == {"spi": 0x1001, "key": b"mh key".hex()}
    assert ObjectConfig.from_json(data) == obj


def test_object_config_defaults() -> None:
    obj = object_config()
    data = obj.to_json()
    for k in ("lifetime", "simultaneous", "reverse_tunnel", "preferred_agent"):
        del data[k]
    back = ObjectConfig.from_json(data)
    assert (back.lifetime, back.simultaneous, back.reverse_tunnel, back.preferred_agent) == (60, False, False, None)


@pytest.mark.parametrize("field", ["name", "home_address", "nai", "mobile_home", "mobile_foreign"])
def test_object_config_missing_field(field: str) -> None:
    data = object_config().to_json()
    del data[field]
    with pytest.raises(ConfigError):
        ObjectConfig.from_json(data)


def test_object_config_bad_credentials() -> None:
    data = object_config().to_json()
    bad_spi = copy.deepcopy(data)
    bad_spi["mobile_foreign"]["spi"] = 1
    with pytest.raises(ConfigError):
        ObjectConfig.from_json(bad_spi)
    bad_key = copy.deepcopy(data)
    bad_key["mobile_home"]["key"] = "not hex"
    with pytest.raises(ConfigError):
        ObjectConfig.from_json(bad_key)


def test_object_flags_must_be_json_booleans() -> None:
    from agent.core.config import ObjectConfig
    from agent.core.errors import ConfigError

    base = {"name": "o", "home_address": "10.16.0.100", "home_agent": "10.16.0.2", "nai": "o@h",
            "mobile_home": {"spi": 256, "key": "aa"}, "mobile_foreign": {"spi": 257, "key": "bb"}}
    assert ObjectConfig.from_json(dict(base, simultaneous=True)).simultaneous is True
    with pytest.raises(ConfigError):
        ObjectConfig.from_json(dict(base, simultaneous="false"))


def test_a_written_configuration_is_root_only_from_creation(tmp_path) -> None:
    """Issue 12: it holds keys; it is never readable by others, not even for a moment."""
    import os
    import stat

    from agent.core.config import AgentConfig, Interface

    cfg = AgentConfig("r1", str(tmp_path), [], [Interface("eth0", "10.0.0.1")],
                      router_key="ab" * 32)
    path = tmp_path / "r1.json"
    old = os.umask(0o022)
    try:
        cfg.write(path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert AgentConfig.load(path).router_key == "ab" * 32
    assert [p.name for p in tmp_path.iterdir()] == ["r1.json"]  # no temporary left
