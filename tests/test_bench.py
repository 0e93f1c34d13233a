"""``bgsynth bench`` (engine/bench.py, engine/cli/bench.py) at a tiny size: the JSON schema, that every stage reports
a rate consistent with what it timed, the bottleneck rule, the output folder's ownership and ``--compare``.

Throughput itself is not asserted (the machine is shared); the expectations are counts: each row's rate times its
median time is the number of items that run processed, known independently (the images selected, the variants).
"""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from bgsynth.bench import (
    SCHEMA,
    BenchResult,
    compare_benches,
    kernel_bandwidth,
    load_bench,
    peak_bandwidth,
    run_bench,
)
from bgsynth.errors import ConfigError
from bgsynth.pipeline import available_backends
from bgsynth.variants import VARIANT_NAMES

N_IMAGES = 8


@pytest.fixture(scope="module")
def tiny_bench(tiny_index):
    return run_bench(tiny_index, device="cpu", images=N_IMAGES, repeats=1, batch_sizes=(4, 8), progress=False,
                     resize=40, crop=32)


def test_every_stage_reports_a_rate_that_matches_its_work(tiny_bench):
    r = tiny_bench
    names = [row["name"] for row in r.stages]
    want = ([f"decode[{b}]" for b in available_backends()] + [f"synthesis[{v}]" for v in VARIANT_NAMES]
            + ["synthesis[all]", "model[batch=4]", "model[batch=8]", "end_to_end"])
    assert names == want
    n_var = len(VARIANT_NAMES)
    for row in r.stages:
        assert math.isfinite(row["rate"]) and row["rate"] > 0, row["name"]
        assert len(row["runs"]) == 1 and row["seconds"] == pytest.approx(row["runs"][0], abs=1e-6)
        items = row["rate"] * row["seconds"]
        if row["stage"] in ("decode", "end_to_end"):
            assert items == pytest.approx(N_IMAGES, rel=1e-3) and row["unit"] == "images/s"
            assert row["images_per_s"] == row["rate"]
        elif row["name"] == "synthesis[all]":
            assert items == pytest.approx(N_IMAGES * n_var, rel=1e-3)
            assert row["images_per_s"] == pytest.approx(row["rate"] / n_var)
        elif row["stage"] == "synthesis":
            assert items == pytest.approx(N_IMAGES, rel=1e-3) and row["images_per_s"] == row["rate"]
        else:  # model: ceil(images / batch) forwards of a full batch, n_var composites per source image
            b = row["batch_size"]
            assert items == pytest.approx(math.ceil(N_IMAGES / b) * b, rel=1e-3)
            assert row["images_per_s"] == pytest.approx(row["rate"] / n_var)
    # the bottleneck: the slowest of decode (the run's backend), synthesis[all], the model at the run's batch (4)
    chain = [row for row in r.stages if row["name"] in (f"decode[{r.run['backend']}]", "synthesis[all]",
                                                      "model[batch=4]")]
    assert len(chain) == 3 and r.bottleneck == min(chain, key=lambda row: row["images_per_s"])["name"]
    assert r.bandwidth == []  # the kernel stage is CUDA only
    assert r.run["batch_size"] == 4 and r.run["geometry"] == {"resize": 40, "crop": 32} and r.run["amp"] is None


def test_json_schema_and_files(tiny_bench, tiny_index, tmp_path):
    paths = tiny_bench.save(tmp_path / "b")
    d = json.loads(paths["json"].read_text())
    assert d["schema"] == SCHEMA
    assert set(d) >= {"stages", "bandwidth", "bottleneck", "device", "config", "run", "load_average", "versions",
                      "seconds", "created"}
    assert set(d["device"]) == {"type", "name", "cores", "torch_threads", "peak_bandwidth_gbs"}
    assert d["device"]["type"] == "cpu" and d["device"]["peak_bandwidth_gbs"] is None
    assert len(d["load_average"]["start"]) == 3 and len(d["load_average"]["end"]) == 3
    assert d["config"]["images"] == N_IMAGES and d["config"]["variants"] == list(VARIANT_NAMES)
    for row in d["stages"]:
        assert {"stage", "name", "rate", "unit", "images_per_s", "seconds", "runs"} <= set(row)
    assert paths["chart"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = load_bench(tmp_path / "b")
    assert again.to_dict() == BenchResult.from_dict(d).to_dict() and again.bottleneck == tiny_bench.bottleneck
    tiny_bench.save(tmp_path / "b")  # the same run's settings: its own files are rewritten
    other = BenchResult.from_dict(dict(d, config=dict(d["config"], repeats=2)))
    with pytest.raises(ConfigError, match="another bench run"):
        other.save(tmp_path / "b")
    other.save(tmp_path / "b", overwrite=True)
    with pytest.raises(ConfigError, match="schema"):
        BenchResult.from_dict({"schema": "something else"})


def test_compare_puts_runs_side_by_side(tiny_bench):
    d = tiny_bench.to_dict()
    half = BenchResult.from_dict(dict(d, stages=[dict(row, images_per_s=row["images_per_s"] / 2)
                                                 for row in d["stages"][:2]], bottleneck=d["stages"][0]["name"]))
    text = compare_benches([tiny_bench, half], ["full", "half"]).splitlines()
    assert text[0].split()[-2:] == ["full", "half"]
    first = next(line for line in text if line.startswith(d["stages"][0]["name"]))
    full_v, half_v = (float(v.replace(",", "")) for v in first.split()[-2:])
    assert half_v == pytest.approx(full_v / 2, rel=0.01)
    end = next(line for line in text if line.startswith("end_to_end"))
    assert end.split()[-1] == "-"  # not measured in the second run


def test_cli_bench_and_compare(builtin_root, tmp_path, capsys):
    from bgsynth.cli import bench as cli

    parser = argparse.ArgumentParser(prog="bgsynth")
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", str(builtin_root), "--device", "cpu", "--images", "4", "--repeats", "1",
                              "--stages", "decode,model", "--backends", "pil", "--batch-sizes", "2",
                              "--resize", "36", "--crop", "32", "--out", str(tmp_path / "one"), "--no-progress"])
    assert cli.run(args) == 0
    out = capsys.readouterr().out
    assert "decode[pil]" in out and "model[batch=2]" in out and "bottleneck:" in out and "load average" in out
    r = load_bench(tmp_path / "one")
    assert [row["name"] for row in r.stages] == ["decode[pil]", "model[batch=2]"]
    args = parser.parse_args(["bench", "--compare", str(tmp_path / "one"), str(tmp_path / "one" / "bench.json"),
                              "--out", str(tmp_path / "cmp")])
    assert cli.run(args) == 0
    assert "decode[pil]" in capsys.readouterr().out and (tmp_path / "cmp" / "compare.png").is_file()
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--batch-sizes", "4,0"])


def test_peak_bandwidth_table_and_errors(tiny_index):
    assert peak_bandwidth("NVIDIA H200") == 4800.0
    assert peak_bandwidth("NVIDIA H100 80GB HBM3") == 3350.0 and peak_bandwidth("NVIDIA H100 PCIe") == 2000.0
    assert peak_bandwidth("NVIDIA A100-SXM4-80GB") == 2039.0 and peak_bandwidth("NVIDIA A100-SXM4-40GB") == 1555.0
    assert peak_bandwidth("NVIDIA L4") == 300.0 and peak_bandwidth("NVIDIA L40S") == 864.0
    assert peak_bandwidth("Intel(R) Xeon(R)") is None
    with pytest.raises(ConfigError, match="CUDA"):
        kernel_bandwidth("cpu")
    with pytest.raises(ConfigError, match="dtype"):
        run_bench(tiny_index, device="cpu", dtype="int8")
    with pytest.raises(ConfigError, match="stages"):
        run_bench(tiny_index, device="cpu", stages=("decode", "nothing"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_kernel_bandwidth():
    rows = kernel_bandwidth("cuda", batch=32, pool=64, crop=64, iters=3)
    assert [r["kernel"] for r in rows] == ["composite mixed uint8", "composite mixed bf16 norm CL", "tile_fill uint8"]
    assert all(r["gb_per_s"] > 0 for r in rows)


def test_gpu_checks_script_runs_the_bench_command_with_valid_arguments():
    """benchmarks/gpu_checks.py (no GPU here): it imports without torch work, every script it names exists, and its
    ``bgsynth bench`` step parses with the command's own parser (the same code as ``bgsynth bench``)."""
    import importlib.util
    import pathlib
    import sys

    from bgsynth.cli import bench as cli

    root = pathlib.Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("gpu_checks", root / "benchmarks" / "gpu_checks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    names = [name for name, _cmd, _limit in mod.STEPS]
    assert len(names) == len(set(names)) and "bgsynth-bench-cuda" in names
    for _name, cmd, limit in mod.STEPS:
        assert cmd[0] == sys.executable and 0 < limit <= 600
        for part in cmd[1:]:
            if part.endswith(".py"):
                assert (root / part).is_file(), part
    bench_cmd = next(cmd for name, cmd, _ in mod.STEPS if name == "bgsynth-bench-cuda")
    assert bench_cmd[1:3] == ["-m", "bgsynth.cli.bench"]
    parser = argparse.ArgumentParser(prog="bgsynth")
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", *[c.replace("{out}", "/tmp/x") for c in bench_cmd[3:]]])
    assert args.device == "cuda" and args.dtype == "bf16" and args.batch_sizes == (256, 64)
    assert (args.resize, args.crop, args.model) == (256, 224, "resnet50")
