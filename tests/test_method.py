"""The method pinned end to end, stochastic core included, against an independent implementation.

`naive_elastic` re-states the sampling loop from the method description alone (the paper's algorithm
and docs/method.md's sampling loop, sub-sampler, padding, local score, repaint and RRG): the
sub-sampler's group rule and four-way pick, NaN-marked write-back, first-writer-wins windows,
explicit background padding, diffusers' `DDIMScheduler.step` and autograd for RRG. It shares no code
with the sampler; the two get the same injected sub-sampler choices and repaint noise (and the
sampler's own background strips), and must agree on the final latent to fp32 round-off.

The closed-form tests pin single stages: the re-noising distribution, the RRG pull as the gradient
of its loss, the write-back order, window ownership, and the schedule's own previous timestep.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

import elastic_diffusion as ed
from test_sampler import QUIET, relative_error


@pytest.fixture(scope="module")
def sd1(tiny_sd1_path):
    return ed.ElasticDiffusion(device="cpu", sd_version=tiny_sd1_path, view_batch_size=7)


@pytest.fixture(scope="module")
def xl(tiny_sdxl_path):
    return ed.ElasticDiffusion(device="cpu", sd_version=tiny_sdxl_path, view_batch_size=7)


@pytest.fixture(scope="module")
def sd3(tiny_sd3_path):
    return ed.ElasticDiffusion(device="cpu", sd_version=tiny_sd3_path, view_batch_size=7)


# --------------------------------------------------------------------------------------------------
# The independent implementation
# --------------------------------------------------------------------------------------------------


def naive_views(L, D, p):
    """One axis of the local views: (window_start, window_end, crop_start, crop_end), context moved across."""
    if L <= D:
        return [(0, L, 0, L)]
    n = math.ceil((L - p) / p) + 1
    out, half = [], (D - p) // 2
    for j in range(n):
        a = min(j * p, L - p)
        b = a + p
        if a - half < 0:
            nb = a
            na = min(2 * half - nb, L - b)
        else:
            na = min(half, L - b)
            nb = min(2 * half - na, a)
        out.append((a, b, a - nb, b + na))
    return out


def naive_reference_size(Hp, Wp, P):
    f = max(max(Hp, Wp) / P, 1.0)
    return int((Hp // f) // 8), int((Wp // f) // 8)


def group_rule(L, l):
    """Groups [floor(m L / l), floor((m + 1) L / l)): first and last member, and the group of every index."""
    bounds = [(m * L // l, (m + 1) * L // l) for m in range(l)]
    first = torch.tensor([a for a, _ in bounds])
    last = torch.tensor([b - 1 for _, b in bounds])
    owner = torch.tensor([m for m, (a, b) in enumerate(bounds) for _ in range(a, b)])
    return first, last, owner


def naive_elastic(sampler, latents, neg, pos, T, omega, R, lam0, kappa, stop_t, patch, cells, noise,
                  backgrounds, repaint=True):
    """The sampling loop for one image, from the method description. `cells[i]` (R + 1, h, w) holds the
    sub-sampler's k in {0, 1, 2, 3} for step i (0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right),
    `noise[i]` the re-noising draw of step i, `backgrounds[(strip, (height, width), t)]` the noised strips.
    An SD 3 model (`sampler.is_flow`) runs the flow form: the transformer's v, the Euler step x0 = x - sigma v,
    x' = x + (sigma' - sigma) v on the scheduler's sigmas, repaint a x' + b noise with a = (1 - sigma) / (1 - sigma'),
    b = sqrt(sigma^2 - a^2 sigma'^2), and an image within the native size unpadded."""
    unet, D, P, flow = sampler.unet, sampler.native_latent, sampler.native_px, sampler.is_flow
    sched = (FlowMatchEulerDiscreteScheduler if flow else DDIMScheduler).from_config(sampler.scheduler.config)
    sched.set_timesteps(T)
    timesteps = sched.timesteps.tolist() if flow else [int(t) for t in sched.timesteps]
    acp, sigmas = (None, sched.sigmas.tolist()) if flow else (sched.alphas_cumprod, None)
    embeds, pooled = sampler.encode_prompt([neg, pos])
    H, W = latents.shape[-2:]
    Hp, Wp = 8 * H, 8 * W
    h, w = naive_reference_size(Hp, Wp, P)
    row_first, row_last, row_owner = group_rule(H, h)
    col_first, col_last, col_owner = group_rule(W, w)

    def pad(x, t):
        """Centre x (N, C, a, b) on a D x D canvas: strips left/right of height a first, then top/bottom of width D."""
        a, b = x.shape[-2:]
        if flow and (a, b) == (H, W):  # SD 3 runs an image within the native size at its own size
            return x, 0, 0
        left, top = (D - b) // 2, (D - a) // 2
        right, bottom = D - b - left, D - a - top
        strip = lambda name, size: backgrounds[(name, size, t)].expand(x.shape[0], -1, -1, -1)  # noqa: E731
        parts = ([strip("left", (a, left))] if left else []) + [x] + ([strip("right", (a, right))] if right else [])
        x = torch.cat(parts, dim=3)
        parts = ([strip("top", (top, D))] if top else []) + [x] + ([strip("bottom", (bottom, D))] if bottom else [])
        return torch.cat(parts, dim=2), top, left

    def eps(x, t, which):
        """The UNet's noise prediction for one latent of at most D x D, one sample per call; which: 0 neg, 1 pos."""
        a, b = x.shape[-2:]
        canvas, top, left = pad(x, t)
        kwargs = {}
        if sampler.is_sdxl:
            ids = torch.tensor([[4 * Hp, 4 * Wp, 0, 0, 4 * Hp, 4 * Wp]], dtype=torch.float32)
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled[which:which + 1], "time_ids": ids}
        if flow:
            out = unet(hidden_states=canvas, timestep=torch.tensor([t]), encoder_hidden_states=embeds[which:which + 1],
                       pooled_projections=pooled[which:which + 1]).sample
        else:
            out = unet(canvas, t, encoder_hidden_states=embeds[which:which + 1], **kwargs).sample
        return out[:, :, top:top + a, left:left + b]

    def global_direction(x, t, k):
        direction = torch.full_like(x, float("nan"))  # "unset"
        for s in range(k.shape[0]):
            rows = torch.where(k[s] < 2, row_first[:, None], row_last[:, None])
            cols = torch.where(k[s] % 2 == 0, col_first[None, :], col_last[None, :])
            x_ref = x[:, :, rows, cols]
            eps_neg, eps_pos = eps(x_ref, t, 0), eps(x_ref, t, 1)
            delta = eps_pos - eps_neg
            direction[:, :, rows, cols] = delta  # later passes overwrite earlier ones
        fill = delta[:, :, row_owner][:, :, :, col_owner]  # the last pass's value of each position's group
        direction = torch.where(torch.isnan(direction), fill, direction)
        return direction, x_ref, eps_neg

    def local_uncond(x, t):
        local = torch.zeros_like(x)
        written = torch.zeros(H, W, dtype=torch.bool)
        for ra, rb, r0, r1 in naive_views(H, D, patch):
            for ca, cb, c0, c1 in naive_views(W, D, patch):
                window = torch.zeros(H, W, dtype=torch.bool)
                window[ra:rb, ca:cb] = True
                todo = window & ~written  # first writer wins
                full = torch.zeros_like(x)
                full[:, :, r0:r1, c0:c1] = eps(x[:, :, r0:r1, c0:c1], t, 0)
                local[:, :, todo] = full[:, :, todo]
                written |= todo
        assert written.all()
        return local

    def step(prediction, i, t, x):
        """(x0, x at the next level): the flow's Euler step in closed form, or diffusers' DDIM step."""
        if flow:
            return x - sigmas[i] * prediction, x + (sigmas[i + 1] - sigmas[i]) * prediction
        out = sched.step(prediction, t, x)
        return out.pred_original_sample, out.prev_sample

    S = T - math.floor(T * stop_t)
    x = latents.clone()
    for i, t in enumerate(timesteps):
        if i + 1 < T and not flow:  # DDIMScheduler.step steps to t - 1000 // T: here the schedule's own next one
            assert timesteps[i + 1] == t - 1000 // T
        direction, x_ref, eps_ref_neg = global_direction(x, t, cells[i])
        x0, x_prev = step(local_uncond(x, t) + omega * direction, i, t, x)
        omega_rrg = omega
        if repaint and R > 0 and i < T - 1:
            if flow:  # from sigma_{i+1} back to sigma_i
                a = (1 - sigmas[i]) / (1 - sigmas[i + 1])
                x = a * x_prev + math.sqrt(sigmas[i] ** 2 - a ** 2 * sigmas[i + 1] ** 2) * noise[i]
            else:
                ratio = acp[t] / acp[timesteps[i + 1]]
                x = ratio.sqrt() * x_prev + (1 - ratio).sqrt() * noise[i]  # from level t_{i+1} back to t
            direction, x_ref, eps_ref_neg = global_direction(x, t, torch.zeros(1, h, w, dtype=torch.long))
            omega_rrg = omega / 3
            x0, x_prev = step(local_uncond(x, t) + omega_rrg * direction, i, t, x)
        lam = lam0 * ((1 + math.cos(math.pi * i / S)) / 2) ** kappa if i < S else 0.0
        if lam > 10:
            eps_ref = eps_ref_neg + omega_rrg * F.interpolate(direction, size=(h, w), mode="nearest")
            if flow:
                x0_ref = x_ref - sigmas[i] * eps_ref  # v = eps - x0
            else:
                a = acp[t]
                x0_ref = (x_ref - (1 - a).sqrt() * eps_ref) / a.sqrt()
            target = x0_ref[:, :, row_owner][:, :, :, col_owner]
            leaf = x0.detach().clone().requires_grad_(True)
            with torch.enable_grad():
                (grad,) = torch.autograd.grad(lam * ((target - leaf) ** 2).mean(), leaf)
            x_prev = x_prev - grad
        x = x_prev
    return x


class BackgroundSpy:
    """Keeps the background strips the sampler prepares for its run."""

    def __init__(self, sampler):
        self.strips, self.sampler = {}, sampler
        prepare = sampler.prepare_backgrounds

        def spy(*args, **kwargs):
            out = prepare(*args, **kwargs)
            self.strips.update(out)
            return out

        sampler.prepare_backgrounds = spy

    def close(self):
        del self.sampler.prepare_backgrounds


def injected(T, R, h, w, shape, seed=0):
    """Sub-sampler choices (pass 0 top-left, later passes any of the four) and re-noising draws per step."""
    gen = torch.Generator().manual_seed(seed)
    cells = [torch.cat([torch.zeros(1, h, w, dtype=torch.long), torch.randint(0, 4, (R, h, w), generator=gen)])
             for _ in range(T)]
    noise = [torch.randn(shape, generator=gen) for _ in range(T)]
    return cells, noise


CASES = {  # model, width x height, repaint: what it exercises (sd1: native 512 px, latent 64; SDXL 1024, 128)
    "2x_width": ("sd1", 1024, 512, True),  # ratio 1/2, padded reference (32 x 64 in 64 x 64), four windows
    "2x_both": ("sd1", 1024, 1024, True),  # ratio 1/2 on both axes, 16 overlapping windows, no padding
    "1.5x": ("sd1", 768, 520, True),  # ratios 43/65 and 2/3, reference padded 10 + 11, three windows down
    "below_native": ("sd1", 384, 256, True),  # ratio 1: the whole image padded, passes and the view one input
    "no_repaint": ("sd1", 1024, 512, False),  # every step keeps the resampled direction at full guidance
    "sdxl_2x_width": ("sdxl", 2048, 1024, True),  # pooled embeddings and 4x time ids
    "sd3_2x_width": ("sd3", 1024, 512, True),  # the flow form (tiny SD 3: native 512 px): v, Euler, four windows
    "sd3_1.5x": ("sd3", 768, 512, True),  # the flow form with a padded reference (42 x 64 in 64 x 64)
}


@pytest.mark.parametrize("case", list(CASES))
def test_full_loop_matches_independent_implementation(case, request):
    kind, width, height, repaint = CASES[case]
    sampler = request.getfixturevalue({"sdxl": "xl", "sd3": "sd3"}.get(kind, "sd1"))
    D, P, C = sampler.native_latent, sampler.native_px, sampler.latent_channels
    # RRG at every step (1500, 1125, 375): after repaint passes (w/3, one pass) and after the last, resampled one.
    T, R, omega, lam0, kappa, stop_t, patch = 3, 2, 7.0, 1500.0, 1.0, 0.0, D // 2
    H, W = height // 8, width // 8
    h, w = naive_reference_size(height, width, P)
    latents = torch.randn(1, C, H, W, generator=torch.Generator().manual_seed(4))
    cells, noise = injected(T, R, h, w, (1, C, H, W))
    spy = BackgroundSpy(sampler)
    try:
        ours, info = sampler("a castle", "ugly", height=height, width=width, num_inference_steps=T,
                             guidance_scale=omega, resampling_steps=R, rrg_init_weight=lam0, cosine_scale=kappa,
                             rrg_stop_t=stop_t, patch_size=patch, repaint=repaint, latents=latents,
                             cells=lambda i, n: cells[i], repaint_noise=lambda i, shape: noise[i], **QUIET)
    finally:
        spy.close()
    assert info["reference_size"] == (h, w)
    with torch.no_grad():
        naive = naive_elastic(sampler, latents, "ugly", "a castle", T, omega, R, lam0, kappa, stop_t, patch,
                              cells, noise, spy.strips, repaint)
    assert relative_error(ours, naive) < 1e-5


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_deterministic_path_matches_independent_implementation(kind, request):
    """R = 0 (no resampling, no repaint) at 2x both sides: the default sub-sampler needs no injection."""
    sampler = request.getfixturevalue("xl" if kind == "sdxl" else "sd1")
    P, D = sampler.native_px, sampler.native_latent
    T, omega, lam0, kappa, stop_t, patch = 3, 9.0, 1500.0, 1.0, 0.2, D // 2
    latents = torch.randn(1, 4, 2 * D, 2 * D, generator=torch.Generator().manual_seed(4))
    ours, info = sampler("a castle", "ugly", height=2 * P, width=2 * P, num_inference_steps=T, guidance_scale=omega,
                         resampling_steps=0, rrg_init_weight=lam0, cosine_scale=kappa, rrg_stop_t=stop_t,
                         patch_size=patch, latents=latents, **QUIET)
    cells = [torch.zeros(1, D, D, dtype=torch.long)] * T
    with torch.no_grad():
        naive = naive_elastic(sampler, latents, "ugly", "a castle", T, omega, 0, lam0, kappa, stop_t, patch,
                              cells, None, {})
    assert info["vae_encodes"] == 0  # no padding on this path
    assert relative_error(ours, naive) < 1e-5


def test_default_draws_are_the_documented_ones(sd1):
    """Same seed, same latent: the default sub-sampler and re-noising draw, in loop order, from one CPU
    generator seeded with a number drawn from the seed's generator after the initial latents."""
    args = dict(height=512, width=1024, num_inference_steps=3, resampling_steps=3, **QUIET)
    default, info = sd1("a fox", seed=21, **args)
    gen = torch.Generator().manual_seed(21)
    latents = torch.randn(1, 4, 64, 128, generator=gen)
    after_latents = torch.Generator().set_state(gen.get_state())  # the background strips' seed comes next
    aux = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 62, (1,), generator=gen)))
    counts = torch.full((32, 64), 4)
    draws = []

    def cells(step, passes):
        draws.append("cells")
        return ed.choose_cells(passes, counts, 0.3, aux)

    def noise(step, shape):
        draws.append("noise")
        return torch.randn(shape, generator=aux)

    replayed, _ = sd1("a fox", latents=latents, generator=after_latents, cells=cells, repaint_noise=noise, **args)
    assert torch.equal(default, replayed)
    assert draws == ["cells", "noise", "cells", "noise", "cells"]  # no repaint after the last step


def test_injected_cells_are_checked(sd1):
    with pytest.raises(ValueError, match=r"cells\(step, num_passes\) gave shape"):
        sd1("a fox", height=512, width=1024, num_inference_steps=1, resampling_steps=1, seed=0,
            cells=lambda step, passes: torch.zeros(passes, 8, 8, dtype=torch.long), **QUIET)


# --------------------------------------------------------------------------------------------------
# Stages with a closed form
# --------------------------------------------------------------------------------------------------


def test_renoising_distribution_over_many_draws(sd1):
    """Re-noising x' from t_{i+1} up to t_i with the default noise source: mean sqrt(a_t / a_{t_{i+1}}) x',
    variance 1 - a_t / a_{t_{i+1}}, for the schedule's own pair of levels (T = 50, step 0: 961 -> 981)."""
    timesteps = sd1.timesteps(50)
    t, t_next = timesteps[0], timesteps[1]
    ratio = sd1.model.alpha(t) / sd1.model.alpha(t_next)
    assert ratio == pytest.approx(0.79315, rel=1e-4)
    x_prev = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1)) * 3
    aux = torch.Generator().manual_seed(2)
    alpha, alpha_next = sd1.model.alpha(t), sd1.model.alpha(t_next)
    draws = torch.stack([ed.renoise(x_prev, alpha_next, alpha, torch.randn(x_prev.shape, generator=aux))
                         for _ in range(4000)])
    mean, var = draws.mean(0), draws.var(0)
    slope = float((mean * x_prev).sum() / (x_prev * x_prev).sum())
    assert slope == pytest.approx(math.sqrt(ratio), abs=2e-3)
    assert float((mean - math.sqrt(ratio) * x_prev).abs().mean()) < 0.01  # no offset
    assert float(var.mean()) == pytest.approx(1 - ratio, rel=0.02)


def test_rrg_is_the_gradient_of_its_loss_at_a_non_half_ratio(sd1):
    """The sampler's RRG term from a ScoreEstimate equals -d/dx0 of lambda * mean((up(x0_ref) - x0)^2), with
    x0_ref the reference's DDIM prediction at the step's guidance, at ratio 2/3 (groups of one and two)."""
    H, W, h, w = 96, 48, 64, 32
    gen = torch.Generator().manual_seed(0)
    estimate = ed.ScoreEstimate(local_uncond=torch.randn(1, 4, H, W, generator=gen),
                                direction=torch.randn(1, 4, H, W, generator=gen),
                                reference_latent=torch.randn(1, 4, h, w, generator=gen),
                                reference_uncond=torch.randn(1, 4, h, w, generator=gen))
    x0 = torch.randn(1, 4, H, W, generator=gen, dtype=torch.float64).float()
    t, omega, weight = 501, 7.0 / 3, 900.0
    pull = sd1.reduced_resolution_guidance(estimate, x0, sd1.model.alpha(t), omega, weight)
    a = torch.tensor(sd1.model.alpha(t), dtype=torch.float64)
    _, _, row_owner = group_rule(H, h)
    _, _, col_owner = group_rule(W, w)
    eps_ref = estimate.reference_uncond.double() + omega * F.interpolate(estimate.direction.double(), size=(h, w),
                                                                        mode="nearest")
    x0_ref = (estimate.reference_latent.double() - (1 - a).sqrt() * eps_ref) / a.sqrt()
    leaf = x0.double().requires_grad_(True)
    loss = weight * ((x0_ref[:, :, row_owner][:, :, :, col_owner] - leaf) ** 2).mean()
    (grad,) = torch.autograd.grad(loss, leaf)
    torch.testing.assert_close(pull.double(), -grad, rtol=1e-5, atol=1e-6)  # fp32 round-off of a ~0.3 pull


def test_write_back_later_pass_wins():
    """Three passes at ratio 1/2: where two passes gathered the same position, the later one's value is kept."""
    H, W, h, w = 4, 4, 2, 2
    cells = torch.tensor([[[0, 0], [0, 0]],  # pass 0: top-left everywhere
                          [[0, 1], [3, 0]],  # pass 1: cell (0, 0) again top-left; others move
                          [[3, 1], [3, 0]]])  # pass 2: cell (0, 0) bottom-right; (0, 1) and (1, 0) repeat pass 1
    rows, cols = ed.source_indices(cells, H, W)
    deltas = torch.stack([torch.full((1, 1, h, w), float(s + 1)) for s in range(3)])  # pass s writes s + 1
    direction = ed.write_back_direction(deltas, rows, cols, H, W)[0, 0]
    assert direction[0, 0] == 2  # written by passes 0 and 1: pass 1 wins
    assert direction[1, 1] == 3  # pass 2's own position
    assert direction[0, 3] == 3 and direction[3, 2] == 3  # passes 1 and 2 gathered these: pass 2 wins
    assert direction[2, 2] == 3  # cell (1, 1): passes 0, 1 and 2 all top-left: the last one's value
    assert direction[0, 2] == 1  # cell (0, 1)'s top-left: only pass 0 sampled it
    assert direction[1, 0] == 3  # never sampled: the last pass's value of its group
    assert direction[2, 0] == 1  # cell (1, 0)'s top-left, sampled by pass 0 only


@pytest.mark.parametrize("H,W,patch", [(256, 256, 64), (135, 240, 64), (96, 200, 32), (100, 37, 48)])
def test_overlapping_windows_each_position_from_its_first_window(H, W, patch):
    """U takes each position from the first view (row-major) whose window, not context, covers it."""
    views = ed.local_views(H, W, 128, patch)
    gen = torch.Generator().manual_seed(0)
    scores = [torch.randn(1, 2, r.crop_end - r.crop_start, c.crop_end - c.crop_start, generator=gen)
              for r, c in views]
    local = ed.assemble_local_score(torch.stack(scores), views, H, W)
    expected = torch.zeros(1, 2, H, W)
    written = torch.zeros(H, W, dtype=torch.bool)
    rows, cols = naive_views(H, 128, patch), naive_views(W, 128, patch)
    assert len(views) == len(rows) * len(cols)
    for score, ((ra, rb, r0, r1), (ca, cb, c0, c1)) in zip(scores, [(r, c) for r in rows for c in cols]):
        window = torch.zeros(H, W, dtype=torch.bool)
        window[ra:rb, ca:cb] = True
        todo = window & ~written
        full = torch.zeros(1, 2, H, W)
        full[:, :, r0:r1, c0:c1] = score
        expected[:, :, todo] = full[:, :, todo]
        written |= todo
    assert written.all() and torch.equal(local, expected)


# --------------------------------------------------------------------------------------------------
# The schedule's own previous timestep
# --------------------------------------------------------------------------------------------------


def _with_scheduler(sampler, scheduler):
    return ed.ElasticDiffusion.from_pipe(ed.share_pipeline(sampler.pipe, scheduler=scheduler), device="cpu")


def test_linspace_schedule_steps_to_its_own_previous_timestep(sd1):
    """timestep_spacing='linspace' at T = 4 gives 999, 666, 333, 0: DDIM steps 999 -> 666 -> 333 -> 0 -> final
    level. (diffusers' DDIMScheduler.step would step to t - 1000 // T = 749, a level the schedule does not
    visit next.) Reference: plain CFG with diffusers' first-order DPM-Solver, which is DDIM, on the same
    timesteps, at the native size with R = 0, where the method is plain CFG."""
    config = dict(sd1.scheduler.config, timestep_spacing="linspace")
    sampler = _with_scheduler(sd1, DDIMScheduler.from_config(config))
    T, omega, P = 4, 7.5, sampler.native_px
    timesteps = sampler.timesteps(T)
    assert timesteps == [999, 666, 333, 0]
    latents = torch.randn(1, 4, P // 8, P // 8, generator=torch.Generator().manual_seed(0))
    seen = []
    ours, info = sampler("a red house", "blurry", height=P, width=P, num_inference_steps=T, guidance_scale=omega,
                         resampling_steps=0, rrg_init_weight=0, latents=latents,
                         callback_on_step_end=lambda pipe, i, t, tensors: seen.append(t), **QUIET)
    assert seen == timesteps and info["unet_samples"] == 2 * T
    ddim = DPMSolverMultistepScheduler.from_config(sd1.scheduler.config, solver_order=1, algorithm_type="dpmsolver",
                                                   final_sigmas_type="sigma_min", lower_order_final=True)
    plain = ed.share_pipeline(sd1.pipe, scheduler=ddim)
    embeds, _ = sampler.encode_prompt(["blurry", "a red house"])
    reference = plain(prompt_embeds=embeds[1:], negative_prompt_embeds=embeds[:1], height=P, width=P,
                      timesteps=timesteps, guidance_scale=omega, latents=latents.clone(), output_type="latent").images
    assert relative_error(ours, reference) < 1e-5


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_uniform_schedules_agree_with_diffusers_ddim_step(sd1, spacing):
    """Where t - 1000 // T is the schedule's own next timestep (leading, trailing), the sampler's plain-CFG
    path equals diffusers' DDIMScheduler pipeline."""
    scheduler = DDIMScheduler.from_config(dict(sd1.scheduler.config, timestep_spacing=spacing))
    sampler = _with_scheduler(sd1, scheduler)
    T, omega, P = 5, 7.5, sampler.native_px
    latents = torch.randn(1, 4, P // 8, P // 8, generator=torch.Generator().manual_seed(1))
    ours, _ = sampler("a red house", "blurry", height=P, width=P, num_inference_steps=T, guidance_scale=omega,
                      resampling_steps=0, rrg_init_weight=0, latents=latents, **QUIET)
    plain = ed.share_pipeline(sd1.pipe, scheduler=DDIMScheduler.from_config(scheduler.config))
    embeds, _ = sampler.encode_prompt(["blurry", "a red house"])
    reference = plain(prompt_embeds=embeds[1:], negative_prompt_embeds=embeds[:1], height=P, width=P,
                      num_inference_steps=T, guidance_scale=omega, latents=latents.clone(), output_type="latent").images
    assert relative_error(ours, reference) < 1e-5
