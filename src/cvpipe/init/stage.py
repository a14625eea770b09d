"""``cvpipe init SOURCE``: scan the data and the machine, write a commented params.yaml that is a strong recipe.

1. :func:`scan_source` lists the source with the same code as ingest (every file is
   counted per class and split folder) and reads the bytes of at most ``scan_limit``
   of them, spread over the listing: their SHA-256 (ingest's content hash) counts
   exact duplicates, their header (never decoded) gives the native resolution.
2. :func:`machine_profile` reads cores, RAM, the GPU, and what ``train.device: auto``
   and ``train.amp: auto`` resolve to here.
3. :mod:`cvpipe.init.recipe` turns both into choices, each with its reason;
   :func:`render_params` writes the complete params.yaml (every section) with the
   reasons as comments, checked to load back to exactly the values chosen and to pass
   validation; :func:`run` writes it atomically, never over an existing file unless forced.
   A credential in a SOURCE URL is written as a ``${CVPIPE_SOURCE_*}`` environment variable
   (:func:`source_refs`), never its value: params.yaml is committed.
"""

from __future__ import annotations

import hashlib
import io
import os
import shlex
import warnings
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import numpy as np
import yaml
from pydantic import BaseModel, ValidationError

from cvpipe import __version__
from cvpipe.core import storage
from cvpipe.core.config import IngestParams, Params, control_character, parse_yaml
from cvpipe.core.console import console, is_quiet, progress, warn
from cvpipe.core.errors import StageError, UsageError, shorten
from cvpipe.core.urls import REDACTED, redact_url, url_secrets, with_env_refs
from cvpipe.data.sources import (
    SourceItem,
    SourceOptions,
    check_source,
    filesystem_for,
    list_sources,
    resolve_sources,
)
from cvpipe.init import recipe
from cvpipe.init.recipe import Choice, DataProfile, MachineProfile, RecipeOptions, SizeStats

COMMENT_COLUMN = 29  # where the comments start, as in the repository's params.yaml
SUMMARY_KEYS = (
    "preprocess.image_size", "split.strategy", "augment.train", "bakeoff.archs", "train.batch_size", "train.lr",
    "train.epochs", "train.time_budget_minutes", "train.class_balance", "train.amp",
)
MAX_LINE = 130  # longer "value  # reason" lines put the reason on a line of its own above


# ----------------------------------------------------------------------------- scanning the data


def _spread(items: list[SourceItem], limit: int) -> list[SourceItem]:
    """At most *limit* items, evenly spaced over the (URI-sorted) listing: every class and split is sampled."""
    if len(items) <= limit:
        return items
    return [items[i * len(items) // limit] for i in range(limit)]


def _read_bytes(items: list[SourceItem], ingest: IngestParams, opts: SourceOptions) -> Iterator[tuple[SourceItem, Any]]:
    """``(item, bytes or the exception)`` for each item: local files read, remote ones fetched concurrently."""
    from cvpipe.data.sources import fetch_many

    remote: dict[str, list[SourceItem]] = defaultdict(list)
    for it in items:
        if it.remote:
            remote[storage.protocol(it.remote)].append(it)
            continue
        try:
            with open(it.local_path, "rb") as fh:  # type: ignore[arg-type]
                yield it, fh.read()
        except (OSError, TypeError) as exc:
            yield it, exc
    for group in remote.values():
        fs = filesystem_for(group[0].remote, opts)  # type: ignore[arg-type]
        yield from zip(group, fetch_many(fs, [it.remote for it in group], ingest.transfer_concurrency))


def header_size(data: bytes) -> Optional[tuple[int, int]]:
    """``(width, height)`` from the image header alone (nothing is decoded); None when it is not an image."""
    if not data or data.startswith(b"version https://git-lfs"):
        return None
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                return img.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):  # UnidentifiedImageError is an OSError
        return None


def _size_stats(values: list[int]) -> SizeStats:
    p10, median, p90 = np.percentile(np.asarray(values, dtype=np.float64), [10, 50, 90])
    return SizeStats(median=int(round(median)), p10=int(round(p10)), p90=int(round(p90)))


def scan_source(sources: list[str], ingest: IngestParams, scan_limit: int = 2000) -> DataProfile:
    """Profile *sources* (anything ``ingest.source`` accepts): classes, split folders, resolution, duplicates."""
    for src in sources:
        check_source(src)
    opts = SourceOptions(gcs_token=ingest.gcs_token, max_archive_bytes=ingest.max_archive_bytes)
    listed = list_sources(sources, opts)
    # items rejected while listing (FIFOs, loops, conflicting labels) are never read: ingest quarantines them
    labelled = [it for it in listed if it.label is not None and not it.junk and it.rejected is None]
    shown = ", ".join(redact_url(s) for s in sources)
    if not labelled:
        raise StageError(f"no image files inside class folders in {shown} ({len(listed)} files listed)")
    classes = Counter(it.label for it in labelled)
    if len(classes) < 2:
        raise StageError(f"found only the class {next(iter(classes))!r} in {shown}: a classifier needs at least 2")
    sample = _spread(labelled, scan_limit)
    hashes: set[str] = set()
    shorter: list[int] = []
    longer: list[int] = []
    duplicates = unreadable = 0
    with progress("files") as bar:
        task = bar.add_task("scan", total=len(sample))
        for _, data in _read_bytes(sample, ingest, opts):
            bar.advance(task)
            size = header_size(data) if isinstance(data, (bytes, bytearray)) else None
            if size is None:
                unreadable += 1
                continue
            digest = hashlib.sha256(data).hexdigest()
            duplicates += digest in hashes
            hashes.add(digest)
            shorter.append(min(size))
            longer.append(max(size))
    if not shorter:
        raise StageError(f"none of the {len(sample)} files scanned in {shown} is a readable image")
    return DataProfile(
        sources=tuple(sources),
        class_counts=dict(sorted(classes.items())),  # type: ignore[arg-type]
        shorter_side=_size_stats(shorter),
        longer_side=_size_stats(longer),
        duplicates=duplicates,
        unreadable=unreadable,
        scanned=len(sample),
        unlabelled=len(listed) - len(labelled),
        split_counts=dict(sorted(Counter(it.split_hint for it in labelled if it.split_hint).items())),  # type: ignore[arg-type]
    )


# ----------------------------------------------------------------------------- the machine


def machine_profile() -> MachineProfile:
    """Cores this process may use, RAM, the GPU, and what device/amp ``auto`` resolve to (as train resolves them)."""
    import torch

    from cvpipe.torchkit.runtime import cpu_supports_bf16, resolve_runtime

    rt = resolve_runtime("auto", "auto", channels_last=True)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    gpu_name = gpu_mem = None
    if rt.device.type == "cuda":
        props = torch.cuda.get_device_properties(rt.device)
        gpu_name, gpu_mem = props.name, props.total_memory / 1024**3
        bf16 = bool(torch.cuda.is_bf16_supported())
    elif rt.device.type == "mps":
        gpu_name, bf16 = "Apple MPS", False
    else:
        bf16 = cpu_supports_bf16()
    return MachineProfile(
        cpu_cores=cores, ram_gib=round(ram_gib, 1), accelerator=rt.device.type, gpu_name=gpu_name,
        gpu_mem_gib=None if gpu_mem is None else round(gpu_mem, 1), bf16=bf16, amp=rt.amp_name,
    )


# ----------------------------------------------------------------------------- options


def check_text_arguments(sources: list[str], params_path: Union[str, Path], options: RecipeOptions) -> None:
    """Refuse (exit 2) a SOURCE, ``--params`` or ``--pretrained-path`` holding a control character (newline, tab,
    NUL, ...): params.yaml could not name it as a path, and no stage could use it."""
    named = [("SOURCE", s) for s in sources] + [("--params", str(params_path))]
    if options.pretrained_path is not None:
        named.append(("--pretrained-path", options.pretrained_path))
    if options.arch is not None:
        named.append(("--arch", options.arch))
    for what, text in named:
        bad = control_character(text)
        if bad:
            raise UsageError(f"{what} {shorten(text)}: contains a control character ({bad}); rename it or pick another path")


def check_options(options: RecipeOptions) -> None:
    """Refuse contradictory or impossible ``cvpipe init`` options (exit 2) before anything is scanned."""
    from cvpipe.torchkit.models import check_arch

    if options.time_budget_minutes is not None and not 0 < options.time_budget_minutes <= 100_000:
        raise UsageError(f"--time-budget: must be between 0 and 100000 minutes (got {options.time_budget_minutes:g})")
    if options.pretrained and options.pretrained_path is not None:
        raise UsageError("--pretrained (timm hub weights) and --pretrained-path (a weights file) exclude each other")
    if options.pretrained_path is not None:
        if not options.arch:
            raise UsageError("--pretrained-path needs --arch: the timm architecture the weights belong to")
        if not storage.is_remote(options.pretrained_path) and not Path(options.pretrained_path).is_file():
            raise UsageError(f"--pretrained-path: {options.pretrained_path} is not a file")
    if options.arch:
        check_arch(options.arch, key="--arch")
        if options.pretrained:
            import timm

            if not timm.list_models(options.arch, pretrained=True):
                raise UsageError(f"--arch {options.arch}: timm has no pretrained weights for it (drop --pretrained)")


# ----------------------------------------------------------------------------- writing params.yaml


class _NoAliasDumper(yaml.SafeDumper):
    """SafeDumper that writes a value seen twice twice: params files may hold no anchors or aliases."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _flow(value: Any) -> str:
    """One-line YAML for *value* (flow style), written by a YAML dumper."""
    text = yaml.dump(value, Dumper=_NoAliasDumper, default_flow_style=True, sort_keys=False, width=1 << 30).strip()
    return text[: -len("...")].strip() if text.endswith("\n...") else text


def _comment_text(text: str) -> str:
    """*text* safe inside a ``#`` comment: every character YAML could read as a line break (or any other
    non-printable one) is written escaped (``\\n``), so a comment always ends where its line ends."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _line(indent: int, text: str, comment: Optional[str]) -> list[str]:
    """``text  # comment`` aligned at the comment column; a comment that would make the line long goes above it."""
    line = " " * indent + text
    if not comment:
        return [line]
    comment = _comment_text(comment)
    if len(line) + len(comment) + 3 > MAX_LINE:
        return [" " * indent + f"# {comment}", line]
    return [f"{line.ljust(COMMENT_COLUMN - 1)} # {comment}" if len(line) < COMMENT_COLUMN - 1 else f"{line}  # {comment}"]


def _key_lines(key: str, value: Any, choice: Optional[Choice[Any]], description: Optional[str]) -> list[str]:
    if choice is None or not choice.parts:
        return _line(2, f"{key}: {_flow(value)}", choice.reason if choice else description)
    lines = _line(2, f"{key}:", choice.reason)
    for part in choice.parts:
        if isinstance(value, list):  # one transform: {Name: {args}}
            ((name, args),) = part.value.items()
            lines += _line(4, f"- {_flow(name)}: {_flow(args)}", part.reason)
        else:  # a mapping entry: name -> its value
            lines += _line(4, f"{_flow(part.value)}: {_flow(value[part.value])}", part.reason)
    return lines


def _header(profile: DataProfile, machine: MachineProfile, command: str) -> list[str]:
    counts = profile.class_counts
    folders = ", ".join(f"{k} {v}" for k, v in profile.split_counts.items()) or "none"
    sh, lo = profile.shorter_side, profile.longer_side
    return [_comment_text(line) for line in [
        f"# cvpipe parameters, written by `{command}` (cvpipe {__version__}).",
        "# Choices made for this data and machine carry their reason; the other keys are cvpipe's defaults",
        "# (the repository's params.yaml documents every key). Validated when any stage starts; override any",
        "# value with `cvpipe <stage> -S section.key=value` or `dvc exp run -S section.key=value`.",
        "#",
        f"# Data: {redact_url(profile.source)}",
        f"#   {profile.num_images:,} images in {profile.num_classes} classes: {min(counts.values()):,} to "
        f"{max(counts.values()):,} per class (imbalance max/min {profile.imbalance_ratio:.2f})",
        f"#   given split (train/ val/ test/ folders or a split column): {folders}; {profile.unlabelled} file(s) outside class folders (ingest quarantines them)",
        f"#   {profile.scanned:,} scanned (header + content hash): shorter side median {sh.median} px (p10 {sh.p10}, "
        f"p90 {sh.p90}), longer side median {lo.median} px (p10 {lo.p10}, p90 {lo.p90})",
        f"#   {profile.duplicates} exact duplicate(s), {profile.unreadable} unreadable file(s) among them",
        f"# Machine: {machine.describe()}; train.device auto -> {machine.accelerator}, train.amp auto -> {machine.amp}",
        "",
    ]]


def _validated(data: dict[str, Any]) -> Params:
    try:
        return Params.model_validate(data)
    except ValidationError as exc:  # a recipe rule produced an invalid value: a bug, not the user's fault
        raise StageError(f"cvpipe init produced invalid params: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}") from None


def render_params(profile: DataProfile, machine: MachineProfile, choices: dict[str, Choice[Any]], command: str) -> str:
    """The complete params.yaml: every section and key, the *choices* applied and explained in comments."""
    data = Params().model_dump(mode="json")
    for dotted, choice in choices.items():
        section, key = dotted.split(".", 1)
        data[section][key] = choice.value
    _validated(data)
    lines = _header(profile, machine, command)
    for section, field in Params.model_fields.items():
        model: type[BaseModel] = field.annotation  # type: ignore[assignment]
        lines.append(f"{section}:")
        for key, value in data[section].items():
            lines += _key_lines(key, value, choices.get(f"{section}.{key}"), model.model_fields[key].description)
        lines.append("")
    text = "\n".join(lines)
    try:  # the comments and flow values must not change what loads, with the loader every stage uses
        loaded = parse_yaml(text)
    except yaml.YAMLError:
        loaded = None
    if loaded != data:
        raise StageError("cvpipe init: the rendered params.yaml does not load back to the values chosen (a bug)")
    return text


def relative_to_params(params_path: Path, path: str) -> str:
    """*path* as params.yaml must name it (stages run in its folder): a relative local path is rebased there."""
    if "://" in path or Path(path).expanduser().is_absolute():
        return path
    return os.path.relpath(Path(path).resolve(), params_path.resolve().parent)


def source_refs(params_path: Path, sources: list[str], resolved: list[str]) -> tuple[list[str], list[str]]:
    """*sources* as params.yaml names them (:func:`relative_to_params`, every secret part of a URL a
    ``${CVPIPE_SOURCE_*}`` reference: :func:`cvpipe.core.urls.with_env_refs`) and the names of those
    variables. A local path is written *resolved* (its ``${NAME}`` expanded: a path is no secret, and
    must be rebased)."""
    written, taken = [], {}
    for src, expanded in zip(sources, resolved):
        if "://" in src:
            written.append(with_env_refs(src, taken=taken)[0])
        else:
            written.append(relative_to_params(params_path, expanded))
    return written, list(taken)


def _without_secrets(command: str, sources: list[str], written: list[str], resolved: list[str]) -> str:
    """*command* (the header's ``cvpipe init ...``) with each SOURCE URL as params.yaml names it, and any
    credential left in it (an option's value, say) as ``***``."""
    for src, ref in zip(sources, written):
        if "://" in src:
            command = command.replace(shlex.quote(src), shlex.quote(ref)).replace(src, ref)
    for src in resolved:
        for secret in url_secrets(src):
            command = command.replace(secret, REDACTED)
    return command


def _ingest_params(sources: list[str]) -> IngestParams:
    """``ingest.source`` set to the SOURCE arguments, validated as params.yaml will be (exit 2 when it is not)."""
    try:
        return IngestParams(source=sources)
    except ValidationError as exc:
        raise UsageError(f"SOURCE: {exc.errors()[0]['msg'].removeprefix('Value error, ')}") from None


def run(
    sources: list[str], params_path: Union[str, Path], options: RecipeOptions, *, command: str,
    force: bool = False, scan_limit: int = 2000, estimate: bool = True,
) -> dict[str, Choice[Any]]:
    """Scan, choose, write *params_path* (refusing to overwrite it unless *force*); returns the choices.

    With *estimate* (and not quiet) it then times a few training steps of each planned architecture and
    says how long the planned ``dvc repro`` takes here (:mod:`cvpipe.init.estimate`)."""
    target = Path(params_path)
    check_text_arguments(sources, target, options)
    if target.exists() and not force:
        raise UsageError(f"{target} exists; pass --force to overwrite it")
    check_options(options)
    resolved = resolve_sources(sources)  # a SOURCE may itself name ${NAME} variables
    profile = scan_source(resolved, _ingest_params(resolved), scan_limit)
    written, secrets = source_refs(target, sources, resolved)
    if options.pretrained_path is not None:
        options = replace(options, pretrained_path=relative_to_params(target, options.pretrained_path))
    machine = machine_profile()
    choices = {
        "ingest.source": Choice(written if len(written) > 1 else written[0], "scanned by cvpipe init (see the header)"),
        **recipe.build_recipe(profile, machine, options),
    }
    command = _without_secrets(command, sources, written, resolved)
    storage.write_text(target, render_params(profile, machine, choices, command))
    if secrets:  # not quiet-only: without them the next `dvc repro` stops at ingest
        warn(f"{target} names the credentials of SOURCE as environment variables, never their values: export "
             f"{', '.join(secrets)} (each the part of the URL you gave that it replaces) before `dvc repro`")
    if not is_quiet():
        _print_summary(target, profile, machine, choices)
        if estimate:
            from cvpipe.init.estimate import from_choices

            est = from_choices(choices, profile.num_classes, recipe.estimated_train_images(profile),
                               recipe.estimated_val_images(profile))
            console.print(est.message(), markup=False, soft_wrap=True)
    return choices


def _print_summary(target: Path, profile: DataProfile, machine: MachineProfile, choices: dict[str, Choice[Any]]) -> None:
    from rich.table import Table

    scan = Table(title=f"cvpipe init: scanned {redact_url(profile.source)}", title_justify="left", show_header=False)
    scan.add_row("classes", f"{profile.num_classes} ({', '.join(f'{k} {v}' for k, v in list(profile.class_counts.items())[:8])}"
                 f"{', ...' if profile.num_classes > 8 else ''})")
    scan.add_row("images", f"{profile.num_images:,} (imbalance max/min {profile.imbalance_ratio:.2f})")
    scan.add_row("given split", ", ".join(f"{k} {v}" for k, v in profile.split_counts.items()) or "none")
    scan.add_row("resolution", f"shorter side median {profile.shorter_side.median} px, longer {profile.longer_side.median} px")
    scan.add_row("scanned", f"{profile.scanned:,}: {profile.duplicates} exact duplicates, {profile.unreadable} unreadable")
    scan.add_row("machine", f"{machine.describe()}, amp {machine.amp}")
    console.print(scan)
    table = Table(title=f"recipe written to {target} (the reasons are comments there)", title_justify="left")
    table.add_column("param")
    table.add_column("value", overflow="fold")
    for key in SUMMARY_KEYS:
        choice = choices[key]
        if key == "augment.train":
            value = ", ".join(next(iter(item)) for item in choice.value) or "none"
        elif isinstance(choice.value, dict):
            value = ", ".join(choice.value)
        else:
            value = _flow(choice.value)
        table.add_row(key, value)
    console.print(table)
    console.print("next: `dvc repro` (or `cvpipe ingest`, `cvpipe preprocess`, `cvpipe train`, ...)")
