"""The closed sets of diffprobe, defined once. Config parsing, modules and CLIs all use these.

A `StrEnum` member is its string (``Recipe.SGD == "sgd"``), so configs, ledgers and JSON keep
plain strings.
"""

from __future__ import annotations

from enum import StrEnum


class Preset(StrEnum):
    """Named U-Net architectures (their flags: `diffprobe.extract.unet.PRESETS`)."""

    TINY = "tiny"
    ADM_256_UNCOND = "adm-256-uncond"


class Source(StrEnum):
    DIGITS = "digits"
    IMAGEFOLDER = "imagefolder"
    SEGFOLDER = "segfolder"


class OnCorrupt(StrEnum):
    ERROR = "error"
    SKIP = "skip"


class Autocast(StrEnum):
    NONE = "none"
    BF16 = "bf16"
    FP16 = "fp16"


class LoaderKind(StrEnum):
    """What runs `extract run`'s loaders: threads (PIL and torch release the GIL) or processes."""

    THREAD = "thread"
    PROCESS = "process"


class Cluster(StrEnum):
    LOCAL = "local"
    DASK_CUDA = "dask-cuda"


class Dtype(StrEnum):
    FLOAT16 = "float16"
    FLOAT32 = "float32"


class Codec(StrEnum):
    NONE = "none"
    ZSTD = "zstd"
    BLOSC_LZ4 = "blosc-lz4"


class Recipe(StrEnum):
    """Linear-probe recipes: the paper's SGD grid, or full-batch L-BFGS."""

    SGD = "sgd"
    LBFGS = "lbfgs"


class Estimator(StrEnum):
    """CKA estimators (`diffprobe.analyze.cka`)."""

    LINEAR = "linear"
    LINEAR_UNBIASED = "linear-unbiased"
    RBF = "rbf"
    RBF_UNBIASED = "rbf-unbiased"
    MINIBATCH = "minibatch"


class Precision(StrEnum):
    FLOAT32 = "float32"
    FLOAT64 = "float64"


class Head(StrEnum):
    """What a ledger row's ``head`` column can say."""

    LINEAR = "linear"
    ATTENTION = "attention"
    FUSION = "fusion"
    FEEDBACK = "feedback"
    KNN = "knn"
    SEGMENT = "segment"


class KnnMetric(StrEnum):
    """Similarities of `probe knn` and `analyze align` (`diffprobe.probe.neighbours`)."""

    COSINE = "cosine"
    L2 = "l2"


class KnnWeighting(StrEnum):
    """Votes of `probe knn`: DINOv2's exp(similarity / T), or a plain majority."""

    EXP = "exp"
    UNIFORM = "uniform"


class AlignMetric(StrEnum):
    """kNN alignment metrics of `analyze align` (`diffprobe.analyze.knn`)."""

    MUTUAL_KNN = "mutual-knn"
    CKNNA = "cknna"


class Optimizer(StrEnum):
    """Optimisers of the dense linear head (`probe segment`)."""

    ADAMW = "adamw"
    SGD = "sgd"


def allowed(choices: type[StrEnum]) -> str:
    """``'a', 'b', 'c'``: the allowed values, as every error message lists them."""
    return ", ".join(repr(c.value) for c in choices)
