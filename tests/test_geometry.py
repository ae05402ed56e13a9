"""Pure index math against docs/method.md (docs/method.md#checking-an-implementation): no model needed."""
import math

import pytest
import torch

import elastic_diffusion as ed

XL = 1024  # SDXL native size in pixels; D = 128 latent


@pytest.mark.parametrize("width,height,expected", [
    (2048, 2048, (128, 128)), (1536, 1536, (128, 128)), (1024, 2048, (128, 64)), (2048, 1024, (64, 128)),
    (1080, 1920, (128, 72)), (1920, 1080, (72, 128)), (2048, 1536, (96, 128)), (768, 2048, (128, 48)),
    (2048, 768, (48, 128)), (2048, 512, (32, 128)), (512, 2048, (128, 32)), (1280, 768, (76, 128)),
    (768, 768, (96, 96)), (512, 512, (64, 64)), (1024, 1024, (128, 128)),
])
def test_reference_size_table(width, height, expected):
    assert ed.reference_size(height, width, XL) == expected


def test_reference_size_sd15():
    assert ed.reference_size(1024, 1024, 512) == (64, 64)
    assert ed.reference_size(512, 1024, 512) == (32, 64)


def _starts(windows):
    return [w.own_start if i == 0 else None for i, w in enumerate(windows)]


@pytest.mark.parametrize("width,height,V,row_crops,col_crops", [
    (2048, 2048, 16, [(0, 128), (32, 160), (96, 224), (128, 256)], [(0, 128), (32, 160), (96, 224), (128, 256)]),
    (1536, 1536, 9, [(0, 128), (32, 160), (64, 192)], [(0, 128), (32, 160), (64, 192)]),
    (1024, 2048, 4, [(0, 128), (32, 160), (96, 224), (128, 256)], [(0, 128)]),
    (2048, 1024, 4, [(0, 128)], [(0, 128), (32, 160), (96, 224), (128, 256)]),
    (1080, 1920, 12, [(0, 128), (32, 160), (96, 224), (112, 240)], [(0, 128), (7, 135), (7, 135)]),
    (1920, 1080, 12, [(0, 128), (7, 135), (7, 135)], [(0, 128), (32, 160), (96, 224), (112, 240)]),
    (2048, 1536, 12, [(0, 128), (32, 160), (64, 192)], [(0, 128), (32, 160), (96, 224), (128, 256)]),
    (768, 2048, 4, [(0, 128), (32, 160), (96, 224), (128, 256)], [(0, 96)]),
    (2048, 512, 4, [(0, 64)], [(0, 128), (32, 160), (96, 224), (128, 256)]),
    (768, 768, 1, [(0, 96)], [(0, 96)]),
    (512, 512, 1, [(0, 64)], [(0, 64)]),
])
def test_view_geometry(width, height, V, row_crops, col_crops):
    H, W = height // 8, width // 8
    rows, cols = ed.axis_windows(H, 128, 64), ed.axis_windows(W, 128, 64)
    assert len(ed.local_views(H, W, 128, 64)) == V
    assert [(w.crop_start, w.crop_end) for w in rows] == row_crops
    assert [(w.crop_start, w.crop_end) for w in cols] == col_crops


def test_window_starts_shifted_back_and_ownership_1920x1080():
    rows = ed.axis_windows(135, 128, 64)
    # windows start at 0, 64 and 71 (moved back); ownership: 0-63, 64-127, 128-134
    assert [(w.own_start, w.own_end) for w in rows] == [(0, 64), (64, 128), (128, 135)]
    cols = ed.axis_windows(240, 128, 64)
    assert [(w.own_start, w.own_end) for w in cols] == [(0, 64), (64, 128), (128, 192), (192, 240)]


@pytest.mark.parametrize("patch,V", [(32, 64), (96, 9), (120, 9), (64, 16)])
def test_view_count_other_patch_sizes(patch, V):
    assert len(ed.local_views(256, 256, 128, patch)) == V


@pytest.mark.parametrize("H,W", [(135, 240), (256, 256), (192, 96), (100, 37), (64, 256)])
def test_local_views_partition_the_image(H, W):
    owner = torch.zeros(H, W, dtype=torch.long)
    for r, c in ed.local_views(H, W, 128, 64):
        assert r.crop_end - r.crop_start <= 128 and c.crop_end - c.crop_start <= 128
        assert r.crop_start <= r.own_start and r.own_end <= r.crop_end
        owner[r.own_start:r.own_end, c.own_start:c.own_end] += 1
    assert torch.equal(owner, torch.ones(H, W, dtype=torch.long))


def test_padding_is_centred():
    D = 128
    assert ed.centered_padding(64, 128, D) == (32, 32, 0, 0)
    assert ed.centered_padding(128, 64, D) == (0, 0, 32, 32)
    assert ed.centered_padding(72, 128, D) == (28, 28, 0, 0)
    assert ed.centered_padding(128, 48, D) == (0, 0, 40, 40)
    assert ed.centered_padding(96, 96, D) == (16, 16, 16, 16)
    assert ed.centered_padding(76, 128, D) == (26, 26, 0, 0)
    assert ed.centered_padding(43, 99, D) == (42, 43, 14, 15)  # odd: the extra pixel goes after (bottom, right)
    assert ed.padding_strips(96, 96, D) == {"left": (96, 16), "right": (96, 16), "top": (16, 128), "bottom": (16, 128)}
    assert ed.padding_strips(128, 128, D) == {}


# ---------------------------------------------------------------------------------- sub-sampler


def _pairs(L, l, n):
    start, size = ed.axis_groups(L, l)
    return [(int(a), int(a + s - 1)) for a, s in zip(start[:n], size[:n])]


def test_candidate_tables():
    assert _pairs(192, 128, 4) == [(0, 0), (1, 2), (3, 3), (4, 5)]  # 1536^2, ratio 2/3
    assert _pairs(135, 72, 10) == [(0, 0), (1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14),
                                   (15, 15), (16, 17)]  # 1080x1920 columns, ratio 8/15
    assert _pairs(256, 128, 3) == [(0, 1), (2, 3), (4, 5)]
    assert _pairs(128, 128, 3) == [(0, 0), (1, 1), (2, 2)]


def _all_sizes_8px(native_px):
    for height in range(ed.MIN_SIDE_PX, 2 * native_px + 1, 8):
        for width in range(ed.MIN_SIDE_PX, 2 * native_px + 1, 8):
            yield height, width


def test_subsampler_exact_on_the_whole_8px_grid():
    """Every size on the 8-px grid up to 2x (SD 1.5 native 512): x_ref is (h, w) and the mask is
    exactly the gathered set, at every pass (docs/method.md#fix-sub-sampler-tables)."""
    gen = torch.Generator().manual_seed(0)
    checked = 0
    for height, width in _all_sizes_8px(512):
        H, W = height // 8, width // 8
        h, w = ed.reference_size(height, width, 512)
        counts = ed.candidate_counts(H, W, h, w)
        assert set(counts.unique().tolist()) <= {4, 6, 9}  # rounding can leave a group of 3 (136 px -> 17 -> 8)
        cells = ed.choose_cells(3, counts, 0.5, gen)
        rows, cols = ed.source_indices(cells, H, W)
        assert rows.shape == (3, h, w) and cols.shape == (3, h, w)
        assert int(rows.max()) < H and int(cols.max()) < W
        flat = rows * W + cols
        for s in range(3):  # one source pixel per cell, never twice
            assert flat[s].unique().numel() == h * w
        checked += 1
    assert checked == 113 ** 2  # 128..1024 step 8


def test_group_rule_covers_every_source_index():
    for L in range(64, 257, 1):
        for l in range(-(-L // 2), L + 1, 7):
            start, size = ed.axis_groups(L, l)
            assert int(size.min()) >= 1 and int(size.max()) <= 2 and int(size.sum()) == L
            assert torch.equal(ed.group_map(L, l)[start], torch.arange(l))
            assert ed.group_map(L, l).numel() == L


def test_pass0_is_top_left_and_ratio_one_is_identity():
    x = torch.randn(2, 4, 256, 192)
    cells = ed.choose_cells(1, ed.candidate_counts(256, 192, 128, 96), 0.3)
    rows, cols = ed.source_indices(cells, 256, 192)
    ref = ed.gather_reference(x, rows, cols)[0]
    assert torch.equal(ref, x[:, :, ::2, ::2])
    y = torch.randn(1, 4, 96, 96)
    cells = ed.choose_cells(5, ed.candidate_counts(96, 96, 96, 96), 0.9, torch.Generator().manual_seed(1))
    rows, cols = ed.source_indices(cells, 96, 96)
    for ref in ed.gather_reference(y, rows, cols):
        assert torch.equal(ref, y)


def test_ratio_half_is_polyphase_pick():
    x = torch.randn(1, 4, 64, 64)
    cells = ed.choose_cells(4, ed.candidate_counts(64, 64, 32, 32), 0.5, torch.Generator().manual_seed(3))
    rows, cols = ed.source_indices(cells, 64, 64)
    m = torch.arange(32)
    assert torch.equal(rows - 2 * m[:, None], cells // 2)
    assert torch.equal(cols - 2 * m[None, :], cells % 2)
    refs = ed.gather_reference(x, rows, cols)
    for ref, k in zip(refs, cells):  # x_ref[m, n] = x[2m + a, 2n + b], (a, b) from the cell's k
        expected = torch.stack([x[:, :, 0::2, 0::2], x[:, :, 0::2, 1::2], x[:, :, 1::2, 0::2], x[:, :, 1::2, 1::2]])
        assert torch.equal(ref, expected.gather(0, k[None, None, None].expand(1, 1, 4, 32, 32)).squeeze(0))


def test_candidates_are_equally_likely_within_every_group_at_2048x1032():
    """2048x1032 on SDXL: 129 latent rows go into 64 groups, one of them of 3 rows. That row of cells gets
    3 x 2 = 6 candidates, every other cell the official 4; over many passes every source pixel of a group is
    picked equally often, whatever the group's size (a global 3x3 choice gave 2-row groups' second row 2/3)."""
    H, W = 1032 // 8, 2048 // 8
    h, w = ed.reference_size(1032, 2048, 1024)
    assert (H, W, h, w) == (129, 256, 64, 128)
    row_start, row_size = ed.axis_groups(H, h)
    col_start, col_size = ed.axis_groups(W, w)
    (triple,) = (row_size == 3).nonzero().flatten().tolist()
    assert set(row_size.tolist()) == {2, 3} and set(col_size.tolist()) == {2}
    counts = ed.candidate_counts(H, W, h, w)
    assert counts[triple].unique().tolist() == [6] and (counts[row_size == 2] == 4).all()
    cells = ed.choose_cells(401, counts, 1.0, torch.Generator().manual_seed(0))  # a fresh pick every pass
    rows, cols = ed.source_indices(cells[1:], H, W)
    row_offset, col_offset = rows - row_start[:, None], cols - col_start
    pairs = row_offset[:, row_size == 2]
    assert abs((pairs == 1).float().mean().item() - 1 / 2) < 0.005
    for r in range(3):
        assert abs((row_offset[:, triple] == r).float().mean().item() - 1 / 3) < 0.01
    assert abs((col_offset == 1).float().mean().item() - 1 / 2) < 0.005
    # every candidate of a 6-candidate cell comes up in its first 6 passes (the exclusion rule, sized per cell)
    first = cells[:6, triple]
    assert all(sorted(first[:, n].tolist()) == list(range(6)) for n in range(w))


def test_fresh_fraction_is_exactly_new_p():
    cells = ed.choose_cells(2, torch.full((400, 400), 4), 0.3, torch.Generator().manual_seed(0))
    changed = (cells[1] != cells[0]).float().mean().item()  # pass 1 always draws an unused k != 0
    assert abs(changed - 0.3) < 0.005


def _direct_fraction(H, W, R, seed=0):
    h, w = ed.reference_size(H * 8, W * 8, 1024)
    cells = ed.choose_cells(R + 1, ed.candidate_counts(H, W, h, w), 0.3, torch.Generator().manual_seed(seed))
    rows, cols = ed.source_indices(cells, H, W)
    hit = torch.zeros(H * W, dtype=torch.bool)
    hit[(rows * W + cols).flatten()] = True
    return hit.float().mean().item()


@pytest.mark.parametrize("H,W,R,expected", [
    (256, 256, 10, 0.8599), (128, 256, 7, 0.7353), (192, 192, 7, 0.8457), (240, 135, 7, 0.7592),
    (256, 256, 0, 0.25), (192, 192, 0, 4 / 9), (240, 135, 0, 0.2844),
])
def test_direct_coverage_matches_expectation(H, W, R, expected):
    assert abs(_direct_fraction(H, W, R) - expected) < 0.01


def test_coverage_formula_at_ratio_half():
    # (1 + E[min(3, X)]) / 4 with X ~ Binomial(R, 0.3)
    for R, value in ((10, 0.8599), (7, 0.7353)):
        e = sum(min(3, k) * math.comb(R, k) * 0.3 ** k * 0.7 ** (R - k) for k in range(R + 1))
        assert abs((1 + e) / 4 - value) < 1e-4


def test_write_back_goes_to_the_gathered_positions_and_fills_by_group():
    H, W, h, w = 192, 135, 128, 72  # ratios 2/3 and 8/15, where nearest upsampling misaligns
    cells = ed.choose_cells(3, ed.candidate_counts(H, W, h, w), 0.3, torch.Generator().manual_seed(0))
    rows, cols = ed.source_indices(cells, H, W)
    deltas = torch.randn(3, 2, 4, h, w)
    direction = ed.write_back_direction(deltas, rows, cols, H, W)
    # the last pass is exact where it sampled
    assert torch.equal(direction[:, :, rows[-1], cols[-1]], deltas[-1])
    # an earlier pass survives where no later pass sampled
    later = torch.zeros(H, W, dtype=torch.bool)
    later[rows[1], cols[1]] = True
    later[rows[2], cols[2]] = True
    first = torch.zeros(H, W, dtype=torch.bool)
    first[rows[0], cols[0]] = True
    only_first = first & ~later
    assert only_first.any()
    expected = torch.zeros(2, 4, H, W)
    expected[:, :, rows[0], cols[0]] = deltas[0]
    assert torch.equal(direction[:, :, only_first], expected[:, :, only_first])
    # never sampled: the last pass's value of the cell's group
    unsampled = ~(first | later)
    filled = deltas[-1][:, :, ed.group_map(H, h)][:, :, :, ed.group_map(W, w)]
    assert torch.equal(direction[:, :, unsampled], filled[:, :, unsampled])


def test_group_up_and_down_sampling_equal_nearest_at_half():
    x = torch.randn(1, 4, 64, 128)
    up = ed.upsample_groups(x, 128, 256)
    assert torch.equal(up, torch.nn.functional.interpolate(x, size=(128, 256), mode="nearest"))
    y = torch.randn(1, 4, 240, 135)
    assert torch.equal(ed.downsample_groups(y, 128, 72),
                       torch.nn.functional.interpolate(y, size=(128, 72), mode="nearest"))


def test_assemble_local_score_writes_each_owned_region():
    H, W = 135, 240
    views = ed.local_views(H, W, 128, 64)
    scores = torch.stack([torch.full((1, 4, 128, 128), float(i)) for i in range(len(views))])
    local = ed.assemble_local_score(scores, views, H, W)
    assert local[0, 0, 64:128, 0].unique().tolist() == [4.0]  # second row window, first column
    assert local[0, 0, 128:135, 0].unique().tolist() == [8.0]  # third row window
    assert local[0, 0, 0, 192:240].unique().tolist() == [3.0]


# ---------------------------------------------------------------------------------- RRG and DDIM


def test_rrg_schedule_active_steps():
    def active(T, stop, kappa, lam):
        return [i for i in range(T) if ed.rrg_weight(i, T, lam, kappa, stop) > 10]

    assert active(50, 0.4, 10, 1000) == list(range(13))
    assert active(50, 0.4, 10, 1500) == list(range(13))
    assert active(50, 0.4, 10, 2000) == list(range(14))
    assert active(50, 0.4, 10, 200) == list(range(11))
    assert active(50, 0.2, 10, 4000) == list(range(19))
    assert active(50, 0.2, 3, 1000) == list(range(28))
    assert ed.rrg_weight(12, 50, 1000, 10, 0.4) == pytest.approx(14.38, rel=0.01)  # the doc rounds; exact: 14.43
    assert ed.rrg_weight(13, 50, 1000, 10, 0.4) == pytest.approx(6.49, rel=0.01)  # exact: 6.45


def test_rrg_closed_form_equals_autograd():
    x0 = torch.randn(2, 4, 16, 24, dtype=torch.float64)
    target = torch.randn(2, 4, 16, 24, dtype=torch.float64)
    weight = 777.0
    leaf = x0.clone().requires_grad_(True)
    loss = sum(weight * ((target[b] - leaf[b]) ** 2).mean() for b in range(2))
    (grad,) = torch.autograd.grad(loss, leaf)
    assert torch.allclose(ed.rrg_pull(target, x0, weight), -grad, rtol=1e-12, atol=1e-15)


def test_rrg_pull_at_step_zero():
    # 2 lambda0 / (4 H W) for 2048^2 with lambda0 = 2000
    pull = ed.rrg_pull(torch.ones(1, 4, 256, 256), torch.zeros(1, 4, 256, 256), 2000.0)
    assert float(pull[0, 0, 0, 0]) == pytest.approx(0.0153, abs=1e-4)


def test_ddim_constants():
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                          timestep_spacing="leading", clip_sample=False, set_alpha_to_one=False)
    sched.set_timesteps(50)
    assert [int(t) for t in sched.timesteps] == [(49 - i) * 20 + 1 for i in range(50)]
    acp = sched.alphas_cumprod.double()
    for t, value in ((0, 0.99915), (1, 0.99830), (961, 0.0072817), (981, 0.0057755), (999, 0.0046601)):
        assert float(acp[t]) == pytest.approx(value, rel=1e-4)
    assert float(acp[981] / acp[961]) == pytest.approx(0.79315, rel=1e-4)


def test_ddim_step_matches_diffusers_scheduler():
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                          timestep_spacing="leading", clip_sample=False, set_alpha_to_one=False)
    sched.set_timesteps(50)
    acp = sched.alphas_cumprod.double()
    x, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    for t in (981, 21, 1):
        out = sched.step(eps, t, x)
        prev = float(acp[t - 20]) if t - 20 >= 0 else float(acp[0])  # last step uses alpha_0
        x0, x_prev = ed.ddim_step(eps, x, float(acp[t]), prev)
        assert torch.allclose(x_prev, out.prev_sample, atol=1e-5)
        assert torch.allclose(x0, out.pred_original_sample, atol=1e-5)


def test_renoise_factor_and_variance():
    x = torch.ones(1, 4, 8, 8)
    out = ed.renoise(x, 0.0072817, 0.0057755, torch.zeros_like(x))
    assert float(out[0, 0, 0, 0]) == pytest.approx(math.sqrt(0.79315), rel=1e-4)
    noise = torch.randn(1, 4, 256, 256, generator=torch.Generator().manual_seed(0))
    out = ed.renoise(torch.zeros_like(noise), 0.5, 0.25, noise)
    assert out.var().item() == pytest.approx(0.5, rel=0.02)


# ---------------------------------------------------------------------------------- presets


@pytest.mark.parametrize("preset", ed.DEMO_PRESETS, ids=lambda p: f"{p['width']}x{p['height']}")
def test_recommended_settings_reproduce_demo_presets(preset):
    s = ed.recommended_settings(preset["width"], preset["height"], 1024)
    assert s["resampling_steps"] == preset["resampling_steps"]
    assert s["new_p"] == preset["new_p"]
    assert s["rrg_init_weight"] == preset["rrg_init_weight"]
    assert (s["guidance_scale"], s["cosine_scale"], s["num_inference_steps"], s["patch_size"]) == (10.0, 10.0, 50, 64)
    assert s["rrg_stop_t"] == 0.4 and s["repaint"] is True


def test_recommended_settings_between_presets_are_monotone():
    weights = [ed.recommended_settings(w, w, 1024)["rrg_init_weight"] for w in range(1032, 2049, 64)]
    assert weights == sorted(weights) and weights[0] >= 1000 and weights[-1] == 2000
    assert ed.recommended_settings(1024, 1024, 1024)["resampling_steps"] == 0
    assert ed.recommended_settings(1280, 768, 1024)["resampling_steps"] == 7
    assert ed.recommended_settings(1024, 1024, 512)["patch_size"] == 32
    assert ed.recommended_settings(1024, 1024, 512)["rrg_init_weight"] == 2000


# ---------------------------------------------------------------------------------- cost model


def test_cost_model_reproduces_the_method_table():
    """docs/method.md#cost-model: SDXL, T = 50, B = 1, v = 16, p = 64, the demo presets' R."""
    table = {(2048, 2048): (16, 2782, 248, 0), (1536, 1536): (9, 1789, 149, 0), (1024, 2048): (4, 1294, 149, 100),
             (1080, 1920): (12, 2086, 149, 100), (2048, 1536): (12, 2386, 199, 100), (768, 2048): (4, 1294, 149, 200),
             (2048, 512): (4, 1294, 149, 200), (768, 768): (1, 100, 50, 200), (512, 512): (1, 100, 50, 200)}
    for (width, height), (V, samples, calls, encodes) in table.items():
        cost = ed.unet_cost(width, height, ed.recommended_settings(width, height), 128)
        assert (cost.views, cost.samples, cost.calls, cost.vae_encodes) == (V, samples, calls, encodes), (width, height)
    # Worked examples and sensitivities of the same section.
    settings = ed.recommended_settings(2048, 2048)
    assert ed.unet_cost(2048, 2048, settings, 128).samples == 50 * (2 * 11 + 16) + 49 * (2 + 16)
    assert ed.unet_cost(2048, 2048, dict(settings, patch_size=32), 128).samples == 7534
    assert ed.unet_cost(2048, 2048, dict(settings, patch_size=96), 128).samples == 2089
    assert ed.unet_cost(2048, 2048, dict(settings, patch_size=120), 128).samples == 2089
    sd15 = dict(ed.recommended_settings(1024, 1024, 512), resampling_steps=7)
    assert ed.unet_cost(1024, 1024, sd15, 64).samples == 2482  # SD 1.5 at 1024², R = 7: V = 16
    # Without repaint no repaint pass; at the native size with R > 0 the repaint pass is one [neg; pos] pair.
    assert ed.unet_cost(2048, 1024, dict(ed.recommended_settings(2048, 1024), repaint=False), 128).samples == 1000
    at_native = ed.unet_cost(1024, 1024, dict(ed.recommended_settings(1024, 1024), resampling_steps=3), 128)
    assert (at_native.samples, at_native.samples_per_main_pass, at_native.samples_per_repaint_pass) == (198, 2, 2)
    two = ed.unet_cost(2048, 1024, ed.recommended_settings(2048, 1024), 128, batch=2, view_batch_size=5)
    assert (two.samples, two.calls) == (2 * 1294, 50 * 8 + 49 * 3)  # 40 samples in 8 calls, 12 in 3
