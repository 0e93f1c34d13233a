"""Models: the demo CNN, architecture factories, safe checkpoint loading and a batched predictor.

Three layers, each usable on its own:

* :func:`create_model` builds a randomly initialised network: ``'bgsynth_cnn'`` (a small CNN that trains in about a
  minute on two CPU cores) or any torchvision / timm architecture name.
* :func:`load_model` turns a ``--model`` specification (an architecture name, optionally with ``weights``, or a
  checkpoint file) into a :class:`LoadedModel`: the module, its output space (9 IN-9 classes, 1000 ImageNet
  classes, or ``'custom'``: the classes of some other label space), the input normalisation that goes with it and
  a provenance record. Checkpoints are read with ``torch.load(weights_only=True)``; a pickled module is unpickled
  only with ``trust_checkpoint=True``, and weights that do not cover the architecture exactly are refused (never
  a silently partial load). A file that is empty, truncated, not a checkpoint at all or holds Python objects is
  named with what is wrong and what to do.
* :class:`Predictor` runs a loaded model on already-normalised composites: inference mode, ``channels_last`` and
  autocast on CUDA, optional ``torch.compile``, the model's outputs mapped onto the index's label space by a
  :class:`~bgsynth.classes.OutputMap` (:func:`resolve_output_map`: identity, IN-1000 -> IN-9, or a JSON map) under
  the ``'official'`` or ``'restricted'`` protocol, and an out-of-memory back-off that halves the chunk size and
  goes on.

>>> loaded = load_model("bgsynth_cnn")
>>> loaded.num_outputs, loaded.output_space
(9, 'in9')
>>> pred = Predictor(loaded)
>>> pred.predict(torch.zeros(2, 3, 64, 64)).shape
torch.Size([2])
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import io
import os
import pathlib
import pickle
import re
import warnings
import zipfile
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .classes import IMAGENET_MEAN, IMAGENET_STD, IN9, IN9_MEAN, IN9_STD, NUM_IN9, LabelSpace, OutputMap
from .config import AMP_DTYPES, resolve_amp, resolve_device
from .errors import CheckpointError, ConfigError
from .fileio import atomic_write_bytes

__all__ = [
    "CHECKPOINT_FORMAT",
    "LABEL_PROTOCOLS",
    "OUTPUT_SPACES",
    "BgsynthCNN",
    "LoadedModel",
    "Predictor",
    "PredictorConfig",
    "create_model",
    "list_models",
    "load_model",
    "save_checkpoint",
    "default_normalization",
    "resolve_output_map",
    "check_label_space",
]

CHECKPOINT_FORMAT = "bgsynth-checkpoint"
LABEL_PROTOCOLS = ("official", "restricted")
#: what a model's outputs are: IN-9 classes, ImageNet-1k classes, or the classes of another label space (``custom``:
#: one-to-one when the counts match, else through an output map)
OUTPUT_SPACES = ("in9", "in1k", "custom")


# --------------------------------------------------------------------------------------------------------------
# The demo CNN
# --------------------------------------------------------------------------------------------------------------


class BgsynthCNN(nn.Module):
    """A small CNN for the built-in dataset: conv-bn-relu stages with stride, global average pool, linear head.

    Five stages (the first four halve the resolution) take a 64-128 px crop down to a 4-8 px map; the net has
    about 0.76 M parameters and costs about 21 M multiply-adds per 64 px image (about 650 training images/s on two
    CPU cores), yet sees both object shape and background texture.

    Args:
        num_classes: width of the output layer.
        widths: output channels of the five stages.
        dropout: dropout before the linear head (training only).

    Shape:
        - Input: ``[B, 3, H, W]`` normalised float images (any ``H, W >= 16``).
        - Output: ``[B, num_classes]`` logits.

    >>> BgsynthCNN(num_classes=9)(torch.zeros(2, 3, 64, 64)).shape
    torch.Size([2, 9])
    """

    def __init__(self, num_classes: int = NUM_IN9, widths: Sequence[int] = (32, 64, 128, 192, 256), dropout: float = 0.1):
        super().__init__()
        if len(widths) != 5 or any(int(w) <= 0 for w in widths):
            raise ConfigError(f"BgsynthCNN: expected 5 positive stage widths, got {tuple(widths)}")
        if int(num_classes) <= 0:
            raise ConfigError(f"BgsynthCNN: expected num_classes > 0, got {num_classes}")
        self.num_classes = int(num_classes)
        strides = (2, 2, 2, 2, 1)
        layers: list[nn.Module] = []
        cin = 3
        for cout, stride in zip(widths, strides):
            layers += [
                nn.Conv2d(cin, int(cout), 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(int(cout)),
                nn.ReLU(inplace=True),
            ]
            cin = int(cout)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(cin, self.num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x)).flatten(1)
        return self.fc(self.dropout(x))


_OWN_MODELS: dict[str, Callable[..., nn.Module]] = {"bgsynth_cnn": BgsynthCNN}


def _torchvision_models():
    import torchvision  # imported when a model outside bgsynth's own is asked for (bgsynth_cnn needs none)

    return torchvision.models


def _timm():
    """timm, or ``None`` when it is not installed.

    timm is a heavy optional dependency: it is imported only when a name that is neither bgsynth's nor
    torchvision's is asked for (a timm architecture, or an unknown name that gets close matches).
    """
    try:
        import timm  # heavy, optional: imported only here (see above)
    except ImportError:
        return None
    return timm


def list_models() -> list[str]:
    """Architecture names :func:`create_model` accepts: bgsynth's own, then torchvision's (timm's are many more)."""
    models = _torchvision_models()
    return sorted(_OWN_MODELS) + sorted(models.list_models(module=models))


def create_model(arch: str, num_classes: int = NUM_IN9, **kwargs: Any) -> nn.Module:
    """A randomly initialised network by architecture name.

    Looks the name up in bgsynth's own models (``'bgsynth_cnn'``), then torchvision's classification models,
    then timm's.

    Args:
        arch: architecture name, e.g. ``'bgsynth_cnn'``, ``'resnet50'``, ``'vit_small_patch16_224'``.
        num_classes: output width (9 for IN-9, 1000 for ImageNet-1k).
        **kwargs: passed to the architecture's constructor.

    Returns:
        The module, in training mode, on the CPU.

    Raises:
        ConfigError: unknown name (with close matches) or bad ``num_classes``.
    """
    if not isinstance(arch, str) or not arch:
        raise ConfigError(f"create_model: expected an architecture name, got {arch!r}")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes <= 0:
        raise ConfigError(f"create_model: expected num_classes to be a positive int, got {num_classes!r}")
    if arch in _OWN_MODELS:
        return _OWN_MODELS[arch](num_classes=num_classes, **kwargs)
    models = _torchvision_models()
    tv_names = models.list_models(module=models)
    if arch in tv_names:
        return models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
    timm = _timm()
    if timm is not None and timm.is_model(arch):
        return timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)
    timm_names = timm.list_models() if timm is not None else []
    names = list(dict.fromkeys([*_OWN_MODELS, *tv_names, *timm_names]))  # torchvision and timm share many names
    close = difflib.get_close_matches(arch, names, n=5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(
        f"create_model: unknown architecture {arch!r} (not bgsynth's, torchvision's or timm's"
        f"{'' if timm is not None else ', which is not installed'}).{hint} "
        f"(A checkpoint path that does not exist is also reported this way.)"
    )


# --------------------------------------------------------------------------------------------------------------
# Loaded models and their defaults
# --------------------------------------------------------------------------------------------------------------


def default_normalization(output_space: str) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Input mean/std that go with an output space: IN-9's for ``'in9'``, ImageNet's for ``'in1k'`` and ``'custom'``
    (most backbones were trained with them; a checkpoint's stored normalisation or ``--mean/--std`` win)."""
    if output_space in ("in1k", "custom"):
        return tuple(IMAGENET_MEAN), tuple(IMAGENET_STD)
    if output_space == "in9":
        return tuple(IN9_MEAN), tuple(IN9_STD)
    raise ConfigError(f"expected output space in {OUTPUT_SPACES}, got {output_space!r}")


@dataclasses.dataclass
class LoadedModel:
    """A model ready for prediction, with what is needed to feed it and to score it.

    Attributes:
        module: the network (eval mode, CPU, float32).
        num_outputs: width of its output layer.
        output_space: ``'in9'`` (outputs are IN-9 classes; an index >= 9 counts as unmapped), ``'in1k'``
            (ImageNet-1k classes, mapped through :func:`bgsynth.classes.in1k_to_in9` on IN-9 data) or ``'custom'``
            (any other width: the classes of the label space it is scored on, see :func:`resolve_output_map`).
        mean, std: per-channel input normalisation (of images scaled to [0, 1]).
        arch: architecture name when known, else ``None``.
        geometry: crop geometry stored with the checkpoint (``{'resize', 'crop'}``) or ``None``.
        provenance: JSON-able record of where the model came from (spec, file, sha256, layout, ...).
    """

    module: nn.Module
    num_outputs: int
    output_space: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    arch: str | None = None
    geometry: dict | None = None
    provenance: dict = dataclasses.field(default_factory=dict)

    def output_map(self, label_space: LabelSpace = IN9,
                   output_map: OutputMap | str | os.PathLike | None = None) -> OutputMap:
        """How this model's outputs map onto ``label_space`` (:func:`resolve_output_map`)."""
        return resolve_output_map(self.num_outputs, label_space, self.output_space, output_map,
                                  where=str(self.provenance.get("file") or self.provenance.get("spec") or "model"))


def resolve_output_map(num_outputs: int, label_space: LabelSpace = IN9, output_space: str | None = None,
                       output_map: OutputMap | str | os.PathLike | None = None, where: str = "model") -> OutputMap:
    """How a model's ``K`` outputs map onto the ``N`` classes of a label space, by these rules in order:

    1. ``output_map`` given (an :class:`~bgsynth.classes.OutputMap`, or a JSON file ``{output: class}`` /
       ``[class of output 0, ...]``, many-to-one, unnamed outputs map to no class): that map, checked;
    2. ``K == N``: the identity;
    3. ``K == 1000`` on IN-9 data (unless the outputs are declared ``'in9'``): the IN-1000 -> IN-9 map (the paper's;
       the 630 classes outside IN-9 map to none);
    4. outputs declared ``'in9'`` (``output_space``) on IN-9 data with ``K > 9``: outputs 0..8 are the classes, the
       others map to none (as bgsynth always scored such models);
    5. anything else is a :class:`ConfigError` that says to give an output map.

    Args:
        num_outputs: ``K``, the model's output width.
        label_space: the classes it is scored on (the index's ``label_space``; IN-9 by default).
        output_space: what the outputs are, when known (:data:`OUTPUT_SPACES`).
        output_map: a user map (rule 1).
        where: the model, named in errors.

    >>> resolve_output_map(9).name, resolve_output_map(1000).name
    ('identity', 'in1k->in9')
    >>> resolve_output_map(2, LabelSpace.from_names(["land", "water"])).name
    'identity'
    """
    k, n = int(num_outputs), label_space.num_classes
    if output_map is not None:
        try:
            omap = output_map if isinstance(output_map, OutputMap) else OutputMap.from_json(output_map, k)
        except (TypeError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"{output_map}: expected an output map {{\"<output>\": <class id>}} or a list of class "
                              f"ids (-1: no class), with integers only ({type(e).__name__}: {e})") from None
        omap.check(k, n, where)
        return omap
    if k == n:
        return OutputMap.identity()
    if label_space == IN9 and k == 1000 and output_space != "in9":
        return OutputMap.in1k_to_in9()
    if label_space == IN9 and output_space == "in9" and k > n:
        return OutputMap(np.where(np.arange(k) < n, np.arange(k), -1), "in9 (outputs >= 9 unmapped)")
    hint = (" (a 1000-class ImageNet model maps onto IN-9 only)" if k == 1000 else "")
    raise ConfigError(
        f"{where}: {k} outputs cannot be scored on the {n} classes of the label space {label_space.name!r}{hint}; "
        f"give an output map (--output-map MAP.json: {{\"<output>\": <class id>, ...}}, many-to-one, unnamed outputs "
        f"map to no class)"
    )


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _is_torchscript(path: pathlib.Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    return any(n.endswith("/constants.pkl") for n in names) or any("/code/" in n for n in names)


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _clean(e: BaseException, limit: int = 200) -> str:
    """An exception's message for ours: no ANSI escape codes (torch colours some), one line, at most ``limit``."""
    text = " ".join(_ANSI.sub("", str(e)).split())
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


_REDO = "re-download or re-save it"


def _check_bytes(path: pathlib.Path) -> None:
    """Name what is wrong with a file that cannot be a PyTorch checkpoint, before torch tries (its messages for such
    files are misleading: random bytes are "weights only load failed", a cut-off archive an "internal miniz error").
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the checkpoint file ({_clean(e)})") from e
    if size == 0:
        raise CheckpointError(f"{path}: the checkpoint file is empty (0 bytes); {_REDO}")
    if head.startswith(b"PK\x03\x04"):  # torch.save's zip archive (and TorchScript's)
        if not zipfile.is_zipfile(path):
            raise CheckpointError(f"{path}: truncated or corrupt checkpoint: a zip archive ({size} bytes) without its "
                                  f"end (central directory), as when a download or copy is cut short; {_REDO}")
        return
    if head[:1] == b"\x80":  # a pickle (the legacy torch.save format)
        return
    if len(head) >= 9 and head[8:9] == b"{":
        raise CheckpointError(f"{path}: looks like a safetensors file, which bgsynth does not read; load it with "
                              f"safetensors and save the state_dict with torch.save")
    raise CheckpointError(
        f"{path}: not a PyTorch checkpoint: neither a zip archive (torch.save) nor a pickle (it starts with "
        f"{head[:8]!r}); check that --model / --weights name a checkpoint file"
    )


def _refused(path: pathlib.Path, e: pickle.UnpicklingError) -> CheckpointError:
    """Why safe loading refused a pickle, without torch's coloured advice: the first Python object it met."""
    found = re.search(r"GLOBAL ([\w.]+)", _ANSI.sub("", str(e)))
    what = f" (e.g. {found.group(1)})" if found else ""
    return CheckpointError(
        f"{path}: refused to unpickle: the file holds Python objects{what} that safe loading "
        f"(torch.load(weights_only=True)) does not allow. Unpickling can run arbitrary code. If you trust where "
        f"this file came from, pass --trust-checkpoint (trust_checkpoint=True); better, re-save it as a plain "
        f"state_dict or with bgsynth's save_checkpoint()."
    )


def _read_file(path: pathlib.Path, trust: bool) -> tuple[Any, str]:
    """Read a checkpoint file -> (object, how it was read)."""
    _check_bytes(path)
    if _is_torchscript(path):
        try:
            return torch.jit.load(str(path), map_location="cpu"), "torchscript"
        except Exception as e:  # noqa: BLE001 - report any failure as a checkpoint problem
            raise CheckpointError(f"{path}: looks like a TorchScript archive but could not be loaded ({_clean(e)}); "
                                  f"{_REDO}") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=True), "weights_only"
    except pickle.UnpicklingError as e:
        if "truncated" in str(e).lower():
            raise CheckpointError(f"{path}: truncated checkpoint ({_clean(e)}); {_REDO}") from e
        if not trust:
            raise _refused(path, e) from e
    except Exception as e:  # noqa: BLE001 - corrupt data makes torch's reader fail in any way (EOF, struct, index)
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint, corrupt or cut short ({_clean(e)}); "
                              f"{_REDO}") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=False), "trusted_pickle"
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: could not be unpickled even as a trusted file ({_clean(e)})") from e


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _unwrap(obj: Any, path: pathlib.Path) -> tuple[Any, dict, str]:
    """Find the weights inside a checkpoint object -> (state_dict or module, the outer dict, where found)."""
    if isinstance(obj, nn.Module):
        return obj, {}, "module"
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state_dict, a checkpoint dict or a module, got {type(obj).__name__}")
    if obj.get("format") == CHECKPOINT_FORMAT:
        if not _is_state_dict(obj.get("state_dict")):
            raise CheckpointError(f"{path}: bgsynth checkpoint without a valid 'state_dict'")
        return obj["state_dict"], dict(obj), "bgsynth"
    for key in ("model", "state_dict", "model_state_dict", "module", "net"):
        inner = obj.get(key)
        if isinstance(inner, nn.Module):
            return inner, dict(obj), f"module under '{key}'"
        if _is_state_dict(inner):
            return inner, dict(obj), f"state_dict under '{key}'"
    if _is_state_dict(obj):
        return obj, {}, "state_dict"
    tensors = sum(isinstance(v, torch.Tensor) for v in obj.values())
    keys = ", ".join(repr(k) for k in list(obj)[:8])
    raise CheckpointError(
        f"{path}: found no weights: expected a state_dict (str -> tensor) at top level or under 'model' / "
        f"'state_dict', got a dict with keys {keys} ({tensors} tensors at top level)"
    )


def _strip(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor] | None:
    if not all(k.startswith(prefix) for k in sd):
        return None
    return {k[len(prefix) :]: v for k, v in sd.items()}


def _split_normalizer(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], tuple | None, tuple | None, bool]:
    """Handle the official backgrounds-challenge (robustness library) layout.

    Keys look like ``module.normalizer.new_mean``, ``module.normalizer.new_std``, ``module.model.<net>`` and,
    in robustness checkpoints, ``module.attacker.normalize.*`` / ``module.attacker.model.<net>`` (a second copy of
    the same network). Returns the bare network state_dict, the stored mean/std and whether the layout matched.
    """
    sd = dict(sd)
    for p in ("module.",):
        if all(k.startswith(p) for k in sd):
            sd = {k[len(p) :]: v for k, v in sd.items()}
    if "normalizer.new_mean" not in sd or "normalizer.new_std" not in sd:
        return sd, None, None, False
    mean = tuple(float(v) for v in sd.pop("normalizer.new_mean").flatten().tolist())
    std = tuple(float(v) for v in sd.pop("normalizer.new_std").flatten().tolist())
    net = {k[len("model.") :]: v for k, v in sd.items() if k.startswith("model.")}
    rest = [k for k in sd if not k.startswith("model.") and not k.startswith("attacker.")]
    if rest:
        raise CheckpointError(
            f"normaliser-wrapped checkpoint has keys outside normalizer./model./attacker.: {rest[:5]}"
        )
    if len(mean) != 3 or len(std) != 3:
        raise CheckpointError(f"normaliser-wrapped checkpoint: expected 3-channel mean/std, got {mean}, {std}")
    return net, mean, std, True


def _candidates(sd: Mapping[str, torch.Tensor]) -> list[tuple[str, dict[str, torch.Tensor]]]:
    """State dicts to try, from the file's keys as they are to common wrapper prefixes stripped."""
    out = [("", dict(sd))]
    seen = {tuple(sorted(sd))}
    frontier = [("", dict(sd))]
    for _ in range(3):
        nxt = []
        for name, cand in frontier:
            for p in ("module.", "model.", "_orig_mod.", "backbone."):
                s = _strip(cand, p)
                if s is not None and tuple(sorted(s)) not in seen:
                    seen.add(tuple(sorted(s)))
                    nxt.append((name + p, s))
        out += nxt
        frontier = nxt
    return out


def _load_exact(module: nn.Module, sd: Mapping[str, torch.Tensor], where: str) -> str:
    """Load ``sd`` into ``module`` only if keys and shapes match exactly; returns the prefix that was stripped."""
    target = module.state_dict()
    want = set(target)
    best = None
    for prefix, cand in _candidates(sd):
        have = set(cand)
        if have == want:
            bad = [k for k in want if tuple(cand[k].shape) != tuple(target[k].shape)]
            if bad:
                details = ", ".join(f"{k}: {tuple(cand[k].shape)} vs {tuple(target[k].shape)}" for k in bad[:4])
                raise CheckpointError(f"{where}: shape mismatch in {len(bad)} tensors (checkpoint vs model): {details}")
            module.load_state_dict(cand, strict=True)
            return prefix
        score = len(have & want)
        if best is None or score > best[0]:
            best = (score, prefix, have)
    _score, prefix, have = best
    missing = sorted(want - have)
    unexpected = sorted(have - want)
    raise CheckpointError(
        f"{where}: refusing a partial load: {len(missing)} missing and {len(unexpected)} unexpected keys "
        f"(after stripping {prefix!r}); missing e.g. {missing[:4]}, unexpected e.g. {unexpected[:4]}. "
        f"Check --model (architecture) and --num-classes."
    )


def _classifier_width(module: nn.Module, sd: Mapping[str, torch.Tensor], num_classes: int) -> int | None:
    """If ``sd`` differs from ``module`` only in the classifier's output width, return the checkpoint's width."""
    target = module.state_dict()
    for _prefix, cand in _candidates(sd):
        if set(cand) != set(target):
            continue
        diff = [k for k in target if tuple(cand[k].shape) != tuple(target[k].shape)]
        if not diff:
            return None
        widths = {int(cand[k].shape[0]) for k in diff if cand[k].ndim >= 1}
        if len(widths) == 1 and all(target[k].shape[0] == num_classes and cand[k].ndim == target[k].ndim for k in diff):
            return widths.pop()
    return None


def _output_width(module: nn.Module, crop: int) -> int:
    """Output width of a module, by a forward pass on zeros (modules without a declared ``num_classes``)."""
    for attr in ("num_classes", "out_features"):
        v = getattr(module, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    x = torch.zeros(2, 3, crop, crop)
    try:
        with torch.inference_mode():
            y = module(x)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"could not run the model on a {crop}x{crop} input to find its output width ({e})") from e
    if isinstance(y, (tuple, list)):
        y = y[0]
    if not isinstance(y, torch.Tensor) or y.ndim != 2:
        raise CheckpointError(f"expected the model to return logits [B, classes], got {getattr(y, 'shape', type(y))}")
    return int(y.shape[1])


def _resolve_space(width: int, output_space: str | None, where: str) -> str:
    if output_space in (None, "auto"):
        return {1000: "in1k", NUM_IN9: "in9"}.get(width, "custom")
    if output_space not in OUTPUT_SPACES:
        raise ConfigError(f"expected output_space in {OUTPUT_SPACES} or 'auto', got {output_space!r}")
    if output_space == "in1k" and width != 1000:
        raise ConfigError(f"{where}: output space 'in1k' needs 1000 outputs, the model has {width}")
    if output_space == "in9" and width < NUM_IN9:
        raise ConfigError(f"{where}: output space 'in9' needs at least 9 outputs, the model has {width}")
    return output_space


def _triple(v, name: str) -> tuple[float, float, float] | None:
    if v is None:
        return None
    t = tuple(float(x) for x in (v.flatten().tolist() if isinstance(v, torch.Tensor) else v))
    if len(t) != 3:
        raise ConfigError(f"expected 3 values for {name}, got {len(t)}: {t}")
    if name == "std" and any(x <= 0 for x in t):
        raise ConfigError(f"expected positive std, got {t}")
    return t


@dataclasses.dataclass
class _Built:
    """A module on its way to a :class:`LoadedModel`, with what its file said about it."""

    module: nn.Module
    arch: str | None = None
    width: int | None = None  # known without a probe when bgsynth built the module
    mean: tuple | None = None
    std: tuple | None = None
    geometry: Any = None
    output_space: str | None = None


def _read_weights(path: pathlib.Path, trust: bool, prov: dict) -> tuple[Any, dict, str]:
    """Read a checkpoint file and find the weights in it -> (state_dict or module, the outer dict, where found);
    records the file, its hash, how it was read and the layout in ``prov``."""
    obj, how = _read_file(path, trust)
    prov.update(file=str(path.resolve()), sha256=_sha256(path), read_as=how)
    found, outer, where = _unwrap(obj, path)
    prov["layout"] = "torchscript" if how == "torchscript" and isinstance(found, nn.Module) else where
    return found, outer, where


def _bgsynth_extras(outer: Mapping, built: _Built) -> _Built:
    """The normalisation and crop geometry a bgsynth checkpoint (:func:`save_checkpoint`) stores."""
    if outer.get("format") == CHECKPOINT_FORMAT:
        built.mean = _triple(outer.get("mean"), "mean") or built.mean
        built.std = _triple(outer.get("std"), "std") or built.std
        built.geometry = outer.get("geometry")
    return built


def _from_checkpoint(path: pathlib.Path, trust: bool, num_classes: int | None, prov: dict) -> _Built:
    """A checkpoint file given as ``--model``: a bgsynth checkpoint, a dict with ``'arch'`` (plain or official
    layout), a TorchScript archive or a pickled module."""
    found, outer, _where = _read_weights(path, trust, prov)
    if isinstance(found, nn.Module):  # TorchScript or a (trusted) pickled module
        built = _Built(found, outer.get("arch") if isinstance(outer.get("arch"), str) else None)
    else:
        arch = outer.get("arch")
        if not isinstance(arch, str):
            raise CheckpointError(
                f"{path}: a plain state_dict does not say which architecture it belongs to; pass the "
                f"architecture as --model and the file as --weights (e.g. --model resnet50 --weights {path})"
            )
        module, width, (mean, std) = _build_and_load(arch, found, outer.get("num_classes", num_classes), path, prov)
        built = _Built(module, arch, width, mean, std)
    if outer.get("format") == CHECKPOINT_FORMAT:
        _bgsynth_extras(outer, built)
        if outer.get("output_space") in OUTPUT_SPACES:
            built.output_space = outer["output_space"]
        for k in ("epoch", "train", "metrics"):
            if k in outer:
                prov[k] = outer[k]
    return built


def _from_arch(spec: str, path: pathlib.Path, num_classes: int | None, prov: dict) -> _Built:
    """An architecture name without weights: randomly initialised from seed 0 (torch's global generator is left as
    it was), so the same name gives the same weights in every run: a run on it can be resumed, and its output
    folder's fingerprint (:func:`bgsynth.results.model_digest`) does not change from one run to the next."""
    if any(sep in spec for sep in ("/", "\\")) or path.suffix in (".pt", ".pth", ".bin", ".ckpt", ".safetensors"):
        raise CheckpointError(f"{spec}: checkpoint file not found")
    width = NUM_IN9 if num_classes is None else int(num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = create_model(spec, width)
    prov.update(layout="random_init", init_seed=0)
    return _Built(module, spec, width)


def _from_weights(arch: str, weights: str | os.PathLike, trust: bool, num_classes: int | None, prov: dict) -> _Built:
    """An architecture name with a weights file (plain state_dict, nested, prefixed, official layout, bgsynth)."""
    wpath = pathlib.Path(os.fspath(weights))
    if not wpath.is_file():
        raise CheckpointError(f"{wpath}: weights file not found")
    found, outer, _where = _read_weights(wpath, trust, prov)
    if isinstance(found, nn.Module):
        raise CheckpointError(
            f"{wpath}: holds a whole module, not weights for {arch!r}; pass it as --model {wpath} instead"
        )
    n = num_classes if num_classes is not None else outer.get("num_classes")
    module, width, (mean, std) = _build_and_load(arch, found, n, wpath, prov)
    return _bgsynth_extras(outer, _Built(module, arch, width, mean, std))


def _finish(built: _Built, output_space: str | None, mean, std, probe_size: int, prov: dict) -> LoadedModel:
    """Eval mode, float32, the output width and space, the normalisation; the provenance record completed."""
    module = built.module.eval()
    if not isinstance(module, torch.jit.ScriptModule):
        module = module.float()
    geometry = built.geometry if isinstance(built.geometry, Mapping) else None
    crop = int(geometry["crop"]) if geometry is not None and "crop" in geometry else int(probe_size)
    width = _output_width(module, crop) if built.width is None else built.width
    if output_space in (None, "auto") and built.output_space is not None:
        output_space = built.output_space
    space = _resolve_space(width, output_space, prov.get("file", prov["spec"]))
    dm, ds = default_normalization(space)
    m = _triple(mean, "mean") or built.mean or dm
    s = _triple(std, "std") or built.std or ds
    prov.update(arch=built.arch, num_outputs=width, output_space=space, mean=list(m), std=list(s))
    if built.mean is not None:
        prov["normalization_from_checkpoint"] = True
    try:
        prov["parameters"] = int(sum(p.numel() for p in module.parameters()))
    except Exception:  # noqa: BLE001 - some scripted modules do not expose parameters
        pass
    return LoadedModel(module, width, space, m, s, built.arch, dict(geometry) if geometry is not None else None, prov)


def load_model(
    spec: str | os.PathLike,
    weights: str | os.PathLike | None = None,
    trust_checkpoint: bool = False,
    num_classes: int | None = None,
    output_space: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    probe_size: int = 224,
) -> LoadedModel:
    """Resolve a ``--model`` specification into a :class:`LoadedModel`.

    Accepted forms:

    * an architecture name (``'bgsynth_cnn'``, any torchvision or timm name): randomly initialised with
      ``num_classes`` outputs (default 9), or loaded from ``weights``;
    * a checkpoint file: bgsynth's own format (:func:`save_checkpoint`, architecture included), a TorchScript
      archive, a pickled full module (only with ``trust_checkpoint``), or a dict with an ``'arch'`` entry;
    * an architecture name with ``weights`` = a state_dict file: at top level or nested under ``'model'`` /
      ``'state_dict'``, with ``module.`` / ``model.`` prefixes stripped where needed, or in the normaliser-wrapped
      layout of the official backgrounds-challenge checkpoints (``module.normalizer.new_mean/new_std`` +
      ``module.model.*``, whose stored mean/std then become the default normalisation).

    Weights must match the architecture exactly: missing, unexpected or mis-shaped keys raise
    :class:`CheckpointError` listing a few. When ``num_classes`` is not given, the classifier width is taken
    from the weights.

    Args:
        spec: architecture name or checkpoint path.
        weights: weights file for an architecture name.
        trust_checkpoint: allow unpickling arbitrary Python objects (only for files you trust).
        num_classes: output width of a freshly created architecture.
        output_space: ``'in9'``, ``'in1k'``, ``'custom'`` or ``None``/``'auto'`` (from the output width: 9 -> in9,
            1000 -> in1k, any other -> custom, scored through :func:`resolve_output_map`).
        mean, std: override the input normalisation.
        probe_size: input side used for one dummy forward when the output width must be measured.

    Returns:
        A :class:`LoadedModel` in eval mode on the CPU.

    Raises:
        CheckpointError: unreadable, unsafe (without trust) or mismatching checkpoint.
        ConfigError: unknown architecture or inconsistent options.
    """
    spec_s = os.fspath(spec)
    path = pathlib.Path(spec_s)
    prov: dict[str, Any] = {"spec": spec_s, "trust_checkpoint": bool(trust_checkpoint)}
    if weights is not None:
        built = _from_weights(spec_s, weights, trust_checkpoint, num_classes, prov)
    elif path.is_file():
        built = _from_checkpoint(path, trust_checkpoint, num_classes, prov)
    else:
        built = _from_arch(spec_s, path, num_classes, prov)
    return _finish(built, output_space, mean, std, probe_size, prov)


def _build_and_load(arch: str, sd: Mapping[str, torch.Tensor], num_classes: int | None, path: pathlib.Path, prov: dict):
    """Create ``arch`` and load ``sd`` into it exactly (normaliser layout handled) -> (module, width, (mean, std))."""
    net_sd, mean, std, wrapped = _split_normalizer(sd)
    if wrapped:
        prov["layout"] = prov.get("layout", "") + " (normaliser-wrapped: module.normalizer + module.model)"
    else:
        net_sd = dict(sd)
    n = NUM_IN9 if num_classes is None else int(num_classes)
    module = create_model(arch, n)
    if num_classes is None:
        w = _classifier_width(module, net_sd, n)
        if w is not None:
            module, n = create_model(arch, w), w
    stripped = _load_exact(module, net_sd, f"{path} (as {arch})")
    if stripped:
        prov["stripped_prefix"] = stripped
    return module, n, (mean, std)


def save_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    arch: str,
    num_classes: int,
    extra: Mapping[str, Any] | None = None,
) -> pathlib.Path:
    """Save a model as a plain dict that ``torch.load(weights_only=True)`` and :func:`load_model` both read.

    The dict holds ``format`` (``'bgsynth-checkpoint'``), ``arch``, ``num_classes``, ``state_dict`` (CPU tensors,
    wrapper prefixes removed), ``mean``/``std`` (defaults of the output space unless given in ``extra``),
    ``geometry`` (``None`` unless given) and anything else in ``extra`` (plain Python values only).

    Args:
        model: the network (a ``torch.compile``-d or DataParallel/DDP-wrapped one is unwrapped).
        path: output file (written atomically).
        arch: architecture name that :func:`create_model` accepts.
        num_classes: output width.
        extra: additional entries, e.g. ``{'geometry': {'resize': 72, 'crop': 64}, 'epoch': 3}``.

    Returns:
        The path written.
    """
    net = model
    while True:
        if hasattr(net, "_orig_mod"):
            net = net._orig_mod
        elif isinstance(net, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            net = net.module
        else:
            break
    space = "in1k" if int(num_classes) == 1000 else "in9"
    dm, ds = default_normalization(space)
    extra = dict(extra or {})
    geom = extra.pop("geometry", None)
    if geom is not None and hasattr(geom, "to_dict"):
        geom = geom.to_dict()
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "arch": str(arch),
        "num_classes": int(num_classes),
        "state_dict": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()},
        "mean": list(_triple(extra.pop("mean", None), "mean") or dm),
        "std": list(_triple(extra.pop("std", None), "std") or ds),
        "geometry": geom,
    }
    ckpt.update(extra)
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    path = pathlib.Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path


# --------------------------------------------------------------------------------------------------------------
# Prediction
# --------------------------------------------------------------------------------------------------------------


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(e, RuntimeError) and "out of memory" in str(e).lower()


@dataclasses.dataclass(frozen=True)
class PredictorConfig:
    """How a :class:`Predictor` runs its model (the device and autocast are resolved by :mod:`bgsynth.config`).

    Attributes:
        channels_last: memory format; ``None`` = on for CUDA, off on CPU.
        compile: wrap the module in ``torch.compile`` (falls back to eager with a warning if compiling fails).
        label_protocol: ``'official'`` (top-1 over all outputs, then mapped; an output that maps to no class
            counts as -1 = wrong) or ``'restricted'`` (argmax over the outputs that map to a class only; for a
            1000-class model on IN-9 the 370 mapped ImageNet classes). The same under the identity map.
        mean, std: override the loaded model's normalisation.
        max_batch: largest chunk per forward (``None``: the whole input); halved on out-of-memory.
    """

    channels_last: bool | None = None
    compile: bool = False
    label_protocol: str = "official"
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    max_batch: int | None = None

    def __post_init__(self):
        if self.label_protocol not in LABEL_PROTOCOLS:
            raise ConfigError(f"Predictor: expected label_protocol in {LABEL_PROTOCOLS}, got {self.label_protocol!r}")
        if self.max_batch is not None and (not isinstance(self.max_batch, int) or self.max_batch < 1):
            raise ConfigError(f"Predictor: expected max_batch >= 1 or None, got {self.max_batch!r}")


def _predictor_config(config: PredictorConfig | None, options: Mapping[str, Any]) -> PredictorConfig:
    """``config`` (default :class:`PredictorConfig`) with the keyword ``options`` applied; unknown names are an
    error that lists the valid ones."""
    fields = {f.name for f in dataclasses.fields(PredictorConfig)}
    unknown = sorted(k for k in options if k not in fields)
    if unknown:
        raise ConfigError(f"Predictor: unknown option(s) {unknown}; expected device, amp, config or PredictorConfig "
                          f"fields {sorted(fields)}")
    config = PredictorConfig() if config is None else config
    return dataclasses.replace(config, **options) if options else config


def check_label_space(predictor, index, owner: str) -> None:
    """Refuse a predictor that answers in another label space than the index it is scored on.

    A :class:`Predictor` names its classes (``label_space``); predictors without one (test doubles, user
    objects that return the index's class ids) are taken at their word.
    """
    space = getattr(predictor, "label_space", None)
    if space is not None and space != index.label_space:
        raise ConfigError(f"{owner}: the predictor answers in the label space {space.name!r} ({space.num_classes} "
                          f"classes) but {index.path or 'the index'} holds {index.label_space.name!r} "
                          f"({index.label_space.num_classes} classes); make it with "
                          f"Predictor(..., label_space=index.label_space)")


class Predictor:
    """Batched inference for a :class:`LoadedModel`, returning class ids of a label space (IN-9 by default).

    Inputs are composites already normalised with :attr:`mean`/:attr:`std`, in :attr:`input_dtype` and (when
    :attr:`channels_last`) the channels-last memory format; :meth:`prepare` makes them from uint8 images.

    The label space is the one of the index the predictions are scored on: pass ``label_space=index.label_space``
    (IN-9 when not given, so ``Predictor(loaded, device=..., label_protocol=...)`` scores IN-9 exactly as before).
    The model's outputs map onto it by :func:`resolve_output_map`: the identity when the widths match, the
    IN-1000 -> IN-9 map for a 1000-class model on IN-9, or ``output_map`` (``--output-map``); anything else is a
    :class:`ConfigError` here, before any work.

    Args:
        loaded: the model; its module is moved to ``device`` (and to channels_last) in place, not copied.
        device: where to run it (:func:`bgsynth.config.resolve_device`: ``'cpu'``, ``'cuda'``, ``'cuda:1'``,
            ``'auto'``).
        amp: ``None``/``'none'`` (full precision), ``'bf16'``, ``'fp16'`` or ``'auto'`` (bf16 on CUDA when
            supported, else off; :func:`bgsynth.config.resolve_amp`).
        config: how to run it (:class:`PredictorConfig`).
        label_space: the classes predictions are given in (:class:`~bgsynth.classes.LabelSpace`; default IN-9).
        output_map: an :class:`~bgsynth.classes.OutputMap` or the path of a JSON map ``{output: class}``.
        **options: :class:`PredictorConfig` fields by name (``channels_last=``, ``compile=``,
            ``label_protocol=``, ``mean=``, ``std=``, ``max_batch=``), overriding ``config``.

    Attributes:
        forwards: number of images forwarded so far.
        label_space, num_classes, output_map: what predictions mean.

    >>> p = Predictor(load_model("bgsynth_cnn"))
    >>> y = p.predict(p.prepare(torch.zeros(3, 3, 32, 32, dtype=torch.uint8)))
    >>> y.dtype, y.shape, p.forwards, p.output_map.name
    (torch.int64, torch.Size([3]), 3, 'identity')
    """

    # size: the resolved placement (device, amp), the job config and the label space it answers in
    def __init__(self, loaded: LoadedModel, device: str | torch.device = "cpu", amp: str | None = None,
                 config: PredictorConfig | None = None, *, label_space: LabelSpace | None = None,
                 output_map: OutputMap | str | os.PathLike | None = None, **options):
        if not isinstance(loaded, LoadedModel):
            raise ConfigError(f"Predictor: expected a LoadedModel, got {type(loaded).__name__}")
        if label_space is not None and not isinstance(label_space, LabelSpace):
            raise ConfigError(f"Predictor: expected a LabelSpace (index.label_space), got {type(label_space).__name__}")
        config = _predictor_config(config, options)
        self.loaded = loaded
        self.config = config
        self.label_space = IN9 if label_space is None else label_space
        self.num_classes = self.label_space.num_classes
        self.output_map = loaded.output_map(self.label_space, output_map)  # a bad combination fails before any work
        self.device = resolve_device(device)
        self.amp = resolve_amp(amp, self.device)
        cl = config.channels_last
        self.channels_last = (self.device.type == "cuda") if cl is None else bool(cl)
        self.label_protocol = config.label_protocol
        self.output_space = loaded.output_space
        self.num_outputs = loaded.num_outputs
        self.mean = _triple(config.mean, "mean") or tuple(loaded.mean)
        self.std = _triple(config.std, "std") or tuple(loaded.std)
        self.max_batch = config.max_batch
        self.forwards = 0
        self.oom_backoffs = 0
        self._place_module(loaded.module, config.compile)
        param = next((p for p in self._eager.parameters() if p.is_floating_point()), None)
        self.param_dtype = param.dtype if param is not None else torch.float32
        self.input_dtype = AMP_DTYPES[self.amp] if self.amp is not None else self.param_dtype

    def _place_module(self, module: nn.Module, compile: bool) -> None:
        """The module on the device, in eval mode and its memory format, compiled when asked."""
        module = module.to(self.device).eval()
        if self.channels_last and not isinstance(module, torch.jit.ScriptModule):
            module = module.to(memory_format=torch.channels_last)
        self.module = module
        self._eager = module
        self._compiled = False
        if compile:
            try:
                self.module = torch.compile(module)
                self._compiled = True
            except Exception as e:  # noqa: BLE001 - compile support varies by platform
                warnings.warn(f"torch.compile unavailable ({e}); running eagerly", stacklevel=3)

    # ------------------------------------------------------------------------------------------ helpers
    def describe(self) -> dict:
        """JSON-able settings (recorded in results)."""
        return {
            "device": str(self.device),
            "amp": self.amp,
            "channels_last": self.channels_last,
            "compile": self._compiled,
            "label_protocol": self.label_protocol,
            "output_space": self.output_space,
            "label_space": self.label_space.name,
            "num_classes": self.num_classes,
            "output_map": self.output_map.name,
            "mean": list(self.mean),
            "std": list(self.std),
            "input_dtype": str(self.input_dtype).replace("torch.", ""),
        }

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, 3, H, W]`` images -> normalised model input (device, dtype, memory format).

        The composites of :func:`bgsynth.variants.synthesize` are made this way in one fused pass; this is for
        callers that hold plain uint8 images.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ConfigError(f"Predictor.prepare: expected images [B, 3, H, W], got {tuple(images.shape)}")
        x = images.to(self.device, non_blocking=True)
        dt = torch.float64 if self.input_dtype == torch.float64 else torch.float32
        mean = torch.tensor(self.mean, dtype=dt, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=dt, device=self.device).view(1, 3, 1, 1)
        x = ((x.to(dt) / 255.0 - mean) / std).to(self.input_dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.amp is not None:
            with torch.autocast(device_type=self.device.type, dtype=AMP_DTYPES[self.amp]):
                y = self.module(x)
        else:
            y = self.module(x)
        if isinstance(y, (tuple, list)):
            y = y[0]
        return y

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        try:
            return self._forward(x)
        except Exception as e:  # noqa: BLE001
            if _is_oom(e) or not self._compiled:
                raise
            warnings.warn(f"torch.compile failed at the first call ({type(e).__name__}: {e}); running eagerly", stacklevel=3)
            self.module, self._compiled = self._eager, False
            return self._forward(x)

    # ------------------------------------------------------------------------------------------ public
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Raw model outputs ``float32 [B, num_outputs]`` for normalised input ``x`` ``[B, 3, H, W]``.

        Runs in inference mode, in chunks of at most :attr:`max_batch`; on CUDA out-of-memory the chunk is halved
        (and remembered) and the run goes on; it fails only if a single image does not fit.
        """
        if x.ndim != 4:
            raise ConfigError(f"Predictor.logits: expected a batch [B, C, H, W], got shape {tuple(x.shape)}")
        n = int(x.shape[0])
        if n == 0:
            return torch.empty(0, self.num_outputs, dtype=torch.float32, device=self.device)
        if x.device != self.device:
            x = x.to(self.device, non_blocking=True)
        outs: list[torch.Tensor] = []
        start = 0
        with torch.inference_mode():
            while start < n:
                chunk = n - start if self.max_batch is None else min(self.max_batch, n - start)
                try:
                    y = self._call(x[start : start + chunk])
                except Exception as e:  # noqa: BLE001
                    if not _is_oom(e):
                        raise
                    if chunk <= 1:
                        raise
                    del e
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()
                    self.max_batch = max(1, chunk // 2)
                    self.oom_backoffs += 1
                    warnings.warn(
                        f"out of memory with {chunk} images per forward; continuing with {self.max_batch}",
                        stacklevel=2,
                    )
                    continue
                outs.append(y.float())
                self.forwards += chunk
                start += chunk
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def labels_from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Class ids ``int64 [B]`` of the label space from logits, through :attr:`output_map` under this predictor's
        label protocol (-1 = an output that maps to no class)."""
        if logits.ndim != 2 or logits.shape[1] != self.num_outputs:
            raise ConfigError(
                f"labels_from_logits: expected logits [B, {self.num_outputs}], got {tuple(logits.shape)}"
            )
        return self.output_map.predict(logits, self.label_protocol)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Class ids ``int64 [B]`` of the label space (on the predictor's device) for normalised input ``x``."""
        return self.labels_from_logits(self.logits(x))

    __call__ = predict
