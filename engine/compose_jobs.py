"""Composed datasets as jobs: export to disk (ImageFolder + Waterbirds metadata), per-group evaluation, and the
comparison of training correlations.

The rule (:mod:`bgsynth.compose`) defines the set; these consumers write it or measure a model on it:

* :func:`export_composed`: every foreground of the chosen splits on its rule-chosen background, written as
  ``<out>/<split>/<fg class folder>/<stem>.jpg`` (an ImageFolder per split) with ``metadata.csv`` in the column
  layout of the Waterbirds metadata of group DRO / WILDS (``img_id, img_filename, y, split, place,
  place_filename``, then ``fg_class, bg_class, group, bg_id, aligned``) and ``manifest.json`` (rule, backgrounds,
  counts per group). Resumable; a file that cannot be decoded is recorded, never fatal.
* :func:`evaluate_composed`: a model on the composed set (or, with ``all_groups``, each foreground on one
  background of every class), with accuracy per group (foreground class x background class), the average and
  worst group, and the aligned-minus-conflicting gap (:func:`bgsynth.compose.group_metrics`), in
  ``results.json`` under ``variants.composed``.
* :func:`compare_correlations`: the same model trained online at several correlations (e.g. 0.95 and the
  balanced 0.5), each evaluated on every group.

Composites are made by the path of training (:class:`~bgsynth.augment.BackgroundSwap` with the rule's rows,
no crop or flip) or by the same fused op (:func:`bgsynth.variants.composite`) with the model's normalisation:
foreground pixels where the mask is 1, the background crop elsewhere.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import io
import json
import os
import pathlib
import re
import time
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from .augment import BackgroundSwap
from .classes import IN9_MEAN, IN9_STD
from .compose import (ComposeRule, ComposeSpec, backgrounds_of_class, compose_backgrounds, group_metrics,
                      weighted_accuracy)
from .compose_loader import Backgrounds, load_backgrounds, scene_index, spec_digests
from .config import DEMO_GEOMETRY, RunConfig, resolve_options
from .errors import CheckpointError, ConfigError
from .export import safe_stem
from .fileio import atomic_write_bytes, atomic_write_json
from .index import DatasetIndex, require_index
from .models import LoadedModel, Predictor, create_model, load_model
from .pipeline import create_loader
from .runs import Fingerprint, OutputFolder, file_digest, index_digest
from .train import train
from .types import BackgroundPool, Batch
from .variants import composite

__all__ = ["describe_composed", "WATERBIRDS_COLUMNS", "SPLIT_CODES", "ComposeExportConfig", "ComposeExportResult", "export_composed",
           "ComposeEvalConfig", "ComposedEvalResult", "evaluate_composed", "load_classifier", "compare_correlations",
           "CorrelationComparison", "group_table"]

#: the columns of the Waterbirds metadata (group DRO, WILDS), first and in this order; ours follow them
WATERBIRDS_COLUMNS = ("img_id", "img_filename", "y", "split", "place", "place_filename")
EXTRA_COLUMNS = ("fg_class", "bg_class", "group", "bg_id", "aligned")
#: Waterbirds' split codes; other split names get 3, 4, ... in sorted order (``manifest.json`` lists them)
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


def _split_codes(splits: Sequence[str]) -> dict[str, int]:
    codes = {s: SPLIT_CODES[s] for s in splits if s in SPLIT_CODES}
    for k, s in enumerate(sorted(s for s in splits if s not in SPLIT_CODES)):
        codes[s] = 3 + k
    return codes


def _spec(spec) -> ComposeSpec:
    if isinstance(spec, Mapping):
        return ComposeSpec(**spec)
    if not isinstance(spec, ComposeSpec):
        raise ConfigError(f"compose: expected a ComposeSpec (or its fields as a mapping), got {type(spec).__name__}")
    return spec


def _backgrounds(spec: ComposeSpec, run: RunConfig, given: Backgrounds | None) -> Backgrounds:
    if given is not None:
        if not isinstance(given, Backgrounds):
            raise ConfigError(f"compose: expected backgrounds as bgsynth.compose_loader.Backgrounds, got "
                              f"{type(given).__name__}")
        return given
    return load_backgrounds(spec.backgrounds, run.replace(progress=False), split=spec.bg_split,
                            per_class=spec.bg_per_class)


def _decode(index: DatasetIndex, run: RunConfig):
    """The foregrounds, decoded in the run's geometry (no Only-BG-T: the backgrounds come from elsewhere)."""
    return create_loader(index, backend=run.backend, geometry=run.geometry, batch_size=run.batch_size,
                         device=run.device, num_threads=run.num_threads, tiling="crop", only_bg_t=False)


def _settings(run: RunConfig, spec: ComposeSpec, rule: ComposeRule, bg: Backgrounds, **more) -> dict:
    """What decides a composed job's output (its fingerprint's settings)."""
    r = rule.to_dict()
    return {"pairing": r["pairing"], "correlation": r["correlation"], "seed": r["seed"], "backgrounds": spec.backgrounds,
            "pairing_digest": spec_digests(spec)["pairing_digest"], "bg_split": spec.bg_split,
            "bg_per_class": spec.bg_per_class, "backgrounds_digest": index_digest(bg.index),
            "backgrounds_kind": bg.kind, "geometry": run.geometry.to_dict(), "tiling": run.tiling,
            "backend": run.backend, **more}


@dataclasses.dataclass(frozen=True)
class _Split:
    """The job config of :func:`describe_composed`."""

    split: str | None = None


def describe_composed(index, spec: ComposeSpec | Mapping, run: RunConfig | None = None, **options) -> dict:
    """What a composed set holds, without decoding an image: the rule, the background source's images per class
    and, per foreground split, the composites per group the rule gives (its class draws need only the ids).

    Returns:
        ``{"rule", "backgrounds": {"source", "kind", "classes", "counts"}, "groups": {split: {"fg/bg": n}}}``.
    """
    index = require_index(index, "compose", load_paths=True)
    spec = _spec(spec)
    run, config = resolve_options("describe_composed", run, None, _Split, options)
    src = pathlib.Path(spec.backgrounds).expanduser()
    bg_index = scene_index(src) if src.is_dir() else DatasetIndex.load(src)
    if spec.bg_split is not None:
        bg_index = bg_index.select(split=spec.bg_split)
    rule = spec.rule(index.label_space, bg_index.label_space, run.seed)
    space = bg_index.label_space
    counts = np.bincount(bg_index.labels(), minlength=space.num_classes) if len(bg_index) else [0] * space.num_classes
    bg = {"source": spec.backgrounds, "kind": "scenes" if src.is_dir() else "index", "classes": list(space.classes),
          "counts": {c: int(counts[k]) for k, c in enumerate(space.classes)}}
    sub = index.select(split=config.split) if config.split is not None else index
    index.require_images(sub, "describe", split=config.split)
    no_images = BackgroundPool(torch.zeros((0, 3, 1, 1), dtype=torch.uint8), torch.zeros(0, dtype=torch.int64),
                               torch.zeros(0, dtype=torch.int64), space.num_classes)  # the class draw needs no pixels
    groups: dict[str, dict[str, int]] = {}
    for split in sorted({str(sub.image(i).get("split", "")) for i in sub.ids}):
        ids = sub.select(split=split).ids
        ch = compose_backgrounds(torch.tensor(ids, dtype=torch.int64), torch.from_numpy(sub.labels(ids)), no_images,
                                 rule, 0)
        g = np.bincount((torch.from_numpy(sub.labels(ids)) * space.num_classes + ch.bg_class).numpy(),
                        minlength=rule.pairing.num_fg * space.num_classes)
        groups[split] = {f"{rule.pairing.fg_space.classes[k // space.num_classes]}/"
                         f"{space.classes[k % space.num_classes]}": int(n) for k, n in enumerate(g)}
    return {"rule": rule.to_dict(), "backgrounds": bg, "groups": groups}


# ==============================================================================================================
# Export
# ==============================================================================================================


@dataclasses.dataclass(frozen=True)
class ComposeExportConfig:
    """The settings of :func:`export_composed` (the geometry, device, backend, batch size and seed are the run's).

    Attributes:
        split: foreground splits to export (``None``: every split of the index).
        split_correlation: per-split correlations overriding the spec's (e.g. ``{"val": 0.5, "test": 0.5}``:
            Waterbirds' balanced evaluation splits).
        image_format: ``'jpg'`` (quality ``quality``) or ``'png'`` (lossless).
        quality: JPEG quality.
        resume: continue an interrupted export with the same settings (files written are kept).
        overwrite: replace an export made with other settings (only the files it recorded are deleted).
    """

    split: str | Sequence[str] | None = None
    split_correlation: Mapping[str, float] | None = None
    image_format: str = "jpg"
    quality: int = 95
    resume: bool = False
    overwrite: bool = False

    def __post_init__(self):
        if self.image_format not in ("jpg", "png"):
            raise ConfigError(f"export_composed: expected image_format 'jpg' or 'png', got {self.image_format!r}")
        if not 1 <= int(self.quality) <= 100:
            raise ConfigError(f"export_composed: expected quality in 1..100, got {self.quality}")


@dataclasses.dataclass
class ComposeExportResult:
    """What :func:`export_composed` wrote.

    Attributes:
        out_dir: the folder; metadata: ``metadata.csv``; manifest: ``manifest.json``.
        written: composites in the export (files written now plus those kept from an interrupted run).
        skipped: ``{reason: count}`` of foregrounds not exported (``decode_failed``, ``no_mask``,
            ``no_background``).
        groups: ``{split: {group id: count}}``.
        seconds: wall time.
    """

    out_dir: pathlib.Path
    metadata: pathlib.Path
    manifest: pathlib.Path
    written: int
    skipped: dict[str, int]
    groups: dict[str, dict[int, int]]
    seconds: float


def _encode(hwc: np.ndarray, image_format: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if image_format == "png":
        Image.fromarray(hwc).save(buf, format="PNG")
    else:
        Image.fromarray(hwc).save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


class _Export:
    """One export run: the claimed folder, the swap that composites, and the rows of ``metadata.csv``."""

    def __init__(self, index, spec, rule, bg, run, config, out):
        self.index, self.spec, self.rule, self.bg, self.run, self.config, self.out = \
            index, spec, rule, bg, run, config, out
        self.swap = BackgroundSwap({"mixed_rand": 1.0}, bg_source="pool", pool=bg.pool, seed=run.seed,
                                   random_resized_crop=False, flip=False, mean=None, std=None, dtype=torch.uint8,
                                   kernel_backend=run.kernel_backend)
        self.rows: list[dict] = []
        self.skipped: dict[str, int] = {}
        self.rejects: list[dict] = []
        self.ext = ".png" if config.image_format == "png" else ".jpg"

    def correlation(self, split: str) -> float:
        over = dict(self.config.split_correlation or {})
        return over[split] if split in over else self.rule.correlation_at(0)

    def _skip(self, reason: str, n: int) -> None:
        if n:
            self.skipped[reason] = self.skipped.get(reason, 0) + int(n)

    def rel_path(self, split: str, label: int, image_id: int) -> str:
        rec = self.index.image(image_id)
        stem = f"{safe_stem(rec['file_name'], fallback='img')}_{int(image_id)}"
        return f"{safe_stem(split, fallback='split')}/{self.index.label_space.folders[label]}/{stem}{self.ext}"

    def batch(self, batch: Batch, split: str, code: int, folder: OutputFolder, pool) -> list[str]:
        """Composite and write one decoded batch; returns the files written."""
        choice = compose_backgrounds(batch.image_ids, batch.labels, self.bg.pool, self.rule, 0, self.correlation(split))
        out = self.swap.apply_batch(batch, epoch=0, backgrounds=choice.as_rows())
        ok = ~out.fell_back
        self._skip("no_mask", int((~batch.has_mask.to(torch.bool)).sum()))
        self._skip("no_background", int((batch.has_mask.to(torch.bool) & (choice.rows < 0)).sum()))
        images = out.images.permute(0, 2, 3, 1).contiguous().cpu().numpy()
        cols = {k: v.cpu().tolist() for k, v in dict(ids=batch.image_ids, y=batch.labels, bg=choice.bg_labels,
                                                       bg_id=choice.bg_ids, aligned=choice.aligned, ok=ok).items()}
        jobs, files = [], []
        nb = self.rule.pairing.num_bg
        for j, image_id in enumerate(cols["ids"]):
            if not cols["ok"][j]:
                continue
            rel = self.rel_path(split, cols["y"][j], image_id)
            target = self.out / rel
            if not (self.config.resume and target.is_file() and rel in folder.files):
                target.parent.mkdir(parents=True, exist_ok=True)
                jobs.append(pool.submit(lambda t=target, a=images[j]: atomic_write_bytes(
                    t, _encode(a, self.config.image_format, self.config.quality))))
            files.append(rel)
            y, b = cols["y"][j], cols["bg"][j]
            self.rows.append({"img_id": image_id, "img_filename": rel, "y": y, "split": code, "place": b,
                              "place_filename": self.bg.file_name(cols["bg_id"][j]),
                              "fg_class": self.rule.pairing.fg_space.classes[y],
                              "bg_class": self.rule.pairing.bg_space.classes[b], "group": y * nb + b,
                              "bg_id": cols["bg_id"][j], "aligned": int(cols["aligned"][j])})
        for f in jobs:
            f.result()
        return files

    def metadata(self) -> bytes:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=[*WATERBIRDS_COLUMNS, *EXTRA_COLUMNS], lineterminator="\n")
        w.writeheader()
        for row in sorted(self.rows, key=lambda r: (r["split"], r["img_id"])):
            w.writerow(row)
        return buf.getvalue().encode("utf-8")


def export_composed(index, spec: ComposeSpec | Mapping, out_dir: str | os.PathLike, run: RunConfig | None = None,
                    config: ComposeExportConfig | None = None, *, backgrounds: Backgrounds | None = None,
                    **options) -> ComposeExportResult:
    """Write a composed set to disk: ImageFolder per split, ``metadata.csv`` (Waterbirds columns) and a manifest.

    Args:
        index: the foreground :class:`~bgsynth.index.DatasetIndex` (or its path); images need masks.
        spec: the :class:`~bgsynth.compose.ComposeSpec` (backgrounds, pairing, correlation; epoch 0's draw).
        out_dir: the export folder (claimed for this run's settings: :class:`bgsynth.runs.OutputFolder`).
        run: the :class:`~bgsynth.config.RunConfig` (geometry: the crop written, default 256 -> 224; seed: the
            rule's; device, backend, batch size).
        config: :class:`ComposeExportConfig`.
        backgrounds: a :class:`~bgsynth.compose_loader.Backgrounds` already loaded (default: from ``spec``).
        **options: loose run options and :class:`ComposeExportConfig` fields.

    Returns:
        A :class:`ComposeExportResult`.
    """
    t0 = time.perf_counter()
    index = require_index(index, "compose", load_paths=True)
    spec = _spec(spec)
    run, config = resolve_options("export_composed", run, config, ComposeExportConfig, options, batch_kind="decode")
    sub = index.select(split=config.split) if config.split is not None else index
    index.require_images(sub, "export", split=config.split)
    out = pathlib.Path(out_dir).expanduser()
    bg = _backgrounds(spec, run, backgrounds)
    rule = spec.rule(index.label_space, bg.label_space, run.seed)
    fp = Fingerprint("compose-export", _settings(run, spec, rule, bg, split=config.split,
                                                 split_correlation=dict(config.split_correlation or {}),
                                                 image_format=config.image_format, quality=config.quality),
                     index=index_digest(sub))
    folder = OutputFolder(out, fp, overwrite=config.overwrite, resume=config.resume,
                          owned=lambda p: p.suffix.lower() in (".jpg", ".png", ".csv") or p.name == "manifest.json"
                          ).claim()
    folder.commit()  # the record first: a killed export is this run's to resume
    job = _Export(sub, spec, rule, bg, run, config, out)
    splits = sorted({str(sub.image(i).get("split", "")) for i in sub.ids})
    codes = _split_codes(splits)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        for split in splits:
            loader = _decode(sub.select(split=split), run)
            try:
                for batch in loader:
                    folder.commit(job.batch(batch, split, codes[split], folder, pool))
            finally:
                loader.close()
            job.rejects.extend(getattr(loader, "rejects", []))
    job._skip("decode_failed", len(job.rejects))
    groups: dict[str, dict[int, int]] = {}
    inv = {c: s for s, c in codes.items()}
    for r in job.rows:
        g = groups.setdefault(inv[r["split"]], {})
        g[r["group"]] = g.get(r["group"], 0) + 1
    meta, manifest = out / "metadata.csv", out / "manifest.json"
    atomic_write_bytes(meta, job.metadata())
    atomic_write_json(manifest, {
        "format": "bgsynth-compose-export/1", "rule": rule.to_dict(), "backgrounds": bg.describe(),
        "split_codes": codes, "split_correlation": {s: job.correlation(s) for s in splits},
        "columns": [*WATERBIRDS_COLUMNS, *EXTRA_COLUMNS], "groups": {s: {str(k): v for k, v in sorted(g.items())}
                                                                     for s, g in groups.items()},
        "skipped": job.skipped, "rejects": job.rejects, "geometry": run.geometry.to_dict(),
        "image_format": config.image_format,
        "group_ids": {f"{y * rule.pairing.num_bg + b}": [rule.pairing.fg_space.classes[y],
                                                        rule.pairing.bg_space.classes[b]]
                      for y in range(rule.pairing.num_fg) for b in range(rule.pairing.num_bg)},
    }, indent=1)
    folder.commit([meta.name, manifest.name])
    return ComposeExportResult(out, meta, manifest, len(job.rows), job.skipped, groups, time.perf_counter() - t0)


# ==============================================================================================================
# Evaluation per group
# ==============================================================================================================


def load_classifier(model, num_classes: int) -> LoadedModel:
    """A :class:`~bgsynth.models.LoadedModel` of a classifier of ``num_classes`` outputs (one per class).

    Args:
        model: a :class:`~bgsynth.models.LoadedModel`, an ``nn.Module`` (IN-9 normalisation), a
            :class:`~bgsynth.models.Predictor`'s model, or a checkpoint path / ``--model`` spec.
        num_classes: the label space's class count.

    A bgsynth checkpoint of a label space other than IN-9 or ImageNet-1k (e.g. the 2 classes of the
    waterbirds-like set) is rebuilt from its ``arch`` and loaded exactly (every key, every shape); anything else
    goes through :func:`bgsynth.models.load_model`.
    """
    if isinstance(model, LoadedModel):
        loaded = model
    elif isinstance(model, nn.Module):
        loaded = LoadedModel(module=model.eval(), num_outputs=int(num_classes), output_space="in9",
                             mean=tuple(IN9_MEAN), std=tuple(IN9_STD))
    else:
        loaded = _load_checkpoint(os.fspath(model), int(num_classes))
    if loaded.num_outputs != int(num_classes):
        raise ConfigError(f"compose: the model has {loaded.num_outputs} outputs, the foreground label space "
                          f"{num_classes} classes; expected one output per class")
    return loaded


def _load_checkpoint(spec: str, num_classes: int) -> LoadedModel:
    path = pathlib.Path(spec)
    if num_classes in (9, 1000) or not path.is_file():
        return load_model(spec)
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - corrupt, truncated or not a torch file
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__})") from None
    if not isinstance(ck, dict) or ck.get("format") != "bgsynth-checkpoint" or "arch" not in ck:
        return load_model(spec)
    module = create_model(str(ck["arch"]), num_classes=int(ck.get("num_classes", num_classes)))
    try:
        module.load_state_dict(ck["state_dict"], strict=True)
    except (RuntimeError, KeyError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path}: the weights do not fit {ck['arch']} with {num_classes} outputs ({first})") \
            from None
    return LoadedModel(module=module.eval(), num_outputs=int(ck.get("num_classes", num_classes)), output_space="in9",
                       mean=tuple(ck.get("mean") or IN9_MEAN), std=tuple(ck.get("std") or IN9_STD),
                       arch=str(ck["arch"]), geometry=ck.get("geometry"),
                       provenance={"spec": spec, "file": str(path), "sha256": file_digest(path)})


@dataclasses.dataclass(frozen=True)
class ComposeEvalConfig:
    """The settings of :func:`evaluate_composed`.

    Attributes:
        split: the foreground split evaluated (``None``: every image).
        all_groups: composite each foreground on one background of **every** background class (each group then
            holds every foreground of its class: balanced groups, the Waterbirds test's design) instead of the
            rule's one background at its correlation.
        name: the model's name in the results.
    """

    split: str | None = "val"
    all_groups: bool = False
    name: str | None = None


@dataclasses.dataclass
class ComposedEvalResult:
    """Per-composite records and per-group metrics of a model on a composed set.

    Attributes:
        records: ``{"image_id", "label", "pred", "bg_id", "bg_label", "aligned", "valid"}`` columns (numpy).
        metrics: :func:`bgsynth.compose.group_metrics` of the records.
        rule, backgrounds, model, run, split, mode: provenance (``mode``: ``'rule'`` or ``'all_groups'``).
        correlation: the rule's correlation used (``None`` with ``all_groups``).
    """

    records: dict[str, np.ndarray]
    metrics: dict
    rule: dict
    backgrounds: dict
    model: dict
    run: dict
    split: str | None
    mode: str
    correlation: float | None
    seconds: float = 0.0

    def to_dict(self) -> dict:
        """``results.json``: the metrics under ``variants.composed`` (``groups``, ``worst_group``,
        ``average_group``, ``aligned_gap``, ...) with the provenance."""
        return {"format": "bgsynth-compose-eval/1", "variants": {"composed": self.metrics}, "rule": self.rule,
                "backgrounds": self.backgrounds, "model": self.model, "run": self.run, "split": self.split,
                "mode": self.mode, "correlation": self.correlation, "seconds": self.seconds}

    def table(self) -> str:
        """A Markdown table: average, worst group and every group's accuracy."""
        return group_table({self.model.get("name") or "model": self.metrics})

    def write_csv(self, path: str | os.PathLike) -> pathlib.Path:
        cols = ("image_id", "label", "pred", "bg_id", "bg_label", "aligned", "valid")
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow([*cols, "correct"])
        r = self.records
        correct = (r["pred"] == r["label"]) & r["valid"]
        for i in range(len(r["image_id"])):
            w.writerow([int(r[c][i]) for c in cols] + [int(correct[i])])
        atomic_write_bytes(path, buf.getvalue().encode("utf-8"))
        return pathlib.Path(path)

    def save(self, out_dir: str | os.PathLike, overwrite: bool = False) -> dict[str, pathlib.Path]:
        """Write ``results.json``, ``records.csv`` and ``report.md`` into ``out_dir`` (claimed for these settings)."""
        out = pathlib.Path(out_dir).expanduser()
        fp = Fingerprint("compose-eval", {"rule": self.rule, "backgrounds": self.backgrounds.get("source"),
                                          "split": self.split, "mode": self.mode,
                                          **{k: self.run.get(k) for k in ("geometry", "seed", "device", "backend",
                                                                          "amp", "tiling")}},
                         model=self.model.get("sha256"))
        folder = OutputFolder(out, fp, overwrite=overwrite,
                              owned=lambda p: p.name in ("results.json", "records.csv", "report.md")).claim()
        files = {"results": out / "results.json", "records": out / "records.csv", "report": out / "report.md"}
        atomic_write_json(files["results"], self.to_dict(), indent=1)
        self.write_csv(files["records"])
        text = (f"# Composed set, per group ({self.mode}, split {self.split})\n\n"
                f"Rule: `{json.dumps(self.rule['pairing'])}`, correlation {self.correlation}, seed "
                f"{self.rule['seed']}; backgrounds `{self.backgrounds.get('source')}`.\n\n{self.table()}\n")
        atomic_write_bytes(files["report"], text.encode("utf-8"))
        folder.commit(files.values())
        folder.finish()
        return files


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def group_table(results: Mapping[str, dict], weighted: Mapping[str, float | None] | None = None) -> str:
    """A Markdown table of several runs' group metrics: accuracy, average group, worst group, aligned gap, and
    every group's accuracy (``fg/bg``, ``*`` marking the aligned ones).

    Args:
        results: ``{name: group_metrics(...)}``.
        weighted: ``{name: accuracy}`` at the training distribution (:func:`bgsynth.compose.weighted_accuracy`,
            Waterbirds' "average accuracy"): adds that column after ``accuracy``.
    """
    first = next(iter(results.values()))
    heads = [f"{g['fg_name']}/{g['bg_name']}{'*' if g['aligned'] else ''}" for g in first["groups"]]
    extra = ["average (train dist.)"] if weighted is not None else []
    lines = ["| model | accuracy | " + "".join(f"{h} | " for h in extra) + "average group | worst group | aligned gap | "
             + " | ".join(heads) + " |", "|" + "---|" * (5 + len(extra) + len(heads))]
    for name, m in results.items():
        cells = [_pct(g["accuracy"]) for g in m["groups"]]
        w = f"{_pct(weighted.get(name))} | " if weighted is not None else ""
        lines.append(f"| {name} | {_pct(m['accuracy'])} | {w}{_pct(m['average_group'])} | {_pct(m['worst_group'])} | "
                     f"{_pct(m['aligned_gap'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _predict(pred: Predictor, batch: Batch, rows: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Predictions of the composites ``where(mask, foreground, images[rows])``, made in the model's input format."""
    dev = pred.device
    mean = torch.tensor(pred.mean, dtype=torch.float32, device=dev)
    std = torch.tensor(pred.std, dtype=torch.float32, device=dev)
    x = composite(batch.images.to(dev), batch.masks.to(dev), images, rows.clamp(min=-1).to(dev), mean=mean, std=std,
                  dtype=pred.input_dtype, channels_last=pred.channels_last)
    return pred.predict(x)


def evaluate_composed(index, model, spec: ComposeSpec | Mapping, run: RunConfig | None = None,
                      config: ComposeEvalConfig | None = None, *, backgrounds: Backgrounds | None = None,
                      **options) -> ComposedEvalResult:
    """A classifier's accuracy per group on a composed set.

    Args:
        index: the foreground :class:`~bgsynth.index.DatasetIndex` (or its path); its images need masks.
        model: a checkpoint path, a :class:`~bgsynth.models.LoadedModel` or a :class:`~bgsynth.models.Predictor`
            (outputs: the foreground classes); see :func:`load_classifier`.
        spec: the :class:`~bgsynth.compose.ComposeSpec` (backgrounds, pairing, correlation; epoch 0's draw).
        run: the :class:`~bgsynth.config.RunConfig` (geometry: the model's, default the checkpoint's or 72 -> 64;
            device; seed: the rule's; backend; batch size; amp).
        config: :class:`ComposeEvalConfig` (split, all_groups, name).
        backgrounds: a loaded :class:`~bgsynth.compose_loader.Backgrounds` (default: from ``spec``).
        **options: loose run options and :class:`ComposeEvalConfig` fields.

    Returns:
        A :class:`ComposedEvalResult` (``save(out_dir)`` writes it). Composites without a mask or a background of
        the drawn class are invalid (counted, not scored).
    """
    t0 = time.perf_counter()
    index = require_index(index, "compose", load_paths=True)
    spec = _spec(spec)
    n_cls = index.label_space.num_classes
    pred = model if isinstance(model, Predictor) else None
    loaded = pred.loaded if pred is not None else load_classifier(model, n_cls)
    run, config = resolve_options("evaluate_composed", run, config, ComposeEvalConfig, options, batch_kind="eval",
                                  stored_geometry=loaded.geometry, default_geometry=DEMO_GEOMETRY)
    pred = pred or Predictor(loaded, device=run.device, amp=run.amp, label_space=index.label_space)
    sub = index.select(split=config.split) if config.split is not None else index
    index.require_images(sub, "evaluate", split=config.split)
    bg = _backgrounds(spec, run, backgrounds)
    rule = spec.rule(index.label_space, bg.label_space, run.seed)
    nb = rule.pairing.num_bg
    cols: dict[str, list] = {k: [] for k in ("image_id", "label", "pred", "bg_id", "bg_label", "aligned", "valid")}
    pool_images = bg.pool.images.to(pred.device)
    table = rule.pairing.table
    loader = _decode(sub, run)
    try:
        for batch in loader:
            ids, labels = batch.image_ids.to(bg.pool.device), batch.labels.to(bg.pool.device)
            if config.all_groups:
                draws = [backgrounds_of_class(ids, torch.full_like(ids, b), bg.pool, rule.seed, 0) for b in range(nb)]
            else:
                draws = [compose_backgrounds(ids, labels, bg.pool, rule, 0).as_rows()]
            for rows, bg_ids, bg_labels in draws:
                y = _predict(pred, batch, rows, pool_images)
                valid = batch.has_mask.to(torch.bool).cpu() & (rows.cpu() >= 0)
                for k, v in (("image_id", ids), ("label", labels), ("pred", y), ("bg_id", bg_ids),
                             ("bg_label", bg_labels), ("valid", valid)):
                    cols[k].append(v.cpu().numpy())
                has_bg = bg_labels.cpu() >= 0
                cols["aligned"].append((table[labels.cpu(), bg_labels.cpu().clamp(min=0)] & has_bg).numpy())
    finally:
        loader.close()
    rec = {k: (np.concatenate(v) if v else np.zeros(0, np.int64)) for k, v in cols.items()}
    rec = {k: v.astype(bool if k in ("valid", "aligned") else np.int64) for k, v in rec.items()}
    order = np.lexsort((rec["bg_label"], rec["image_id"]))
    rec = {k: v[order] for k, v in rec.items()}
    metrics = group_metrics(rec["label"], rec["pred"], rec["bg_label"], rec["valid"], rule.pairing)
    model_info = {"name": config.name or loaded.provenance.get("spec") or loaded.arch, "arch": loaded.arch,
                  "sha256": loaded.provenance.get("sha256"), "file": loaded.provenance.get("file")}
    return ComposedEvalResult(rec, metrics, rule.to_dict(), bg.describe(), model_info, run.to_dict(), config.split,
                              "all_groups" if config.all_groups else "rule",
                              None if config.all_groups else rule.correlation_at(0), time.perf_counter() - t0)


# ==============================================================================================================
# Training at several correlations
# ==============================================================================================================


@dataclasses.dataclass
class CorrelationComparison:
    """Models trained online at several correlations and evaluated on every group.

    Attributes:
        rows: ``{name: {"correlation", "checkpoint", "train_seconds", "val_accuracy", "metrics",
            "train_weighted_accuracy"}}``: ``metrics`` on every group of val (balanced), and the accuracy those group
            accuracies give at the run's own training distribution (:func:`bgsynth.compose.weighted_accuracy`).
        config: the shared settings.
    """

    rows: dict[str, dict]
    config: dict

    def table(self) -> str:
        """The runs' :func:`group_table`, with the accuracy at each run's own training distribution."""
        return group_table({name: r["metrics"] for name, r in self.rows.items()},
                           weighted={name: r.get("train_weighted_accuracy") for name, r in self.rows.items()})

    def to_dict(self) -> dict:
        return {"rows": self.rows, "config": self.config}


# size: the comparison's inputs: the data, the two rules' sources, where to write, and the shared settings
def compare_correlations(index, spec: ComposeSpec | Mapping, out_dir: str | os.PathLike,
                         correlations: Mapping[str, float] | Sequence[float] = (0.95, 0.5), *,
                         eval_backgrounds: str | None = None, run: RunConfig | None = None,
                         train_options: Mapping[str, Any] | None = None, reuse: bool = True,
                         **options) -> CorrelationComparison:
    """Train the same model on the composed set at several correlations (online: nothing is written) and evaluate
    each on every group of the val split (``all_groups``) over held-out backgrounds.

    Args:
        index: the foreground index (``train`` and ``val`` splits, masks).
        spec: the training :class:`~bgsynth.compose.ComposeSpec` (its correlation is replaced per run).
        out_dir: checkpoints ``<name>.pt``, evaluations ``eval_<name>/`` (names made file-safe), ``compare.json``
            and ``compare.md``.
        correlations: ``{name: correlation}`` or a list (named ``corr<value>``).
        eval_backgrounds: the backgrounds of the evaluation (default: the spec's).
        run: the shared :class:`~bgsynth.config.RunConfig` (geometry default 72 -> 64, seed, device, backend).
        train_options: :class:`~bgsynth.train.TrainConfig` fields shared by every run (``epochs``, ``lr``, ...).
        reuse: a run that finished with the same settings is not trained again (``resume`` of :func:`~bgsynth.train.train`).
        **options: loose run options.

    Returns:
        A :class:`CorrelationComparison` (also ``compare.json`` / ``compare.md``).
    """
    index = require_index(index, "compose", load_paths=True)
    spec = _spec(spec)
    run, _ = resolve_options("compare_correlations", run, None, ComposeEvalConfig, options, batch_kind="train",
                             default_geometry=DEMO_GEOMETRY, progress=True)
    named = dict(correlations) if isinstance(correlations, Mapping) else {f"corr{c:g}": c for c in correlations}
    out = pathlib.Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    ev_spec = dataclasses.replace(spec, backgrounds=eval_backgrounds or spec.backgrounds, bg_split=None)
    ev_bg = load_backgrounds(ev_spec.backgrounds, run.replace(progress=False))
    rule_pairing = ev_spec.rule(index.label_space, ev_bg.label_space, run.seed).pairing
    train_split = dict(train_options or {}).get("split", "train")  # its class shares weigh the groups
    train_labels = index.labels(index.select(split=train_split).ids if train_split is not None else index.ids)
    prior = np.bincount(train_labels, minlength=index.label_space.num_classes) if len(train_labels) else None
    rows: dict[str, dict] = {}
    for name, corr in named.items():
        tspec = dataclasses.replace(spec, correlation=corr)
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "run"
        ckpt = out / f"{slug}.pt"
        res = train(index, run, compose=tspec, out=ckpt, resume=reuse, overwrite=not reuse,
                    **dict(train_options or {}))
        ev = evaluate_composed(index, str(ckpt), ev_spec, run.replace(batch_size=128, progress=False), split="val",
                               all_groups=True, name=name, backgrounds=ev_bg)
        ev.save(out / f"eval_{slug}", overwrite=True)
        weighted = weighted_accuracy(ev.metrics, rule_pairing, corr, prior)
        rows[name] = {"correlation": corr, "checkpoint": str(ckpt), "metrics": ev.metrics,
                      "train_weighted_accuracy": weighted,
                      "train_seconds": res.seconds if res.history else None, "val_accuracy": res.val_accuracy}
        if run.progress:
            print(f"compare_correlations: {name} (correlation {corr:g}): average at the training distribution "
                  f"{_pct(weighted)}, average group {_pct(ev.metrics['average_group'])}, worst group "
                  f"{_pct(ev.metrics['worst_group'])}", flush=True)
    result = CorrelationComparison(rows, {"spec": spec.to_dict(), "eval_backgrounds": ev_spec.backgrounds,
                                          "seed": run.seed, "geometry": run.geometry.to_dict(),
                                          "train_options": dict(train_options or {})})
    atomic_write_json(out / "compare.json", result.to_dict(), indent=1)
    atomic_write_bytes(out / "compare.md", (result.table() + "\n").encode("utf-8"))
    return result

