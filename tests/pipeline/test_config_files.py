"""Every ready config in configs/ validates; the packaged demo equals configs/demo.yaml; errors are one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import ConfigError, config_from_dict, default_config_path, load_config

REPO = Path(__file__).resolve().parents[2]
# nightly/suite.yaml is the nightly suite index (runs and floors), not a run config
CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml")
                 if p.relative_to(REPO / "configs") != Path("nightly/suite.yaml"))


def test_configs_folder_has_every_paper_setting() -> None:
    names = {p.stem for p in CONFIGS}
    for required in ("demo", "smallnet7_ck_r4", "smallnet7_cl_r4", "smallnet7_ck_r4_kd", "smallnet7_cl_r4_kd",
                     "resnet56_csg128", "resnet56_csg72", "densenet_bc_40_48_csg72", "wrn40_2_teacher",
                     "wrn40_2_g4_kd", "wrn40_2_g4_at", "wrn40_2_b2_kd", "wrn40_2_b2_at"):
        assert required in names, f"configs/{required}.yaml is missing"
    engines = {load_config(p).engine.kind for p in CONFIGS}
    assert {"local", "flower", "ray"} <= engines


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(REPO / "configs")) for p in CONFIGS])
def test_every_config_validates(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.name == path.stem
    if cfg.distill.kind != "none":
        assert cfg.teacher is not None


def test_full_scale_schedules_match_the_papers() -> None:
    exp = load_config(REPO / "configs" / "smallnet7_ck_r4.yaml")
    assert (exp.train.lr, exp.train.epochs, exp.train.milestones, exp.train.gamma, exp.train.weight_decay) == (
        0.01, 150, [50, 100], 0.1, 0.0)
    csg = load_config(REPO / "configs" / "resnet56_csg128.yaml")
    assert (csg.train.lr, csg.train.epochs, csg.train.milestones, csg.train.weight_decay) == (
        0.05, 200, [100, 150], 5e-4)
    assert tuple(csg.compression.slice_shape) == (16, 16, 3, 3) and csg.compression.code_size == 128
    moon = load_config(REPO / "configs" / "wrn40_2_g4_at.yaml")
    assert (moon.train.lr, moon.train.milestones, moon.train.gamma) == (0.1, [60, 120, 160], 0.2)
    assert moon.compression.block == "G(4)" and moon.distill.kind == "at" and moon.distill.beta == 1000.0


def test_packaged_demo_is_the_repo_demo() -> None:
    packaged = REPO / "pipeline" / "assets" / "demo.yaml"
    assert packaged.read_text() == (REPO / "configs" / "demo.yaml").read_text()
    assert default_config_path() == REPO / "configs" / "demo.yaml"
    demo = load_config(None)
    assert demo.data.root is None and demo.name == "demo"


@pytest.mark.parametrize("overrides, needle", [
    (["train.lrr=0.1"], "train.lrr: unknown key"),
    (["train.epochs=many"], "train.epochs"),
    (["compression.kind=zip"], "compression"),
    (["engine.kind=ray", "transport.comm=fp8"], "transport.comm: unknown codec 'fp8'"),
    (["engine.kind=ray", "engine.comm=fp16"], "engine.comm: moved to transport.comm"),
    (["engine.kind=flower", "engine.transport_dtype=bf16"], "engine.transport_dtype: moved to transport.dtype"),
    (["train"], "must look like key.path=value"),
])
def test_config_errors_are_one_line_and_name_the_key(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    msg = str(err.value)
    assert needle in msg and "\n" not in msg


def test_override_switches_sections_and_types() -> None:
    cfg = config_from_dict({}, ["compression={kind: csg, code_size: 72}", "train.milestones=[2, 4]",
                                "engine={kind: flower, rounds: 2}"])
    assert cfg.compression.kind == "csg" and cfg.compression.code_size == 72
    assert cfg.train.milestones == [2, 4] and cfg.engine.rounds == 2


def test_a_bare_yaml_off_switches_the_update_screen_off(tmp_path: Path) -> None:
    """YAML 1.1 reads ``off`` as false; the screen's switches take it as the word written, not a type error."""
    path = tmp_path / "off.yaml"
    path.write_text("engine: {kind: flower, update_screen: {kind: off, direction: off}}\n")
    screen = load_config(path, []).engine.update_screen
    assert (screen.kind, screen.direction) == ("off", "off")
    with pytest.raises(ConfigError, match="engine.update_screen.direction"):
        load_config(path, ["engine.update_screen.direction=true"])
