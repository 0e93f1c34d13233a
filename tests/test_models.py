"""bgsynth.models: factories, checkpoint loading in every layout (never partial, never unsafe by default), label
protocols on hand-made logits, out-of-memory back-off."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from bgsynth.classes import IMAGENET_MEAN, IMAGENET_STD, IN9_MEAN, IN9_STD, LabelSpace, OutputMap, in1k_to_in9
from bgsynth.errors import CheckpointError, ConfigError
from bgsynth.models import (
    CHECKPOINT_FORMAT,
    BgsynthCNN,
    LoadedModel,
    Predictor,
    create_model,
    load_model,
    save_checkpoint,
)

from conftest import cpu_and_cuda


def _net(num_classes=9, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    m = create_model("bgsynth_cnn", num_classes).eval()
    # non-trivial running statistics so that a load that skipped buffers would show
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
    return m


def _same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


X = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------------------------ factories
def test_create_model_names():
    m = create_model("bgsynth_cnn")
    assert isinstance(m, BgsynthCNN) and m(torch.zeros(2, 3, 64, 64)).shape == (2, 9)
    assert create_model("bgsynth_cnn", 1000)(torch.zeros(1, 3, 48, 48)).shape == (1, 1000)
    tv = create_model("resnet18", num_classes=9).eval()
    assert tv(torch.zeros(1, 3, 32, 32)).shape == (1, 9)
    tm = create_model("resnet10t", num_classes=5).eval()  # a timm-only name
    assert tm(torch.zeros(1, 3, 32, 32)).shape == (1, 5)
    with pytest.raises(ConfigError, match="resnet18"):
        create_model("resnet18x")
    with pytest.raises(ConfigError, match="num_classes"):
        create_model("bgsynth_cnn", 0)


def test_load_arch_name_random_init():
    lm = load_model("bgsynth_cnn")
    assert (lm.num_outputs, lm.output_space, lm.mean, lm.std) == (9, "in9", tuple(IN9_MEAN), tuple(IN9_STD))
    assert lm.provenance["layout"] == "random_init" and not lm.module.training
    lm = load_model("bgsynth_cnn", num_classes=1000)
    assert (lm.num_outputs, lm.output_space, lm.mean, lm.std) == (1000, "in1k", tuple(IMAGENET_MEAN), tuple(IMAGENET_STD))
    with pytest.raises(CheckpointError, match="not found"):
        load_model("missing/dir/model.pt")


# ------------------------------------------------------------------------------------------------ checkpoints
def test_save_checkpoint_roundtrip(tmp_path):
    net = _net()
    p = save_checkpoint(net, tmp_path / "ck.pt", "bgsynth_cnn", 9, {"geometry": {"resize": 72, "crop": 64}, "epoch": 3})
    raw = torch.load(p, weights_only=True)  # a plain dict: loads safely
    assert raw["format"] == CHECKPOINT_FORMAT and raw["arch"] == "bgsynth_cnn" and raw["epoch"] == 3
    lm = load_model(p)
    _same_weights(lm.module, net)
    assert lm.geometry == {"resize": 72, "crop": 64} and lm.arch == "bgsynth_cnn"
    assert lm.provenance["sha256"] and lm.provenance["read_as"] == "weights_only"
    with torch.inference_mode():
        assert torch.equal(lm.module(X), net(X))
    # a compiled / DataParallel-wrapped model is saved without its wrapper prefixes
    p2 = save_checkpoint(nn.DataParallel(net), tmp_path / "dp.pt", "bgsynth_cnn", 9)
    assert not any(k.startswith("module.") for k in torch.load(p2, weights_only=True)["state_dict"])


def _layouts(sd):
    """The layouts users bring: name -> (file content, expected mean/std from the file or None)."""
    mean = torch.tensor([0.4717, 0.4499, 0.3837])
    std = torch.tensor([0.2600, 0.2516, 0.2575])
    official = {"module.normalizer.new_mean": mean[:, None, None], "module.normalizer.new_std": std[:, None, None]}
    official.update({f"module.model.{k}": v for k, v in sd.items()})
    official.update({"module.attacker.normalize.new_mean": mean[:, None, None],
                     "module.attacker.normalize.new_std": std[:, None, None]})
    official.update({f"module.attacker.model.{k}": v for k, v in sd.items()})
    return {
        "plain": (dict(sd), None),
        "nested_model": ({"model": dict(sd), "epoch": 1}, None),
        "nested_state_dict_module_prefix": ({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, None),
        "model_prefix": ({f"model.{k}": v for k, v in sd.items()}, None),
        "official_normalizer": ({"model": official, "epoch": 89}, (tuple(mean.tolist()), tuple(std.tolist()))),
    }


@pytest.mark.parametrize("layout", ["plain", "nested_model", "nested_state_dict_module_prefix", "model_prefix",
                                    "official_normalizer"])
def test_state_dict_layouts(tmp_path, layout):
    net = _net()
    content, stats = _layouts(net.state_dict())[layout]
    f = tmp_path / f"{layout}.pt"
    torch.save(content, f)
    lm = load_model("bgsynth_cnn", weights=f)
    _same_weights(lm.module, net)
    with torch.inference_mode():
        assert torch.equal(lm.module(X), net(X))
    if stats is not None:
        assert lm.mean == pytest.approx(stats[0]) and lm.std == pytest.approx(stats[1])
        assert lm.provenance["normalization_from_checkpoint"]
        assert "normaliser" in lm.provenance["layout"]


def test_classifier_width_from_weights(tmp_path):
    net = _net(num_classes=1000)
    f = tmp_path / "in1k.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, f)
    lm = load_model("bgsynth_cnn", weights=f)
    assert (lm.num_outputs, lm.output_space, lm.mean) == (1000, "in1k", tuple(IMAGENET_MEAN))
    _same_weights(lm.module, net)
    # an explicit, contradicting width is a shape mismatch, not a silent re-initialisation
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_model("bgsynth_cnn", weights=f, num_classes=9)


def test_partial_weights_refused(tmp_path):
    sd = _net().state_dict()
    missing = dict(sd)
    del missing["features.3.weight"]
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match=r"partial load.*features\.3\.weight"):
        load_model("bgsynth_cnn", weights=tmp_path / "missing.pt")
    extra = dict(sd, **{"head.extra.weight": torch.zeros(3)})
    torch.save({"model": extra}, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match=r"unexpected.*head\.extra\.weight"):
        load_model("bgsynth_cnn", weights=tmp_path / "extra.pt")
    # weights of another architecture: nothing matches, nothing is loaded
    torch.save(create_model("resnet18").state_dict(), tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="missing"):
        load_model("bgsynth_cnn", weights=tmp_path / "other.pt")


def test_plain_state_dict_needs_arch(tmp_path):
    torch.save(_net().state_dict(), tmp_path / "sd.pt")
    with pytest.raises(CheckpointError, match="--weights"):
        load_model(tmp_path / "sd.pt")


def test_torchscript(tmp_path):
    net = _net()
    f = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(net), str(f))
    lm = load_model(f)
    assert lm.provenance["layout"] == "torchscript" and lm.num_outputs == 9 and lm.output_space == "in9"
    with torch.inference_mode():
        assert torch.allclose(lm.module(X), net(X), atol=1e-6)
    # traced modules have no num_classes attribute: the width is measured with one forward
    f2 = tmp_path / "traced.pt"
    torch.jit.save(torch.jit.trace(_net(1000), torch.zeros(1, 3, 32, 32)), str(f2))
    lm2 = load_model(f2)
    assert lm2.num_outputs == 1000 and lm2.output_space == "in1k"


def test_pickled_module_needs_trust(tmp_path):
    net = _net()
    f = tmp_path / "module.pt"
    torch.save(net, f)
    with pytest.raises(CheckpointError, match="--trust-checkpoint"):
        load_model(f)
    lm = load_model(f, trust_checkpoint=True)
    assert lm.provenance["read_as"] == "trusted_pickle"
    with torch.inference_mode():
        assert torch.equal(lm.module(X), net(X))
    g = tmp_path / "dict_with_module.pt"
    torch.save({"model": net, "epoch": 2}, g)
    with pytest.raises(CheckpointError, match="--trust-checkpoint"):
        load_model(g)
    assert load_model(g, trust_checkpoint=True).num_outputs == 9


def test_unreadable_files(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pt"):
        load_model(bad)
    with pytest.raises(CheckpointError, match="not found"):
        load_model("bgsynth_cnn", weights=tmp_path / "nope.pt")
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "noweights.pt")
    with pytest.raises(CheckpointError, match="found no weights"):
        load_model("bgsynth_cnn", weights=tmp_path / "noweights.pt")


def test_output_space_rules(tmp_path):
    net = _net(num_classes=10)
    f = tmp_path / "ten.pt"
    torch.save(net.state_dict(), f)
    lm = load_model("bgsynth_cnn", weights=f)  # 10 outputs: the classes of some label space, told at scoring
    assert lm.output_space == "custom" and (lm.mean, lm.std) == (tuple(IMAGENET_MEAN), tuple(IMAGENET_STD))
    with pytest.raises(ConfigError, match=r"ten\.pt: 10 outputs cannot be scored on the 9 classes.*--output-map"):
        Predictor(lm)  # on IN-9: refused before any work
    assert Predictor(lm, label_space=LabelSpace.from_names([f"c{i}" for i in range(10)])).output_map.name == "identity"
    lm = load_model("bgsynth_cnn", weights=f, output_space="in9")
    assert lm.num_outputs == 10 and lm.output_space == "in9"
    with pytest.raises(ConfigError, match="1000"):
        load_model("bgsynth_cnn", weights=f, output_space="in1k")
    lm = load_model("bgsynth_cnn", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert lm.mean == (0.5, 0.5, 0.5) and lm.std == (0.25, 0.25, 0.25)


def _corrupt_files(tmp_path) -> dict:
    """Files users pass by mistake: name -> (path, a phrase the error must contain)."""
    good = tmp_path / "good.pt"
    torch.save(_net().state_dict(), good)
    data = good.read_bytes()
    legacy = tmp_path / "legacy.pt"
    torch.save(_net().state_dict(), legacy, _use_new_zipfile_serialization=False)
    out = {
        "empty": (b"", "empty (0 bytes)"),
        "truncated_zip": (data[: len(data) // 2], "truncated or corrupt"),
        "truncated_legacy": (legacy.read_bytes()[:300], "re-download or re-save"),
        "text": (b"this is not a checkpoint\n" * 20, "not a PyTorch checkpoint"),
        "random": (b"\x00" + np.random.default_rng(0).bytes(400), "not a PyTorch checkpoint"),
    }
    files = {}
    for name, (content, phrase) in out.items():
        (tmp_path / f"{name}.pt").write_bytes(content)
        files[name] = (tmp_path / f"{name}.pt", phrase)
    return files


def test_corrupt_checkpoints_are_named_with_what_to_do(tmp_path):
    for name, (path, phrase) in _corrupt_files(tmp_path).items():
        for call in (lambda: load_model(path), lambda: load_model("bgsynth_cnn", weights=path)):
            with pytest.raises(CheckpointError) as e:
                call()
            msg = str(e.value)
            assert msg.startswith(str(path)) and phrase in msg, (name, msg)
            assert "\x1b" not in msg and "\n" not in msg, (name, msg)
            assert "unpickle" not in msg and "Python objects" not in msg, (name, msg)  # not "pickled data" advice
    module = tmp_path / "module.pt"
    torch.save(_net(), module)  # a whole pickled module: refused with the object it holds, no terminal colours
    with pytest.raises(CheckpointError) as e:
        load_model(module)
    msg = str(e.value)
    assert "\x1b" not in msg and "--trust-checkpoint" in msg and "BgsynthCNN" in msg, msg


def test_unknown_architecture_messages():
    with pytest.raises(ConfigError) as e:
        create_model("resnet5")
    msg = str(e.value)
    suggested = msg.split("Did you mean ")[1].split("?")[0].split(", ")
    assert len(suggested) == len(set(suggested)) >= 2 and "resnet50" in suggested  # each name once
    with pytest.raises(ConfigError) as e:
        create_model("zzqqxx")
    msg = str(e.value)
    assert "did you mean" not in msg.lower() and "timm's). (A checkpoint path" in msg  # sentences end properly


# ------------------------------------------------------------------------------------------------ prediction
class _TableModel(nn.Module):
    """Returns hand-made logits: row ``i`` for an input whose pixel [0, 0, 0] is ``i``."""

    def __init__(self, table: torch.Tensor, fail_above: int | None = None):
        super().__init__()
        self.register_buffer("table", table)
        self.fail_above = fail_above
        self.calls: list[int] = []
        self.num_classes = table.shape[1]

    def forward(self, x):
        self.calls.append(int(x.shape[0]))
        if self.fail_above is not None and x.shape[0] > self.fail_above:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (fake, batch {x.shape[0]})")
        return self.table[x[:, 0, 0, 0].round().long()]


def _loaded(table, space, fail_above=None) -> LoadedModel:
    mean, std = (IN9_MEAN, IN9_STD) if space == "in9" else (IMAGENET_MEAN, IMAGENET_STD)
    return LoadedModel(_TableModel(table, fail_above), table.shape[1], space, tuple(mean), tuple(std))


def _rows(n):
    x = torch.zeros(n, 3, 2, 2)
    x[:, 0, 0, 0] = torch.arange(n, dtype=torch.float32)
    return x


def test_label_protocols_on_handmade_logits():
    m = in1k_to_in9()
    mapped = {c: [int(i) for i in np.flatnonzero(m == c)] for c in range(9)}
    unmapped = [int(i) for i in np.flatnonzero(m < 0)]
    t = torch.zeros(4, 1000)
    t[0, mapped[3][5]] = 5.0                                             # mapped top-1 -> class 3 either way
    t[1, unmapped[0]] = 9.0; t[1, mapped[5][0]] = 4.0                    # noqa: E702 unmapped top-1, best mapped: 5
    t[2, unmapped[:50]] = 8.0; t[2, mapped[0][-1]] = 1.0; t[2, mapped[8][0]] = 0.5  # noqa: E702
    t[3] = -1.0; t[3, unmapped[-1]] = 0.0; t[3, mapped[7][2]] = -0.5     # noqa: E702
    official = Predictor(_loaded(t, "in1k"), label_protocol="official")
    restricted = Predictor(_loaded(t, "in1k"), label_protocol="restricted")
    assert official.predict(_rows(4)).tolist() == [3, -1, -1, -1]
    assert restricted.predict(_rows(4)).tolist() == [3, 5, 0, 7]
    assert official.forwards == 4
    # a 9-class model is scored directly; an output >= 9 of a wider IN-9 model is unmapped
    t9 = torch.tensor([[0.0] * 8 + [1.0, 0.0], [0.0] * 9 + [2.0]])
    p9 = Predictor(_loaded(t9, "in9"))
    assert p9.predict(_rows(2)).tolist() == [8, -1]
    # restricted: the extra output is never predicted; row 1's best IN-9 output is a tie of zeros -> class 0
    assert Predictor(_loaded(t9, "in9"), label_protocol="restricted").predict(_rows(2)).tolist() == [8, 0]
    with pytest.raises(ConfigError, match="label_protocol"):
        Predictor(_loaded(t9, "in9"), label_protocol="imagenet")


def _reference_in9(logits: torch.Tensor, protocol: str) -> list[int]:
    """The paper's IN-1000 -> IN-9 scoring written out per row (the reference, not the engine's code)."""
    table = in1k_to_in9()
    out = []
    for row in logits.tolist():
        if protocol == "official":
            out.append(int(table[int(np.argmax(row))]))
        else:
            best = max((v, -i) for i, v in enumerate(row) if table[i] >= 0)
            out.append(int(table[-best[1]]))
    return out


def test_output_maps_onto_label_spaces():
    # IN-1000 -> IN-9: bit-identical to the per-row reference on random logits (ties impossible in float32 noise)
    t = torch.randn(64, 1000, generator=torch.Generator().manual_seed(3))
    for protocol in ("official", "restricted"):
        p = Predictor(_loaded(t, "in1k"), device="cpu", label_protocol=protocol)  # today's call, IN-9 implied
        assert p.output_map.name == "in1k->in9" and p.label_space.name == "in9"
        assert p.predict(_rows(64)).tolist() == _reference_in9(t, protocol)
    # identity: a 2-class model on a 2-class label space
    birds = LabelSpace.from_names(["landbird", "waterbird"], name="waterbirds")
    t2 = torch.tensor([[0.2, 0.1], [0.0, 3.0], [-1.0, -2.0]])
    p = Predictor(_loaded(t2, "custom"), label_space=birds)
    assert p.output_map.name == "identity" and p.predict(_rows(3)).tolist() == [0, 1, 0]
    assert p.describe()["label_space"] == "waterbirds" and p.describe()["num_classes"] == 2
    # a many-to-one JSON map: outputs 0, 1 -> class 0, output 3 -> class 1, outputs 2 and 4 -> no class
    t5 = torch.tensor([[5.0, 1.0, 0.0, 2.0, 0.0],   # top-1 output 0 -> 0
                       [0.0, 1.0, 9.0, 2.0, 0.0],   # top-1 output 2 is unmapped: -1; restricted: output 3 -> 1
                       [0.0, 0.0, 0.0, 0.5, 7.0]])  # top-1 output 4 unmapped: -1; restricted: output 3 -> 1
    mapping = {"0": 0, "1": 0, "3": 1}
    official = Predictor(_loaded(t5, "custom"), label_space=birds, output_map=OutputMap.from_dict(mapping, 5))
    restricted = Predictor(_loaded(t5, "custom"), label_space=birds, output_map=OutputMap.from_dict(mapping, 5),
                           label_protocol="restricted")
    assert official.predict(_rows(3)).tolist() == [0, -1, -1]
    assert restricted.predict(_rows(3)).tolist() == [0, 1, 1]


def test_output_map_errors(tmp_path):
    coco = LabelSpace.from_names([f"cat{i}" for i in range(80)], name="coco")
    with pytest.raises(ConfigError, match=r"1000 outputs cannot be scored on the 80 classes.*--output-map"):
        Predictor(_loaded(torch.zeros(1, 1000), "in1k"), label_space=coco)
    f = tmp_path / "map.json"
    f.write_text('{"0": 0, "1": 0, "9": 1}')
    with pytest.raises(ConfigError, match="output 9 outside 0..4"):
        Predictor(_loaded(torch.zeros(1, 5), "custom"), label_space=coco, output_map=f)
    f.write_text('{"0": 0, "1": 80}')
    with pytest.raises(ConfigError, match="names class 80, the label space has 80"):
        Predictor(_loaded(torch.zeros(1, 5), "custom"), label_space=coco, output_map=f)
    f.write_text("[0, 0, 1, -1, 79]")
    p = Predictor(_loaded(torch.zeros(1, 5), "custom"), label_space=coco, output_map=f)
    assert p.output_map.table.tolist() == [0, 0, 1, -1, 79]
    f.write_text('{"0": "dog"}')
    with pytest.raises(ConfigError, match=r"map\.json: expected an output map"):
        Predictor(_loaded(torch.zeros(1, 5), "custom"), label_space=coco, output_map=f)
    with pytest.raises(ConfigError, match="LabelSpace"):
        Predictor(_loaded(torch.zeros(1, 9), "in9"), label_space="in9")


def test_oom_backoff_halves_and_goes_on():
    t = torch.randn(23, 9, generator=torch.Generator().manual_seed(0))
    lm = _loaded(t, "in9", fail_above=5)
    p = Predictor(lm)
    with pytest.warns(UserWarning, match="out of memory"):
        logits = p.logits(_rows(23))
    assert torch.equal(logits, t)
    assert p.max_batch == 5 and p.oom_backoffs == 2 and p.forwards == 23
    assert lm.module.calls[:3] == [23, 11, 5]
    lm.module.calls.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the smaller chunk is remembered: no new back-off
        assert torch.equal(p.predict(_rows(23)), t.argmax(1))
    assert max(lm.module.calls) == 5
    # a single image that does not fit is an error, not an endless loop
    p1 = Predictor(_loaded(t, "in9", fail_above=0))
    with pytest.raises(torch.cuda.OutOfMemoryError), pytest.warns(UserWarning):
        p1.logits(_rows(3))


def test_non_oom_errors_propagate():
    class Boom(nn.Module):
        num_classes = 9

        def forward(self, x):
            raise ValueError("bad input")

    p = Predictor(LoadedModel(Boom(), 9, "in9", IN9_MEAN, IN9_STD))
    with pytest.raises(ValueError, match="bad input"):
        p.logits(torch.zeros(2, 3, 4, 4))
    assert p.oom_backoffs == 0 and p.forwards == 0


def test_prepare_normalises():
    p = Predictor(load_model("bgsynth_cnn"))
    img = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8)
    want = (img.double() / 255 - torch.tensor(IN9_MEAN, dtype=torch.float64).view(1, 3, 1, 1)) / torch.tensor(
        IN9_STD, dtype=torch.float64).view(1, 3, 1, 1)
    got = p.prepare(img)
    assert got.dtype == torch.float32 and torch.allclose(got.double(), want, atol=1e-6)
    assert p.logits(torch.zeros(0, 3, 8, 8)).shape == (0, 9)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_predictor_device_settings(device):
    net = _net()
    lm = LoadedModel(net, 9, "in9", IN9_MEAN, IN9_STD)
    x = torch.randint(0, 256, (6, 3, 40, 40), dtype=torch.uint8)
    ref = Predictor(LoadedModel(_net(), 9, "in9", IN9_MEAN, IN9_STD), device="cpu")
    ref_logits = ref.logits(ref.prepare(x))
    p = Predictor(lm, device=device, amp="auto")
    if device == "cuda":
        assert p.channels_last and p.amp == ("bf16" if torch.cuda.is_bf16_supported() else None)
    else:
        assert not p.channels_last and p.amp is None and p.input_dtype == torch.float32
    xin = p.prepare(x)
    assert xin.dtype == p.input_dtype and xin.device.type == device
    got = p.logits(xin)
    assert got.dtype == torch.float32 and got.device.type == device
    tol = 0.1 if p.amp else 1e-4
    assert torch.allclose(got.cpu(), ref_logits, atol=tol, rtol=tol)


def test_predictor_config_and_resolved_device():
    from bgsynth.config import resolve_amp, resolve_device
    from bgsynth.models import PredictorConfig

    lm = load_model("bgsynth_cnn")
    p = Predictor(lm, device="auto", amp="auto", max_batch=4, label_protocol="restricted")
    # one device and autocast resolver (bgsynth.config), not the predictor's own
    assert p.device == resolve_device("auto") and p.amp == resolve_amp("auto", p.device)
    assert p.config == PredictorConfig(max_batch=4, label_protocol="restricted") and p.max_batch == 4
    q = Predictor(lm, config=PredictorConfig(max_batch=2), max_batch=3)  # keyword options override the config
    assert q.max_batch == 3 and q.describe()["device"] == "cpu"
    with pytest.raises(ConfigError, match="unknown option.*max_batch"):
        Predictor(lm, max_batches=2)
    with pytest.raises(ConfigError, match="amp"):
        Predictor(lm, amp="fp8")
    with pytest.raises(ConfigError, match="max_batch"):
        PredictorConfig(max_batch=0)


def test_timm_is_imported_only_for_a_timm_architecture():
    import subprocess
    import sys

    code = ("import sys; from bgsynth.models import load_model, Predictor; "
            "Predictor(load_model('bgsynth_cnn')); print('timm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
