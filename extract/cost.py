"""What a run will cost before it runs: FLOPs, U-Net calls with their padding, peak memory of
one call, and time per device kind. `extract plan` prints `estimate`'s result.

- FLOPs per image of a forward truncated after the deepest requested block, counted by
  ``torch.utils.flop_counter`` on the meta device (no weights, no data; linear in rows, so one
  row is one image). It counts matrix products and convolutions; an attention over a 1x1 map
  (the tiny model's blocks 16-21) contracts over one token, which torch runs as an elementwise
  product it does not count (a few hundred FLOPs). A run computes every (image, t) row plus the zero rows that pad each
  U-Net call to ``forward_batch``.
- Peak memory of one U-Net call of ``forward_batch`` rows: the float32 weights plus the
  largest sum of live tensors during the call (`peak_call_bytes`, counted on the meta device
  by following each tensor storage from creation to release), including the captured block
  outputs held until pooling. Nearly linear in rows, so the largest ``forward_batch`` that
  fits the device's free memory follows from two counts.
- Time: on a GPU kind, the FLOPs at an assumed share of its dense bf16 peak (MFU); on this
  machine's CPU, from a short calibration: a few timed calls of the real architecture
  (weights filled with a constant: the speed does not depend on their values).
"""

from __future__ import annotations

import os
import time
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from diffprobe.extract.unet import ModelSpec, build_model, capture

ASSUMED_MFU = 0.45  # the share of peak a well-fed GPU reaches on these convolutions (issue 12's target)
GPU_PEAK_TFLOPS = {  # dense bf16 tensor-core peak per GPU, vendor figures
    "H100/H200 SXM": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
}
CALIBRATION_FLOPS = 2e11  # about a second or two of CPU per timed call
PADDING_WARN = 0.10  # warn when more than this share of the computed rows are padding


def forward_flops(spec: ModelSpec, deepest: int) -> int:
    """FLOPs of one image's forward, stopped after block ``deepest`` (meta device)."""
    model = build_model(spec, device="meta").eval()
    x = torch.empty(1, 3, spec.image_size, spec.image_size, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        capture(model, x, torch.zeros(1, dtype=torch.long, device="meta"), [deepest])
    return int(counter.get_total_flops())


class LiveBytes(TorchDispatchMode):
    """Bytes of tensor storages created under this mode and still alive, and their peak."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen: weakref.WeakSet = weakref.WeakSet()

    def _free(self, n: int) -> None:
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage not in self._seen:
                    self._seen.add(storage)
                    n = storage.nbytes()
                    self.live += n
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, n)  # the storage, not the tensor: views share it
        return out


def peak_call_bytes(spec: ModelSpec, blocks, rows: int) -> int:
    """Peak bytes of the tensors one `capture` call of ``rows`` rows creates (its input, every
    activation, the captured outputs it returns), float32, counted on the meta device."""
    model = build_model(spec, device="meta").eval()
    with torch.no_grad(), LiveBytes() as live:
        x = torch.empty(rows, 3, spec.image_size, spec.image_size, device="meta")
        t = torch.zeros(rows, dtype=torch.long, device="meta")
        out = capture(model, x, t, blocks)
        del out, x, t
    return live.peak


def weight_bytes(spec: ModelSpec) -> int:
    model = build_model(spec, device="meta")
    return sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers()
    )


def free_bytes(device: torch.device) -> int | None:
    """Free memory of ``device``: CUDA's own count, or the host's MemAvailable; None if unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def calls_and_padding(
    split_sizes: dict[str, int],
    chunk_images: int,
    batch_size: int,
    forward_batch: int,
    rows_per_image: int | dict[str, int],
) -> tuple[int, int]:
    """U-Net calls of a whole run and the zero rows padding them: each batch of b images (batches
    never cross an image chunk) runs its b x R rows (R = ``rows_per_image``: timesteps x views
    and noise draws, one number or one per split) in calls of ``forward_batch`` rows. Counted
    per distinct batch size, so ImageNet's count takes no longer than the digits'."""

    def batch(b: int, r: int) -> tuple[int, int]:
        k = -(-(b * r) // forward_batch)
        return k, k * forward_batch - b * r

    def chunk(c: int, r: int) -> tuple[int, int]:
        full, tail = divmod(c, batch_size)
        k, pad = batch(batch_size, r)
        kt, padt = batch(tail, r) if tail else (0, 0)
        return full * k + kt, full * pad + padt

    calls = padded = 0
    for split, n in split_sizes.items():
        r = rows_per_image if isinstance(rows_per_image, int) else rows_per_image[split]
        full, tail = divmod(n, chunk_images)
        k, pad = chunk(chunk_images, r)
        kt, padt = chunk(tail, r) if tail else (0, 0)
        calls += full * k + kt
        padded += full * pad + padt
    return calls, padded


def calibrate_cpu(spec: ModelSpec, blocks, rows: int, repeats: int = 2) -> float:
    """FLOP/s of this CPU on the architecture: the fastest of ``repeats`` timed calls of ``rows``
    rows (after one untimed), weights filled with a constant."""
    model = build_model(spec, device="meta").to_empty(device="cpu").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.01)
        x = torch.zeros(rows, 3, spec.image_size, spec.image_size)
        t = torch.zeros(rows, dtype=torch.long)
        capture(model, x, t, blocks)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            capture(model, x, t, blocks)
            best = min(best, time.perf_counter() - start)
    return forward_flops(spec, max(blocks)) * rows / best


@dataclass(frozen=True)
class Estimate:
    deepest: int
    flops_per_image: int
    rows: int  # (image, t) rows computed
    padded_rows: int
    calls: int
    forward_batch: int
    weight_bytes: int
    call_bytes: int  # peak activations of one call of forward_batch rows (float32)
    bytes_per_row: int  # the increase per added row
    free_bytes: int | None
    device: str
    cpu_flops_per_s: float | None  # calibrated; None when skipped

    @property
    def total_flops(self) -> int:
        return self.flops_per_image * (self.rows + self.padded_rows)

    @property
    def padding_share(self) -> float:
        return self.padded_rows / max(1, self.rows + self.padded_rows)

    @property
    def peak_bytes(self) -> int:
        return self.weight_bytes + self.call_bytes

    @property
    def largest_forward_batch(self) -> int | None:
        """The most rows per call whose weights and activations fit the free memory (None: unknown)."""
        if self.free_bytes is None:
            return None
        fixed = self.peak_bytes - self.bytes_per_row * self.forward_batch
        return max(0, (self.free_bytes - fixed) // max(1, self.bytes_per_row))

    def hours(self) -> dict[str, float]:
        """Estimated hours per device kind: GPUs at ASSUMED_MFU of their peak, this CPU as calibrated."""
        out = {
            f"{name} at {ASSUMED_MFU:.0%} MFU": self.total_flops / (peak * 1e12 * ASSUMED_MFU) / 3600
            for name, peak in GPU_PEAK_TFLOPS.items()
        }
        if self.cpu_flops_per_s:
            out["this CPU (calibrated)"] = self.total_flops / self.cpu_flops_per_s / 3600
        return out

    def warnings(self) -> list[str]:
        out = []
        if self.padding_share > PADDING_WARN:
            out.append(
                f"{self.padding_share:.0%} of the computed rows are padding ({self.padded_rows} of "
                f"{self.rows + self.padded_rows}); a smaller extract.forward_batch wastes less"
            )
        fit = self.largest_forward_batch
        if fit is not None and self.free_bytes is not None and self.peak_bytes > self.free_bytes:
            tail = f"the largest forward_batch that fits is {fit}" if fit else "not even one row fits"
            out.append(
                f"one U-Net call of extract.forward_batch = {self.forward_batch} rows needs about "
                f"{self.peak_bytes / 1e9:.1f} GB on {self.device}, which has {self.free_bytes / 1e9:.1f} GB free; {tail}"
            )
        return out

    def to_dict(self) -> dict:
        return {
            "deepest_block": self.deepest,
            "tflop_per_image": self.flops_per_image / 1e12,
            "tflop_total": self.total_flops / 1e12,
            "rows": self.rows,
            "padded_rows": self.padded_rows,
            "padding_share": self.padding_share,
            "calls": self.calls,
            "forward_batch": self.forward_batch,
            "weight_bytes": self.weight_bytes,
            "activation_bytes": self.call_bytes,
            "peak_bytes": self.peak_bytes,
            "free_bytes": self.free_bytes,
            "largest_forward_batch": self.largest_forward_batch,
            "device": self.device,
            "cpu_tflop_per_s": self.cpu_flops_per_s / 1e12 if self.cpu_flops_per_s else None,
            "assumed_mfu": ASSUMED_MFU,
            "hours": self.hours(),
            "warnings": self.warnings(),
        }


def estimate(cfg, plan, spec, device: torch.device, calibrate: bool = True) -> Estimate:
    """The cost on ``device`` of ``plan`` for ``spec``'s U-Net under ``cfg`` (its forward_batch
    resolved: `extract.job.prepare`, `extract.job.with_forward_batch`)."""
    fb = cfg.extract.forward_batch
    deepest = max(plan.blocks)
    flops = forward_flops(spec, deepest)
    calls, padded = calls_and_padding(
        plan.split_sizes,
        cfg.store.chunk_images,
        cfg.extract.batch_size,
        fb,
        {s: len(plan.timesteps) * plan.variants(s) for s in plan.split_sizes},
    )
    one, at_fb = peak_call_bytes(spec, plan.blocks, 1), peak_call_bytes(spec, plan.blocks, fb)
    per_row = (at_fb - one) // (fb - 1) if fb > 1 else at_fb
    cpu = None
    if calibrate and device.type == "cpu":
        rows = max(1, min(fb, round(CALIBRATION_FLOPS / max(1, flops))))
        cpu = calibrate_cpu(spec, plan.blocks, rows)
    return Estimate(
        deepest=deepest,
        flops_per_image=flops,
        rows=plan.forwards,
        padded_rows=padded,
        calls=calls,
        forward_batch=fb,
        weight_bytes=weight_bytes(spec),
        call_bytes=at_fb,
        bytes_per_row=per_row,
        free_bytes=free_bytes(device),
        device=str(device),
        cpu_flops_per_s=cpu,
    )
