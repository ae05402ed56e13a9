"""pca_diffusion_scores.py: the PCA maths, what the recorders keep, that recording leaves the image alone,
the pictures, the command line and its errors."""
import json
import math
import os
import re

import pytest
import torch
from PIL import Image

import elastic_diffusion as ed
import pca_diffusion_scores as pca

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
FAST = dict(num_inference_steps=3, progress=False)


@pytest.fixture(scope="module")
def sd1(tiny_sd1_path):
    return ed.ElasticDiffusion(device="cpu", sd_version=tiny_sd1_path)


@pytest.fixture(scope="module")
def elastic_2x(sd1):
    """An elastic recording at 2x width with resampling passes, repaint and RRG: every stage runs."""
    return pca.record_scores(sd1, "a red house", "blurry", width=1024, height=512, seed=5, resampling_steps=2, **FAST)


# --------------------------------------------------------------------------------------------------
# PCA
# --------------------------------------------------------------------------------------------------


def x_only_maps(K=1, H=6, W=10):
    """(K, 4, H, W) whose channels are different functions of x alone."""
    x = torch.linspace(-1, 1, W)
    channels = torch.stack([x, 2 * x ** 2, torch.sin(3 * x), 0.5 * x + 1])
    return channels[None, :, None, :].expand(K, 4, H, W).clone()


@pytest.mark.parametrize("basis", pca.BASES)
def test_first_component_of_an_x_only_map_varies_along_x_only(basis):
    rgb = pca.pca_maps(x_only_maps(), basis).rgb
    assert rgb.shape == (1, 3, 6, 10) and torch.isfinite(rgb).all()
    first = rgb[0, 0]  # red: the first principal component
    assert torch.equal(first, first[:1].expand_as(first))  # constant along y
    assert first[0].min() == 0 and first[0].max() == 1  # spans the whole range along x


def test_pca_centres_the_maps():
    """A large constant channel carries no variance: the first axis is the channel that varies, and the
    coordinates are centred on the mean."""
    H, W = 4, 16
    maps = torch.zeros(1, 4, H, W)
    maps[:, 0] = 100.0
    maps[:, 1] = torch.linspace(-1, 1, W)
    maps[:, 2] = 0.01 * torch.randn(H, W, generator=torch.Generator().manual_seed(0))
    mean, components, variance = pca.fit_pca(maps)
    assert torch.allclose(mean, maps.mean((0, 2, 3)), atol=1e-5)
    assert abs(components[0, 1]) > 0.999 and variance[0] > 100 * variance[1]
    result = pca.pca_maps(maps)
    assert result.projections.mean((0, 2, 3)).abs().max() < 1e-4


def test_components_are_orthonormal_and_sorted():
    spread = torch.tensor([3.0, 1, 2, 0.5])[:, None, None]
    maps = torch.randn(3, 4, 5, 7, generator=torch.Generator().manual_seed(1)) * spread
    _, components, variance = pca.fit_pca(maps)
    assert torch.allclose(components @ components.T, torch.eye(3), atol=1e-5)
    assert variance[0] >= variance[1] >= variance[2] > 0
    assert abs(components[0, 0]) > 0.95  # the channel with the largest spread
    largest = components.gather(1, components.abs().argmax(1, keepdim=True))
    assert (largest > 0).all()  # the sign convention: each axis's largest entry is positive


def test_shared_basis_gives_the_same_colour_to_the_same_vector_at_two_steps():
    g = torch.Generator().manual_seed(2)
    maps = torch.stack([torch.randn(4, 6, 8, generator=g), 2 * torch.randn(4, 6, 8, generator=g) + 1])
    maps[1, :, 3, 5] = maps[0, :, 0, 0]
    shared = pca.pca_maps(maps, "shared").rgb
    assert torch.allclose(shared[0, :, 0, 0], shared[1, :, 3, 5], atol=1e-6)
    per_step = pca.pca_maps(maps, "per-step").rgb  # each step its own basis: the colours differ
    assert not torch.allclose(per_step[0, :, 0, 0], per_step[1, :, 3, 5], atol=1e-2)


def test_per_step_basis_fits_each_step_alone():
    """A step that is an affine copy of another (3x + 5) gets the same picture per step, another with one basis."""
    first = torch.randn(4, 6, 8, generator=torch.Generator().manual_seed(3))
    maps = torch.stack([first, 3 * first + 5])
    per_step = pca.pca_maps(maps, "per-step")
    assert per_step.components.shape == (2, 3, 4) and per_step.mean.shape == (2, 4)
    assert torch.allclose(per_step.rgb[0], per_step.rgb[1], atol=1e-5)
    shared = pca.pca_maps(maps, "shared")
    assert shared.components.shape == (1, 3, 4)
    assert not torch.allclose(shared.rgb[0], shared.rgb[1], atol=1e-2)


@pytest.mark.parametrize("basis", pca.BASES)
def test_zero_variance_maps_give_finite_mid_grey_images(basis):
    constant = torch.full((2, 4, 5, 6), 0.25)
    rgb = pca.pca_maps(constant, basis).rgb
    assert torch.isfinite(rgb).all() and torch.equal(rgb, torch.full_like(rgb, 0.5))
    mixed = torch.cat([constant[:1], x_only_maps(1, 5, 6)])  # step 0 of a constant input, then structure
    rgb = pca.pca_maps(mixed, basis).rgb
    assert torch.isfinite(rgb).all() and rgb[1, 0].max() == 1
    if basis == "per-step":
        assert torch.equal(rgb[0], torch.full_like(rgb[0], 0.5))


def test_bad_basis_is_refused():
    with pytest.raises(ValueError, match="basis must be one of 'shared', 'per-step'; got 'global'"):
        pca.pca_maps(x_only_maps(), "global")


# --------------------------------------------------------------------------------------------------
# Steps to keep
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec,T,expected", [
    ("all", 4, [0, 1, 2, 3]),
    ("every:5", 12, [0, 5, 10, 11]),
    ("every:5", 11, [0, 5, 10]),
    ("0,10,20,30,40,49", 50, [0, 10, 20, 30, 40, 49]),
    (" 7, 2,2 ", 10, [2, 7]),
    ([3, 0], 4, [0, 3]),
])
def test_steps_to_keep_forms(spec, T, expected):
    assert pca.parse_steps_to_keep(spec, T) == expected


@pytest.mark.parametrize("spec,message", [
    ("0,50", "step 50 is out of range; with num_inference_steps=50 the steps are 0 to 49"),
    ("-1", "step -1 is out of range"),
    ("every:0", "steps_to_keep must be 'all', 'every:K' with K >= 1, or step indices from 0 to 49"),
    ("first", "got 'first'"),
    ("", "names no step"),
    ([1.5], "steps_to_keep must be"),
])
def test_steps_to_keep_errors_name_the_argument(spec, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        pca.parse_steps_to_keep(spec, 50)


# --------------------------------------------------------------------------------------------------
# Recording
# --------------------------------------------------------------------------------------------------


def test_epsilon_from_prediction_inverts_v_and_sample():
    g = torch.Generator().manual_seed(4)
    eps, x0 = torch.randn(2, 4, 8, 8, generator=g).unbind()
    alpha = 0.3
    x = math.sqrt(alpha) * x0 + math.sqrt(1 - alpha) * eps
    v = math.sqrt(alpha) * eps - math.sqrt(1 - alpha) * x0
    assert ed.epsilon_from_prediction(eps, x, alpha, "epsilon") is eps
    assert torch.allclose(ed.epsilon_from_prediction(v, x, alpha, "v_prediction"), eps, atol=1e-5)
    assert torch.allclose(ed.epsilon_from_prediction(x0, x, alpha, "sample"), eps, atol=1e-5)


@pytest.mark.parametrize("width,height", [(1024, 512), (1024, 1024)])  # 2x width, 2x both sides
@pytest.mark.parametrize("method", pca.METHODS)
def test_recording_does_not_change_the_image(sd1, method, width, height):
    recording = pca.record_scores(sd1, "a red house", "blurry", width=width, height=height, seed=7, method=method,
                                  resampling_steps=2, **FAST)
    if method == "elastic":
        images, _ = sd1("a red house", "blurry", width=width, height=height, seed=7, resampling_steps=2,
                        output_type="pt", **FAST)
    else:
        images, _ = pca.generate_plain(sd1, "a red house", "blurry", height, width, 3, 10.0, 7, output_type="pt",
                                       progress=False)
    assert recording.image_pt.shape == (3, height, width)
    assert torch.equal(recording.image_pt, images[0].cpu())  # bit for bit
    assert recording.steps == [0, 1, 2] and recording.timesteps == sd1.timesteps(3)
    latent = (3, 4, height // 8, width // 8)
    assert recording.direction.shape == recording.local_uncond.shape == recording.x0.shape == latent
    assert recording.direction.dtype == torch.float16 and recording.direction.device.type == "cpu"


def test_elastic_records_the_kept_update(sd1):
    """Per step the recorder keeps the ScoreEstimate of the update the step kept (the repaint pass's, except
    at the last step), its x0, and the direction on the reference grid as RRG reads it."""
    seen = {}

    def spy(pipe, i, t, tensors):
        seen[i] = {k: v for k, v in tensors.items()}
        return {}

    rec = pca.record_scores(sd1, "a red house", "blurry", width=1024, height=512, seed=5, resampling_steps=2,
                            steps_to_keep="0,2", callback_on_step_end=spy, **FAST)
    assert sorted(seen) == [0, 1, 2] and rec.steps == [0, 2]
    h, w = rec.reference_size
    assert (h, w) == (32, 64) and rec.reference_direction.shape == (2, 4, h, w)
    for k, step in enumerate(rec.steps):
        kept = seen[step]["scores"]
        assert torch.equal(rec.direction[k], kept.direction[0].half())
        assert torch.equal(rec.local_uncond[k], kept.local_uncond[0].half())
        assert torch.equal(rec.x0[k], seen[step]["x0"][0].half())
        assert torch.equal(rec.reference_direction[k], ed.downsample_groups(kept.direction, h, w)[0].half())
    assert not torch.equal(seen[0]["scores"].direction, seen[0]["resampled_scores"].direction)
    # The method itself: a kept repaint update has one top-left reference pass, so its full-resolution direction
    # is the reference direction filled nearest; the last step keeps the resampled passes' written-back one.
    filled = ed.upsample_groups(rec.reference_direction.float(), 64, 128).half()
    assert torch.equal(rec.direction[0], filled[0])
    assert not torch.equal(rec.direction[1], filled[1])


def test_plain_and_elastic_record_the_same_scores_at_the_native_size(sd1):
    """At the native size with resampling_steps=0 ElasticDiffusion is plain CFG: the hook on diffusers' pipeline
    and the sampler's callback must record the same x0, direction and unconditional score."""
    common = dict(width=512, height=512, seed=3, **FAST)
    plain = pca.record_scores(sd1, "a red house", "blurry", method="plain", **common)
    elastic = pca.record_scores(sd1, "a red house", "blurry", method="elastic", resampling_steps=0, **common)
    for name in ("x0", "direction", "local_uncond"):
        ours, theirs = getattr(plain, name).float(), getattr(elastic, name).float()
        assert (ours - theirs).norm() / theirs.norm() < 1e-3, name
    assert plain.reference_direction is None and plain.views == []
    assert (elastic.direction.float() - elastic.local_uncond.float()).norm() > 0.1 * elastic.direction.float().norm()


def test_recording_memory_is_the_formula(elastic_2x, sd1):
    K = len(elastic_2x.steps)
    assert elastic_2x.nbytes == pca.recording_nbytes(K, 4, (64, 128), (32, 64))
    plain = pca.record_scores(sd1, "p", width=1024, height=512, seed=1, method="plain", steps_to_keep="1", **FAST)
    assert plain.nbytes == pca.recording_nbytes(1, 4, (64, 128), None)
    # the bound the docs state: a 2048^2 SDXL run keeping all 50 steps
    mib = pca.recording_nbytes(50, 4, (256, 256), (128, 128)) / 2 ** 20
    assert mib < 1024
    for text in (open(README, encoding="utf-8").read(), pca.__doc__):
        assert f"{mib:.1f} MiB" in text


def test_linear_previews_reproduce_an_affine_vae():
    g = torch.Generator().manual_seed(6)
    latent = torch.randn(4, 6, 10, generator=g)
    mapping, offset = 0.04 * torch.randn(3, 4, generator=g), torch.tensor([0.5, 0.4, 0.6])
    rgb = torch.einsum("rc,chw->rhw", mapping, latent) + offset[:, None, None]
    assert 0 < rgb.min() and rgb.max() < 1
    image = rgb.repeat_interleave(8, 1).repeat_interleave(8, 2)  # what the "VAE" decodes, (3, 48, 80)
    x0 = torch.stack([latent, 0.5 * latent]).half()
    previews = pca.linear_previews(x0, latent, image, 8)
    assert previews.shape == (2, 3, 6, 10) and previews.dtype == torch.uint8
    expected = pca._to_uint8(torch.einsum("rc,kchw->krhw", mapping, x0.double().float()) + offset[:, None, None])
    assert (previews.int() - expected.int()).abs().max() <= 1


def test_decode_x0_previews_are_the_vae_decode(sd1):
    rec = pca.record_scores(sd1, "p", width=512, height=256, seed=2, steps_to_keep="2", decode_x0=True, **FAST)
    decoded = sd1.decode(rec.x0[0][None].float(), output_type="pt")
    assert torch.equal(rec.x0_preview[0], pca._to_uint8(torch.nn.functional.avg_pool2d(decoded, 8)[0]))


def test_bad_input_is_refused_before_anything_runs(sd1):
    calls = []
    spy = lambda *a: calls.append(a) or {}  # noqa: E731
    cases = [
        (dict(method="direct"), "method must be one of 'plain', 'elastic'; got 'direct'"),
        (dict(steps_to_keep="0,3"), "step 3 is out of range; with num_inference_steps=3 the steps are 0 to 2"),
        (dict(width=1001), "width must be a multiple of 8"),
        (dict(height=2048), "height must be between 128 and 1024"),
        (dict(method="plain", guidance_scale=1.0), "guidance_scale must be greater than 1 for method 'plain'"),
    ]
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['guidance'\]"):
        pca.record_scores(sd1, "p", width=512, height=512, method="plain", guidance=5.0, callback_on_step_end=spy,
                          **FAST)
    for kwargs, message in cases:
        args = dict(width=512, height=512, callback_on_step_end=spy, **FAST)
        args.update(kwargs)
        with pytest.raises(ValueError, match=re.escape(message)):
            pca.record_scores(sd1, "p", **args)
    assert calls == []


# --------------------------------------------------------------------------------------------------
# Pictures
# --------------------------------------------------------------------------------------------------


def test_contact_sheet_rows_are_x0_direction_uncond_and_columns_the_steps(elastic_2x):
    sheet = pca.contact_sheet(elastic_2x, steps=[0, 2], panel_px=128)
    maps = elastic_2x.pca("shared")
    layout = pca.SheetLayout((128, 64), 3, 2, 12)
    assert sheet.size == layout.size
    rows = [elastic_2x.x0_preview, maps["direction"].rgb, maps["local_uncond"].rgb]
    for row, images in enumerate(rows):
        for column, k in enumerate([0, 2]):
            expected = pca.map_panel(images[k], (128, 64))
            assert sheet.crop(layout.box(row, column)).tobytes() == expected.tobytes(), (row, column)
    assert pca.contact_sheet(elastic_2x, max_columns=2).size == pca.contact_sheet(elastic_2x, steps=[0, 2]).size


def test_sheet_steps_are_evenly_spaced_with_both_ends():
    assert pca.sheet_steps(list(range(50)), 6) == [0, 10, 20, 29, 39, 49]
    assert pca.sheet_steps([0, 5, 9], 6) == [0, 5, 9]
    assert pca.sheet_steps([0, 5, 9], 1) == [9]


def test_contact_sheet_of_unrecorded_steps_is_refused(elastic_2x):
    with pytest.raises(ValueError, match=r"step 7 was not recorded; recorded steps are \[0, 1, 2\]"):
        pca.contact_sheet(elastic_2x, steps=[7])


@pytest.mark.parametrize("fmt", pca.ANIMATION_FORMATS)
def test_animation_has_one_frame_per_kept_step(elastic_2x, fmt, tmp_path):
    path = tmp_path / f"a.{fmt}"
    path.write_bytes(pca.animation(elastic_2x, fmt=fmt, panel_px=64))
    frames = Image.open(path)
    assert frames.format == fmt.upper() and frames.n_frames == len(elastic_2x.steps) == 3
    if fmt == "webp":  # lossless: each frame is the one-column contact sheet of its step
        for k, step in enumerate(elastic_2x.steps):
            frames.seek(k)
            expected = pca.contact_sheet(elastic_2x, steps=[step], panel_px=64)
            assert frames.convert("RGB").tobytes() == expected.tobytes()


def test_window_overlay_draws_windows_crops_and_reference():
    image = Image.new("RGB", (1024, 512), "black")  # SD 1.x at 2x width: latent 64 x 128, windows of 32
    views = ed.local_views(64, 128, 64, 32)
    out = pca.window_overlay(image, views, (32, 64))
    assert image.getpixel((10, 10)) == (0, 0, 0)  # the input is left alone
    assert out.width == 1024 and out.height > 512  # a legend strip below
    colours = [pca.WINDOW_COLOURS[j % 2] for j in range(4)]  # one row of windows: colours alternate
    for (r, c), colour in zip(views, colours):
        middle = (c.own_start * 8 + 40, 40)  # inside the window, off every crop's outline
        tinted = tuple(round(v * pca.WINDOW_TINT / 255) for v in colour)
        assert all(abs(a - b) <= 1 for a, b in zip(out.getpixel(middle), tinted))
        assert out.getpixel((c.own_start * 8 + 40, 1)) == colour  # the window's outline (2 px; the crops' is 1)
    assert out.getpixel((80 * 8 - 1, 60)) == colours[1]  # view 1's crop [16, 80): its right edge
    assert out.getpixel((256 + 1, 128 + 100)) == (255, 255, 255)  # reference 512x256 px, centred
    assert "4 local windows (1x4" in pca.overlay_legend(views, (32, 64))


def test_window_overlay_neighbours_differ_in_both_directions():
    views = ed.local_views(128, 128, 64, 32)  # 2x both sides: 4 x 4 windows
    out = pca.window_overlay(Image.new("RGB", (1024, 1024), "black"), views, (64, 64), legend=False)
    assert out.size == (1024, 1024)
    centre = {(r.own_start, c.own_start): out.getpixel((c.own_start * 8 + 40, r.own_start * 8 + 40)) for r, c in views}
    assert len(centre) == 16
    for (row, col), colour in centre.items():
        for neighbour in ((row + 32, col), (row, col + 32), (row + 32, col + 32)):
            if neighbour in centre:
                assert centre[neighbour] != colour


def test_describe_says_what_is_shown(elastic_2x):
    text = pca.describe(elastic_2x)
    assert "512×256 px reference" in text and "one basis for all steps" in text
    assert "a basis per step" in pca.describe(elastic_2x, "per-step")


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,method,width,height", [
    ("sd1", "elastic", 1024, 512),
    ("sd1", "plain", 512, 1024),
    ("sdxl", "elastic", 1536, 1024),
    ("sdxl", "plain", 1536, 1024),
])
def test_cli_writes_sheet_animation_image_and_windows(request, tmp_path, kind, method, width, height):
    model = request.getfixturevalue(f"tiny_{kind}_path")
    out = tmp_path / "out"
    paths = pca.main(["--sd_version", model, "--method", method, "--width", str(width), "--height", str(height),
                      "--steps", "3", "--resampling_steps", "1", "--steps_to_keep", "0,2", "--seed", "4",
                      "--prompt", "a lighthouse", "--outdir", str(out), "--panel_px", "96"])
    (folder,) = os.listdir(out)
    assert folder.endswith(f"_{method}_{width}x{height}_seed4")
    expected = {"image.png", "sheet.png", "animation.webp"}
    expected |= {"windows.png"} if method == "elastic" else set()
    assert set(os.listdir(out / folder)) == expected and set(map(os.path.basename, paths.values())) == expected
    H, W = height // 8, width // 8
    image, sheet = Image.open(paths["image"]), Image.open(paths["sheet"])
    assert image.size == (width, height)
    panel = pca.panel_size((H, W), 96)
    assert sheet.size == pca.SheetLayout(panel, 3, 2, 12).size
    assert Image.open(paths["animation"]).n_frames == 2
    record = json.loads(image.text["elastic_diffusion"])
    assert record["prompt"] == "a lighthouse" and record["seed"] == 4 and record["model"] == model
    assert record["pca_method"] == method and record["pca_steps"] == [0, 2] and record["num_inference_steps"] == 3
    assert sheet.text["elastic_diffusion"] == image.text["elastic_diffusion"]


@pytest.mark.parametrize("argv,message", [
    (["--steps_to_keep", "0,50"], "--steps_to_keep: step 50 is out of range; with num_inference_steps=50"),
    (["--steps", "10", "--steps_to_keep", "every:0"], "steps_to_keep must be 'all', 'every:K' with K >= 1"),
    (["--basis", "global"], "argument --basis: invalid choice: 'global' (choose from"),
    (["--method", "direct"], "argument --method: invalid choice: 'direct' (choose from"),
    (["--width", "1001"], "width must be a multiple of 8"),
    (["--width", "2048"], "width must be between 128 and 1024"),
    (["--num_images", "2"], "--num_images: this script records one image"),
    (["--sheet_columns", "0"], "--sheet_columns must be at least 1"),
    (["--prompts_file", "prompts.txt"], "--prompts_file: this script records one image"),
    (["--dry_run"], "--dry_run: this script records one image"),
])
def test_cli_bad_input_is_a_usage_error_and_writes_nothing(tiny_sd1_path, tmp_path, capsys, argv, message):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as exit_info:
        pca.main(["--sd_version", tiny_sd1_path, "--outdir", str(out), "--height", "512", "--width", "512", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_cli_shares_the_main_flags():
    main_flags = {a.dest for a in ed.build_parser()._actions}
    ours = {a.dest for a in pca.build_parser()._actions}
    assert main_flags < ours and {"method", "basis", "steps_to_keep"} < ours
    args = pca.build_parser().parse_args([])
    assert (args.method, args.basis, args.steps_to_keep, args.outdir) == ("elastic", "shared", "all", "results/pca/")


# --------------------------------------------------------------------------------------------------
# README
# --------------------------------------------------------------------------------------------------


def readme_section() -> str:
    text = open(README, encoding="utf-8").read()
    match = re.search(r"\n## Look inside.*?(?=\n## )", text, re.S)
    assert match, "README lost its 'Look inside' section"
    return match.group(0)


def test_readme_commands_parse_and_the_first_one_runs(tiny_sd1_path, tmp_path, monkeypatch):
    import shlex

    section = readme_section()
    commands = [line.strip() for line in re.findall(r"```bash\n(.*?)```", section, re.S)[0].splitlines()
                if line.startswith("python pca_diffusion_scores.py") and "--help" not in line]
    assert len(commands) >= 2
    parsed = [pca.build_parser().parse_args(shlex.split(c)[2:]) for c in commands]
    assert {a.method for a in parsed} == {"plain", "elastic"}
    first = shlex.split(commands[0])[2:] + ["--sd_version", tiny_sd1_path, "--steps", "2", "--panel_px", "64"]
    monkeypatch.chdir(tmp_path)
    paths = pca.main(first)
    assert all(os.path.isfile(p) for p in paths.values())
    image = re.search(r"!\[[^\]]*\]\((imgs/[^)]+\.png)\)", section).group(1)
    assert os.path.isfile(os.path.join(os.path.dirname(README), image))


def test_elastic_recording_works_through_the_controlnet_subclass(tiny_sd1_path, tmp_path):
    """The recorder uses only the step callback, so a subclass that adds inputs records the same way."""
    from tiny_models import save_tiny_controlnet

    from elastic_diffusion_w_controlnet import DEFAULT_INPUT, ElasticDiffusionControlNet

    sampler = ElasticDiffusionControlNet(device="cpu", sd_version=tiny_sd1_path,
                                         controlnet_model=save_tiny_controlnet(tiny_sd1_path, tmp_path / "cn"))
    control = dict(condition_image=DEFAULT_INPUT, condition="canny")
    rec = pca.record_scores(sampler, "p", width=1024, height=512, seed=2, resampling_steps=1, **control, **FAST)
    images, _ = sampler("p", width=1024, height=512, seed=2, resampling_steps=1, output_type="pt", **control, **FAST)
    assert torch.equal(rec.image_pt, images[0]) and rec.direction.shape == (3, 4, 64, 128)
