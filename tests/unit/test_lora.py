"""LoRA students (peft): identity at init, shared base with the teacher, only adapters train, reload."""

import pytest
import torch

from diffdistill import load_generator
from diffdistill.models.conditioning import Conditioning
from diffdistill.models.lora import SharedBaseDenoiser, adapters_disabled, has_lora, lora_state_dict
from diffdistill.training.builders import build_experiment, build_trainer
from tests.helpers import TINY, compose_train

LORA = ["student.lora={rank:4,alpha:4}"]


def _inputs(n=4):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 8, 8, generator=g) * 2
    return x, torch.full((n,), 2.0), Conditioning(class_labels=torch.arange(n) % 10)


def _perturb_lora(module, scale=0.5):
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.add_(scale * torch.randn_like(p))


def _storages(*modules):
    return {p.untyped_storage().data_ptr() for m in modules for p in m.parameters()} | {
        b.untyped_storage().data_ptr() for m in modules for b in m.buffers()
    }


def test_shared_base_student_starts_as_the_teacher_and_shares_its_weights():
    exp = build_experiment(compose_train([*TINY, "objective=ect", *LORA]))
    gen, teacher = exp.roles["generator"], exp.teacher
    assert isinstance(teacher.denoiser, SharedBaseDenoiser) and has_lora(gen)
    assert sum(p.numel() for p in teacher.parameters()) == 0  # the teacher owns no copy
    x, s, c = _inputs()
    with torch.no_grad():
        assert torch.equal(gen.denoise(x, s, c), teacher(x, s, c))  # LoRA B = 0: the student is the teacher
        _perturb_lora(gen)
        assert not torch.allclose(gen.denoise(x, s, c), teacher(x, s, c))
        with adapters_disabled(gen):
            assert torch.equal(gen.denoise(x, s, c), teacher(x, s, c))  # the teacher is the base network
    trainable = [n for n, p in gen.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    n_lora = sum(p.numel() for p in gen.parameters() if p.requires_grad)
    assert n_lora < 0.5 * sum(p.numel() for p in gen.parameters())
    assert teacher.sample_shape == gen.sample_shape and teacher.num_classes == gen.num_classes


def test_unshared_lora_student_is_a_copy_and_fake_score_copies_the_base():
    exp = build_experiment(compose_train([*TINY, "objective=dmd", "student.lora={rank:4,alpha:4,share_base:false}"]))
    gen, fake, teacher = exp.roles["generator"], exp.roles["fake_score"], exp.teacher
    assert not isinstance(teacher.denoiser, SharedBaseDenoiser) and has_lora(gen) and not has_lora(fake)
    assert not (_storages(gen) & _storages(teacher))
    shared = build_experiment(compose_train([*TINY, "objective=dmd", *LORA]))
    fake_s = shared.roles["fake_score"]
    assert not has_lora(fake_s) and all(p.requires_grad for p in fake_s.parameters())  # a full trainable copy
    x, s, c = _inputs()
    with torch.no_grad():
        assert torch.allclose(fake_s(x, s, c), shared.teacher(x, s, c))
    assert not (_storages(fake_s) & _storages(shared.roles["generator"]))


def test_teacher_view_ignores_the_students_guidance_embedding():
    exp = build_experiment(compose_train([*TINY, "objective=lcm", *LORA]))  # LCM embeds w in the student
    gen, teacher = exp.roles["generator"], exp.teacher
    host = next(m for m in gen.modules() if getattr(m, "guidance_emb", None) is not None)
    x, s, c = _inputs()
    with torch.no_grad():
        before = teacher(x, s, c)
        for p in host.guidance_emb.parameters():
            p.add_(torch.randn_like(p))
        c_w = Conditioning(class_labels=c.class_labels, guidance_scale=torch.full((4,), 3.0))
        assert not torch.allclose(gen.denoise(x, s, c_w), gen.denoise(x, s, c))  # the student sees w
        assert torch.equal(teacher(x, s, c), before)  # the teacher does not
    assert host.guidance_emb is not None  # restored after the teacher pass


def test_lcm_lora_trains_only_adapters_and_reloads(tmp_path):
    cfg = compose_train(
        [*TINY, "objective=lcm", *LORA, "objective.embed_guidance=false", f"run_dir={tmp_path}", "optim.lr=1e-2"]
    )
    trainer = build_trainer(cfg)
    gen, teacher = trainer.roles["generator"], trainer.teacher
    base = {n: p.detach().clone() for n, p in gen.named_parameters() if "lora_" not in n}
    lora = {n: p.detach().clone() for n, p in gen.named_parameters() if "lora_" in n}
    x, s, c = _inputs()
    with torch.no_grad():
        t_before = teacher(x, s, c)
    trainer.fit()
    after = dict(gen.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in base.items())  # the shared base never moves
    assert any(not torch.equal(after[n], v) for n, v in lora.items())  # the adapters do
    with torch.no_grad():
        assert torch.equal(teacher(x, s, c), t_before)
        out = gen.denoise(x, s, c)
    reloaded = load_generator(tmp_path / "checkpoints" / "last", ema=None)
    assert has_lora(reloaded)
    with torch.no_grad():
        assert torch.allclose(reloaded.denoise(x, s, c), out, atol=1e-6)
    ema = trainer.ema_generator()
    shared = [n for n, p in ema.named_parameters() if "lora_" not in n]
    assert shared and all(dict(ema.named_parameters())[n] is after[n] for n in shared)  # no second base copy
    reloaded_ema = load_generator(tmp_path / "checkpoints" / "last")
    with torch.no_grad():
        assert torch.allclose(reloaded_ema.denoise(x, s, c), ema.denoise(x, s, c), atol=1e-6)
    target = trainer.roles["target_generator"]  # LCM's target network shares the base as well
    assert all(dict(target.named_parameters())[n] is after[n] for n in shared)
    sd = lora_state_dict(gen)
    assert sd and all("lora_" in k for k in sd)


def test_lora_config_errors():
    with pytest.raises(ValueError, match="rank"):
        build_experiment(compose_train([*TINY, "objective=ect", "student.lora={rank:0}"]))
    with pytest.raises(ValueError, match="no network weights"):
        build_experiment(
            compose_train(["~experiment", "backbone=analytic", "data=toy_gaussian", "objective=ect", *LORA])
        )
