"""key=value overrides are typed against the dataclass fields; bad keys/values name the key."""

from dataclasses import dataclass, field

import pytest

from bevnext.config import apply_overrides, config_to_dict
from bevnext.errors import ConfigError


@dataclass(frozen=True)
class _Optim:
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.999)
    clip: float | None = 5.0


@dataclass(frozen=True)
class _Cfg:
    name: str = "stage1"
    epochs: int = 2
    amp: bool = False
    input_size: tuple[int, ...] = (256, 704)
    optim: _Optim = field(default_factory=_Optim)


def test_overrides_are_typed_and_nested():
    cfg = apply_overrides(
        _Cfg(), ["epochs=12", "optim.lr=4e-4", "optim.betas=(0.8, 0.99)", "name=stage2", "amp=true",
                 "input_size=[128, 352]", "optim.clip=None"]
    )
    assert cfg.epochs == 12 and cfg.name == "stage2" and cfg.amp is True
    assert cfg.optim.lr == 4e-4 and cfg.optim.betas == (0.8, 0.99) and cfg.optim.clip is None
    assert cfg.input_size == (128, 352)
    assert _Cfg().epochs == 2  # the original is untouched


def test_int_is_accepted_for_float():
    assert apply_overrides(_Cfg(), ["optim.lr=1"]).optim.lr == 1.0


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("epoch=3", "unknown config key 'epoch'; did you mean 'epochs'?"),
        ("zzz=3", "unknown config key 'zzz'; valid keys here: amp, epochs, input_size, name, optim"),
        ("optim.momentum=0.9", "unknown config key 'optim.momentum'"),
        ("epochs=2.5", "config key 'epochs': 2.5 is not a valid int"),
        ("amp=3", "config key 'amp'"),
        ("optim.betas=(1, 2, 3)", "expected 2 values"),
        ("optim=1", "is a section"),
        ("epochs", "not of the form key=value"),
    ],
)
def test_bad_overrides_name_the_key(item, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        apply_overrides(_Cfg(), [item])


def test_config_to_dict_is_json_ready():
    import json

    d = config_to_dict(_Cfg())
    assert d["optim"]["betas"] == [0.9, 0.999]
    assert json.loads(json.dumps(d)) == d
