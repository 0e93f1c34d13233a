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

from .challenge import challenge_foregrounds, run_challenge
from .compose import ComposeSpec
from .compose_jobs import compare_correlations
from .config import DEMO_GEOMETRY, RunConfig, resolve_options
from .errors import ConfigError
from .evaluate import evaluate_to_dir, model_threads
from .fileio import atomic_write_bytes
from .index import DatasetIndex
from .masks import SelectionFilters
from .models import Predictor, load_model
from .prepare import prepare
from .report import write_report
from .report.tables import paper_table
from .show import show_index
from .sources.synthetic import KINDS, WATERBIRDS_PAIRING, build_builtin_dataset, default_cache_dir
from .train import compare_training, train

__all__ = ["DemoConfig", "DemoResult", "WaterbirdsDemoResult", "run_demo", "findings", "remedy_finding",
           "group_findings"]

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


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """What the demo does (the run's geometry, device, seed, backend and tiling are run options).

    Attributes:
        out_dir: where the run's results and report go.
        cache_dir: cache of the dataset, prepared index and demo model (default: the built-in dataset's cache).
        epochs: training epochs of the demo model (default: :func:`bgsynth.train.train`'s, 14; the waterbirds-like
            kind: :data:`WATERBIRDS_EPOCHS`, 28, for each of its models).
        challenge: run the Backgrounds Challenge.
        challenge_fg_per_class, challenge_bg_per_class: balanced val subsets for the challenge (``None``: all).
        compare_training: also train on Mixed-Rand and compare BG-Gap and challenge accuracy.
        force: ignore the caches of the prepared index and the model.
        dataset: extra arguments of :func:`~bgsynth.sources.synthetic.build_builtin_dataset` (e.g. a smaller
            ``train_per_class`` / ``val_per_class``).
        kind: ``'in9'`` (the paper's findings, above) or ``'waterbirds-like'``: the group-robustness result on the
            waterbirds-like set (the same CNN trained online on composites at ``correlations``, each evaluated on
            every group of val; see :func:`bgsynth.compose_jobs.compare_correlations`).
        correlations: ``{name: training correlation}`` of the waterbirds-like demo.
    """

    out_dir: str | os.PathLike = "bgsynth-demo"
    cache_dir: str | os.PathLike | None = None
    epochs: int | None = None
    challenge: bool = True
    challenge_fg_per_class: int | None = 25
    challenge_bg_per_class: int | None = 25
    compare_training: bool = False
    force: bool = False
    dataset: dict | None = None
    kind: str = "in9"
    correlations: dict | None = None


def run_demo(run: RunConfig | None = None, config: DemoConfig | None = None, **options) -> DemoResult:
    """Run the whole demo (see the module docstring) and write ``<out_dir>/report.md``.

    Args:
        run: the run's settings (default: the demo geometry 72 -> 64, device ``'auto'``, seed 0, paper tiling).
        config: a :class:`DemoConfig`.
        **options: fields of either, e.g. ``run_demo(out_dir="demo", seed=1, device="cpu", tiling="crop")``.
    """
    run, config = resolve_options("run_demo", run, config, DemoConfig, options, default_geometry=DEMO_GEOMETRY,
                                  progress=True, amp=None)
    if config.kind not in KINDS:
        raise ConfigError(f"run_demo: expected kind in {KINDS}, got {config.kind!r}")
    if config.kind == "waterbirds-like":
        return _WaterbirdsDemo(run, config).run()
    return _Demo(run, config).run()


class _Steps:
    """What every demo shares: its settings, the output and cache folders, the clock and the step printout."""

    def __init__(self, run: RunConfig, config: DemoConfig):
        self.run_cfg, self.cfg = run, config
        self.out = pathlib.Path(config.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.cache = pathlib.Path(config.cache_dir) if config.cache_dir is not None else default_cache_dir()
        self.t0 = time.perf_counter()
        self.device = str(run.device)

    def step(self, msg: str) -> None:
        if self.run_cfg.progress:
            print(f"[bgsynth demo {time.perf_counter() - self.t0:6.1f}s] {msg}", flush=True)


class _Demo(_Steps):
    """The demo's steps; each is cached on disk so that a re-run only redoes what changed."""

    def run(self) -> DemoResult:
        self.step("1/5 built-in dataset")
        raw = build_builtin_dataset(root=self.cache, seed=self.run_cfg.seed, progress=self.run_cfg.progress,
                                    **(self.cfg.dataset or {}))
        self.step("2/5 the paper's selection filters on every image (true masks kept, no GrabCut needed)")
        index, prep_key = self.prepared(raw)
        self.step("3/5 demo model (trained on Original train)")
        ckpt = self.model(index, raw, prep_key)
        predictor = Predictor(load_model(str(ckpt)), device=self.device, label_space=index.label_space)
        self.step("4/5 evaluation of all eight variants on val (one pass)")
        with model_threads(self.device):  # the model's share of the cores, as `bgsynth eval` and `challenge`
            eval_result, _files = evaluate_to_dir(index, predictor, self.out / "eval", name="demo model (Original)",
                                                  **self.common(split="val"))
            chal = self.challenge(index, predictor) if self.cfg.challenge else None
        self.sheets(index)
        comparison = self.compare(index) if self.cfg.compare_training else None
        found = findings(eval_result, chal) + remedy_finding(comparison)
        report = _write_report(self.out, eval_result, chal, comparison, found, index, ckpt,
                               time.perf_counter() - self.t0)
        return DemoResult(self.out, report, pathlib.Path(index.path), ckpt, eval_result, chal, comparison, found,
                          time.perf_counter() - self.t0)

    def common(self, **more) -> dict:
        """The options every step shares (as keywords: each consumer resolves them the same way)."""
        r = self.run_cfg
        return dict(seed=r.seed, geometry=r.geometry, device=self.device, backend=r.backend, progress=r.progress,
                    tiling=r.tiling, **more)

    def prepared(self, raw: pathlib.Path) -> tuple[DatasetIndex, str]:
        r = self.run_cfg
        filters = SelectionFilters()  # every filter on; Only-BG-T margin per ``tiling``
        # v=2: indexes cached before the filters applied to images with masks (v=1) are not reused
        key = _key(index=str(raw), geometry=r.geometry.to_dict(), filters=filters.to_dict(), tiling=r.tiling, v=2)
        path = raw.parent / f"prepared-{key}.json"
        if path.exists() and not self.cfg.force:
            index = DatasetIndex.load(path)
        else:
            index = prepare(DatasetIndex.load(raw), out=path, geometry=r.geometry, filters=filters, tiling=r.tiling,
                            seed=r.seed, progress=r.progress)
        summ, prep = index.summary(), index.data["info"]["prepare"]
        dropped = prep["filtered"]
        self.step(f"    {summ['images']} of {prep['input_images']} images kept ({summ['per_split']}); the selection "
                  f"filters ({', '.join(prep['filters_enabled'])}) dropped {sum(dropped.values())}: {dropped or 'none'}")
        other = {k: v for k, v in summ["rejects"].items() if k not in dropped}
        if other:
            self.step(f"    other rejects: {other}")
        return index, key

    def model(self, index: DatasetIndex, raw: pathlib.Path, prep_key: str) -> pathlib.Path:
        r = self.run_cfg
        key = _key(index=prep_key, seed=r.seed, epochs=self.cfg.epochs, geometry=r.geometry.to_dict(), v=1)
        ckpt = raw.parent / f"demo-model-{key}.pt"
        if ckpt.exists() and not self.cfg.force:
            self.step(f"    cached: {ckpt}")
            return ckpt
        kw = {} if self.cfg.epochs is None else {"epochs": self.cfg.epochs}
        res = train(index, split="train", val_split="val", seed=r.seed, geometry=r.geometry, device=self.device,
                    out=ckpt, progress=r.progress, backend=r.backend, overwrite=True, **kw)  # the cache key decides
        self.step(f"    trained in {res.seconds:.0f}s, Original val accuracy {100 * (res.val_accuracy or 0):.1f}%")
        return ckpt

    def challenge_subset(self, index: DatasetIndex) -> dict:
        fg = challenge_foregrounds(index, "val", fg_per_class=self.cfg.challenge_fg_per_class, seed=self.run_cfg.seed)
        return {"fg_ids": fg, "bg_per_class": self.cfg.challenge_bg_per_class}

    def challenge(self, index: DatasetIndex, predictor):
        self.step("5/5 Backgrounds Challenge on val")
        state = self.out / "challenge" / "state.ckpt"  # a killed demo continues the challenge where it stopped
        if self.cfg.force:
            state.unlink(missing_ok=True)
        chal = run_challenge(index, predictor, checkpoint=state, resume=state.exists(),
                             **self.common(split="val", **self.challenge_subset(index)))
        chal.save(self.out / "challenge")
        state.unlink(missing_ok=True)  # the finished result is in challenge.json
        return chal

    def sheets(self, index: DatasetIndex) -> None:
        r = self.run_cfg
        kw = dict(n=9, per_class=True, split="val", seed=r.seed, resize=r.geometry.resize, crop=r.geometry.crop,
                  tile=96, backend=r.backend)
        show_index(index, self.out / "variants.png", tiling=r.tiling, **kw)
        show_index(index, self.out / "decoded.png", decoded=True, **kw)

    def compare(self, index: DatasetIndex):
        self.step("extra: the paper's remedy, training on Mixed-Rand (same budget, same seed)")
        r = self.run_cfg
        kw = {} if self.cfg.epochs is None else {"epochs": self.cfg.epochs}
        return compare_training(index, self.out / "compare-training", seed=r.seed, geometry=r.geometry,
                                device=self.device, progress=r.progress, challenge=self.cfg.challenge,
                                tiling=r.tiling, challenge_kwargs=self.challenge_subset(index), **kw)


def remedy_finding(comparison) -> list[dict]:
    """Finding (c) from a :func:`~bgsynth.train.compare_training` result (empty without one)."""
    if comparison is None:
        return []
    base, remedy = comparison.rows.get("original"), comparison.rows.get("mixed_rand")
    if not (base and remedy and base.get("bg_gap") is not None and remedy.get("bg_gap") is not None):
        return []
    return [{
        "finding": "(c) training on Mixed-Rand reduces background dependence (smaller BG-Gap)",
        "observed": remedy["bg_gap"] < base["bg_gap"],
        "evidence": f"BG-Gap {100 * base['bg_gap']:+.1f} -> {100 * remedy['bg_gap']:+.1f} points",
    }]


# size: the report's eight ingredients, each a product of one demo step
def _write_report(out_dir, eval_result, chal, comparison, found, index, ckpt, seconds) -> pathlib.Path:
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


# ==============================================================================================================
# The waterbirds-like demo: controlled spurious correlation
# ==============================================================================================================

#: the two training rules of the waterbirds-like demo: Waterbirds' correlation, and the balanced rule
WATERBIRDS_CORRELATIONS = {"correlation 0.95": 0.95, "balanced (0.5)": 0.5}
#: training epochs of each waterbirds-like demo model: twice the IN-9 demo's 14. At 14 the model trained at 0.95 is
#: still on the scene shortcut (train accuracy at the correlation, conflicting groups near 0%); by 28 it fits its
#: training set (train accuracy 0.98-0.99) and uses the birds too, as ERM does on Waterbirds (see docs/compose.md)
WATERBIRDS_EPOCHS = 28


@dataclasses.dataclass
class WaterbirdsDemoResult:
    """What the waterbirds-like demo produced: the comparison of the training correlations and its findings."""

    out_dir: pathlib.Path
    report: pathlib.Path
    index: pathlib.Path
    comparison: Any
    findings: list[dict]
    seconds: float


def group_findings(comparison) -> list[dict]:
    """The group-robustness result, stated plainly from a :func:`~bgsynth.compose_jobs.compare_correlations`
    result whose first run is the correlated one and whose last is the balanced one."""
    rows = list(comparison.rows.values())
    if len(rows) < 2:
        return []
    hi, lo = rows[0]["metrics"], rows[-1]["metrics"]
    if any(m[k] is None for m in (hi, lo) for k in ("worst_group", "average_group")):
        return []
    gap_hi, gap_lo = hi["average_group"] - hi["worst_group"], lo["average_group"] - lo["worst_group"]
    return [
        {"finding": f"trained at correlation {rows[0]['correlation']:g}, worst-group accuracy is far below the "
                    f"average (by more than 15 points)",
         "observed": gap_hi > 0.15,
         "evidence": f"average group {100 * hi['average_group']:.1f}%, worst group {100 * hi['worst_group']:.1f}%"
                     + _weighted(rows[0])},
        {"finding": f"training with the balanced rule (correlation {rows[-1]['correlation']:g}) narrows the gap "
                    f"between average and worst group",
         "observed": gap_lo < gap_hi,
         "evidence": f"average - worst: {100 * gap_hi:.1f} -> {100 * gap_lo:.1f} points"},
    ]


def _weighted(row: dict) -> str:
    w = row.get("train_weighted_accuracy")
    return "" if w is None else f", average at the training distribution {100 * w:.1f}%"


class _WaterbirdsDemo(_Steps):
    """The waterbirds-like demo's steps: the dataset (cached), two trainings (reused when finished), the table."""

    def run(self) -> WaterbirdsDemoResult:
        r = self.run_cfg
        self.step("1/3 built-in waterbirds-like dataset (2 bird classes, land/water scenes, bird-free places)")
        raw = build_builtin_dataset(root=self.cache, kind="waterbirds-like", seed=r.seed, progress=r.progress,
                                    **(self.cfg.dataset or {}))
        root = raw.parent
        spec = ComposeSpec(backgrounds=str(root / "places" / "train"), pairing=dict(WATERBIRDS_PAIRING))
        named = self.cfg.correlations or WATERBIRDS_CORRELATIONS
        self.step(f"2/3 the demo CNN trained online on composites (train birds on train places) at "
                  f"{', '.join(f'{c:g}' for c in named.values())}; each evaluated on every group of val (val birds "
                  f"on held-out val places)")
        train_options = {"epochs": WATERBIRDS_EPOCHS if self.cfg.epochs is None else self.cfg.epochs}
        comparison = compare_correlations(raw, spec, self.out / "compose", named,
                                          eval_backgrounds=str(root / "places" / "val"), run=r,
                                          train_options=train_options, reuse=not self.cfg.force)
        self.step("3/3 report")
        found = group_findings(comparison)
        report = self.report(raw, comparison, found)
        return WaterbirdsDemoResult(self.out, report, raw, comparison, found, time.perf_counter() - self.t0)

    def report(self, raw: pathlib.Path, comparison, found: list[dict]) -> pathlib.Path:
        lines = ["# bgsynth demo: controlled spurious correlation (waterbirds-like)", "",
                 f"Built-in waterbirds-like dataset (`{raw}`): land birds and water birds; each model is the demo "
                 f"CNN trained online on composites of the train birds over bird-free train scenes, the background "
                 f"class aligned with the bird's class with the given probability; evaluated on every group of the "
                 f"val birds over held-out val scenes (each bird once on each scene family). "
                 f"{time.perf_counter() - self.t0:.0f} s in all.", "",
                 "Accuracy in %; groups are bird/scene, `*` marks the aligned ones. `accuracy` is over the balanced "
                 "val groups; `average (train dist.)` weighs the same group accuracies as the model's own training "
                 "set (Waterbirds' \"average accuracy\"); `aligned gap` is aligned minus conflicting groups.", "",
                 comparison.table(), "", "## Findings", ""]
        for f in found:
            lines.append(f"- {'observed' if f['observed'] else 'NOT observed'}: {f['finding']} ({f['evidence']})")
        path = self.out / "report.md"
        atomic_write_bytes(path, ("\n".join(lines) + "\n").encode("utf-8"))
        return path
