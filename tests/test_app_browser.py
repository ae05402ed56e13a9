"""A real headless Chromium opens the demo, types a prompt, clicks Generate and sees the image.

Needs Debian's `chromium` and `chromium-driver` (`bash .ci/install-browser.sh`); skipped without them.
Selenium drives the browser through the system chromedriver, so nothing is downloaded. Set
APP_SCREENSHOT=path/to/file.png to keep a screenshot of the page with its result (the README's
`imgs/app_screenshot.png` is made this way).
"""
from __future__ import annotations

import os
import shutil
import socket
import time

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="Debian's chromium and chromium-driver are not installed (run: bash .ci/install-browser.sh)")

os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager: never download a browser or driver
from selenium import webdriver  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

import app_gradio as app  # noqa: E402
from elastic_diffusion import ElasticDiffusion  # noqa: E402

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1280,1450", "--hide-scrollbars")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sampler(tiny_sdxl_path):
    return ElasticDiffusion(sd_version=tiny_sdxl_path)


def launched(demo):
    """The page as `app_gradio.serve` launches it (with its CSS), on a free port; returns its URL."""
    demo.queue(max_size=4)
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True,
                            css=app.PAGE_CSS)
    return url


@pytest.fixture(scope="module")
def app_url(sampler, tmp_path_factory):
    os.environ.setdefault("GRADIO_EXAMPLES_CACHE", str(tmp_path_factory.mktemp("gradio_examples")))
    demo = app.TextToImageApp(sampler, preview_every=10).build()
    yield launched(demo)
    demo.close()


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS + (f"--user-data-dir={tmp_path / 'chromium-profile'}",):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


def set_number(driver, selector: str, value: int) -> None:
    field = driver.find_element(By.CSS_SELECTOR, selector)
    field.clear()
    field.send_keys(str(value), Keys.TAB)  # TAB: the change event fires when the field loses focus


def slider_value(driver, name: str) -> str:
    return driver.find_element(By.CSS_SELECTOR, f"#knob-{name} input[type=number]").get_attribute("value")


def fill_request(browser, wait, prompt, text: str, width: int, height: int) -> None:
    """Type `text` into the `prompt` box, set the size (2x the native area: R = 7), open the advanced options,
    wait for the size's preset to reach them, and set 2 steps."""
    prompt.send_keys(text)
    set_number(browser, "#width input", width)
    set_number(browser, "#height input", height)
    browser.find_element(By.CSS_SELECTOR, "#advanced .label-wrap").click()
    wait.until(lambda d: slider_value(d, "resampling_steps") == "7")
    set_number(browser, "#knob-num_inference_steps input[type=number]", 2)


def finished_images(driver):
    """The result's images once the summary is in and each image has loaded, else False."""
    summary = driver.find_element(By.CSS_SELECTOR, "#summary").text
    images = driver.find_elements(By.CSS_SELECTOR, "#gallery img")
    loaded = [img for img in images if driver.execute_script("return arguments[0].naturalWidth", img) > 0]
    return loaded if "UNet evaluations" in summary and len(loaded) == len(images) > 0 else False


SHOWN = """
const img = arguments[0], box = img.getBoundingClientRect();
const clippedBy = [];
for (let node = img.parentElement; node; node = node.parentElement) {
    const style = getComputedStyle(node), r = node.getBoundingClientRect();
    if (style.overflowX !== "visible" || style.overflowY !== "visible") {
        if (box.left < r.left - 1 || box.top < r.top - 1 || box.right > r.right + 1 || box.bottom > r.bottom + 1)
            clippedBy.push(node.className || node.tagName);
    }
}
return [box.width, box.height, img.naturalWidth, img.naturalHeight, getComputedStyle(img).objectFit, clippedBy];
"""


def shown_whole(driver, img) -> bool:
    """The image element's box has the image's own aspect ratio and no ancestor clips any of it."""
    width, height, natural_width, natural_height, fit, clipped_by = driver.execute_script(SHOWN, img)
    assert natural_width and height > 50, (width, height)
    assert abs(width / height - natural_width / natural_height) < 0.02, (width, height, natural_width, natural_height)
    assert fit in ("contain", "fill", "scale-down") and clipped_by == [], clipped_by  # each shows the image whole
    return True


def test_a_tall_result_is_shown_whole_and_progress_starts_before_step_1(app_url, browser, sampler, monkeypatch):
    real = sampler.prepare_backgrounds

    def slowed(*args, report=None, **kwargs):  # long enough to be seen, as on a CPU at 2048 px
        def report_and_wait(*progress):
            report(*progress)
            time.sleep(0.4)
        return real(*args, report=report_and_wait, **kwargs)

    monkeypatch.setattr(sampler, "prepare_backgrounds", slowed)
    browser.get(app_url)
    wait = WebDriverWait(browser, 90, poll_frequency=0.2)
    prompt = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#prompt textarea"))
    assert browser.find_element(By.CSS_SELECTOR, "#seed-used input").get_attribute("value") == ""  # no run yet
    fill_request(browser, wait, prompt, "A realistic bird-eye view of a lake", 512, 2048)
    browser.find_element(By.CSS_SELECTOR, "#generate").click()
    texts, deadline = [], time.monotonic() + 90
    while not finished_images(browser):
        text = browser.find_element(By.CSS_SELECTOR, "#summary").text
        if text and (not texts or texts[-1] != text):
            texts.append(text)
        assert time.monotonic() < deadline, texts
        time.sleep(0.1)
    stages = [i for i, text in enumerate(texts) if "Encoding the padding strips" in text]
    steps = [i for i, text in enumerate(texts) if "step 1/2" in text]
    assert stages and (not steps or stages[0] < steps[0]), texts  # progress text before step 1
    (image,) = finished_images(browser)
    size = browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", image)
    assert size == [512, 2048]
    assert shown_whole(browser, image)
    seed = browser.find_element(By.CSS_SELECTOR, "#seed-used input").get_attribute("value")
    summary = " ".join(browser.find_element(By.CSS_SELECTOR, "#summary").text.split())
    assert seed.isdigit() and f"seed {seed}" in summary


def save_compact_screenshot(driver, path: str) -> None:
    """The page at 80 % in 128 colours: the README's image stays small although the test model draws noise."""
    from io import BytesIO

    from PIL import Image

    page = Image.open(BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    page = page.resize((page.width * 4 // 5, page.height * 4 // 5), Image.LANCZOS)
    page.quantize(colors=128, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)


def test_type_prompt_click_generate_see_image(app_url, browser, tmp_path):
    browser.get(app_url)
    wait = WebDriverWait(browser, 90, poll_frequency=0.2)
    prompt = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#prompt textarea"))
    prompt.send_keys("A photo of the dolomites, highly detailed, sharp")
    set_number(browser, "#width input", 2048)
    set_number(browser, "#height input", 1024)
    browser.find_element(By.CSS_SELECTOR, "#advanced .label-wrap").click()  # open Advanced options
    # The knobs follow the resolution-aware preset of the new size (R = 7, lambda0 = 1000 at 2048x1024).
    wait.until(lambda d: slider_value(d, "resampling_steps") == "7" and slider_value(d, "rrg_init_weight") == "1000")
    set_number(browser, "#knob-num_inference_steps input[type=number]", 8)  # keep the CPU run short
    browser.find_element(By.CSS_SELECTOR, "#advanced .label-wrap").click()
    browser.find_element(By.CSS_SELECTOR, "#compare-plain input").click()
    browser.find_element(By.CSS_SELECTOR, "#generate").click()

    images = wait.until(finished_images)
    sources = [img.get_attribute("src") for img in images]
    assert len(images) == 2 and "elastic_seed" in sources[0] and "plain_seed" in sources[1]
    assert all(source.endswith("2048x1024.png") for source in sources)
    assert [browser.execute_script("return arguments[0].naturalWidth", img) for img in images] == [2048, 2048]
    for img in images:  # wide images fill their box: no blank band above or below
        assert shown_whole(browser, img)
    summary = browser.find_element(By.CSS_SELECTOR, "#summary").text
    assert "2048×1024" in summary and "R 7" in summary and "T 8" in summary
    browser.save_screenshot(str(tmp_path / "app.png"))
    if os.environ.get("APP_SCREENSHOT"):
        save_compact_screenshot(browser, os.environ["APP_SCREENSHOT"])


def loaded_size(driver, selector: str):
    """The natural (width, height) of the image in `selector` once it has loaded, else False."""
    images = driver.find_elements(By.CSS_SELECTOR, f"{selector} img")
    size = images and driver.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", images[0])
    return tuple(size) if size and size[0] else False


def test_look_inside_shows_the_sheet_the_animation_and_the_windows(app_url, browser):
    browser.get(app_url)
    wait = WebDriverWait(browser, 90, poll_frequency=0.2)
    prompt = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#prompt textarea"))
    assert not browser.find_element(By.CSS_SELECTOR, "#look-inside input").is_selected()  # off by default
    assert not browser.find_elements(By.CSS_SELECTOR, "#look-inside-sheet img")
    fill_request(browser, wait, prompt, "A photo of the dolomites", 2048, 1024)
    browser.find_element(By.CSS_SELECTOR, "#advanced .label-wrap").click()
    browser.find_element(By.CSS_SELECTOR, "#look-inside input").click()
    browser.find_element(By.CSS_SELECTOR, "#generate").click()
    (image,) = wait.until(finished_images)
    windows = wait.until(lambda d: loaded_size(d, "#look-inside-windows"))
    sheet = wait.until(lambda d: loaded_size(d, "#look-inside-sheet"))
    animation = wait.until(lambda d: loaded_size(d, "#look-inside-animation"))
    assert animation[1] == sheet[1] and animation[0] < sheet[0]  # a frame is one column of the two-step sheet
    assert windows[0] == 2048 and windows[1] > 1024  # the image with the window grid, and the legend below it
    assert sheet[0] > sheet[1] > 0
    for selector in ("#look-inside-sheet", "#look-inside-windows"):
        assert shown_whole(browser, browser.find_element(By.CSS_SELECTOR, f"{selector} img"))
    sources = [browser.find_element(By.CSS_SELECTOR, f"#look-inside-{name} img").get_attribute("src")
               for name in ("sheet", "animation", "windows")]
    assert [source.rsplit("/", 1)[-1].split("_seed")[0] for source in sources] == [
        "look_inside_sheet", "look_inside_steps", "look_inside_windows"]
    caption = browser.find_element(By.CSS_SELECTOR, "#look-inside-caption").text
    assert caption.startswith("Top row") and "White box: the reference size" in caption
    assert "look inside: pictures drawn in" in browser.find_element(By.CSS_SELECTOR, "#summary").text


def click_example(driver, wait, label_start: str) -> None:
    """Click the example whose button label starts with `label_start`, as a visitor does."""
    buttons = wait.until(lambda d: [b for b in d.find_elements(By.CSS_SELECTOR, "button")
                                    if b.text.startswith(label_start)])
    assert len(buttons) == 1, [b.text for b in buttons]
    buttons[0].click()


def error_toasts(driver) -> list[str]:
    return [toast.text for toast in driver.find_elements(By.CSS_SELECTOR, ".toast-body")]


def shortened(monkeypatch, sampler, **knobs) -> None:
    """The sampler runs each request with `knobs` in place of the asked ones (a preset's 50 steps take long here)."""
    real = sampler.generate
    monkeypatch.setattr(sampler, "generate", lambda *args, **kwargs: real(*args, **{**kwargs, **knobs}))


def test_a_visitors_first_click_on_a_preset_shows_its_image(app_url, browser, sampler, monkeypatch):
    shortened(monkeypatch, sampler, num_inference_steps=2)
    browser.get(app_url)
    wait = WebDriverWait(browser, 120, poll_frequency=0.2)
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#prompt textarea"))
    click_example(browser, wait, "2048×512 (4:1)")
    (image,) = wait.until(lambda d: error_toasts(d) or finished_images(d))  # an error toast fails here
    size = browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", image)
    assert size == [2048, 512]
    assert error_toasts(browser) == []
    assert browser.find_element(By.CSS_SELECTOR, "#prompt textarea").get_attribute("value").startswith("A front view")
    assert browser.find_element(By.CSS_SELECTOR, "#seed-used input").get_attribute("value") == "0"  # the preset's
    assert "2048×512" in browser.find_element(By.CSS_SELECTOR, "#summary").text


def test_an_error_message_leaves_the_generate_button_free(app_url, browser):
    browser.get(app_url)
    wait = WebDriverWait(browser, 60, poll_frequency=0.2)
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#prompt textarea")).send_keys("a lake")
    set_number(browser, "#width input", 1001)
    browser.find_element(By.CSS_SELECTOR, "#generate").click()
    # The toast appears before its text is drawn: wait for the text, not just the box.
    (toast,) = wait.until(lambda d: [t for t in d.find_elements(By.CSS_SELECTOR, ".toast-body") if t.text])
    assert "Width" in toast.text
    button = browser.find_element(By.CSS_SELECTOR, "#generate").rect
    box = toast.rect
    assert box["y"] > button["y"] + button["height"]  # below the button, not over it


@pytest.fixture(scope="module")
def img2img_sampler(tiny_sdxl_path, tmp_path_factory):
    from elastic_diffusion_w_controlnet import ElasticDiffusionControlNet
    from tiny_models import save_tiny_controlnet

    controlnet = save_tiny_controlnet(tiny_sdxl_path, tmp_path_factory.mktemp("controlnet-canny"))
    return ElasticDiffusionControlNet(sd_version=tiny_sdxl_path, controlnet_model=controlnet)


@pytest.fixture(scope="module")
def img2img_app(img2img_sampler):
    import app_gradio_img2img as img2img

    return img2img.ImageToImageApp(img2img_sampler, preview_every=10)


@pytest.fixture(scope="module")
def img2img_url(img2img_app, tmp_path_factory):
    os.environ.setdefault("GRADIO_EXAMPLES_CACHE", str(tmp_path_factory.mktemp("gradio_examples")))
    demo = img2img_app.build()
    yield launched(demo)
    demo.close()


def test_a_visitors_first_click_on_the_image_demos_example_shows_its_images(img2img_url, browser, img2img_sampler,
                                                                            monkeypatch):
    shortened(monkeypatch, img2img_sampler, num_inference_steps=2, resampling_steps=0)
    browser.get(img2img_url)
    wait = WebDriverWait(browser, 120, poll_frequency=0.2)
    click_example(browser, wait, "1536×1536, canny edges")
    images = wait.until(lambda d: error_toasts(d) or finished_images(d))
    assert error_toasts(browser) == []
    assert [browser.execute_script("return arguments[0].naturalWidth", img) for img in images] == [1536, 1536]
    assert browser.find_element(By.CSS_SELECTOR, "#seed-used input").get_attribute("value") == "0"


def test_img2img_upload_shows_the_condition_map_and_follows_the_size(img2img_url, browser):
    from elastic_diffusion_w_controlnet import DEFAULT_INPUT

    browser.get(img2img_url)
    wait = WebDriverWait(browser, 60, poll_frequency=0.2)
    upload = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#input-image input[type=file]"))
    upload.send_keys(DEFAULT_INPUT)
    # the default 1024x1024, made as soon as the image is there
    assert wait.until(lambda d: loaded_size(d, "#condition-preview")) == (1024, 1024)
    set_number(browser, "#width input", 2048)
    # 2:1, shrunk to the page's 1024 px
    assert wait.until(lambda d: loaded_size(d, "#condition-preview") == (1024, 512) or False)
    browser.find_element(By.CSS_SELECTOR, "#advanced .label-wrap").click()
    wait.until(lambda d: slider_value(d, "resampling_steps") == "7")  # the size presets work here too
    assert slider_value(browser, "canny_low") == "100" and slider_value(browser, "canny_high") == "200"


def test_refine_upscales_an_uploaded_picture_from_the_page(img2img_url, img2img_app, browser, monkeypatch):
    """Upload, Upscale ×2, Generate: the refine guide (the default) gives the picture at twice its size."""
    from elastic_diffusion_w_controlnet import DEFAULT_INPUT

    shortened(monkeypatch, img2img_app.sampler, num_inference_steps=4)
    browser.get(img2img_url)
    wait = WebDriverWait(browser, 120, poll_frequency=0.2)
    upload = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#input-image input[type=file]"))
    upload.send_keys(DEFAULT_INPUT)  # 512x512
    assert slider_value(browser, "strength") == "0.5"  # refine's own default
    wait.until(lambda d: loaded_size(d, "#condition-preview"))
    browser.find_element(By.CSS_SELECTOR, "#upscale-2x").click()
    wait.until(lambda d: [d.find_element(By.CSS_SELECTOR, f"#{side} input").get_attribute("value")
                          for side in ("width", "height")] == ["1024", "1024"])
    browser.find_element(By.CSS_SELECTOR, "#prompt textarea").send_keys("a portrait photo of an astronaut")
    browser.find_element(By.CSS_SELECTOR, "#generate").click()
    (image,) = wait.until(lambda d: error_toasts(d) or finished_images(d))  # no condition map beside it
    assert error_toasts(browser) == []
    assert browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", image) == [1024,
                                                                                                              1024]
    assert "started from the input image at strength 0.5" in browser.find_element(By.CSS_SELECTOR, "#summary").text


def test_the_command_line_img2img_app_takes_an_upload_from_the_page(browser, tmp_path):
    """The app as its command line serves it (upload limits in front of Gradio's upload route), without a
    model: the page's own upload goes through and its Canny preview appears."""
    import subprocess
    import sys

    from elastic_diffusion_w_controlnet import DEFAULT_INPUT
    from test_app import wait_for_config

    port, repo = free_port(), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", GRADIO_TEMP_DIR=str(tmp_path))
    process = subprocess.Popen([sys.executable, os.path.join(repo, "app_gradio_img2img.py"), "--model", "/no/model",
                                "--port", str(port)], cwd=repo, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_config(process, port)
        browser.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(browser, 60, poll_frequency=0.2)
        upload = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#input-image input[type=file]"))
        upload.send_keys(DEFAULT_INPUT)
        assert wait.until(lambda d: loaded_size(d, "#condition-preview")) == (1024, 1024)
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=30)
    assert "MB in all" in output  # the upload limits were set up

