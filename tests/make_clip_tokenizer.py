"""Build the offline CLIP tokenizer fixtures used by the test-suite.

Stable Diffusion pipelines need a real CLIP BPE tokenizer, but the tests must
run without network access, so we cannot download ``openai/clip-vit-large-patch14``.
The ``open_clip_torch`` package ships the original OpenAI CLIP BPE merges as
``open_clip/bpe_simple_vocab_16e6.txt.gz``; this script turns that file into
Hugging Face ``CLIPTokenizer`` folders (``vocab.json`` + ``merges.txt`` +
configs) with exactly the ids of the real Stable Diffusion tokenizers.

Two folders are written (identical vocabulary, different pad token):

* ``tests/fixtures/clip_tokenizer/``      pads with ``<|endoftext|>`` (id 49407):
  SD 1.x ``tokenizer`` and SDXL ``tokenizer``.
* ``tests/fixtures/clip_tokenizer_pad0/`` pads with ``!`` (id 0):
  SD 2.x ``tokenizer`` and SDXL ``tokenizer_2``.

Licence: ``bpe_simple_vocab_16e6.txt.gz`` comes from OpenAI's CLIP repository
(https://github.com/openai/CLIP, MIT licence, Copyright (c) 2021 OpenAI) and is
redistributed in open_clip (https://github.com/mlfoundations/open_clip, MIT
licence). The generated ``vocab.json``/``merges.txt`` are derived from it and
remain under the MIT licence.

Re-run with ``python tests/make_clip_tokenizer.py``; it overwrites the folders.
"""

from __future__ import annotations

import glob
import gzip
import importlib.util
import json
import os
import sys
import sysconfig

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "fixtures")
VOCAB_NAME = "bpe_simple_vocab_16e6.txt.gz"

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
VOCAB_SIZE = 49408
NUM_MERGES = 49152 - 256 - 2  # 48,894 merges, as in CLIP's SimpleTokenizer

# folder name -> pad token
VARIANTS = {"clip_tokenizer": EOS, "clip_tokenizer_pad0": "!"}


def find_bpe_file() -> str:
    """Locate open_clip's BPE file without importing open_clip (it needs torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    dirs = list(spec.submodule_search_locations or []) if spec else []
    for d in dirs:
        path = os.path.join(d, VOCAB_NAME)
        if os.path.isfile(path):
            return path
    for site in {sysconfig.get_paths()["purelib"], *sys.path}:
        hits = glob.glob(os.path.join(site, "open_clip", VOCAB_NAME))
        if hits:
            return hits[0]
    raise FileNotFoundError(f"{VOCAB_NAME} not found: install open_clip_torch (pip install --no-deps open_clip_torch)")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible byte -> printable unicode map, in its canonical order."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    byte_values = printable[:]
    code_points = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            byte_values.append(b)
            code_points.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(byte_values, code_points)}


def build_vocab_and_merges(bpe_path: str) -> tuple[dict[str, int], list[str]]:
    with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = lines[1 : NUM_MERGES + 1]  # line 0 is a "#version" header
    assert len(merges) == NUM_MERGES, len(merges)

    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    tokens += ["".join(m.split()) for m in merges]
    tokens += [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    assert len(vocab) == VOCAB_SIZE, len(vocab)
    assert vocab[BOS] == 49406 and vocab[EOS] == 49407 and vocab["!"] == 0
    return vocab, merges


def _special(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def write_folder(folder: str, vocab: dict[str, int], merges: list[str], pad_token: str) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False, separators=(",", ":"))
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")

    special_map = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    added = {str(vocab[BOS]): {**_special(BOS), "special": True}, str(vocab[EOS]): {**_special(EOS), "special": True}}
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "do_lower_case": True,
        "add_prefix_space": False,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
        **special_map,
        "added_tokens_decoder": added,
    }
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(folder, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(special_map, f, indent=2)
    # A stale tokenizer.json from another run/tool would take precedence over vocab/merges.
    stale = os.path.join(folder, "tokenizer.json")
    if os.path.exists(stale):
        os.remove(stale)


def main() -> None:
    bpe_path = find_bpe_file()
    vocab, merges = build_vocab_and_merges(bpe_path)
    print(f"read {bpe_path}")
    for name, pad in VARIANTS.items():
        folder = os.path.join(FIXTURES, name)
        write_folder(folder, vocab, merges, pad)
        print(f"wrote {folder} (pad_token={pad!r}, id {vocab[pad]})")


if __name__ == "__main__":
    main()
