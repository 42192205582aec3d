"""The guided-diffusion U-Net: presets, building, checkpoints, the block table and capture.

Blocks are numbered as in the paper (1-based): ``input_blocks`` first, then the middle
block, then ``output_blocks``. The numbering, each block's channels and spatial size are
read off the model (a forward pass on the meta device), never hard-coded.

    spec = preset("tiny")
    model = build_model(spec)
    load_checkpoint(model, TINY_CHECKPOINT)
    feats = capture(model, x_t, t, blocks=[19, 24])   # {19: (N, C, H, W), 24: ...}

This module knows nothing of stores or probes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import operator
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from diffprobe.store.choices import Preset, allowed
from diffprobe.store.errors import BlockError, CheckpointError

with warnings.catch_warnings():  # guided_diffusion uses deprecated torch.cuda.amp decorators
    warnings.simplefilter("ignore", FutureWarning)
    from guided_diffusion import gaussian_diffusion as gd
    from guided_diffusion.respace import SpacedDiffusion, space_timesteps
    from guided_diffusion.unet import UNetModel

ASSETS = Path(__file__).parent / "assets"
TINY_CHECKPOINT = ASSETS / "tiny-unet.pt"


@dataclass(frozen=True)
class ModelSpec:
    """Architecture and diffusion flags of an unconditional guided-diffusion U-Net.

    Field names follow guided-diffusion's ``model_and_diffusion_defaults`` flags.
    ``attention_resolutions`` are in pixels (as the flag), ``channel_mult`` per level.
    """

    image_size: int
    num_channels: int
    num_res_blocks: int
    channel_mult: tuple[int, ...]
    attention_resolutions: tuple[int, ...]
    num_head_channels: int
    num_heads: int = 4
    learn_sigma: bool = True
    resblock_updown: bool = True
    use_scale_shift_norm: bool = True
    use_new_attention_order: bool = False
    dropout: float = 0.0
    diffusion_steps: int = 1000
    noise_schedule: str = "linear"

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


PRESETS: dict[Preset, ModelSpec] = {
    # OpenAI's 256x256_diffusion_uncond.pt (Dhariwal & Nichol 2021), the paper's model.
    Preset.ADM_256_UNCOND: ModelSpec(
        image_size=256,
        num_channels=256,
        num_res_blocks=2,
        channel_mult=(1, 1, 2, 2, 4, 4),
        attention_resolutions=(32, 16, 8),
        num_head_channels=64,
    ),
    # The embedded default: ADM-256's 37-block topology at 32x32, trained by
    # `python -m diffprobe.extract.train_tiny` on the digits train split.
    Preset.TINY: ModelSpec(
        image_size=32,
        num_channels=32,
        num_res_blocks=2,
        channel_mult=(1, 1, 2, 2, 4, 4),
        attention_resolutions=(4, 2, 1),
        num_head_channels=32,
    ),
}


def preset(name: str, **overrides) -> ModelSpec:
    """The named preset's spec, with any flags replaced by ``overrides``."""
    try:
        key = Preset(name)
    except ValueError:
        raise CheckpointError(f"model.preset: unknown preset {name!r}; allowed: {allowed(Preset)}") from None
    return dataclasses.replace(PRESETS[key], **overrides)


def build_model(spec: ModelSpec, device: str | torch.device = "cpu") -> UNetModel:
    """A freshly initialised U-Net for ``spec`` (on ``device``; ``"meta"`` allocates nothing)."""
    with torch.device(device):
        return UNetModel(
            image_size=spec.image_size,
            in_channels=3,
            model_channels=spec.num_channels,
            out_channels=6 if spec.learn_sigma else 3,
            num_res_blocks=spec.num_res_blocks,
            attention_resolutions=tuple(spec.image_size // r for r in spec.attention_resolutions),
            dropout=spec.dropout,
            channel_mult=spec.channel_mult,
            num_classes=None,
            num_heads=spec.num_heads,
            num_head_channels=spec.num_head_channels,
            use_scale_shift_norm=spec.use_scale_shift_norm,
            resblock_updown=spec.resblock_updown,
            use_new_attention_order=spec.use_new_attention_order,
        )


def build_diffusion(spec: ModelSpec) -> SpacedDiffusion:
    """The Gaussian diffusion (schedule, q_sample, losses) that goes with ``spec``."""
    return SpacedDiffusion(
        use_timesteps=space_timesteps(spec.diffusion_steps, [spec.diffusion_steps]),
        betas=gd.get_named_beta_schedule(spec.noise_schedule, spec.diffusion_steps),
        model_mean_type=gd.ModelMeanType.EPSILON,
        model_var_type=gd.ModelVarType.LEARNED_RANGE if spec.learn_sigma else gd.ModelVarType.FIXED_LARGE,
        loss_type=gd.LossType.MSE,
    )


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _not_a_checkpoint(e: Exception) -> str:
    """Why torch could not load a file, in diffprobe's words: torch's own message advises
    ``weights_only=False``, which would run whatever code a pickle carries."""
    text = str(e)
    if "Unsupported global" in text:  # a pickle naming classes or functions to import and call
        return (
            "holds pickled Python objects besides tensors (classes or code), which diffprobe never "
            "loads; a checkpoint here is a state dict saved with torch.save(model.state_dict(), path)"
        )
    detail = text.split("WeightsUnpickler error:", 1)[1] if "WeightsUnpickler error:" in text else text
    lines = [line.strip() for line in detail.splitlines() if line.strip() and "weights_only" not in line]
    why = f" ({lines[0][:120]})" if lines else ""
    return (
        f"not a torch.save file of tensors{why}; diffprobe loads state dicts saved with "
        f"torch.save(model.state_dict(), path)"
    )


def load_checkpoint(model: nn.Module, path: str | Path, sha256: str | None = None) -> str:
    """Load a state dict into ``model`` with strict key and shape matching; return its sha256
    (``sha256`` when the caller already knows it: hashing 2 GB takes seconds).

    Tensors are cast to the model's dtype (the tiny checkpoint ships in float16).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model.checkpoint: no such file {str(path)!r}")
    with warnings.catch_warnings(record=True) as caught:  # torch's warnings: shown only for a file it reads
        warnings.simplefilter("always")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle, zip and weights_only errors all mean "not a checkpoint"
            raise CheckpointError(f"{path}: {_not_a_checkpoint(e)}") from None
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    expected = model.state_dict()
    for key, want in expected.items():
        if key not in state:
            raise CheckpointError(
                f"{path}: missing key {key!r} (model expects shape {tuple(want.shape)}); "
                f"is model.preset right for this checkpoint?"
            )
        got = state[key]
        if tuple(got.shape) != tuple(want.shape):
            raise CheckpointError(
                f"{path}: shape mismatch at {key!r}: checkpoint {tuple(got.shape)}, "
                f"model {tuple(want.shape)}; is model.preset right for this checkpoint?"
            )
    for key in state:
        if key not in expected:
            raise CheckpointError(
                f"{path}: unexpected key {key!r} (shape {tuple(state[key].shape)}) not in the model; "
                f"is model.preset right for this checkpoint?"
            )
    model.load_state_dict(state, strict=True)
    return sha256 or file_sha256(path)


def compile_blocks(model: UNetModel) -> None:
    """torch.compile each block's forward, in place (the state dict keeps its keys). The hooks of
    `capture` sit around the compiled forwards, so capturing and stopping after the deepest block
    work as before; a block compiles on its first call, so blocks after the deepest never do.

    The blocks share one code object, which dynamo compiles once per block: its recompile limit
    is raised to the block count."""
    import torch._dynamo.config as dynamo

    blocks = block_modules(model)
    dynamo.recompile_limit = max(dynamo.recompile_limit, 2 * len(blocks))
    for _, block in blocks:
        block.forward = torch.compile(block.forward, dynamic=False)


# ---------------------------------------------------------------------------- blocks


def block_modules(model: UNetModel) -> list[tuple[str, nn.Module]]:
    """The U-Net's blocks in paper order: (module path, module), block n at index n-1."""
    return (
        [(f"input_blocks.{i}", m) for i, m in enumerate(model.input_blocks)]
        + [("middle_block", model.middle_block)]
        + [(f"output_blocks.{i}", m) for i, m in enumerate(model.output_blocks)]
    )


def _block_numbers(numbers) -> list[int]:
    """Block numbers as Python ints (numpy integers welcome); anything else is a BlockError."""
    out = []
    for n in numbers:
        try:
            out.append(operator.index(n))
        except TypeError:
            raise BlockError(f"block {n!r} is not an integer block number") from None
    return out


@dataclass(frozen=True)
class BlockInfo:
    number: int  # 1-based, the paper's convention
    module: str  # e.g. "input_blocks.3", "middle_block", "output_blocks.5"
    channels: int
    spatial: int  # H (= W) of the block's output at the spec's image size


@dataclass(frozen=True)
class BlockTable:
    """Block number -> module, channels, spatial size, derived from the model itself."""

    blocks: tuple[BlockInfo, ...]

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, number: int) -> BlockInfo:
        self.check([number])
        return self.blocks[operator.index(number) - 1]

    def check(self, numbers) -> None:
        """Raise `BlockError` naming the valid range if any number is not a block."""
        for n in _block_numbers(numbers):
            if not 1 <= n <= len(self.blocks):
                raise BlockError(f"block {n} does not exist: this model has blocks 1-{len(self.blocks)}")

    def to_list(self) -> list[dict]:
        return [dataclasses.asdict(b) for b in self.blocks]


def block_table(spec: ModelSpec) -> BlockTable:
    """Derive the block table by running ``spec``'s U-Net on the meta device (no weights)."""
    model = build_model(spec, device="meta")
    shapes: dict[int, torch.Size] = {}
    hooks = [
        module.register_forward_hook(lambda _m, _i, out, n=n: shapes.__setitem__(n, out.shape))
        for n, (_, module) in enumerate(block_modules(model), start=1)
    ]
    try:
        with torch.no_grad():
            x = torch.empty(1, 3, spec.image_size, spec.image_size, device="meta")
            model(x, torch.zeros(1, dtype=torch.long, device="meta"))
    finally:
        for h in hooks:
            h.remove()
    blocks = []
    for n, (name, _) in enumerate(block_modules(model), start=1):
        _, c, h, w = shapes[n]
        if h != w:
            raise BlockError(f"block {n} ({name}) has a non-square map {h}x{w}; only square images are supported")
        blocks.append(BlockInfo(number=n, module=name, channels=int(c), spatial=int(h)))
    return BlockTable(tuple(blocks))


# --------------------------------------------------------------------------- capture


class _StopForward(Exception):
    """Raised by the deepest requested block's hook to skip the rest of the network."""


def capture(model: UNetModel, x_t: torch.Tensor, t: torch.Tensor, blocks) -> dict[int, torch.Tensor]:
    """Run ``model`` on (x_t, t) and return the outputs of ``blocks``, full resolution.

    x_t: (N, 3, H, W) noised images; t: (N,) integer timesteps; blocks: 1-based block
    numbers. Returns {block: (N, C_b, H_b, W_b)} in the model's dtype. The forward stops
    right after the deepest requested block, so later blocks cost nothing.
    """
    modules = block_modules(model)
    blocks = sorted(set(_block_numbers(blocks)))
    if not blocks:
        return {}
    for b in blocks:
        if not 1 <= b <= len(modules):
            raise BlockError(f"block {b} does not exist: this model has blocks 1-{len(modules)}")
    deepest = blocks[-1]
    out: dict[int, torch.Tensor] = {}

    def hook(n):
        def fn(_module, _inputs, output):
            out[n] = output
            if n == deepest:
                raise _StopForward

        return fn

    handles = [modules[b - 1][1].register_forward_hook(hook(b)) for b in blocks]
    try:
        model(x_t, t)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    return out
