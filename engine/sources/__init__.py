"""Sources: everything that turns a dataset on disk into a :class:`~bgsynth.index.DatasetIndex`.

* :func:`ingest_imagenet`: ImageNet class folders (or a flat val folder + labels file) with ILSVRC XML boxes.
* :func:`ingest_in9_release`: the released IN-9 layout (``<variant>/val/<NN_name>`` + ``fg_mask`` ``.npy``).
* :func:`ingest_coco`: any COCO instance-mask JSON with a category -> IN-9 map.
* :func:`build_builtin_dataset` / :func:`load_builtin_index`: the procedural built-in dataset.

Every ingest probes each image robustly (:func:`bgsynth.probe.probe_file`): bad files become rejects with a reason, never a
crash; an ingest fails (:class:`IngestError`) only when nothing valid remains.
"""

from ..probe import ProbeResult, probe_file
from ._probe import IngestError, WorkerPoolError
from .coco import CocoIngestConfig, ingest_coco, read_category_map
from .imagenet import ingest_imagenet, read_labels_file
from .in9_release import ingest_in9_release
from .synthetic import BuiltinSpec, build_builtin_dataset, default_cache_dir, load_builtin_index

__all__ = [
    "IngestError",
    "WorkerPoolError",
    "ProbeResult",
    "probe_file",
    "ingest_imagenet",
    "read_labels_file",
    "ingest_in9_release",
    "ingest_coco",
    "CocoIngestConfig",
    "read_category_map",
    "build_builtin_dataset",
    "BuiltinSpec",
    "default_cache_dir",
    "load_builtin_index",
]
