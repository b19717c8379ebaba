"""Teacher training runs through the one trainer: objective ``edm`` (diffdistill/objectives/edm.py) and the
``diffdistill-teacher`` front end (diffdistill/cli/teacher.py), whose folder a distillation run then uses."""

from __future__ import annotations

import importlib
import importlib.util
import math
import subprocess
import sys

import pytest
import torch

from diffdistill.cli.teacher import run
from diffdistill.models.analytic import GaussianDenoiser
from diffdistill.models.conditioning import Batch, Conditioning
from diffdistill.models.denoiser import Denoiser, edm_loss_weight
from diffdistill.models.generator import Generator
from diffdistill.models.io import model_extra
from diffdistill.models.teacher import Teacher
from diffdistill.objectives.edm import EDMDenoising
from diffdistill.training.trainer import DistillTrainer
from tests.helpers import compose_train

# the experiment of configs/teacher.yaml stays selected: only the network, the data and the loop are made tiny
TINY_TEACHER = [
    "backbone=tiny_unet",
    "data=synthetic",
    "trainer.device=cpu",
    "trainer.max_steps=4",
    "trainer.batch_size=8",
    "trainer.log_every=1",
    "trainer.sample_every=2",
    "trainer.checkpoint_every=2",
    "trainer.num_grid_samples=8",
    "trainer.teacher_sample_steps=3",
]


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_there_is_no_second_training_loop():
    assert importlib.util.find_spec("diffdistill.training.teacher") is None
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("diffdistill.training.teacher")


def test_teacher_config_is_the_packaged_recipe():
    """configs/teacher.yaml = train.yaml + objective edm with the settings the packaged teacher records."""
    import json

    from omegaconf import OmegaConf

    from diffdistill.utils.paths import ASSETS

    cfg = compose_train([], config_name="teacher")
    recorded = json.loads((ASSETS / "teachers" / "fashion_mnist" / "config.json").read_text())["_extra"]
    assert cfg.objective._target_ == "diffdistill.objectives.edm.EDMDenoising"
    student = OmegaConf.to_container(cfg.student.denoiser, resolve=True)
    assert student == recorded["model_config"]  # a fresh network of the packaged teacher's architecture
    assert cfg.trainer.max_steps == recorded["steps"] and cfg.trainer.batch_size == recorded["batch_size"]
    assert cfg.optim.name == "adam" and cfg.optim.lr == recorded["lr"] and cfg.optim.weight_decay == 0
    assert list(cfg.optim.betas) == [0.9, 0.99] and cfg.optim.warmup_steps == 200
    assert list(cfg.trainer.ema_decays) == [recorded["ema_decay"]] and cfg.trainer.grad_clip == 1.0
    assert cfg.trainer.ema_warmup_steps == 100  # the EMA warm-up of the loop that trained it
    assert cfg.objective.label_dropout == recorded["label_dropout"]
    assert (cfg.objective.P_mean, cfg.objective.P_std) == (recorded["P_mean"], recorded["P_std"])
    assert cfg.trainer.seed == recorded["seed"] and cfg.data._target_ == "diffdistill.data.FashionMNIST"


def test_teacher_cli_trains_through_the_trainer_and_a_distillation_run_uses_its_folder(tmp_path, monkeypatch):
    fits: list[tuple[DistillTrainer, dict, dict]] = []
    fit = DistillTrainer.fit

    def spy(self):
        fits.append((self, _state(self.roles["generator"].denoiser), _state(self.teacher.denoiser)))
        return fit(self)

    monkeypatch.setattr(DistillTrainer, "fit", spy)
    cfg = compose_train([*TINY_TEACHER, f"run_dir={tmp_path / 'run'}"], config_name="teacher")
    folder = run(cfg, command="diffdistill-teacher backbone=tiny_unet")

    (trainer, start, reference) = fits[0]
    assert len(fits) == 1 and isinstance(trainer.objective, EDMDenoising) and trainer.step == 4
    assert trainer.objective.label_dropout == 0.1
    assert not _equal(start, reference)  # the student started from its own fresh network, not the teacher's
    assert (tmp_path / "run" / "checkpoints" / "LATEST").exists()
    assert sorted(p.name for p in (tmp_path / "run" / "samples").glob("step*.png")) == [
        "step0000002.png",
        "step0000004.png",
    ]

    # the teacher folder holds the EMA denoiser (not the online weights) and the recipe with its command
    ema, online = _state(trainer.ema_generator().denoiser), _state(trainer.roles["generator"].denoiser)
    assert not _equal(ema, online)
    assert folder == tmp_path / "run" / "teacher"
    loaded = Teacher.from_pretrained(folder)
    assert _equal(_state(loaded.denoiser), ema)
    assert _equal(_state(Teacher.from_pretrained(tmp_path / "run").denoiser), ema)  # the run folder, too
    meta = model_extra(folder)
    assert meta["role"] == "teacher" and meta["objective"] == "edm" and meta["ema_decay"] == 0.998
    assert meta["command"] == "diffdistill-teacher backbone=tiny_unet" and meta["steps"] == 4
    assert meta["label_dropout"] == 0.1 and meta["lr"] == 1e-3 and "teacher" not in meta

    # a distillation run (the default experiment, DMD) distils the folder through backbone.path
    fits.clear()
    from diffdistill.cli.train import run as train

    dist = [
        "backbone=fashion_mnist",
        f"backbone.path={folder}",
        "data=synthetic",
        "trainer=tiny",
        "trainer.device=cpu",
        "trainer.max_steps=2",
        "trainer.sample_every=0",
        f"run_dir={tmp_path / 'distil'}",
    ]
    train(compose_train(dist))
    (student_run, student_start, teacher_weights) = fits[0]
    assert student_run.objective.name == "dmd"
    assert _equal(teacher_weights, ema) and _equal(student_start, ema)  # the student starts from the teacher
    assert (tmp_path / "distil" / "checkpoints" / "LATEST").exists()


@pytest.mark.parametrize(
    "override,message",
    [("objective=dmd", "objective=edm"), ("backbone=fashion_mnist", "backbone has none")],
    ids=["distillation-objective", "no-network-config"],
)
def test_teacher_cli_refuses_what_it_cannot_train(tmp_path, override, message):
    cfg = compose_train([*TINY_TEACHER, override, f"run_dir={tmp_path}"], config_name="teacher")
    with pytest.raises(ValueError, match=message):
        run(cfg)
    assert not (tmp_path / "checkpoints").exists()


def test_teacher_command_records_its_command_line(tmp_path):
    args = [*TINY_TEACHER, "trainer.max_steps=2", "trainer.sample_every=0", f"run_dir={tmp_path}"]
    res = subprocess.run(
        [sys.executable, "-c", "from diffdistill.cli.teacher import main; main()", *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"teacher written to {tmp_path / 'teacher'}" in res.stdout
    assert model_extra(tmp_path / "teacher")["command"] == " ".join(["diffdistill-teacher", *args])
    assert Teacher.from_pretrained(tmp_path / "teacher").sample_shape == (1, 8, 8)


# ---------------------------------------------------------------------------------------------
# the loss against closed forms


class Recording(Denoiser):
    """A denoiser that records the sigma and conditioning of every call (and delegates to ``inner``)."""

    def __init__(self, inner: Denoiser, num_classes: int | None = None):
        super().__init__()
        self.inner, self.num_classes, self.sigma_data = inner, num_classes, inner.sigma_data
        self.calls: list[tuple[torch.Tensor, Conditioning]] = []

    @property
    def sample_shape(self):
        return self.inner.sample_shape

    def denoise(self, x, sigma, cond):
        self.calls.append((sigma.detach().clone(), cond))
        return self.inner.denoise(x, sigma, cond)


MU, STD = torch.linspace(-0.5, 0.5, 16), torch.linspace(0.2, 1.5, 16)


def _gaussian_batch(n: int, seed: int = 0) -> Batch:
    return Batch(MU + STD * torch.randn(n, 16, generator=torch.Generator().manual_seed(seed)), Conditioning())


def _closed_form(sigma: torch.Tensor, sigma_data: float, weighted: bool = True) -> torch.Tensor:
    """Per-sample E||D(x0 + sigma eps) - x0||^2 / dim of the exact Gaussian denoiser: the posterior variance
    sigma^2 s^2 / (s^2 + sigma^2) averaged over dims, times lambda(sigma) (EDM Eq. 8, Table 1)."""
    s2, sig2 = STD**2, sigma[:, None] ** 2
    mse = (sig2 * s2 / (s2 + sig2)).mean(1)
    return edm_loss_weight(sigma, sigma_data) * mse if weighted else mse


@pytest.mark.parametrize("weighting", ["edm", "none"])
def test_edm_loss_of_the_exact_denoiser_is_the_closed_form(weighting):
    """The loss of the analytic Gaussian denoiser equals E_sigma[lambda(sigma) sigma^2 s^2/(s^2 + sigma^2)]
    under the log-normal density (the weighting changes the value, so a wrong lambda fails)."""
    torch.manual_seed(0)
    den = Recording(GaussianDenoiser(MU, STD, trainable=True))
    obj = EDMDenoising(Generator(den), weighting=weighting)
    out = obj.generator_loss(_gaussian_batch(40_000), step=0)
    ((sigma, _),) = den.calls
    assert out.loss.shape == (40_000,)
    expected = _closed_form(sigma, den.sigma_data, weighted=weighting == "edm")
    assert out.loss.mean().item() == pytest.approx(expected.mean().item(), rel=0.01)
    # ln sigma ~ N(-1.2, 1.2^2) (Table 1), stated for sigma_data = 0.5: shifted by ln(sigma_data / 0.5)
    assert sigma.log().mean().item() == pytest.approx(-1.2 + math.log(den.sigma_data / 0.5), abs=0.03)
    assert sigma.log().std().item() == pytest.approx(1.2, abs=0.03)


@pytest.mark.parametrize("sigma", [0.05, 0.5, 5.0])
def test_edm_loss_at_one_noise_level(sigma):
    """P_std = 0 fixes sigma = exp(P_mean): the batch mean is lambda(sigma) times the posterior variance."""
    torch.manual_seed(1)
    den = GaussianDenoiser(MU, STD, trainable=True)
    obj = EDMDenoising(Generator(den), P_mean=float(torch.tensor(sigma).log()), P_std=0.0, match_sigma_data=False)
    loss = obj.generator_loss(_gaussian_batch(40_000, seed=1), step=0).loss.mean().item()
    assert loss == pytest.approx(_closed_form(torch.tensor([sigma]), den.sigma_data).item(), rel=0.01)


@pytest.mark.parametrize("p", [0.0, 0.1, 0.3])
def test_label_dropout_drops_at_the_configured_rate(p):
    torch.manual_seed(0)
    den = Recording(GaussianDenoiser(MU, STD), num_classes=10)
    obj = EDMDenoising(Generator(den), label_dropout=p)
    n = 40_000
    labels = torch.arange(n) % 10
    obj.generator_loss(Batch(_gaussian_batch(n).x0, Conditioning(class_labels=labels)), step=0)
    ((_, cond),) = den.calls
    dropped = cond.class_labels == 10  # the null class = num_classes
    assert dropped.float().mean().item() == pytest.approx(p, abs=0.01)
    assert torch.equal(cond.class_labels[~dropped], labels[~dropped])  # the others keep their label


def test_label_dropout_of_an_unconditional_network_is_ignored_with_a_warning(caplog):
    """The Fashion-MNIST recipe's 0.1 under data=toy_gmm: nothing to drop, one logged line, no error."""
    with caplog.at_level("WARNING"):
        obj = EDMDenoising(Generator(GaussianDenoiser(MU, STD)), label_dropout=0.1)
    assert obj.label_dropout == 0.0 and "label_dropout=0.1 ignored" in caplog.text


@pytest.mark.parametrize("dim", [2, 8])
def test_teacher_cli_trains_a_toy_mlp_with_no_model_config(tmp_path, dim):
    """``diffdistill-teacher data=toy_gmm`` (any dim): the network is an MLP of the data's shape, sigma_data is the
    mixture's, and the scatter plots (d > 2: principal axes) show the samples."""
    from PIL import Image

    from diffdistill.data import GaussianMixtureToy
    from diffdistill.models.backbones import MLPBackbone

    over = ["data=toy_gmm", f"data.dim={dim}", "trainer.device=cpu", "trainer.max_steps=30", "trainer.batch_size=64"]
    over += ["trainer.sample_every=30", "trainer.checkpoint_every=30", "trainer.teacher_sample_steps=4"]
    cfg = compose_train([*over, f"run_dir={tmp_path / 'run'}"], config_name="teacher")
    folder = run(cfg, command="diffdistill-teacher data=toy_gmm")
    teacher = Teacher.from_pretrained(folder)
    assert isinstance(teacher.denoiser.net, MLPBackbone) and teacher.sample_shape == (dim,)
    assert teacher.sigma_data == pytest.approx(GaussianMixtureToy(dim=dim).sigma_data, rel=1e-5)
    assert teacher.num_classes is None
    png = tmp_path / "run" / "samples" / "step0000030.png"
    pixels = torch.from_numpy(__import__("numpy").asarray(Image.open(png).convert("L"))).float()
    assert (pixels < 128).float().mean() > 0.005  # dark marks: the scatter is drawn, not an empty frame
