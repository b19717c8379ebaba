"""The consistency family (CD, iCT, ECT, LCM, sCM) against the invariants of docs/invariants.md §2-4 and Gaussian toys.

Toy runs use data N(0.3, 0.8^2) in d = 16 dims with its exact (analytic) teacher and the
:class:`AffineConsistencyDenoiser` student, whose family contains the exact consistency function; samples are
checked on 4096 x 16 values (sampling error of the mean ~0.003, of the std ~0.002).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from diffdistill.conventions import append_dims, consistency_precond, trig_to_edm
from diffdistill.data import GaussianToy
from diffdistill.data.images import Batch
from diffdistill.models import Conditioning, Generator, Teacher
from diffdistill.models.builders import edm_mlp
from diffdistill.models.consistency import AffineConsistencyDenoiser, ConsistencyDenoiser, trigflow_F
from diffdistill.models.denoiser import Denoiser
from diffdistill.objectives import ECT, ICT, LCM, OBJECTIVES, SCM, ConsistencyDistillation, PassCount
from diffdistill.objectives.consistency import RNGState, consistency_distance, default_huber_c, euler_step, heun_step
from diffdistill.objectives.ect import _norm_distance, ect_r, ict_num_scales, ict_pair_probs
from diffdistill.objectives.scm import normalize_tangent, scm_tangent, trigflow_jvp
from diffdistill.schedules.karras import karras_sigmas

torch.set_num_threads(1)
MU, S, DIM = 0.3, 0.8, 16


@pytest.fixture
def toy():
    return GaussianToy(dim=DIM, mean=MU, std=S)


def f_star(x, sigma, sigma_b=0.002):
    """Exact consistency function of N(MU, S^2) with boundary sigma_b (docs/invariants.md §1)."""
    return MU + ((S**2 + sigma_b**2) / (S**2 + append_dims(sigma, x.ndim) ** 2)).sqrt() * (x - MU)


# ---------------------------------------------------------------------------------------------
# consistency distillation (docs/invariants.md §2)


def test_boundary_exact_for_arbitrary_network():
    torch.manual_seed(0)
    for inner in (edm_mlp(dim=DIM, hidden=32, depth=2), GaussianToy(dim=DIM).teacher()):
        f = ConsistencyDenoiser(inner, sigma_min=0.002)
        x = 3 * torch.randn(8, DIM)
        assert torch.equal(f(x, torch.full((8,), 0.002)), x)  # bit-exact
        assert not torch.allclose(f(x, torch.full((8,), 0.5)), x)


def test_boundary_scalings_use_sigma_in_c_out_denominator():
    sigma = torch.tensor([0.002, 0.5, 10.0])
    c_skip, c_out = consistency_precond(sigma, 0.5, 0.002)
    assert c_skip[0] == 1.0 and c_out[0] == 0.0
    assert torch.allclose(c_out, (sigma - 0.002) * 0.5 / (sigma**2 + 0.25).sqrt())
    assert torch.allclose(c_skip, 0.25 / ((sigma - 0.002) ** 2 + 0.25))


def test_wrapper_edm_path_equals_generic_path():
    torch.manual_seed(0)
    den = edm_mlp(dim=DIM, hidden=32, depth=2)
    x, sigma = torch.randn(8, DIM), torch.rand(8) * 5 + 0.01
    direct = ConsistencyDenoiser(den)(x, sigma)

    class Opaque(Denoiser):  # hides the EDM structure: forces F = (D - c_skip x) / c_out
        sigma_data, sigma_min, sigma_max = 0.5, 0.002, 80.0

        def denoise(self, x, sigma, cond):
            return den(x, sigma, cond)

    assert torch.allclose(direct, ConsistencyDenoiser(Opaque())(x, sigma), atol=1e-5)


@pytest.mark.parametrize("N,bound", [(18, 1.6e-2), (40, 1.4e-3), (80, 1.7e-4)])
def test_heun_teacher_local_error(toy, N, bound):
    """docs/invariants.md §2: one Heun step of the exact teacher moves f* by at most the bound (worst step, RMS over
    256 x 16 samples; N(0.3, 0.8^2) gives 1.2e-2 / 1.1e-3 / 1.3e-4, and the max over samples is ~4x larger)."""
    torch.manual_seed(0)
    teacher = Teacher(toy.teacher())
    sigmas = karras_sigmas(N)
    x0 = toy.get(torch.arange(256)).x0
    worst = 0.0
    for n in range(N - 1):
        s, s_next = torch.full((256,), float(sigmas[n])), torch.full((256,), float(sigmas[n + 1]))
        x_t = x0 + append_dims(s, 2) * torch.randn_like(x0)
        x_hat = heun_step(teacher, x_t, s, s_next, None)
        err = f_star(x_hat, s_next) - f_star(x_t, s)
        worst = max(worst, float(err.pow(2).mean().sqrt()))  # RMS over samples, worst step
    assert worst <= bound
    assert worst >= bound / 20  # not vacuous: the local error is O(h^3), the bounds shrink ~10x per doubling of N


def test_ct_branch_euler_with_clean_sample_is_exact(toy):
    x0 = toy.get(torch.arange(64)).x0
    eps = torch.randn_like(x0)
    s, s_next = torch.full((64,), 2.0), torch.full((64,), 0.7)
    clean = lambda x, sigma, cond, guidance_scale=None: x0  # noqa: E731
    assert torch.allclose(euler_step(clean, x0 + 2.0 * eps, s, s_next, None), x0 + 0.7 * eps, atol=1e-6)


def _affine_gen(boundary=0.002, a=0.3, b=-0.2):
    return Generator(AffineConsistencyDenoiser(DIM, a_init=a, b_init=b, boundary_sigma=boundary), sigma_init=80.0)


def test_cd_pairs_target_gradient_and_ema(toy):
    torch.manual_seed(0)
    gen = _affine_gen()
    obj = ConsistencyDistillation.create(teacher=Teacher(toy.teacher()), generator=gen, distance="l2", num_scales=18)
    s, s_next = obj.sample_pair(4096, torch.device("cpu"))
    grid = obj.sigmas.tolist()
    assert (s > s_next).all()
    idx = torch.tensor([grid.index(v) for v in s.tolist()])
    assert idx.min() == 0 and idx.max() == 16  # n in {0..N-2}
    assert torch.equal(s_next, obj.sigmas[idx + 1])
    out = obj.generator_loss(toy.get(torch.arange(64)), 0)
    assert out.loss.shape == (64,)
    out.loss.mean().backward()
    assert gen.denoiser.a.grad is not None
    assert all(p.grad is None for p in obj.target_generator.parameters())
    old = obj.target_generator.denoiser.a.detach().clone()
    with torch.no_grad():
        gen.denoiser.a.add_(1.0)
    obj.on_step_end(0)
    assert torch.allclose(obj.target_generator.denoiser.a, 0.95 * old + 0.05 * gen.denoiser.a.detach())


def test_distances_l2_mean_and_lpips_input_range():
    x, y = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8)
    assert torch.allclose(consistency_distance(x, y, "l2"), ((x - y) ** 2).flatten(1).mean(1))
    assert torch.allclose(consistency_distance(x, y, "l1"), (x - y).abs().flatten(1).mean(1))
    seen = {}

    class Spy(nn.Module):
        def forward(self, a, b, normalize=False):
            seen.update(a=a, normalize=normalize)
            return torch.zeros(a.shape[0], 1, 1, 1)

    img = torch.rand(2, 3, 32, 32) * 2 - 1
    consistency_distance(img, img, "lpips", lpips_fn=Spy())
    a = seen["a"]
    assert a.shape == (2, 3, 224, 224) and seen["normalize"] and a.min() >= 0 and a.max() <= 1


def test_lpips_random_trunk_never_downloads():
    from diffdistill.objectives.consistency import build_lpips

    metric = build_lpips("alex", "random")
    x = torch.rand(2, 3, 224, 224)
    assert metric(x, x, normalize=True).abs().max() < 1e-6
    with pytest.raises(ValueError, match="lpips_weights"):
        build_lpips("alex", None)


def test_shared_dropout_rng():
    drop = nn.Dropout(0.5)
    x = torch.ones(4, 1000)
    rng = RNGState(torch.device("cpu"))
    a = drop(x)
    after = torch.get_rng_state()
    with rng.replay():
        b = drop(x)
    assert torch.equal(a, b)  # same mask
    assert torch.equal(torch.get_rng_state(), after)  # the RNG continues as if the replay had not run


# ---------------------------------------------------------------------------------------------
# iCT / ECT (docs/invariants.md §3)


def test_pseudo_huber_on_flattened_norm():
    c = 0.3
    d = torch.zeros(2, 4, 4)
    d[:, 0, 0], d[:, 1, 2] = c * 0.6, c * 0.8  # ||d|| = c
    assert torch.allclose(_norm_distance(d, c), torch.full((2,), (math.sqrt(2) - 1) * c))
    assert torch.allclose(
        consistency_distance(d, torch.zeros_like(d), "pseudo_huber", c), torch.full((2,), (math.sqrt(2) - 1) * c)
    )
    assert torch.allclose(_norm_distance(d, 0.0), torch.full((2,), c))  # ECT default: unsquared L2
    assert default_huber_c(torch.zeros(1, 3, 32, 32)) == pytest.approx(0.02993, abs=1e-5)
    assert default_huber_c(torch.zeros(1, 4, 64, 64)) == pytest.approx(0.06912, abs=1e-5)


def test_ict_curriculum_and_pair_probabilities():
    K = 400_000
    assert [ict_num_scales(k, K) for k in range(0, K, 50_000)] == [11, 21, 41, 81, 161, 321, 641, 1281]
    assert ict_num_scales(K - 1, K) == 1281
    for n in (11, 1281):
        sigmas = karras_sigmas(n).flip(0)
        p = ict_pair_probs(sigmas)
        assert p.shape == (n - 1,) and float(p.sum()) == pytest.approx(1.0, abs=1e-6) and (p > 0).all()
    # the log-normal mode (exp(-1.1) = 0.33) gets the most mass
    sigmas = karras_sigmas(81).flip(0)
    i = int(ict_pair_probs(sigmas).argmax())
    assert float(sigmas[i]) < 0.8 and float(sigmas[i + 1]) > 0.1


@pytest.mark.parametrize("stage,t,r", [(0, 1.0, 0.0), (0, 10.0, 4.998), (1, 1.0, 0.2121), (3, 1.0, 0.803)])
def test_ect_r_table(stage, t, r):
    assert float(ect_r(torch.tensor([t]), stage)) == pytest.approx(r, abs=1e-3)


def test_ect_clean_target_where_r_is_zero():
    torch.manual_seed(0)

    class Identity(Denoiser):  # f(x, sigma) = x: its own target wherever r > 0, so only r = 0 contributes
        sigma_data, sigma_min, sigma_max = 0.5, 0.002, 80.0

        def denoise(self, x, sigma, cond):
            return x

    obj = ECT(generator=Generator(Identity()), P_mean=-4.0, P_std=0.1)  # t ~ 0.02: r = 0 at stage 0
    y = torch.randn(2048, DIM)
    out = obj.generator_loss(Batch(y), 0)
    # target = y, pred = y + t eps, loss = ||t eps|| / t = ||eps|| ~ sqrt(D)
    assert out.logs["clean_target_frac"] == 1.0
    assert float(out.loss.mean()) == pytest.approx(math.sqrt(DIM), rel=0.03)
    obj_late = ECT(generator=Generator(Identity()), P_mean=1.0, P_std=0.1)  # t ~ 2.7: r > 0 from stage 1
    assert float(obj_late.generator_loss(Batch(y), 3 * obj_late.double_every).loss.abs().max()) > 0  # x_t != x_r


class _DiracTeacher(nn.Module):
    """The exact denoiser of a point mass at 0: D(x, sigma) = 0, whose PF-ODE x(sigma) = x_t sigma / t is what the
    one-sample pair x0 + sigma z gives at x0 = 0 (and what one Heun step of it gives exactly)."""

    calls = 0

    def forward(self, x, sigma, cond=None, guidance_scale=None):
        self.calls += 1
        return torch.zeros_like(x)


@pytest.mark.parametrize("name", ["ict", "ect"])
def test_teacher_pair_is_the_data_pair_where_the_one_sample_step_is_exact(name):
    """objective.pair=teacher (the CD ablation of iCT / ECT): at data x0 = 0 with its exact teacher the one-sample
    step is the PF-ODE step, so both pairs give the same loss; at x0 = 1 (the same teacher, now wrong) they differ."""
    inner = edm_mlp(dim=DIM, hidden=32, depth=2)

    def losses(x0):
        out = []
        for pair in ("data", "teacher"):
            torch.manual_seed(0)
            gen = Generator(ConsistencyDenoiser(inner, sigma_min=0.002) if name == "ict" else inner)
            kw = {"total_steps": 800} if name == "ict" else {"double_every": 100}
            teacher = _DiracTeacher()
            obj = OBJECTIVES[name](generator=gen, teacher=teacher, pair=pair, **kw)
            out.append(obj.generator_loss(Batch(x0), 350).loss.detach())
            # the pass count's teacher forwards are the ones made (Heun: 2; the data pair: none)
            assert teacher.calls == obj.pass_count().forward - 1.0
        return out

    data, teacher = losses(torch.zeros(256, DIM))
    assert float(data.abs().mean()) > 0.01
    torch.testing.assert_close(teacher, data, rtol=1e-4, atol=1e-6)
    data, teacher = losses(torch.ones(256, DIM))
    assert float((teacher - data).abs().mean()) > 0.01 * float(data.abs().mean())
    with pytest.raises(ValueError, match="objective.pair=teacher needs a teacher"):
        OBJECTIVES[name](generator=Generator(inner), pair="teacher")
    with pytest.raises(ValueError, match="objective.pair must be one of"):
        OBJECTIVES[name](generator=Generator(inner), teacher=_DiracTeacher(), pair="ode")


def test_weighted_l2_limit_as_r_approaches_t(toy):
    """docs/invariants.md §3: ||f(x_t, t) - f(x_r, r)|| / (t - r) tends to a finite non-zero limit for a
    non-consistent f and to 0 for the exact consistency function f* (x_r on the teacher's ODE from x_t)."""
    torch.manual_seed(0)
    teacher = Teacher(toy.teacher())
    x0 = toy.get(torch.arange(512)).x0
    t = torch.full((512,), 1.5)
    x_t = x0 + 1.5 * torch.randn_like(x0)

    def linear(x, sigma):  # consistent nowhere: the same affine map at every sigma
        return 0.6 * x + 0.1

    ratios = {"linear": [], "exact": []}
    for h in (0.2, 0.1, 0.05, 0.025):
        r = t - h
        x_r = heun_step(teacher, x_t, t, r, None)  # one ODE step of the exact teacher
        for name, f in (("linear", linear), ("exact", f_star)):
            diff = f(x_t, t) - f(x_r, r)
            ratios[name].append(float(_norm_distance(diff, 0.0).mean() / h))  # (ECT Eq. 6) with c = 0
    lin, ex = ratios["linear"], ratios["exact"]
    assert lin[-1] > 0.5 and abs(lin[-1] - lin[-2]) < 0.02 * lin[-1]  # converges to a non-zero limit
    assert ex[-1] < 1e-3 * lin[-1] and all(b < a / 3 for a, b in zip(ex, ex[1:]))  # O(h^2) -> 0

    # ECT's const mapping r = t (1 - q^-(s+1)) shrinks t - r with the stage; for linear f the weighted loss is
    # |a| ||eps|| at every stage: finite, non-zero, independent of t - r
    class Linear(Denoiser):
        sigma_data, sigma_min, sigma_max = 0.5, 0.002, 80.0

        def denoise(self, x, sigma, cond):
            return linear(x, sigma)

    obj = ECT(generator=Generator(Linear()), mapping="const", P_mean=0.5, P_std=0.1, double_every=1)
    y = toy.get(torch.arange(4096)).x0
    torch.manual_seed(1)
    early = float(obj.generator_loss(Batch(y), 0).loss.mean())
    torch.manual_seed(1)
    late = float(obj.generator_loss(Batch(y), 6).loss.mean())
    assert early == pytest.approx(late, rel=1e-3) and early == pytest.approx(0.6 * math.sqrt(DIM), rel=0.03)


# ---------------------------------------------------------------------------------------------
# sCM (docs/invariants.md §4)


@pytest.mark.parametrize("t", [0.1, 0.7, 1.3, 1.5])
def test_trigflow_F_edm_identity(t):
    torch.manual_seed(0)
    den = edm_mlp(dim=DIM, hidden=32, depth=2)
    x_t, tt = torch.randn(8, DIM), torch.full((8,), t)

    class Opaque(Denoiser):
        sigma_data, sigma_min, sigma_max = 0.5, 0.002, 80.0

        def denoise(self, x, sigma, cond):
            return den(x, sigma, cond)

    assert torch.allclose(trigflow_F(den, x_t, tt, None, 0.5), trigflow_F(Opaque(), x_t, tt, None, 0.5), atol=1e-4)
    # f(x, t) = cos t x - sigma_d sin t F reproduces the EDM denoiser, hence f(x, 0) = x
    x, sigma = trig_to_edm(x_t, tt, 0.5)
    f = math.cos(t) * x_t - 0.5 * math.sin(t) * trigflow_F(den, x_t, tt, None, 0.5)
    assert torch.allclose(f, den(x, sigma), atol=1e-5)


def test_jvp_matches_finite_differences():
    torch.manual_seed(0)
    den = edm_mlp(dim=DIM, hidden=32, depth=2)
    x_t, t, dxdt = torch.randn(8, DIM), torch.rand(8) * 1.3 + 0.1, torch.randn(8, DIM)

    def fn(x, tt):
        return trigflow_F(den, x, tt, None, 0.5)

    with torch.no_grad():
        F_a, dF_a = trigflow_jvp(fn, x_t, t, dxdt, "autograd")
        F_f, dF_f = trigflow_jvp(fn, x_t, t, dxdt, "finite_difference", 1e-3)
        h = 1e-4  # the one-sided formula of docs/invariants.md §4
        cs = append_dims(torch.cos(t) * torch.sin(t), 2)
        dF_1 = (fn(x_t + h * cs * dxdt, t + h * cs[:, 0]) - fn(x_t, t)) / h
    assert torch.allclose(F_a, F_f)
    assert (dF_a - dF_f).abs().max() <= 2e-3 * dF_a.abs().max()
    assert (dF_a - dF_1).abs().max() <= 2e-2 * dF_a.abs().max()


@pytest.mark.parametrize("backend", ["autograd", "finite_difference"])
def test_tangent_vanishes_at_exact_trigflow_solution(toy, backend):
    torch.manual_seed(0)
    teacher = Teacher(toy.teacher())
    exact = _affine_gen(boundary=0.0, a=S, b=MU)
    wrong = _affine_gen(boundary=0.0, a=0.5, b=0.0)
    x0 = toy.get(torch.arange(64)).x0
    for t_val in (0.1, 0.7, 1.3, 1.5):
        t = torch.full((64,), t_val)
        x_t = math.cos(t_val) * x0 + math.sin(t_val) * 0.5 * torch.randn_like(x0)
        with torch.no_grad():
            dxdt = 0.5 * trigflow_F(teacher, x_t, t, None, 0.5)
            for gen, small in ((exact, True), (wrong, False)):
                F, dF = trigflow_jvp(lambda x, tt, g=gen: trigflow_F(g, x, tt, None, 0.5), x_t, t, dxdt, backend)
                g = scm_tangent(x_t, t, dxdt, F, dF, 0.5, 1.0)
                if small:
                    assert g.abs().max() < (1e-4 if backend == "autograd" else 5e-3)  # fp32 rounding of the FD
                else:
                    assert g.abs().max() > 1e-2


def test_tangent_normalisation_and_warmup():
    torch.manual_seed(0)
    g = 10 * torch.randn(5, DIM)
    gn = normalize_tangent(g, 0.1)
    assert (torch.linalg.vector_norm(gn, dim=1) < 1).all()
    assert torch.allclose(torch.linalg.vector_norm(gn, dim=1), g.norm(dim=1) / (g.norm(dim=1) + 0.1))
    x_t, F, dxdt, dF = (torch.randn(5, DIM) for _ in range(4))
    t = torch.rand(5)
    expected = -append_dims(torch.cos(t) ** 2, 2) * (0.5 * F - dxdt)
    assert torch.allclose(scm_tangent(x_t, t, dxdt, F, dF, 0.5, 0.0), expected)  # r = 0: the first term only


def test_rcm_and_scm_warmup_variants():
    """docs/invariants.md §4: both variants agree at r = 1; at r = 0 sCM keeps -cos^2 t (sigma_d F- - dx/dt) whereas
    rCM keeps -cos t (F- - F_teacher) - cos t sin t dF-/dt (sigma_d = 1, dx/dt = F_teacher)."""
    torch.manual_seed(0)
    x_t, F, F_teacher, dF = (torch.randn(6, DIM) for _ in range(4))
    t = torch.rand(6) * 1.5
    c = append_dims(torch.cos(t), 2)
    for sd in (0.5, 1.0):
        full = [scm_tangent(x_t, t, F_teacher, F, dF, sd, 1.0, v) for v in ("scm", "rcm")]
        assert torch.allclose(full[0], full[1], atol=1e-6)
    assert torch.allclose(scm_tangent(x_t, t, F_teacher, F, dF, 1.0, 0.0, "scm"), -(c**2) * (F - F_teacher))
    expected = -c * (F - F_teacher) - dF  # dF is already cos t sin t dF-/dt
    assert torch.allclose(scm_tangent(x_t, t, F_teacher, F, dF, 1.0, 0.0, "rcm"), expected, atol=1e-6)
    half = [scm_tangent(x_t, t, F_teacher, F, dF, 1.0, 0.5, v) for v in ("scm", "rcm")]
    assert (half[0] - half[1]).abs().max() > 1e-2  # the variants differ during the warm-up
    with pytest.raises(ValueError, match="warmup variant"):
        scm_tangent(x_t, t, F_teacher, F, dF, 1.0, 0.5, "ecm")


def test_scm_loss_value_and_adaptive_weight_optimum(toy):
    """At the forward pass sq = ||g_n||^2 / D; training only w_phi drives e^{-logvar} sq -> 1 (e^w = D / M)."""
    torch.manual_seed(0)
    gen = _affine_gen(boundary=0.0)
    obj = SCM.create(
        teacher=Teacher(toy.teacher()), generator=gen, tangent_warmup_steps=0, jvp_backend="finite_difference"
    )
    opt = torch.optim.Adam(gen.adaptive_weight.parameters(), lr=5e-2)
    for step in range(300):
        out = obj.generator_loss(toy.get(torch.arange(256) + 256 * step), step)
        opt.zero_grad()
        out.loss.mean().backward()
        opt.step()
    with torch.no_grad():
        ratios = []
        for _ in range(4):
            out = obj.generator_loss(toy.get(torch.arange(4096)), 10_000)
            logvar = float(out.logs["logvar_mean"])
            ratios.append(out.logs["tangent_sq"] / math.exp(logvar))
    assert abs(sum(ratios) / len(ratios) - 1.0) < 0.35  # the weight is t-dependent, so only roughly 1 on average
    assert out.logs["tangent_sq"] <= 1.0 / DIM + 1e-6  # ||g_n||^2 / D < 1 / D


# ---------------------------------------------------------------------------------------------
# Gaussian toys: one- and two-step samples reach the data distribution


def _train(obj, gen, toy, steps, lr=3e-2, batch=256):
    opt = torch.optim.Adam(gen.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=lr / 100)
    for step in range(steps):
        x0 = MU + S * torch.randn(batch, DIM)
        out = obj.generator_loss(Batch(x0, Conditioning()), step)
        assert torch.isfinite(out.loss).all()
        opt.zero_grad()
        out.loss.mean().backward()
        opt.step()
        sched.step()
        obj.on_step_end(step)
    with torch.no_grad():
        z = torch.randn(4096, DIM)
        one = gen(z)
        two = gen.sample(z, sigmas=[80.0, 0.8])
    return (float(one.mean()), float(one.std())), (float(two.mean()), float(two.std()))


def _chain_std(path: list[float], solver: str) -> float:
    """Std of N(MU, S^2) data transported by the teacher solver along ``path`` (the CD fixed point)."""
    std = math.sqrt(S**2 + path[0] ** 2)
    for s, s_next in zip(path[:-1], path[1:]):
        if s == s_next:
            continue
        k = lambda sig: sig**2 / (S**2 + sig**2)  # noqa: E731  d(x - D*)/dx
        if solver == "euler":
            std *= 1 + (s_next - s) * k(s) / s
        else:
            x_e = 1 + (s_next - s) * k(s) / s
            std *= 1 + (s_next - s) * 0.5 * (k(s) / s + x_e * k(s_next) / s_next)
    return std


def assert_near_data(one, two, mean=MU, std=S, tol_mean=0.03, tol_std=0.03):
    for m, s in (one, two):
        assert abs(m - mean) < tol_mean, (one, two)
        assert abs(s - std) < tol_std, (one, two)


def test_toy_cd_reaches_data(toy):
    """N = 40 (Heun chain std 0.807) with the paper's mu = 0.95: the boundary propagates through 39 EMA-lagged links,
    hence the 4000 steps (~6 s)."""
    torch.manual_seed(0)
    gen = _affine_gen()
    obj = ConsistencyDistillation.create(teacher=Teacher(toy.teacher()), generator=gen, distance="l2", num_scales=40)
    one, two = _train(obj, gen, toy, 4000)
    assert_near_data(one, two)


def test_toy_cd_n18_lands_on_the_heun_chain(toy):
    """With N = 18 the Heun chain overestimates the std (0.838 vs 0.8); CD must reproduce the chain, not the truth."""
    torch.manual_seed(0)
    gen = _affine_gen()
    obj = ConsistencyDistillation.create(teacher=Teacher(toy.teacher()), generator=gen, distance="l2")
    expected = _chain_std(karras_sigmas(18).tolist(), "heun")
    assert expected == pytest.approx(0.838, abs=2e-3)
    one, _ = _train(obj, gen, toy, 1500)
    assert abs(one[1] - expected) < 0.02 and abs(one[0] - MU) < 0.03


def test_toy_ict_reaches_data(toy):
    torch.manual_seed(0)
    gen = _affine_gen()
    obj = ICT.create(generator=gen, total_steps=800)
    one, two = _train(obj, gen, toy, 800, lr=1e-2)
    assert_near_data(one, two)


def test_toy_ect_reaches_data(toy):
    torch.manual_seed(0)
    gen = _affine_gen(boundary=0.0)
    obj = ECT(generator=gen, double_every=100)
    one, two = _train(obj, gen, toy, 800, lr=1e-2)
    assert_near_data(one, two)


@pytest.mark.parametrize("solver", ["ddim", "heun"])
def test_toy_lcm_lands_on_its_solver_chain(toy, solver):
    """LCM with a 100-point grid and k = 5: DDIM's chain gives std 0.70, Heun's ~0.82; the student must match."""
    torch.manual_seed(0)
    gen = _affine_gen()
    obj = LCM.create(teacher=Teacher(toy.teacher()), generator=gen, num_scales=100, skipping_step=5, solver=solver)
    grid = obj.sigmas_asc
    path = [float(grid[i]) for i in obj.start_index] + [float(grid[0])]
    expected = _chain_std(path, "euler" if solver == "ddim" else "heun")
    one, two = _train(obj, gen, toy, 1500)
    assert_near_data(one, two, std=expected, tol_std=0.025)


@pytest.mark.parametrize("mode,backend", [("scd", "autograd"), ("sct", "finite_difference")])
def test_toy_scm_reaches_data(toy, mode, backend):
    torch.manual_seed(0)
    gen = _affine_gen(boundary=0.0)
    obj = SCM.create(
        teacher=Teacher(toy.teacher()), generator=gen, mode=mode, jvp_backend=backend, tangent_warmup_steps=200
    )
    one, two = _train(obj, gen, toy, 600 if mode == "scd" else 800, lr=1e-2)
    assert_near_data(one, two, tol_std=0.03 if mode == "scd" else 0.04, tol_mean=0.03 if mode == "scd" else 0.04)


# ---------------------------------------------------------------------------------------------
# plumbing: registry, guidance embedding, networks, configs


def test_registry_papers_and_pass_counts(toy):
    for cls in OBJECTIVES.values():
        assert cls.paper is not None and cls.paper.arxiv
    teacher = Teacher(toy.teacher())
    objs = [
        ConsistencyDistillation.create(teacher=teacher, generator=_affine_gen(), distance="l2"),
        ICT.create(generator=_affine_gen()),
        ECT(generator=_affine_gen(0.0)),
        LCM.create(teacher=teacher, generator=_affine_gen(), num_scales=100, skipping_step=5),
        SCM.create(teacher=teacher, generator=_affine_gen(0.0)),
    ]
    costs = {type(o).__name__: o.pass_count().cost() for o in objs}
    assert all(isinstance(o.pass_count(), PassCount) for o in objs)
    assert costs["ECT"] < costs["ConsistencyDistillation"] and costs["SCM"] > costs["ECT"]


def test_lcm_guidance_embedding_and_mlp_student():
    from diffdistill.data import GaussianMixtureToy

    torch.manual_seed(0)
    toy = GaussianMixtureToy(dim=2, conditional=True)
    teacher = Teacher(toy.teacher())
    den = edm_mlp(dim=2, hidden=32, depth=2, num_classes=toy.num_classes, sigma_min=0.002)
    keys_before = set(den.state_dict())
    assert not any("guidance" in k for k in keys_before)  # default off: saved configs keep loading
    gen = Generator(den)
    x, sigma = torch.randn(4, 2), torch.full((4,), 1.0)
    labels = torch.tensor([0, 1, 2, 3])
    ref = gen.denoise(x, sigma, Conditioning(class_labels=labels))
    obj = LCM.create(teacher=teacher, generator=gen, num_scales=100, skipping_step=5)
    assert obj.embedded_guidance and isinstance(gen.denoiser, ConsistencyDenoiser)
    w_cond = Conditioning(class_labels=labels, guidance_scale=torch.full((4,), 7.0))
    assert torch.allclose(gen.denoiser.inner(x, sigma, w_cond), ref)  # zero-initialised: unchanged at init
    batch = toy.get(torch.arange(32))
    out = obj.generator_loss(batch, 0)
    out.loss.mean().backward()
    emb = gen.denoiser.inner.net.guidance_emb
    assert emb.mlp[2].weight.grad is not None and emb.mlp[2].weight.grad.abs().sum() > 0
    assert obj._w.min() >= 3.0 and obj._w.max() <= 15.0
    with torch.no_grad():
        emb.mlp[2].weight.add_(0.5)
    out_a = gen.denoise(x, sigma, Conditioning(class_labels=labels, guidance_scale=torch.full((4,), 2.0)))
    out_b = gen.denoise(x, sigma, Conditioning(class_labels=labels, guidance_scale=torch.full((4,), 9.0)))
    assert not torch.allclose(out_a, out_b)


def test_unet_guidance_embedding_and_scm_jvp_through_attention():
    from diffdistill.models.builders import edm_unet
    from tests.helpers import tiny_unet2d_config

    torch.manual_seed(0)
    cfg = tiny_unet2d_config(
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )
    den = edm_unet(cfg)
    x, sigma = torch.randn(2, 1, 8, 8), torch.full((2,), 0.7)
    ref = den(x, sigma)
    den.net.enable_guidance_embedding()
    c = Conditioning(guidance_scale=torch.tensor([2.0, 8.0]))
    assert torch.allclose(den(x, sigma, c), ref, atol=1e-6)
    with torch.no_grad():
        den.net.guidance_emb.mlp[2].bias.add_(0.1)
    assert not torch.allclose(den(x, sigma, c), ref)
    # sCT on a UNet with attention: forward-mode AD needs the math SDPA kernel on CPU
    gen = Generator(edm_unet(cfg))
    obj = SCM.create(teacher=None, generator=gen, mode="sct")
    out = obj.generator_loss(Batch(torch.rand(2, 1, 8, 8) * 2 - 1), 5)
    out.loss.mean().backward()
    assert torch.isfinite(out.loss).all()


def test_configs_instantiate(toy):
    from pathlib import Path

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    root = Path(__file__).resolve().parents[2] / "diffdistill" / "configs" / "objective"
    teacher = Teacher(toy.teacher())
    for name, cls in (("cd", ConsistencyDistillation), ("ict", ICT), ("ect", ECT), ("lcm", LCM), ("scm", SCM)):
        cfg = OmegaConf.load(root / f"{name}.yaml")
        import inspect

        params = list(inspect.signature(cls.__init__).parameters)
        keys = [k for k in cfg if not k.startswith("_")]
        assert keys == [p for p in params if p in keys], f"{name}.yaml is not in signature order"
        if name == "cd":
            cfg.lpips_weights = "random"
            cfg.lpips_net = "alex"
        factory = instantiate(cfg)
        kw = {"generator": _affine_gen(0.0 if name in ("ect", "scm") else 0.002)}
        if "teacher" in params:
            kw["teacher"] = teacher
        obj = cls.create(**factory.keywords, **kw)
        assert isinstance(obj, cls)
