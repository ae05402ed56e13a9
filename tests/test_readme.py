"""The README's Python quick start runs as written (D1), with a tiny model in place of SDXL."""
import os
import re

import elastic_diffusion as ed

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def quickstart_code() -> str:
    text = open(README, encoding="utf-8").read()
    match = re.search(r"<!-- quickstart[^>]*-->\s*```python\n(.*?)```", text, re.S)
    assert match, "README lost its quick-start block"
    return match.group(1)


def test_readme_quickstart_runs(tiny_sdxl_path, tmp_path, monkeypatch):
    code = quickstart_code()
    assert "sd_version='XL1.0'" in code and "torch.device('cuda')" in code and "drop_p=0.7" in code
    code = (code.replace("sd_version='XL1.0'", f"sd_version={tiny_sdxl_path!r}")
                .replace("torch.device('cuda')", "torch.device('cpu')")
                .replace("num_inference_steps=50", "num_inference_steps=2"))
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    images, info = namespace["images"], namespace["verbose_info"]
    assert images[0].size == (2048, 1024)
    assert info["settings"]["new_p"] == 0.3 and info["settings"]["resampling_steps"] == 7
    assert (tmp_path / "ostrich.png").is_file()


def test_readme_documents_every_knob():
    text = open(README, encoding="utf-8").read()
    for name in ed.SETTING_NAMES + ("view_batch_size", "low_vram"):
        assert f"`{name}`" in text, name
