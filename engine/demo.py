"""The main job on the built-in dataset: every finding of the paper, end to end, on one CPU in a few minutes.

Steps (each cached, so a re-run only redoes what changed):

1. build the built-in IN-9-like dataset (:func:`bgsynth.sources.synthetic.build_builtin_dataset`);
2. the paper's selection filters (:func:`bgsynth.masks.prepare` with its defaults: every filter on, applied to
   every image; the built-in masks are the true ones and are kept, so no GrabCut runs; e.g. the images with two
   objects are dropped);
3. train the demo CNN on the Original train split (:func:`bgsynth.train.train`);
4. evaluate all eight variants on val in one pass (:func:`bgsynth.evaluate.evaluate_to_dir`);
5. the Backgrounds Challenge on val (:func:`bgsynth.challenge.run_challenge`);
6. optionally (``compare_training=True``) the paper's remedy: the same model trained on Mixed-Rand, evaluated the
   same way (:func:`bgsynth.train.compare_training`);
7. ``report.md`` with the paper's table, the challenge and an honest check of each finding.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import time
from typing import Any

import torch

from .config import DEMO_GEOMETRY
from .fileio import atomic_write_bytes
from .geometry import CropGeometry
from .index import DatasetIndex

__all__ = ["DemoResult", "run_demo", "findings"]

CHANCE = 1.0 / 9.0


@dataclasses.dataclass
class DemoResult:
    """What :func:`run_demo` produced: paths of the artefacts and the headline numbers."""

    out_dir: pathlib.Path
    report: pathlib.Path
    index: pathlib.Path
    checkpoint: pathlib.Path
    eval_result: Any
    challenge: Any | None
    comparison: Any | None
    findings: list[dict]
    seconds: float


def _key(**parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def findings(eval_result, challenge=None) -> list[dict]:
    """Check the paper's findings (a)-(c) on a result; each entry says plainly whether it was observed.

    Returns:
        ``[{"finding", "observed": bool, "evidence"}]``.
    """
    acc = {v: eval_result.metrics[v]["accuracy"] for v in eval_result.variants}
    out = []
    bg_only = {v: acc.get(v) for v in ("only_bg_b", "only_bg_t", "no_fg") if acc.get(v) is not None}
    if bg_only:
        above = {v: a for v, a in bg_only.items() if a > CHANCE}
        out.append({
            "finding": "(a) background-only accuracy above chance (11.1%)",
            "observed": len(above) == len(bg_only),
            "evidence": ", ".join(f"{v} {100 * a:.1f}%" for v, a in bg_only.items()),
        })
    gap = eval_result.bg_gap
    if gap is not None:
        out.append({
            "finding": "BG-Gap > 0 (Mixed-Same more accurate than Mixed-Rand)",
            "observed": gap > 0,
            "evidence": f"BG-Gap {100 * gap:+.1f} points",
        })
    if challenge is not None:
        out.append({
            "finding": "(b) adversarially chosen backgrounds fool foregrounds (official challenge semantics)",
            "observed": challenge.num_vulnerable > 0,
            "evidence": f"{challenge.num_vulnerable}/{challenge.num_foregrounds} foregrounds fooled, challenge accuracy "
                        f"{100 * challenge.accuracy:.1f}%",
        })
    return out


def run_demo(
    out_dir: str | os.PathLike = "bgsynth-demo",
    seed: int = 0,
    device: str = "auto",
    cache_dir: str | os.PathLike | None = None,
    geometry: CropGeometry | None = None,
    epochs: int | None = None,
    challenge: bool = True,
    challenge_fg_per_class: int | None = 25,
    challenge_bg_per_class: int | None = 25,
    compare_training: bool = False,
    backend: str = "auto",
    progress: bool = True,
    force: bool = False,
    dataset: dict | None = None,
    tiling: str = "paper",
) -> DemoResult:
    """Run the whole demo (see the module docstring) and write ``<out_dir>/report.md``.

    Args:
        out_dir: where the run's results and report go.
        seed: seed of the dataset, training, background choice and challenge order.
        device: ``'auto'`` (CUDA when present), ``'cpu'`` or ``'cuda'``.
        cache_dir: cache of the dataset, prepared index and demo model (default: the built-in dataset's cache).
        geometry: model input geometry (default :data:`bgsynth.config.DEMO_GEOMETRY`).
        epochs: training epochs of the demo model (default: :func:`bgsynth.train.train`'s).
        challenge: run the Backgrounds Challenge.
        challenge_fg_per_class, challenge_bg_per_class: balanced val subsets for the challenge (``None``: all).
        compare_training: also train on Mixed-Rand and compare BG-Gap and challenge accuracy.
        force: ignore the caches of the prepared index and the model.
        dataset: extra arguments of :func:`~bgsynth.sources.synthetic.build_builtin_dataset` (e.g. a smaller
            ``train_per_class`` / ``val_per_class``).
        tiling: Only-BG-T construction everywhere (filters, evaluation, challenge, training backgrounds):
            ``"paper"`` (the authors' full-resolution tiling) or ``"crop"`` (the crop-space approximation).
    """
    from . import masks
    from .prepare import prepare
    from . import train as train_mod
    from .challenge import challenge_foregrounds, run_challenge
    from .evaluate import evaluate_to_dir
    from .models import Predictor, load_model
    from .sources.synthetic import build_builtin_dataset, default_cache_dir

    t0 = time.perf_counter()
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    geometry = DEMO_GEOMETRY if geometry is None else geometry
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cache = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()

    def step(msg: str) -> None:
        if progress:
            print(f"[bgsynth demo {time.perf_counter() - t0:6.1f}s] {msg}", flush=True)

    step("1/5 built-in dataset")
    raw_index = build_builtin_dataset(root=cache, seed=seed, progress=progress, **(dataset or {}))

    step("2/5 the paper's selection filters on every image (true masks kept, no GrabCut needed)")
    filters = masks.SelectionFilters()  # every filter on; Only-BG-T margin per ``tiling``
    # v=2: indexes cached before the filters applied to images with masks (v=1) are not reused
    prep_key = _key(index=str(raw_index), geometry=geometry.to_dict(), filters=filters.to_dict(), tiling=tiling,
                    v=2)
    prepared = raw_index.parent / f"prepared-{prep_key}.json"
    if prepared.exists() and not force:
        index = DatasetIndex.load(prepared)
    else:
        index = prepare(DatasetIndex.load(raw_index), out=prepared, geometry=geometry, filters=filters, tiling=tiling,
                        seed=seed, progress=progress)
    summ = index.summary()
    prep = index.data["info"]["prepare"]
    dropped = prep["filtered"]
    step(f"    {summ['images']} of {prep['input_images']} images kept ({summ['per_split']}); the selection filters "
         f"({', '.join(prep['filters_enabled'])}) dropped {sum(dropped.values())}: {dropped or 'none'}")
    other = {k: v for k, v in summ["rejects"].items() if k not in dropped}
    if other:
        step(f"    other rejects: {other}")

    step("3/5 demo model (trained on Original train)")
    ckpt_key = _key(index=prep_key, seed=seed, epochs=epochs, geometry=geometry.to_dict(), v=1)
    ckpt = raw_index.parent / f"demo-model-{ckpt_key}.pt"
    if not ckpt.exists() or force:
        kw = {} if epochs is None else {"epochs": epochs}
        res = train_mod.train(index, split="train", val_split="val", seed=seed, geometry=geometry, device=device,
                              out=ckpt, progress=progress, backend=backend, **kw)
        step(f"    trained in {res.seconds:.0f}s, Original val accuracy {100 * (res.val_accuracy or 0):.1f}%")
    else:
        step(f"    cached: {ckpt}")
    loaded = load_model(str(ckpt))
    predictor = Predictor(loaded, device=device)

    step("4/5 evaluation of all eight variants on val (one pass)")
    eval_result, _files = evaluate_to_dir(index, predictor, out_dir / "eval", split="val", seed=seed,
                                          geometry=geometry, device=device, backend=backend, progress=progress,
                                          name="demo model (Original)", tiling=tiling)

    chal = None
    if challenge:
        step("5/5 Backgrounds Challenge on val")
        fg_ids = challenge_foregrounds(index, "val", fg_per_class=challenge_fg_per_class, seed=seed)
        ckpt_path = out_dir / "challenge" / "state.ckpt"  # a killed demo continues the challenge where it stopped
        if force:
            ckpt_path.unlink(missing_ok=True)
        chal = run_challenge(index, predictor, split="val", geometry=geometry, device=device, seed=seed,
                             fg_ids=fg_ids, bg_per_class=challenge_bg_per_class, backend=backend, progress=progress,
                             checkpoint=ckpt_path, resume=ckpt_path.exists(), tiling=tiling)
        chal.save(out_dir / "challenge")
        ckpt_path.unlink(missing_ok=True)  # the finished result is in challenge.json

    from .show import show_index

    show_index(index, out_dir / "variants.png", n=9, per_class=True, split="val", seed=seed,
               resize=geometry.resize, crop=geometry.crop, tile=96, backend=backend, tiling=tiling)
    show_index(index, out_dir / "decoded.png", n=9, per_class=True, split="val", seed=seed,
               resize=geometry.resize, crop=geometry.crop, tile=96, decoded=True, backend=backend)

    comparison = None
    if compare_training:
        step("extra: the paper's remedy, training on Mixed-Rand (same budget, same seed)")
        kw = {} if epochs is None else {"epochs": epochs}
        comparison = train_mod.compare_training(
            index, out_dir / "compare-training", seed=seed, geometry=geometry, device=device, progress=progress,
            challenge=challenge, tiling=tiling,
            challenge_kwargs={"bg_per_class": challenge_bg_per_class,
                              "fg_ids": challenge_foregrounds(index, "val", fg_per_class=challenge_fg_per_class,
                                                              seed=seed)},
            **kw,
        )

    found = findings(eval_result, chal)
    if comparison is not None:
        base, remedy = comparison.rows.get("original"), comparison.rows.get("mixed_rand")
        if base and remedy and base.get("bg_gap") is not None and remedy.get("bg_gap") is not None:
            found.append({
                "finding": "(c) training on Mixed-Rand reduces background dependence (smaller BG-Gap)",
                "observed": remedy["bg_gap"] < base["bg_gap"],
                "evidence": f"BG-Gap {100 * base['bg_gap']:+.1f} -> {100 * remedy['bg_gap']:+.1f} points",
            })
    report = _write_report(out_dir, eval_result, chal, comparison, found, index, ckpt, time.perf_counter() - t0)
    return DemoResult(out_dir, report, pathlib.Path(index.path), ckpt, eval_result, chal, comparison, found,
                      time.perf_counter() - t0)


def _write_report(out_dir, eval_result, chal, comparison, found, index, ckpt, seconds) -> pathlib.Path:
    from .report import write_report
    from .report.tables import paper_table

    eval_report = write_report(eval_result, out_dir / "eval", title="bgsynth demo: all variants")
    lines = [
        "# bgsynth demo",
        "",
        f"Built-in IN-9-like dataset (`{index.path}`), demo CNN `{ckpt.name}`, {seconds:.0f} s in all.",
        "",
        "## The paper's table (val split)",
        "",
        paper_table([eval_result]),
        "",
    ]
    if chal is not None:
        lines += [
            "## Backgrounds Challenge",
            "",
            "```",
            chal.format(),
            "```",
            "",
        ]
    if comparison is not None:
        lines += ["## Training on Mixed-Rand (the paper's remedy)", "", "```", comparison.table(), "```", ""]
    lines += [
        "## Contact sheets",
        "",
        "One row per val image, one column per variant (`variants.png`); decoded crops with mask and box "
        "(`decoded.png`).",
        "",
        "![variants](variants.png)",
        "",
        "![decoded](decoded.png)",
        "",
    ]
    lines += ["## Findings of the paper on this data", ""]
    for f in found:
        lines.append(f"- {'observed' if f['observed'] else 'NOT observed'}: {f['finding']} ({f['evidence']})")
    lines += ["", f"Details: [eval/report.md]({eval_report.relative_to(out_dir)})"]
    if chal is not None:
        lines.append("Challenge: `challenge/challenge.json`")
    path = out_dir / "report.md"
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode("utf-8"))
    return path
