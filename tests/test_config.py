"""Config: YAML loading, dotted overrides with types, one-line errors, saved resolved config."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from ddp_diffusion import config, registry
from ddp_diffusion.diffusion import build_denoiser
from ddp_diffusion.errors import UserError

REPO = Path(__file__).resolve().parent.parent


def test_yaml_and_overrides_are_typed(tmp_path: Path) -> None:
    cfg = config.load(REPO / "configs" / "quickstart_cpu.yaml",
                      ["train.lr=2e-4", "train.max_steps=100", "out_dir=runs/x",
                       "model.channel_mult=[1,2,4]", "tracking.tags=[a,b]", "train.compile=true"])
    assert cfg.model.channels == 32 and cfg.train.batch_size == 64  # from the file
    assert cfg.train.lr == pytest.approx(2e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.max_steps == 100 and isinstance(cfg.train.max_steps, int)
    assert cfg.out_dir == "runs/x"
    assert cfg.model.channel_mult == [1, 2, 4]
    assert cfg.tracking.tags == ["a", "b"]
    assert cfg.train.compile is True


def test_unknown_key_suggests_closest() -> None:
    with pytest.raises(UserError, match=r"unknown config key 'trian.max_steps'; did you mean "
                                        r"'train.max_steps'\?"):
        config.load(None, ["trian.max_steps=3"])


def test_unknown_key_in_yaml(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  chanels: 8\n")
    with pytest.raises(UserError, match=r"unknown config key 'model.chanels'; did you mean "
                                        r"'model.channels'\?"):
        config.load(p)


@pytest.mark.parametrize(("override", "message"), [
    ("train.max_steps=ten", "config key 'train.max_steps' expects int, got 'ten'"),
    ("train.max_steps=1.5", "config key 'train.max_steps' expects int, got 1.5"),
    ("train.lr=fast", "config key 'train.lr' expects float, got 'fast'"),
    ("train.compile=maybe", "config key 'train.compile' expects bool, got 'maybe'"),
    ("train.precision=fp8", "config key 'train.precision' must be one of auto, fp32, bf16, fp16; "
                            "got 'fp8'"),
    ("train.lr", "override 'train.lr' must look like key=value, e.g. train.lr=2e-4"),
])
def test_bad_values_give_one_line_errors(override: str, message: str) -> None:
    with pytest.raises(UserError) as e:
        config.load(None, [override])
    assert str(e.value) == message
    assert "\n" not in str(e.value)


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = config.load(REPO / "configs" / "quickstart_cpu.yaml", ["seed=7"])
    config.save(cfg, tmp_path / "config.yaml")
    again = config.load(tmp_path / "config.yaml")
    assert again == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["seed"] == 7


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_set_only_real_keys_and_build_their_model(path: Path) -> None:
    raw = config.flatten(yaml.safe_load(path.read_text()))
    cfg = config.load(path)  # unknown keys and out-of-range values would raise here
    loaded = config.flatten(config.to_dict(cfg))
    assert {k: loaded[k] for k in raw} == raw  # every value in the file is the one in effect
    model = build_denoiser(config.with_data_shape(cfg.model, 10, 1), cfg.diffusion.steps)
    x = torch.zeros(2, 1, cfg.model.image_size, cfg.model.image_size)
    with torch.no_grad():
        out = model(x, torch.tensor([0, cfg.diffusion.steps - 1]), torch.tensor([0, 9]),
                    keys=torch.tensor([1, 2]))  # training mode: dropout draws from the keys
    assert out.prediction.shape == x.shape and out.variance_value.shape == x.shape


@pytest.mark.parametrize(("key", "table"), [
    ("model.name", registry.MODELS), ("data.dataset", registry.DATASETS),
    ("sample.sampler", registry.SAMPLERS), ("fid.sampler", registry.SAMPLERS),
])
def test_the_choices_are_the_registered_names(key: str, table: dict[str, registry.Entry]) -> None:
    for name in table:
        config.set_key(config.Config(), key, name)  # accepted
    with pytest.raises(UserError) as e:
        config.load(None, [f"{key}=nope"])
    assert str(e.value) == f"config key '{key}' must be one of {', '.join(table)}; got 'nope'"


def test_every_registered_builder_and_check_exists() -> None:
    """The registry names them as text (so that it imports no torch): a typo fails here."""
    for table in (registry.MODELS, registry.SAMPLERS, registry.DATASETS):
        for name, entry in table.items():
            for ref in filter(None, (entry.builder, entry.check)):
                assert callable(registry.resolve(ref)), (name, ref)


def test_config_and_the_command_line_load_and_validate_without_torch() -> None:
    """`train` checks its config before importing torch (seconds): the registry must keep it."""
    code = ("import sys; from ddp_diffusion import cli, config; cli.build_parser(); "
            "config.load(None, ['model.name=seed_unet', 'data.dataset=mnist']); "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0
