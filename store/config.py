"""pipeline.toml as one frozen, typed config tree.

    cfg = load_config("pipeline.toml", overrides={"extract.blocks": "19,24"})
    cfg.extract.blocks   # (19, 24)

Every key is declared once below with its default and its parser; the parser's error names
the dotted key, the value and what is allowed. Unknown keys are errors. The defaults here
are the embedded default; pipeline.toml at the repository root documents every key and
holds the same values (a test checks that).
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from .choices import (
    AlignMetric,
    Autocast,
    Cluster,
    Codec,
    Dtype,
    Estimator,
    KnnMetric,
    KnnWeighting,
    LoaderKind,
    OnCorrupt,
    Optimizer,
    Precision,
    Preset,
    Recipe,
    Source,
)
from .errors import ConfigError
from .ranges import parse_int_list

# ------------------------------------------------------------------ field parsers


def _int(lo=None, hi=None):
    def parse(v, key):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{key}: expected an integer, got {v!r}")
        _range(v, key, lo, hi)
        return v

    return parse


def _float(lo=None, hi=None):
    def parse(v, key):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {v!r}")
        _range(v, key, lo, hi)
        return float(v)

    return parse


def _range(v, key, lo, hi):
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        bounds = f">= {lo}" if hi is None else f"<= {hi}" if lo is None else f"in {lo}..{hi}"
        raise ConfigError(f"{key}: {v!r} is out of range; allowed: {bounds}")


def _choice(choices: type[StrEnum], *extra: str):
    """A value of the closed set ``choices`` (plus ``extra``), kept as its plain string."""
    options = (*extra, *(c.value for c in choices))

    def parse(v, key):
        if v not in options:
            raise ConfigError(f"{key}: {v!r} is not allowed; allowed: {', '.join(map(repr, options))}")
        return v

    return parse


def _bool(v, key):
    if not isinstance(v, bool):
        raise ConfigError(f"{key}: expected true or false, got {v!r}")
    return v


def _str(v, key):
    if not isinstance(v, str):
        raise ConfigError(f"{key}: expected a string, got {v!r}")
    return v


def _device(v, key):
    _str(v, key)
    if v in ("auto", "cpu", "cuda", "mps") or (v.startswith("cuda:") and v[5:].isdigit()):
        return v
    raise ConfigError(f"{key}: {v!r} is not a device; allowed: 'auto', 'cpu', 'cuda', 'cuda:N', 'mps'")


def _int_list(lo=None, hi=None):
    def parse(v, key):
        values = parse_int_list(v, key)
        for x in values:
            _range(x, key, lo, hi)
        return values

    return parse


def _float_list(lo=None, hi=None):
    def parse(v, key):
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            v = [v]
        if isinstance(v, str):
            try:
                v = [float(s) for s in v.replace(" ", "").split(",")]
            except ValueError:
                raise ConfigError(f"{key}: cannot read {v!r}; use numbers like '0.001,0.01,0.1'") from None
        if not isinstance(v, (list, tuple)) or not v:
            raise ConfigError(f"{key}: expected a non-empty list of numbers, got {v!r}")
        return tuple(_float(lo, hi)(x, key) for x in v)

    return parse


def _str_list(v, key):
    if isinstance(v, str):
        v = [s.strip() for s in v.split(",")]
    if not isinstance(v, (list, tuple)) or not v or not all(isinstance(s, str) and s for s in v):
        raise ConfigError(f"{key}: expected a non-empty list of names, got {v!r}")
    if len(set(v)) != len(v):
        raise ConfigError(f"{key}: names repeat in {v!r}")
    return tuple(v)


def _crop_scale(v, key):
    """guided-diffusion's random_crop_arr fractions [min, max]: 0 < min <= max <= 1."""
    if (
        not isinstance(v, (list, tuple))
        or len(v) != 2
        or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
        or not 0 < v[0] <= v[1] <= 1
    ):
        raise ConfigError(f"{key}: {v!r} is not allowed; allowed: [min, max] with 0 < min <= max <= 1")
    return (float(v[0]), float(v[1]))


def _flip(v, key):
    if v == "auto" or isinstance(v, bool):
        return v
    raise ConfigError(f"{key}: {v!r} is not allowed; allowed: 'auto', true, false")


def per_split(value, split: str) -> int:
    """A count that is one integer for every split, or a per-split table (a split not named: 1)."""
    return value if isinstance(value, int) else dict(value).get(split, 1)


def _per_split_count(lo: int, hi: int):
    """An integer for every split, or a table {split = integer} (a TOML table or [[split, n], ...])."""

    def parse(v, key):
        if isinstance(v, dict):
            v = list(v.items())
        if isinstance(v, (list, tuple)) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in v):
            out = []
            for split, n in v:
                if not isinstance(split, str) or not split:
                    raise ConfigError(f"{key}: {split!r} is not a split name")
                out.append((split, _int(lo, hi)(n, f"{key}.{split}")))
            return tuple(sorted(out))
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{key}: expected an integer or a table {{split = integer}}, got {v!r}")
        return _int(lo, hi)(v, key)

    return parse


def _arch(v, key):
    # Architecture flags overriding the preset; extract.unet.ModelSpec checks names and types.
    if not isinstance(v, dict):
        raise ConfigError(f"{key}: expected a table of guided-diffusion flags, got {v!r}")
    return tuple(sorted(v.items()))


def _key(default, parse, doc):
    return field(default=default, metadata={"parse": parse, "doc": doc})


# ------------------------------------------------------------------ the tree


@dataclass(frozen=True)
class DataConfig:
    source: str = _key("digits", _choice(Source), "image source")
    root: str = _key("", _str, "ImageFolder root holding one folder per split")
    splits: tuple[str, ...] = _key(("train", "val"), _str_list, "splits to extract")
    val_fraction: float = _key(0.2, _float(0.01, 0.99), "digits: fraction held out as val")
    split_seed: int = _key(0, _int(0), "digits: seed of the stratified split")
    max_per_class: int = _key(0, _int(0), "keep the first N images of each class (0 = all)")
    on_corrupt: str = _key("error", _choice(OnCorrupt), "unreadable image: stop, or record as skipped")
    decode_threads: int = _key(4, _int(1, 256), "threads decoding image files")
    masks: bool = _key(
        False, _bool, "store segmentation masks (digits: derived from the strokes; segfolder: required true)"
    )
    crop_scale: tuple[float, float] = _key(
        (0.8, 1.0), _crop_scale, "views >= 1: guided-diffusion random_crop_arr's [min, max] crop fractions"
    )
    flip: bool | str = _key(
        "auto", _flip, "views >= 1: horizontal flip with p 0.5 (auto: off for digits, on otherwise)"
    )


@dataclass(frozen=True)
class ModelConfig:
    preset: str = _key("tiny", _choice(Preset), "named architecture")
    checkpoint: str = _key("", _str, "state dict path ('' = the shipped tiny weights)")
    arch: tuple = _key((), _arch, "guided-diffusion flags overriding the preset")


@dataclass(frozen=True)
class ExtractConfig:
    blocks: tuple[int, ...] = _key(tuple(range(1, 38)), _int_list(1), "blocks to keep")
    timesteps: tuple[int, ...] = _key((30, 90, 150, 300, 600, 900), _int_list(0), "timesteps t")
    pools: tuple[int, ...] = _key((1, 2), _int_list(1, 64), "adaptive-average-pool sizes p")
    batch_size: int = _key(64, _int(1, 65536), "images read, noised and written per step")
    forward_batch: int = _key(
        0,
        _int(0, 65536),
        "rows of every U-Net call (fixed: bit-identity); 0 = auto: the store's, else at most 32 with the least padding",
    )
    device: str = _key("auto", _device, "torch device")
    autocast: str = _key("none", _choice(Autocast), "autocast dtype of the U-Net")
    noise_seed: int = _key(0, _int(0, 2**63 - 1), "seed of the per-(image, t) noise")
    threads: int = _key(0, _int(0, 1024), "torch CPU threads (0 = torch's default)")
    workers: int = _key(0, _int(0, 4096), "worker processes of a local dask cluster (0 = this process alone)")
    scheduler: str = _key("", _str, "address of an existing dask.distributed scheduler ('' = none)")
    threads_per_worker: int = _key(
        0,
        _int(0, 1024),
        "torch CPU threads of each dask worker (0 = cores / workers on a local cluster, torch's default on a remote one)",
    )
    cluster: str = _key("local", _choice(Cluster), "kind of local cluster for `workers`")
    loaders: int = _key(
        2, _int(0, 256), "loader workers reading, preprocessing and noising batches ahead (0 = in line)"
    )
    loader_kind: str = _key("thread", _choice(LoaderKind), "what runs the loaders: threads or processes")
    prefetch: int = _key(4, _int(1, 1024), "ready batches the loaders hold ahead of the model")
    write_behind: int = _key(1, _int(0, 64), "chunks written while the next computes (0 = write in line)")
    channels_last: bool = _key(False, _bool, "run the U-Net in channels-last memory format")
    compile: bool = _key(False, _bool, "torch.compile the U-Net's layers (compile time reported apart)")
    views: int | tuple = _key(
        1, _per_split_count(1, 4096), "views per image: the center crop, then random crops/flips (int or per split)"
    )
    noise_draws: int | tuple = _key(
        1, _per_split_count(1, 4096), "noise draws of the center crop per (image, t) (int or per split)"
    )


@dataclass(frozen=True)
class StoreConfig:
    path: str = _key("runs/digits-tiny.zarr", _str, "the Zarr store")
    chunk_images: int = _key(512, _int(1, 1 << 20), "images per chunk")
    dtype: str = _key("float16", _choice(Dtype), "feature dtype")
    codec: str = _key("none", _choice(Codec), "compression of feature chunks")


@dataclass(frozen=True)
class ProbeConfig:
    recipe: str = _key("sgd", _choice(Recipe), "linear-probe recipe")
    seed: int = _key(0, _int(0, 2**63 - 1), "seed of the held-out selection, initialisation and batch order")
    holdout_fraction: float = _key(0.1, _float(0.01, 0.5), "fraction of train held out to choose hyperparameters")
    device: str = _key("auto", _device, "torch device of the probe")
    threads: int = _key(0, _int(0, 1024), "torch CPU threads of the probe (0 = torch's default)")
    ledger: str = _key("probe-results.csv", _str, "results ledger (CSV), relative to the store's folder")
    pool: int = _key(2, _int(1, 1024), "pool p that probe linear and probe knn read (capped at the block's map)")
    sgd_lr: tuple[float, ...] = _key((0.01, 0.1, 1.0), _float_list(1e-8, 100.0), "sgd: learning-rate grid")
    sgd_weight_decay: tuple[float, ...] = _key((0.0,), _float_list(0.0, 1.0), "sgd: weight-decay grid")
    sgd_epochs: int = _key(28, _int(1, 10000), "sgd: epochs")
    sgd_batch_size: int = _key(128, _int(1, 1 << 20), "sgd: batch size")
    sgd_step_size: int = _key(7, _int(1, 10000), "sgd: StepLR step (epochs)")
    sgd_gamma: float = _key(0.1, _float(0.0, 1.0), "sgd: StepLR factor")
    lbfgs_l2: tuple[float, ...] = _key((1e-4, 1e-3, 1e-2, 1e-1), _float_list(0.0, 1e6), "lbfgs: L2 grid")
    lbfgs_max_iter: int = _key(100, _int(1, 100000), "lbfgs: iterations per grid point")
    memory_mb: float = _key(
        2048.0,
        _float(1e-4, 1e9),
        "most feature memory the probe holds at once (MB, in the bytes of the stored dtype); a split above it is streamed from the store",
    )
    knn_k: tuple[int, ...] = _key(
        (10, 20, 100, 200), _int_list(1), "probe knn: numbers of neighbours k (one ledger row each)"
    )
    knn_temperature: float = _key(0.07, _float(1e-6, 1e6), "probe knn: temperature T of the exp(similarity / T) votes")
    knn_weighting: str = _key("exp", _choice(KnnWeighting), "probe knn: exp(similarity / T) votes, or uniform")
    knn_metric: str = _key("cosine", _choice(KnnMetric), "probe knn: cosine (normalised features) or l2")


@dataclass(frozen=True)
class HeadsConfig:
    depth: int = _key(2, _int(1, 64), "transformer blocks L of the attention, fusion and feedback heads")
    dim: int = _key(
        0,
        _int(0, 65536),
        "token width D (0 = auto: the largest channel count of the head's input blocks, rounded up to a multiple of num_heads)",
    )
    num_heads: int = _key(8, _int(1, 256), "attention heads per transformer block")
    mlp_ratio: float = _key(4.0, _float(0.25, 64.0), "MLP hidden width / D")
    pool: int = _key(
        16,
        _int(1, 1024),
        "largest pool P of the token map (P*P tokens per block; capped at the block's map and at what the store holds)",
    )
    epochs: int = _key(28, _int(1, 10000), "epochs of every head")
    batch_size: int = _key(128, _int(1, 1 << 20), "attention/fusion: images per SGD step")
    step_size: int = _key(7, _int(1, 10000), "StepLR step (epochs)")
    gamma: float = _key(0.1, _float(0.0, 1.0), "StepLR factor")
    weight_decay: float = _key(0.0, _float(0.0, 1.0), "SGD weight decay")
    attention_lr: tuple[float, ...] = _key(
        (0.05,), _float_list(1e-8, 100.0), "attention: learning-rate grid (the best on the held-out part is kept)"
    )
    fusion_lr: tuple[float, ...] = _key((0.05,), _float_list(1e-8, 100.0), "fusion: learning-rate grid")
    feedback_lr: tuple[float, ...] = _key((0.01,), _float_list(1e-8, 100.0), "feedback: learning-rate grid")
    fusion_blocks: tuple[int, ...] = _key((19, 24, 30), _int_list(1, 1000), "DifFormer blocks")
    fusion_timesteps: tuple[int, ...] = _key((90, 150, 300), _int_list(0, 100000), "DifFormer timesteps")
    feedback_blocks: tuple[int, ...] = _key(
        (21, 24, 27, 30, 33, 36), _int_list(1, 1000), "DifFeed decoder blocks fed back"
    )
    feedback_target: int = _key(24, _int(1, 1000), "DifFeed block whose second-pass output feeds the head")
    feedback_t: int = _key(150, _int(0, 100000), "DifFeed timestep")
    feedback_batch_size: int = _key(32, _int(1, 1 << 20), "DifFeed images per step (two U-Net passes each)")
    feedback_autocast: str = _key(
        "auto", _choice(Autocast, "auto"), "DifFeed autocast: auto = bf16 on CUDA, none elsewhere"
    )


@dataclass(frozen=True)
class AnalyzeConfig:
    split: str = _key("val", _str, "split the analyses read")
    pool: int = _key(0, _int(0, 1024), "stored pool the analyses read (0 = the smallest the store holds)")
    estimator: str = _key(
        "linear",
        _choice(Estimator),
        "CKA estimator (diffprobe.store.choices.Estimator)",
    )
    rbf_fraction: float = _key(0.5, _float(1e-6, 1e6), "RBF bandwidth as a fraction of the median pairwise distance")
    minibatch_size: int = _key(256, _int(4, 1 << 20), "images per minibatch of the minibatch estimator")
    bootstrap: int = _key(
        0, _int(0, 100000), "bootstrap replicates (half-samples of the images) for 95% intervals (0 = none)"
    )
    permutations: int = _key(0, _int(0, 100000), "shuffled-pairing replicates for the no-alignment baseline (0 = none)")
    seed: int = _key(0, _int(0, 2**63 - 1), "seed of bootstrap, permutations and minibatch order")
    precision: str = _key("float32", _choice(Precision), "dtype of feature-space chunk products (sums are float64)")
    memory_mb: float = _key(2048.0, _float(1.0, 1e9), "most memory CKA accumulators may hold (MB)")
    knn_metric: str = _key("mutual-knn", _choice(AlignMetric), "analyze align: mutual-knn or cknna")
    knn_k: int = _key(10, _int(1, 1 << 20), "analyze align: neighbours k")


@dataclass(frozen=True)
class SegmentConfig:
    """`probe segment`: DINOv2's linear head (BatchNorm + 1x1 conv) on cached block maps."""

    optimizer: str = _key("adamw", _choice(Optimizer), "optimiser of the dense head")
    lr: tuple[float, ...] = _key(
        (1e-3, 1e-2, 1e-1), _float_list(1e-8, 100.0), "learning-rate grid (one pass; the best held-out mIoU wins)"
    )
    weight_decay: float = _key(1e-4, _float(0.0, 1.0), "weight decay (decoupled for adamw)")
    epochs: int = _key(10, _int(1, 10000), "epochs over the fitted part of train")
    batch_size: int = _key(64, _int(1, 1 << 20), "images per step")
    pool: int = _key(0, _int(0, 1024), "pool P of the maps read (0 = the largest the store holds for every block)")
    eval_size: int = _key(0, _int(0, 8192), "side of the masks scored (0 = the stored mask resolution)")
    examples: int = _key(6, _int(0, 64), "val images drawn in the picture (0 = no picture)")


@dataclass(frozen=True)
class Config:
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    extract: ExtractConfig = ExtractConfig()
    store: StoreConfig = StoreConfig()
    probe: ProbeConfig = ProbeConfig()
    heads: HeadsConfig = HeadsConfig()
    analyze: AnalyzeConfig = AnalyzeConfig()
    segment: SegmentConfig = SegmentConfig()

    def to_dict(self) -> dict:
        out = {}
        for sec in dataclasses.fields(self):
            values = dataclasses.asdict(getattr(self, sec.name))
            out[sec.name] = {
                k: (dict(v) if k == "arch" else list(v) if isinstance(v, tuple) else v) for k, v in values.items()
            }
        return out

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> Config:
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a table, got {raw!r}")
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - set(sections))
        if unknown:
            raise ConfigError(f"{unknown[0]}: unknown section in {source}; allowed: {', '.join(sections)}")
        parsed = {}
        for f in dataclasses.fields(cls):
            table = raw.get(f.name, {})
            if not isinstance(table, dict):
                raise ConfigError(f"{f.name}: expected a [{f.name}] table, got {table!r}")
            parsed[f.name] = _parse_section(type(f.default), table, f.name, source)
        return cls(**parsed)


def _parse_section(cls, table: dict, prefix: str, source: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise ConfigError(f"{prefix}.{unknown[0]}: unknown key in {source}; allowed: {', '.join(fields)}")
    return cls(**{k: fields[k].metadata["parse"](v, f"{prefix}.{k}") for k, v in table.items()})


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> Config:
    """Load ``path`` (default: ./pipeline.toml if present, else the built-in defaults).

    ``overrides`` maps dotted keys to values (CLI flags); ``None`` values are ignored.
    """
    raw: dict = {}
    source = "defaults"
    if path is None and Path("pipeline.toml").is_file():
        path = "pipeline.toml"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"--config: no such file {source!r}")
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{source}: not valid TOML ({e})") from None
        except OSError as e:
            raise ConfigError(f"--config: cannot read {source!r} ({e.strerror or e})") from None
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        section, _, key = dotted.partition(".")
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"{section}: expected a [{section}] table in {source}")
        raw[section][key] = value
    return Config.from_dict(raw, source)
