import dataclasses
import tomllib

import pytest

from diffprobe.store.config import Config, load_config
from diffprobe.store.errors import ConfigError

from .conftest import REPO


def test_pipeline_toml_documents_exactly_the_defaults():
    """Parse pipeline.toml: its sections and keys are exactly the config's, and each value,
    read alone, is that key's built-in default."""
    raw = tomllib.loads((REPO / "pipeline.toml").read_text())
    assert load_config(REPO / "pipeline.toml") == Config()
    assert set(raw) == {f.name for f in dataclasses.fields(Config)}
    for section in dataclasses.fields(Config):
        keys = {f.name for f in dataclasses.fields(type(section.default))}
        assert set(raw[section.name]) == keys, f"[{section.name}]: {set(raw[section.name]) ^ keys}"
        for key, value in raw[section.name].items():
            alone = Config.from_dict({section.name: {key: value}})
            assert getattr(alone, section.name) == section.default, f"{section.name}.{key} = {value!r}"


def test_config_is_frozen_and_typed():
    cfg = load_config(REPO / "pipeline.toml", {"extract.blocks": "19,24", "extract.timesteps": "90,150"})
    assert cfg.extract.blocks == (19, 24) and cfg.extract.timesteps == (90, 150)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.extract.batch_size = 3


@pytest.mark.parametrize(
    "toml,pattern",
    [
        ("[extract]\nbatchsize = 3\n", r"^extract\.batchsize: unknown key .* allowed: blocks"),
        ("[extrct]\n", r"^extrct: unknown section"),
        ('[extract]\nbatch_size = "big"\n', r"^extract\.batch_size: expected an integer, got 'big'"),
        ("[extract]\nbatch_size = 0\n", r"^extract\.batch_size: 0 is out of range; allowed: in 1\.\.65536"),
        ("[extract]\npools = [1, 0]\n", r"^extract\.pools: 0 is out of range"),
        ('[extract]\nautocast = "fp8"\n', r"^extract\.autocast: 'fp8' is not allowed; allowed: 'none', 'bf16', 'fp16'"),
        ('[extract]\ndevice = "gpu"\n', r"^extract\.device: 'gpu' is not a device"),
        ("[data]\nval_fraction = 1.5\n", r"^data\.val_fraction: 1\.5 is out of range"),
        ('[model]\npreset = "sd15"\n', r"^model\.preset: 'sd15' is not allowed; allowed: 'tiny', 'adm-256-uncond'"),
        ('[store]\ncodec = "gzip"\n', r"^store\.codec: 'gzip' is not allowed"),
        ("[data]\nsplits = []\n", r"^data\.splits: expected a non-empty list"),
        ("extract = 3\n", r"^extract: expected a \[extract\] table"),
        ("[extract\n", r"not valid TOML"),
    ],
)
def test_bad_config_names_the_key(tmp_path, toml, pattern):
    p = tmp_path / "bad.toml"
    p.write_text(toml)
    with pytest.raises(ConfigError, match=pattern):
        load_config(p)


def test_override_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"^extract\.blocks: cannot read 'x'"):
        load_config(REPO / "pipeline.toml", {"extract.blocks": "1,x"})


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.toml")


def test_round_trip_through_dict():
    cfg = load_config(REPO / "pipeline.toml", {"model.arch": {"num_channels": 64}})
    assert Config.from_dict(cfg.to_dict()) == cfg
