"""Config: YAML loading, dotted overrides with types, one-line errors, saved resolved config."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from ddp_diffusion import checkpoint, config, config_docs, registry
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


# ------------------------------------------------------------------ every key, described


def config_command(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ddp_diffusion", "config", *args], cwd=REPO,
                          capture_output=True, text=True)


def test_every_key_has_a_doc_and_a_resume_policy_from_its_field() -> None:
    docs = config_docs.key_docs()
    assert [d.key for d in docs] == config.all_keys()
    assert all(d.doc and d.resume for d in docs)
    by_key = {d.key: d for d in docs}
    assert by_key["train.precision"].type == "one of auto, fp32, bf16, fp16"
    assert by_key["fid.ref_stats"].type == "str or null"
    assert by_key["model.channel_mult"].type == "list of int"
    # The frozen keys (the README's prose names them) are those whose field says so.
    assert set(config.FROZEN_KEYS) == {d.key for d in docs if d.resume == config.FROZEN} == {
        *(k for k in config.all_keys() if k.startswith(("model.", "diffusion."))), "seed",
        "train.batch_size", "train.ema_posthoc", "train.ema_posthoc_sigma_rels"}
    saved = config.to_dict(config.Config())
    for key, value in (("train.lr", 1.0), ("train.ema_posthoc_every", 7),
                       ("model.dropout", 0.5), ("diffusion.clamp_x0", False)):
        changed = config.Config()
        config.set_key(changed, key, value)
        frozen = checkpoint.frozen_changes(saved, config.to_dict(changed))
        assert frozen == ([f"{key}: {config.flatten(saved)[key]} -> {value}"]
                          if key in config.FROZEN_KEYS else [])


def test_the_readme_table_is_the_generated_one() -> None:
    readme = (REPO / "README.md").read_text()
    begin, end = readme.index(config_docs.README_BEGIN), readme.index(config_docs.README_END)
    assert readme[begin:end + len(config_docs.README_END)] + "\n" == config_docs.markdown(), (
        "the README's config table is out of date: paste `ddp-diffusion config --format "
        "markdown` over it")


@pytest.mark.parametrize("args", [
    [],
    ["--config", "configs/quickstart_cpu.yaml", "train.lr=2e-4", "fid.ref_stats=ref.npz",
     "tracking.tags=[a,b]", "model.num_classes=10"],
])
def test_the_yaml_it_writes_is_a_complete_config_train_reads_back(tmp_path: Path,
                                                                  args: list[str]) -> None:
    proc = config_command(*args, "--format", "yaml")
    assert proc.returncode == 0, proc.stderr
    path = tmp_path / "all.yaml"
    path.write_text(proc.stdout)
    flags = [a for a in args if "=" not in a]
    expected = config.load(flags[1] if flags else None, [a for a in args if "=" in a])
    assert config.load(path) == expected
    written = yaml.safe_load(proc.stdout)
    assert sorted(config.flatten(written)) == sorted(config.all_keys())  # every key, explicit
    comments = [line.strip() for line in proc.stdout.splitlines() if line.strip()
                .startswith("#")]
    assert len(comments) == 1 + len(config.all_keys())  # the title, then one per key
    assert "# AdamW learning rate (after the warmup) (float" in proc.stdout


def test_the_text_shows_each_value_its_default_where_it_differs_and_the_resume_policy() -> None:
    proc = config_command("train.lr=2e-4", "seed=3")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 * len(config.all_keys())
    at = lines.index("train.lr = 0.0002  (default 0.0001)")
    assert lines[at + 1] == ("    AdamW learning rate (after the warmup) (float; on resume: "
                             "takes effect)")
    assert lines[lines.index("seed = 3  (default 0)") + 1].endswith("(int; on resume: frozen)")
    assert "train.max_steps = 1000" in lines  # unchanged: no default repeated


@pytest.mark.parametrize(("args", "message"), [
    (["train.lrr=1"], "error: unknown config key 'train.lrr'; did you mean 'train.lr'?"),
    (["--config", "missing.yaml"], "error: config file missing.yaml does not exist"),
    (["train.ckpt_every=0"], "error: train.ckpt_every=0 must be >= 1"),
])
def test_bad_config_input_is_one_line(args: list[str], message: str) -> None:
    proc = config_command(*args)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == message
