"""Sources: everything that turns a dataset on disk into a :class:`~bgsynth.index.DatasetIndex`.

* :func:`ingest_imagenet`: ImageNet class folders (or a flat val folder + labels file) with ILSVRC XML boxes, as
  IN-9 or all 1000 ImageNet-1k classes.
* :func:`ingest_in9_release`: the released IN-9 layout (``<variant>/val/<NN_name>`` + ``fg_mask`` ``.npy``).
* :func:`ingest_coco`: any COCO instance-mask JSON with a category -> IN-9 map, or its own categories as the labels.
* :func:`ingest_masks`: a folder of images plus a mirrored folder of PNG segmentation masks (ImageNet-S, VOC, CUB).
* :func:`build_builtin_dataset` / :func:`load_builtin_index`: the procedural built-in dataset.

Every ingest probes each image robustly (:func:`bgsynth.probe.probe_file`): bad files (and file names an index could
not hold) become rejects with a reason, never a crash; an ingest fails (:class:`IngestError`) only when it finds no
image at all or nothing valid remains.
"""

from ..probe import ProbeResult, probe_file
from ._probe import IngestError, WorkerPoolError, pool_context, run_pool, start_worker, watch_parent
from .coco import CocoIngestConfig, ingest_coco, read_category_map
from .imagenet import in1k_label_space, ingest_imagenet, read_labels_file
from .in9_release import ingest_in9_release
from .mask_folder import MaskIngestConfig, ingest_masks
from .synthetic import BuiltinSpec, build_builtin_dataset, default_cache_dir, load_builtin_index

__all__ = [
    "IngestError",
    "WorkerPoolError",
    "run_pool",
    "pool_context",
    "start_worker",
    "watch_parent",
    "ProbeResult",
    "probe_file",
    "ingest_imagenet",
    "in1k_label_space",
    "read_labels_file",
    "ingest_masks",
    "MaskIngestConfig",
    "ingest_in9_release",
    "ingest_coco",
    "CocoIngestConfig",
    "read_category_map",
    "build_builtin_dataset",
    "BuiltinSpec",
    "default_cache_dir",
    "load_builtin_index",
]
