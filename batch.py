"""Many images from one command: a prompts file, split across processes by cost, resumable, with a manifest.

    python batch.py --prompts_file prompts.jsonl --outdir out/                                # one GPU
    accelerate launch --num_processes 8 batch.py --prompts_file prompts.jsonl --outdir out/

`python batch.py` takes elastic_diffusion.py's flags; both sampler command lines hand a --prompts_file over to
`run` (the ControlNet's lines may set its inputs too: `control_line_check`). A job, in order:

1. read the file into `Item`s (`read_prompts_file`); a line that cannot become one stops the job, named;
2. check and price each item without a model (`plan`); one the sampler would refuse is recorded as an error;
3. main process: lock the folder, fold a killed job's records into the manifest, find what is done (`claim`);
4. split what is left by cost (`split_by_cost`): every process computes the same assignment;
5. each process loads the model once and appends a record per image to its `manifest.process<N>.jsonl`;
6. the main process shows the progress, waits for every record and merges them into `manifest.jsonl` (`Progress`).

File formats, the manifest's fields, resuming and multi-node runs: docs/batch.md.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import fcntl
import glob
import json
import logging
import os
import re
import signal
import socket
import time
import unicodedata
from dataclasses import dataclass, field
from typing import Callable

import torch
from PIL import Image

import elastic_diffusion as ed

logger = logging.getLogger("elastic_diffusion.batch")

MANIFEST = "manifest.jsonl"
PART = "manifest.process{rank}.jsonl"  # one per process while a job runs, merged into MANIFEST at its end
LOCK = ".elastic_diffusion.lock"
MERGE_EVERY_S = 30.0  # how stale manifest.jsonl may get while a job runs (each merge rewrites it whole)
POLL_S = 1.0  # how often the main process reads the other processes' records while it waits for them

ITEM_KEYS = ("prompt", "negative_prompt", "width", "height", "seed", "num_images")
IMAGE_KEYS = ("image", "strength", "upscale")  # image-to-image: a line's own, or the command line's --image ...
MEMORY_KEYS = {row.name for row in ed.KNOBS if row.memory}  # in the PNG metadata, but never change the image
# Other spellings people will type, and where they belong.
KEY_HINTS = {
    **{alias: f"the knob is called {row.name!r}" for row in ed.KNOBS for alias in row.aliases},
    "num_sampled": "the key is called 'num_images'", "drop_p": "give new_p = 1 - drop_p",
    **{name: f"{name} is a memory setting of the whole job: give --{name} on the command line" for name in MEMORY_KEYS},
    **dict.fromkeys(("sd_version", "model"), "one model per job: give --sd_version on the command line"),
}


# --- The prompts file ---

def control_line_check(controlnet_model: str) -> Callable[[dict, bool], dict]:
    """How a line's ControlNet inputs (its `CONTROL_ARGS`, the flags as defaults) are checked, as its `generate`
    does: (values, read_files) -> what a generation records of them (`info.settings`), or ValueError."""
    import elastic_diffusion_w_controlnet as edc  # only a ControlNet job needs the ControlNet's code

    def check(values: dict, read_files: bool) -> dict:
        condition = values["condition"] or edc.default_condition(controlnet_model)
        request = edc.control_request(values["condition_image"], condition, values["controlnet_conditioning_scale"],
                                      values["canny_low"], values["canny_high"])
        edc.check_control_request(request, read_files)
        return edc.control_settings(controlnet_model, request)

    return check


@dataclass
class Item:
    """One line of a prompts file: one generation of `num_images` images with one seed."""
    index: int  # position among the file's items, from 0: names the files, offsets the seed
    line: int  # line number in the file, from 1
    prompt: str
    negative_prompt: str
    width: int
    height: int
    seed: int
    num_images: int
    knobs: dict  # method knobs as given (None: the resolution-aware preset)
    extra: dict = field(default_factory=dict)  # more call arguments: IMAGE_KEYS, the ControlNet's input
    recorded: dict = field(default_factory=dict)  # what its PNGs record of `extra` (`plan`): its identity for resume
    settings: dict | None = None  # resolved method knobs (`plan`); None while unchecked or refused
    error: str | None = None  # why the sampler would refuse the item (`plan`)
    cost: int = 0  # estimated native-size UNet samples (`elastic_diffusion.unet_cost`)

    def stem(self, outdir: str) -> str:
        """`outdir/00042_<slug>_seed<seed>`: the item's files are `<stem>_<k>.png`, sortable by index."""
        return os.path.join(outdir, f"{self.index:05d}_{slug(self.prompt)}_seed{self.seed}")

    def path(self, outdir: str, k: int) -> str:
        return f"{self.stem(outdir)}_{k}.png"


def slug(prompt: str, limit: int = 40) -> str:
    """A file-name part from a prompt: lower-case ASCII words joined by '-', whole words up to `limit` characters."""
    words = re.findall(r"[a-z0-9]+", unicodedata.normalize("NFKD", prompt).encode("ascii", "ignore").decode().lower())
    text = ""
    for word in words:
        if len(text) + len(word) + bool(text) > limit:
            break
        text = f"{text}-{word}" if text else word
    return text or (words[0][:limit] if words else "prompt")


def _json_object(text: str) -> dict:
    """A JSON object; ValueError for bad JSON, another type, or a key given twice."""
    def unique(pairs):
        keys = [key for key, _ in pairs]
        twice = sorted({key for key in keys if keys.count(key) > 1})
        if twice:
            raise ValueError(f"key {twice[0]!r} is given twice")
        return dict(pairs)

    try:
        value = json.loads(text, object_pairs_hook=unique)
    except json.JSONDecodeError as error:
        raise ValueError(f"not valid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object such as {{\"prompt\": \"a photo of the dolomites\"}}; "
                         f"got {type(value).__name__}")
    return value


def read_prompts_file(path: str, defaults: dict, knobs: dict, extra: dict | None = None) -> list[Item]:
    """The items of a .txt or .jsonl prompts file, with the command line's values where a line leaves a key out.

    `defaults` holds negative_prompt, width, height (None: default_px, or an image's size), seed (item i gets
    seed + i) and num_images; `knobs` the method knobs (None: preset); `extra` the command line's extra call
    arguments (IMAGE_KEYS and the ControlNet's), which lines may set too.
    A ValueError lists every line that cannot become an item, one "FILE:LINE: what is wrong" a line; sizes and
    knobs are `plan`'s to check. Blank lines and # comments are skipped.
    """
    extra = extra or {}
    if not path.endswith((".txt", ".jsonl")):
        raise ValueError(f"{path}: a prompts file is .txt (one prompt a line) or .jsonl (one JSON object a line)")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as error:
        raise ValueError(f"{path}: cannot be read ({error.strerror or error})") from None
    jsonl = path.endswith(".jsonl")
    allowed = [*ITEM_KEYS, *(row.name for row in ed.method_knobs()), *extra]
    folder = os.path.dirname(path)
    items, errors = [], []
    for number, raw in enumerate(data.splitlines(), start=1):
        try:
            text = raw.decode("utf-8-sig" if number == 1 else "utf-8").strip()
            if not text or text.startswith("#"):
                continue
            values = _json_object(text) if jsonl else {"prompt": text}
            for key in (key for key in values if key not in allowed):  # the first unknown one
                close = difflib.get_close_matches(key, allowed, 1)
                hint = KEY_HINTS.get(key) or (f"did you mean {close[0]!r}?" if close else None)
                raise ValueError(f"unknown key {key!r}" + (f" ({hint})" if hint else "") +
                                 f"; the keys are {', '.join(allowed)}")
            values = {key: value for key, value in values.items() if value is not None}  # null: the default
            if not isinstance(values.get("prompt"), str):
                raise ValueError("missing prompt: every line needs \"prompt\": \"...\"" if "prompt" not in values
                                 else f"prompt must be a string; got {values['prompt']!r}")
            negative = values.get("negative_prompt", defaults["negative_prompt"])
            if not isinstance(negative, str):
                raise ValueError(f"negative_prompt must be a string; got {negative!r}")
            index = len(items)
            # The batch's own integer fields: the plan needs them, so they are checked up front.
            seed = ed.check_number("seed", values.get("seed", defaults["seed"] + index), 0, ed.MAX_SEED, integer=True)
            count = ed.check_number("num_images", values.get("num_images", defaults["num_images"]), 1, integer=True)
        except UnicodeDecodeError as error:
            errors.append(f"{path}:{number}: not UTF-8 text ({error.reason} at byte {error.start})")
            continue
        except ValueError as error:
            errors.append(f"{path}:{number}: {error}")
            continue
        # JSON writes 10 for 10.0: a whole number for a float knob becomes a float, as the CLI parses it (type(): a
        # bool stays a bool).
        line_knobs = {name: float(values[name]) if ed.knob(name).type is float and type(values[name]) is int
                      else values[name] for name in knobs if name in values}
        line_extra = {key: values.get(key, default) for key, default in extra.items()}
        for key in ("image", "condition_image"):  # files: a relative path is relative to the prompts file
            value = values.get(key)
            if isinstance(value, str) and not os.path.isabs(os.path.expanduser(value)):
                line_extra[key] = os.path.normpath(os.path.join(folder, value))
        size = {side: values.get(side, defaults[side]) for side in ("width", "height")}
        if line_extra.get("image") is None:  # an image's size is `plan`'s to read
            size = {side: value or defaults["default_px"] for side, value in size.items()}
        items.append(Item(index=index, line=number, prompt=values["prompt"], negative_prompt=negative, **size,
                          seed=seed, num_images=count, knobs={**knobs, **line_knobs}, extra=line_extra))
    if not items and not errors:
        errors.append(f"{path}: no prompts (the file is empty, or only blank lines and # comments)")
    if errors:
        raise ValueError("\n".join(errors))
    return items


# --- The plan: checks and cost without a model, and the split ---

def plan(items: list[Item], native: ed.Native, max_scale: int = ed.MAX_SCALE, view_batch_size: int = 16,
         check_line: Callable | None = None, read_files: bool = False) -> None:
    """Check every item with the sampler's own rules and price it, in place: `settings`, `recorded` and `cost`, or
    `error`. `read_files` (--dry_run) also reads the files an item names, which a job leaves to the sampler."""
    for item in items:
        try:
            upscale = item.extra.get("upscale")
            picture, item.height, item.width, strength = ed.image_request(  # a picture is read now: size and hash
                item.extra.get("image"), item.extra.get("strength"), upscale, item.height, item.width, native.px,
                native.vae_scale_factor, max_scale)
            recorded = {} if picture is None else dict(strength=strength, upscale=upscale or 1,
                                                        image_hash=ed.image_hash(picture))
            ed.check_size(item.height, item.width, native.px, native.vae_scale_factor, max_scale)
            settings = ed.settings_for(item.width, item.height, native.px, native.flow, **item.knobs)
            ed.check_settings(settings, native.latent)
            if check_line is not None:
                recorded.update(check_line(item.extra, read_files))
        except ValueError as error:
            item.error, item.settings, item.cost = str(error), None, 0
            continue
        item.settings, item.recorded, item.error = settings, recorded, None
        item.cost = ed.unet_cost(item.width, item.height, settings, native.latent, item.num_images, view_batch_size,
                                 native.vae_scale_factor, 1.0 if strength is None else strength, native.flow).samples


def share_out(items: list[Item], done, num_processes: int) -> tuple[list[Item], list[list[int]]]:
    """(the items to generate: not `done`, not refused; their positions per process, `split_by_cost`)."""
    runnable = [item for item in items if item.index not in done and item.error is None]
    return runnable, split_by_cost([item.cost for item in runnable], num_processes)


def split_by_cost(costs: list[int], num_processes: int) -> list[list[int]]:
    """Positions of `costs` per process, balanced by cost: the most expensive first, each to the least loaded
    process (ties: the lower rank); each process's positions in order. Deterministic: every process computes
    the same split."""
    loads, parts = [0] * num_processes, [[] for _ in range(num_processes)]
    for position in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(num_processes), key=lambda r: (loads[r], r))
        parts[rank].append(position)
        loads[rank] += costs[position]
    return [sorted(part) for part in parts]


# --- The output folder: manifest, records, resume, lock ---

def write_manifest(path: str, records: dict[str, dict]) -> None:
    """Write the records (path -> record) as JSON lines sorted by file name, atomically."""
    text = "".join(json.dumps(records[key], ensure_ascii=False) + "\n" for key in sorted(records))
    ed.write_atomically(path, lambda f: f.write(text.encode("utf-8")), suffix=".jsonl.part")


def part_paths(outdir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(glob.escape(outdir), PART.format(rank="*"))))


def append_records(path: str, records: list[dict]) -> None:
    """Append an item's records to a process's log (`PART`) in one write, flushed to disk, so a stopped job loses
    none; a reader sees whole lines, or an unfinished last one (`RecordReader`). The log is created with the first
    record: a process with nothing to do leaves none."""
    with open(path, "ab") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


class RecordReader:
    """Reads a record log as it grows: each `read()` returns the records completed since the last one, and keeps
    in `rest` an unfinished last line (one still being written, or one a power loss cut). A line that is not JSON
    is skipped with a warning."""

    def __init__(self, path: str):
        self.path, self.offset, self.rest = path, 0, b""

    def read(self) -> list[dict]:
        if not os.path.isfile(self.path):  # a process's log is created with its first record
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # decode whole lines only: a read may end inside a character
        self.offset, self.rest = self.offset + end, data[end:]
        records = []
        for line in filter(str.strip, data[:end].decode("utf-8", errors="replace").split("\n")):  # blank: skipped
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                logger.warning("%s: skipped a damaged record: %.80s", self.path, line)
        return records


def png_record(path: str) -> dict | None:
    """The settings record of a PNG this project wrote, read from its header (no pixels decoded), or None."""
    try:
        with Image.open(path) as image:
            record = json.loads(image.info["elastic_diffusion"])
            size = image.size
    except (OSError, KeyError, ValueError):  # PIL's UnidentifiedImageError is an OSError
        return None
    return record if isinstance(record, dict) and size == (record.get("width"), record.get("height")) else None


def done_items(items: list[Item], outdir: str, model: str) -> dict[int, list[dict]]:
    """Items whose every image exists with the metadata this job would write (`GenerationInfo.record`, less the
    memory knobs, which never change an image): index -> the images' PNG records."""
    done = {}
    for item in (item for item in items if item.error is None):
        info = ed.GenerationInfo(dict(item.settings, width=item.width, height=item.height, **item.recorded),
                                 item.seed, model)
        records = [png_record(item.path(outdir, k)) for k in range(item.num_images)]
        if all(record is not None and {key: v for key, v in record.items() if key not in MEMORY_KEYS} ==
               info.record(item.prompt, item.negative_prompt, k) for k, record in enumerate(records)):
            done[item.index] = records
    return done


@contextlib.contextmanager
def folder_lock(outdir: str):
    """Hold the output folder for one job (an flock on `outdir/.elastic_diffusion.lock`, released when the
    process ends however it ends); OSError naming the holder if another job has it."""
    with open(os.path.join(outdir, LOCK), "a+b") as f:  # "a": created if missing, not emptied before it is ours
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read(200).decode("utf-8", errors="replace").strip() or "holder unknown"
            raise OSError(f"{outdir} is in use by another job ({holder}); wait for it to end or choose another "
                          "--outdir") from None
        f.truncate(0)
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        f.flush()
        yield


# --- The job ---

def item_records(item: Item, outdir: str, model: str, rank: int | None, status: str, message: str | None = None,
                 settings: dict | None = None, seconds: float | None = None, unet_samples: int | None = None):
    """The manifest records of an item's images. `seconds` and `unet_samples` are per image: the generation's
    totals divided by its number of images."""
    return [dict(index=item.index, line=item.line, image_index=k, path=os.path.basename(item.path(outdir, k)),
                 status=status, message=message, prompt=item.prompt, negative_prompt=item.negative_prompt,
                 seed=item.seed, width=item.width, height=item.height, model=model,
                 settings=settings if settings is not None else (item.settings or item.knobs),
                 seconds=None if seconds is None else round(seconds / item.num_images, 3),
                 unet_samples=None if unet_samples is None else unet_samples // item.num_images, process=rank)
            for k in range(item.num_images)]


def generate_item(pipe, item: Item, outdir: str, model: str, rank: int, extra_outputs: Callable | None) -> list[dict]:
    """Generate and save one item (`elastic_diffusion.generate_and_save`); its records, `error` ones if it failed."""
    tic = time.perf_counter()
    try:
        _, info = ed.generate_and_save(pipe, item.stem(outdir), item.prompt, item.negative_prompt, extra_outputs,
                                       height=item.height, width=item.width, seed=item.seed,
                                       num_images_per_prompt=item.num_images, progress=False, **item.knobs,
                                       **item.extra)
    except (ValueError, torch.OutOfMemoryError) as error:  # the sampler's refusals and its OOM advice
        return item_records(item, outdir, model, rank, "error", str(error))
    except Exception as error:  # noqa: BLE001 (one broken item must not end a 10,000-image job)
        logger.exception("item %d (line %d) failed", item.index, item.line)
        return item_records(item, outdir, model, rank, "error", f"{type(error).__name__}: {error}")
    return item_records(item, outdir, model, rank, "ok", settings=info.settings,
                        seconds=time.perf_counter() - tic, unet_samples=info.unet_samples)


class Progress:
    """The main process's view of the job: every process's records as they arrive, a bar weighted by cost, and
    the manifest (`base`, the records the job found, updated with them)."""

    def __init__(self, outdir: str, items: list[Item], num_processes: int, base: dict | None = None):
        from tqdm.auto import tqdm

        self.outdir, self.items, self.base = outdir, {item.index: item for item in items}, base or {}
        self.readers = [RecordReader(os.path.join(outdir, PART.format(rank=r))) for r in range(num_processes)]
        self.records: dict[str, dict] = {}  # file name -> record, of this job's images
        self.last_merge = time.monotonic()
        self.bar = tqdm(total=sum(item.cost for item in items) or 1, desc=f"0/{len(self.items)} items",
                        disable=not items, dynamic_ncols=True,
                        bar_format="{desc} {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]")

    def poll(self, merge: bool = False) -> None:
        """Read the records written since the last call; rewrite the manifest every MERGE_EVERY_S (now: `merge`)."""
        count = len(self.records)
        for record in (record for reader in self.readers for record in reader.read()):
            item = self.items.get(record.get("index"))
            if item is not None and record["path"] not in self.records:
                self.records[record["path"]] = record
                self.bar.n += item.cost / item.num_images  # drawn below with the new count: one line per change
        if len(self.records) > count:  # a log file gets a line per change, not one per poll
            seen = {r["index"] for r in self.records.values()}
            failed = {r["index"] for r in self.records.values() if r["status"] != "ok"}
            text = f"{len(seen)}/{len(self.items)} items" + (f", {len(failed)} failed" if failed else "")
            self.bar.set_description_str(text, refresh=True)
        if merge or time.monotonic() - self.last_merge > MERGE_EVERY_S:
            write_manifest(os.path.join(self.outdir, MANIFEST), {**self.base, **self.records})
            self.last_merge = time.monotonic()

    def finish(self) -> None:
        """Wait for the other processes' records, then merge them all into the manifest and remove the logs."""
        while len(self.records) < sum(item.num_images for item in self.items.values()):
            time.sleep(POLL_S)
            self.poll()
        self.poll(merge=True)
        for part in part_paths(self.outdir):  # every record is in the manifest now
            os.unlink(part)


def _count(n: int, thing: str, things: str | None = None) -> str:
    return f"{n:,} {thing if n == 1 else things or thing + 's'}"


def format_plan(path: str, items: list[Item], todo: list[Item], done: dict, parts: list[list[int]], native: ed.Native,
                model: str, verbose: bool = False) -> str:
    """The --dry_run report: refused items, items already done, the split with estimated UNet samples."""
    def share(some: list[Item], cost: bool = True) -> str:
        return f"{_count(len(some), 'item')}, {_count(sum(i.num_images for i in some), 'image')}" + \
            (f", {sum(i.cost for i in some):,} UNet samples" if cost else "")

    lines = [f"{path}: {share(items, cost=False)}; model {model!r}, native size {native.px} px (from {native.source})"]
    refused = [item for item in items if item.error is not None]
    if refused:
        lines.append(f"refused ({_count(len(refused), 'item')}, each would be recorded as an error):")
        lines += [f"  {path}:{item.line}: {item.error}" for item in refused]
    if done:
        lines.append(f"already done (skipped by --resume): {_count(len(done), 'item')}")
    lines.append(f"plan for {_count(len(parts), 'process', 'processes')}, in estimated "
                 "native-size UNet samples (docs/method.md#cost-model):")
    for rank, part in enumerate(parts):
        mine = [todo[i] for i in part]
        lines.append(f"  process {rank}: {share(mine)}")
        if verbose:
            lines += [f"    {i.index:05d} line {i.line}: {i.width}x{i.height}, seed {i.seed}, "
                      f"{_count(i.num_images, 'image')}, {i.cost:,} UNet samples" for i in mine]
    lines.append(f"  total: {share(todo)}")
    return "\n".join(lines)


def summary(outdir: str, path: str, items: list[Item], done, records: list[dict], seconds: float) -> str:
    """The job's last words: what was generated, skipped and failed, and where the manifest is."""
    ok = [r for r in records if r["status"] == "ok"]
    failed = {r["index"]: r for r in records if r["status"] != "ok"}
    lines = [f"{_count(len(items), 'item')}: {len({r['index'] for r in ok})} generated ({_count(len(ok), 'image')}, "
             f"{sum(r['unet_samples'] or 0 for r in ok):,} UNet samples, {seconds:.1f} s), {len(done)} already done, "
             f"{len(failed)} failed; manifest: {os.path.join(outdir, MANIFEST)}"]
    lines += [f"  failed: {path}:{failed[i]['line']} (item {i}): {failed[i]['message']}" for i in sorted(failed)[:20]]
    if len(failed) > 20:
        lines.append(f"  ... and {len(failed) - 20} more (status \"error\" in the manifest)")
    return "\n".join(lines)


def claim(outdir: str, items: list[Item], model: str, resume: bool,
          held: contextlib.ExitStack) -> tuple[str | None, dict, dict]:
    """Main process: lock the folder (until `held` closes), fold the per-process records a stopped job left into the
    manifest (the newer record of an image replaces the older), find what is done. Returns (why the folder cannot be
    used or None, the manifest's records by file name, `done_items`)."""
    try:
        os.makedirs(outdir, exist_ok=True)
        held.enter_context(folder_lock(outdir))
    except OSError as error:  # not a folder, or another job holds it
        return str(error), {}, {}
    for pattern in ("*.png.part", "*.jsonl.part"):  # writes a power loss cut short (`write_atomically`)
        for path in glob.glob(os.path.join(glob.escape(outdir), pattern)):
            os.unlink(path)
    manifest, parts, base = os.path.join(outdir, MANIFEST), part_paths(outdir), {}
    for path in [manifest, *parts]:
        reader = RecordReader(path)
        base.update({r["path"]: r for r in reader.read() if isinstance(r, dict) and "path" in r})
        if reader.rest.strip():
            logger.warning("%s: skipped an unfinished last record (the job writing it was stopped)", path)
    if parts:
        write_manifest(manifest, base)
        for part in parts:  # only once their records are safely in the manifest
            os.unlink(part)
    done = done_items(items, outdir, model) if resume else {}
    for index, records in done.items():  # a done image keeps its ok record; one without (a lost manifest) or with
        item = items[index]  # an error an earlier job recorded for its line gets one from its PNG
        for k, record in enumerate(records):
            name = os.path.basename(item.path(outdir, k))
            if base.get(name, {}).get("status") != "ok":
                settings = {key: value for key, value in record.items() if key not in ed.METADATA_IDENTITY}
                base[name] = item_records(item, outdir, model, None, "ok", settings=settings)[k]
    return None, base, done


def run(parser: argparse.ArgumentParser, args: argparse.Namespace, make_sampler: Callable, call_kwargs: dict,
        extra_outputs: Callable | None = None) -> list[str]:
    """Run the job of `args.prompts_file` on this process (one of those `accelerate launch` started, or the only
    one); returns the paths of the images the job has in `args.outdir`. Exits 2 for a file the job cannot start
    from (and for a --dry_run that finds refused items), 1 when an item failed or another job holds the folder,
    130 when stopped."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list
    from tqdm.contrib.logging import logging_redirect_tqdm

    check_line = control_line_check(args.controlnet_model) if "controlnet_model" in vars(args) else None
    # Several processes on CPUs need cpu=True (accelerate then uses the gloo backend).
    state = PartialState(cpu=(args.device or ed.default_device().type).startswith("cpu"))
    main, rank, outdir, model = state.is_main_process, state.process_index, args.outdir, args.sd_version
    manifest = os.path.join(outdir, MANIFEST)

    def fail(status: int, message: str):  # the main process says why; the others end quietly with it
        parser.exit(status, f"{parser.prog}: {message}\n" if main else None)

    with contextlib.ExitStack() as held:  # released however the job ends (a dry run, a bad file, a stop, an error):
        held.callback(state.destroy_process_group)  # the process group (a no-op on one process); later the lock
        try:
            native = ed.native_size(model, args.native_px)
            if args.seed < 0:  # a flag no line could use
                raise ValueError(f"--seed must be >= 0 with --prompts_file (item i gets --seed + i, so a rerun gives "
                                 f"the same images); got {args.seed}")
            defaults = {key: getattr(args, key) for key in (*ITEM_KEYS[1:], "default_px")}
            extra = {**{key: getattr(args, key) for key in IMAGE_KEYS}, **call_kwargs}
            items = read_prompts_file(args.prompts_file, defaults, ed.knob_flags(args, native.latent), extra)
        except ValueError as error:  # a bad file or flag: every line that cannot be read, with its number
            fail(2, f"error: {error}")
        plan(items, native, args.max_scale, args.view_batch_size, check_line, read_files=args.dry_run is not None)
        resume = args.resume if args.resume is not None else (os.path.isfile(manifest) or bool(part_paths(outdir)))

        if args.dry_run is not None:
            done = done_items(items, outdir, model) if resume else {}
            todo, parts = share_out(items, done, args.dry_run or state.num_processes)
            if main:
                print(format_plan(args.prompts_file, items, todo, done, parts, native, model, args.verbose))
            refused = sum(item.error is not None for item in items)
            if refused:
                fail(2, f"error: {refused} item{'s' if refused > 1 else ''} would be refused (listed above)")
            return []

        if main:
            held.enter_context(logging_redirect_tqdm())  # logs above the bar
        tic, progress, mine = time.perf_counter(), None, []
        # SIGTERM (a scheduler's or torchrun's stop) raises KeyboardInterrupt, so a job stops as after Ctrl-C: the
        # image in flight is dropped, its temporary file removed, the records so far kept, the lock released.
        sigterm = signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            busy, base, done = claim(outdir, items, model, resume, held) if main else (None, {}, {})
            busy, done = broadcast_object_list([(busy, set(done))])[0]  # every process: the same view
            if busy:
                fail(1, f"error: {busy}")
            runnable, parts = share_out(items, done, state.num_processes)
            # Refused items go to the main process, which records them first: no model is loaded for them.
            refused = [item for item in items if item.index not in done and item.error is not None]
            mine = (refused if main else []) + [runnable[i] for i in parts[rank]]
            progress = Progress(outdir, refused + runnable, state.num_processes, base) if main else None
            if args.device is None:  # each process on its own device; make_sampler reads args.device
                args.device = str(state.device)
            pipe, log = None, os.path.join(outdir, PART.format(rank=rank))
            for item in mine:  # in file order, each item's records appended to this process's log
                if item.error is not None:
                    records = item_records(item, outdir, model, rank, "error", item.error)
                else:
                    pipe = pipe or make_sampler()  # loaded once, by the first item to generate
                    loaded = (pipe.native_px, pipe.vae_scale_factor, pipe.is_flow)
                    if loaded != (native.px, native.vae_scale_factor, native.flow):
                        raise ValueError(f"the model (native size, VAE factor, SD 3) is {loaded}, but the plan "
                                         f"assumed {(native.px, native.vae_scale_factor, native.flow)} from "
                                         f"{native.source}: pass --native_px {pipe.native_px}")
                    records = generate_item(pipe, item, outdir, model, rank, extra_outputs)
                if records[0]["status"] != "ok":
                    logger.warning("%s:%d (item %d): %s", args.prompts_file, item.line, item.index,
                                   records[0]["message"])
                append_records(log, records)
                if progress is not None:
                    progress.poll()
            if main:
                progress.finish()
        except KeyboardInterrupt:
            if progress is not None:  # keep what is recorded; the parts stay too: a stopping process may still write
                progress.poll(merge=True)
            fail(130, f"stopped; the records so far are in {manifest}. Run the same command again to resume.")
        except (ValueError, torch.OutOfMemoryError) as error:  # model not loadable, not the planned one, or too big
            parser.exit(1 if isinstance(error, torch.OutOfMemoryError) else 2, f"{parser.prog}: error: {error}\n")
        finally:
            signal.signal(signal.SIGTERM, sigterm)
            if progress is not None:
                progress.bar.close()
        paths = [item.path(outdir, k) for item in (items if main else mine) for k in range(item.num_images)]
        paths = [path for path in paths if os.path.isfile(path)]
        if main:
            records = list(progress.records.values())
            print(summary(outdir, args.prompts_file, items, done, records, time.perf_counter() - tic))
            if any(r["status"] != "ok" for r in records):
                raise SystemExit(1)
        return paths


def main(argv: list[str] | None = None) -> list[str]:
    """`python batch.py --prompts_file FILE ...`: elastic_diffusion.py's flags, the plain sampler."""
    parser = ed.build_parser()
    args = parser.parse_args(argv)
    if args.prompts_file is None:
        parser.error("--prompts_file is required")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    return run(parser, args, lambda: ed.ElasticDiffusion(**ed.sampler_kwargs(args)), {})


if __name__ == "__main__":
    main()
