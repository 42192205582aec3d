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
    SEGMENT = "segment"


class Optimizer(StrEnum):
    """Optimisers of the dense linear head (`probe segment`)."""

    ADAMW = "adamw"
    SGD = "sgd"


def allowed(choices: type[StrEnum]) -> str:
    """``'a', 'b', 'c'``: the allowed values, as every error message lists them."""
    return ", ".join(repr(c.value) for c in choices)
