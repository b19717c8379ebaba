"""Every config file composes and instantiates; wrong keys and values fail with clear errors."""

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

from diffdistill.cli.common import CONFIG_DIR
from diffdistill.objectives import OBJECTIVES
from diffdistill.training.builders import build_experiment, build_trainer
from tests.helpers import TINY, compose_train

CONFIGS = Path(CONFIG_DIR)
GROUPS = ["backbone", "schedule", "objective", "data", "optim", "trainer", "eval", "logger"]
NEEDS_REAL_PACKAGED_TEACHER = {("backbone", "fashion_mnist")}
MANDATORY = {
    ("data", "image_folder"): "root",
    ("data", "cifar10"): "root",
    ("data", "imagenet64"): "root",
    ("data", "image_folder_stream"): "root",
    ("data", "webdataset"): "shards",
    ("data", "hf_datasets"): "path",
    ("backbone", "diffusers_vp"): "path",
    ("backbone", "sd"): "path",
    ("backbone", "sdxl"): "path",
    ("backbone", "sd3"): "path",
    ("data", "prompts"): "path",
    ("data", "coco_captions"): "path",
    ("data", "latents"): "path",
    ("backbone", "edm_diffusers"): "path",
    ("backbone", "pretrained"): "path",
}


def options(group):
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes_and_instantiates(group, option):
    cfg = compose_train([*TINY, f"{group}={option}"])
    node = cfg[group]
    if group == "backbone" and option == "analytic":
        teacher = instantiate(node)(dataset=instantiate(compose_train(["data=toy_gaussian"]).data))
        assert teacher.sample_shape == (16,)
        return
    if (group, option) in NEEDS_REAL_PACKAGED_TEACHER:
        from diffdistill.utils.paths import ASSETS

        if not (ASSETS / "teachers" / "fashion_mnist" / "model.safetensors").exists():
            pytest.skip("packaged teacher not built yet")
    if (group, option) in MANDATORY:  # a mandatory value (???) left unset fails and names the key
        with pytest.raises(Exception, match=MANDATORY[(group, option)]):
            instantiate(node)
        return
    if group == "objective":
        if option == "cd":
            cfg = compose_train([*TINY, "objective=cd", "objective.lpips_weights=random"])
        exp = build_experiment(cfg)
        assert exp.objective.name in OBJECTIVES
        return
    obj = instantiate(node)
    assert obj is not None


@pytest.mark.parametrize(
    "exp",
    sorted(
        str(p.relative_to(CONFIGS / "experiment").with_suffix("")) for p in (CONFIGS / "experiment").rglob("*.yaml")
    ),
)
def test_every_experiment_composes(exp):
    cfg = compose_train([f"experiment={exp}"])
    assert cfg.objective._target_.startswith("diffdistill.objectives.")


def test_unknown_key_fails():
    with pytest.raises(ConfigCompositionException, match="trainer.max_stepz"):
        compose_train([*TINY, "trainer.max_stepz=3"])
    with pytest.raises(ConfigCompositionException):
        compose_train([*TINY, "objective=not_an_objective"])


def test_unknown_constructor_argument_is_reported(tmp_path):
    cfg = compose_train([*TINY, f"run_dir={tmp_path}"])
    from omegaconf import open_dict

    with open_dict(cfg):
        cfg.objective.bogus_argument = 1
    with pytest.raises(ValueError, match="bogus_argument"):
        build_trainer(cfg)


def test_struct_mode_blocks_typos_in_code():
    cfg = compose_train(TINY)
    with pytest.raises((ConfigAttributeError, ConfigKeyError)):
        _ = cfg.trainer.max_stepz


# groups whose options take different keys: an experiment selects an option of these, never sets their keys in its
# body (the body would leak into whatever option a user picks on the command line, e.g. objective=cd)
PRIVATE_GROUPS = ("backbone", "schedule", "objective", "data", "eval", "logger")


@pytest.mark.parametrize(
    "exp",
    sorted(
        str(p.relative_to(CONFIGS / "experiment").with_suffix("")) for p in (CONFIGS / "experiment").rglob("*.yaml")
    ),
)
def test_experiments_keep_group_settings_in_group_options(exp):
    import yaml

    body = yaml.safe_load((CONFIGS / "experiment" / f"{exp}.yaml").read_text())
    leaked = sorted(set(body) & set(PRIVATE_GROUPS))
    assert not leaked, f"experiment/{exp}.yaml sets {leaked} in its body: move them into an option of that group"


@pytest.mark.parametrize(
    "exp",
    sorted(
        str(p.relative_to(CONFIGS / "experiment").with_suffix("")) for p in (CONFIGS / "experiment").rglob("*.yaml")
    ),
)
def test_choosing_another_objective_drops_the_experiments_objective_settings(exp):
    """``experiment=X objective=Y`` gives Y's own defaults, whatever X tuned for its objective (Y: the two objectives
    next to X's own in the registry, so each experiment is checked against others without composing all of them)."""
    from omegaconf import OmegaConf

    names = sorted(OBJECTIVES)
    own_name = compose_train([f"experiment={exp}"]).objective._target_.rsplit(".", 1)[-1]
    i = next((k for k, n in enumerate(names) if OBJECTIVES[n].__name__ == own_name), 0)
    for name in {names[(i + 1) % len(names)], names[(i - 1) % len(names)]}:
        cfg = compose_train([f"experiment={exp}", f"objective={name}"])
        own = OmegaConf.load(CONFIGS / "objective" / f"{name}.yaml")
        assert OmegaConf.to_container(cfg.objective) == OmegaConf.to_container(own), (exp, name)
