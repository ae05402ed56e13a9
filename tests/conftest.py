"""Shared pytest fixtures: tiny Stable Diffusion checkpoints saved once per session.

``HF_HUB_OFFLINE`` is set before diffusers/transformers are imported so no test
can reach the network: everything loads from local folders, like a real
checkpoint that is already in the cache.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# The tiny models' ops are far too small to gain from threads; on a 2-core CI machine a second
# thread per op mostly adds contention (the suite ran 5x faster with one).
torch.set_num_threads(1)

from tiny_models import save_tiny_pipeline  # noqa: E402


def _saved(tmp_path_factory, kind: str) -> str:
    return save_tiny_pipeline(kind, tmp_path_factory.mktemp(f"tiny_{kind}"))


@pytest.fixture(scope="session")
def tiny_sd1_path(tmp_path_factory) -> str:
    return _saved(tmp_path_factory, "sd1")


@pytest.fixture(scope="session")
def tiny_sd2_path(tmp_path_factory) -> str:
    return _saved(tmp_path_factory, "sd2")


@pytest.fixture(scope="session")
def tiny_sdxl_path(tmp_path_factory) -> str:
    return _saved(tmp_path_factory, "sdxl")


@pytest.fixture(scope="session")
def tiny_sd3_path(tmp_path_factory) -> str:
    return _saved(tmp_path_factory, "sd3")


@pytest.fixture(scope="module")
def examples_cache(tmp_path_factory):
    """Gradio's example cache in a fresh temporary folder per test module, not ./.gradio of the checkout."""
    folder = tmp_path_factory.mktemp("gradio_examples")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRADIO_EXAMPLES_CACHE", str(folder))
        yield folder
