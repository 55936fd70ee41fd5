"""AutoAugment (Cubuk et al., CVPR 2019) on whole uint8 batches, one op type at a time.

Every op takes a float batch ``(M, C, H, W)`` holding integer values in [0, 255] and a
per-sample magnitude tensor ``(M,)``; it returns integer values again, rounded the way PIL
does (the authors' code runs the ops through PIL), so ops compose exactly as on uint8 images.

Choices (PIL/torchvision differ; ours):
- geometric ops sample nearest-neighbour about the image centre and fill with grey 128, as the
  AMP authors' ``fillcolor=(128, 128, 128)``;
- magnitudes are torchvision's 10 bins for AutoAugment (``_augmentation_space``): translation
  in whole pixels up to 150/331 of the side, and rotation with a random sign as in the
  official TensorFlow code;
- blends truncate after clipping and greys round, as PIL's ``Image.blend``/``convert("L")``;
  a blend that is mathematically an integer stays that integer (PIL's float maths may land
  one below it, depending on how ``1 - 0.9`` rounds).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from flatmin.errors import UnknownNameError

Op = tuple[str, float, int | None]
SubPolicy = tuple[Op, Op]

# (op, probability, magnitude bin 0..9); torchvision AutoAugmentPolicy.CIFAR10 / .SVHN.
CIFAR10_POLICY: tuple[SubPolicy, ...] = (
    (("Invert", 0.1, None), ("Contrast", 0.2, 6)),
    (("Rotate", 0.7, 2), ("TranslateX", 0.3, 9)),
    (("Sharpness", 0.8, 1), ("Sharpness", 0.9, 3)),
    (("ShearY", 0.5, 8), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.5, None), ("Equalize", 0.9, None)),
    (("ShearY", 0.2, 7), ("Posterize", 0.3, 7)),
    (("Color", 0.4, 3), ("Brightness", 0.6, 7)),
    (("Sharpness", 0.3, 9), ("Brightness", 0.7, 9)),
    (("Equalize", 0.6, None), ("Equalize", 0.5, None)),
    (("Contrast", 0.6, 7), ("Sharpness", 0.6, 5)),
    (("Color", 0.7, 7), ("TranslateX", 0.5, 8)),
    (("Equalize", 0.3, None), ("AutoContrast", 0.4, None)),
    (("TranslateY", 0.4, 3), ("Sharpness", 0.2, 6)),
    (("Brightness", 0.9, 6), ("Color", 0.2, 8)),
    (("Solarize", 0.5, 2), ("Invert", 0.0, None)),
    (("Equalize", 0.2, None), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.2, None), ("Equalize", 0.6, None)),
    (("Color", 0.9, 9), ("Equalize", 0.6, None)),
    (("AutoContrast", 0.8, None), ("Solarize", 0.2, 8)),
    (("Brightness", 0.1, 3), ("Color", 0.7, 0)),
    (("Solarize", 0.4, 5), ("AutoContrast", 0.9, None)),
    (("TranslateY", 0.9, 9), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.9, None), ("Solarize", 0.8, 3)),
    (("Equalize", 0.8, None), ("Invert", 0.1, None)),
    (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, None)),
)

SVHN_POLICY: tuple[SubPolicy, ...] = (
    (("ShearX", 0.9, 4), ("Invert", 0.2, None)),
    (("ShearY", 0.9, 8), ("Invert", 0.7, None)),
    (("Equalize", 0.6, None), ("Solarize", 0.6, 6)),
    (("Invert", 0.9, None), ("Equalize", 0.6, None)),
    (("Equalize", 0.6, None), ("Rotate", 0.9, 3)),
    (("ShearX", 0.9, 4), ("AutoContrast", 0.8, None)),
    (("ShearY", 0.9, 8), ("Invert", 0.4, None)),
    (("ShearY", 0.9, 5), ("Solarize", 0.2, 6)),
    (("Invert", 0.9, None), ("AutoContrast", 0.8, None)),
    (("Equalize", 0.6, None), ("Rotate", 0.9, 3)),
    (("ShearX", 0.9, 4), ("Solarize", 0.3, 3)),
    (("ShearY", 0.8, 8), ("Invert", 0.7, None)),
    (("Equalize", 0.9, None), ("TranslateY", 0.6, 6)),
    (("Invert", 0.9, None), ("Equalize", 0.6, None)),
    (("Contrast", 0.3, 3), ("Rotate", 0.8, 4)),
    (("Invert", 0.8, None), ("TranslateY", 0.0, 2)),
    (("ShearY", 0.7, 6), ("Solarize", 0.4, 8)),
    (("Invert", 0.6, None), ("Rotate", 0.8, 4)),
    (("ShearY", 0.3, 7), ("TranslateX", 0.9, 3)),
    (("ShearX", 0.1, 6), ("Invert", 0.6, None)),
    (("Solarize", 0.7, 2), ("TranslateY", 0.6, 7)),
    (("ShearY", 0.8, 4), ("Invert", 0.8, None)),
    (("ShearX", 0.7, 9), ("TranslateY", 0.8, 3)),
    (("ShearY", 0.8, 5), ("AutoContrast", 0.7, None)),
    (("ShearX", 0.7, 2), ("Invert", 0.1, None)),
)

POLICIES: dict[str, tuple[SubPolicy, ...]] = {"cifar10": CIFAR10_POLICY, "svhn": SVHN_POLICY}

FILL = 128.0  # grey, the AMP authors' fill colour for pixels moved in from outside
NUM_BINS = 10
_TIE_SLACK = 1e-3  # far above float32 error at 255, far below the 0.1 steps of the factors


# --- geometric ops ----------------------------------------------------------------------------


def _affine(
    x: Tensor, a: Tensor, b: Tensor, d: Tensor, e: Tensor, tx: Tensor, ty: Tensor
) -> Tensor:
    """Sample each image at ``[a b; d e] @ (p - centre) + t + centre`` so one kernel serves all."""
    m, _, h, w = x.shape
    # pixel offsets from the centre -> grid_sample's [-1, 1] coordinates (align_corners=False)
    theta = torch.stack(
        [torch.stack([a, b * h / w, 2 * tx / w], 1), torch.stack([d * w / h, e, 2 * ty / h], 1)], 1
    ).to(x.dtype)
    grid = F.affine_grid(theta, [m, 1, h, w], align_corners=False)
    out = F.grid_sample(x - FILL, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return out + FILL  # outside pixels sample 0 and come back as FILL


def shear_x(x: Tensor, m: Tensor) -> Tensor:
    """Slant columns (PIL's affine (1, m, 0, 0, 1, 0), about the centre)."""
    one, zero = torch.ones_like(m), torch.zeros_like(m)
    return _affine(x, one, m, zero, one, zero, zero)


def shear_y(x: Tensor, m: Tensor) -> Tensor:
    """Slant rows (PIL's affine (1, 0, 0, m, 1, 0), about the centre)."""
    one, zero = torch.ones_like(m), torch.zeros_like(m)
    return _affine(x, one, zero, m, one, zero, zero)


def translate_x(x: Tensor, m: Tensor) -> Tensor:
    """Move content right by ``m`` whole pixels (left when negative), as torchvision."""
    one, zero = torch.ones_like(m), torch.zeros_like(m)
    return _affine(x, one, zero, zero, one, -m, zero)


def translate_y(x: Tensor, m: Tensor) -> Tensor:
    """Move content down by ``m`` whole pixels (up when negative), as torchvision."""
    one, zero = torch.ones_like(m), torch.zeros_like(m)
    return _affine(x, one, zero, zero, one, zero, -m)


def rotate(x: Tensor, m: Tensor) -> Tensor:
    """Rotate counter-clockwise by ``m`` degrees about the centre, as PIL and torchvision."""
    r = torch.deg2rad(m)
    c, s, zero = torch.cos(r), torch.sin(r), torch.zeros_like(m)
    return _affine(x, c, -s, s, c, zero, zero)


# --- colour ops -------------------------------------------------------------------------------


def _per_image(m: Tensor) -> Tensor:
    """Broadcast a per-sample value over (C, H, W)."""
    return m.view(-1, 1, 1, 1)


def _blend(degenerate: Tensor, x: Tensor, factor: Tensor) -> Tensor:
    """PIL's ``Image.blend(degenerate, x, factor)``: extrapolate, clip, truncate to uint8 values."""
    out = degenerate + _per_image(factor) * (x - degenerate)
    # factors like 1 - 0.9 are inexact in binary; truncate as exact arithmetic would
    return (out + _TIE_SLACK).clamp(0, 255).floor()


def _grey(x: Tensor) -> Tensor:
    """PIL's ``convert("L")`` (ITU-R 601-2 luma, rounded); grey images are their own luma."""
    if x.shape[1] == 1:
        return x
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return torch.floor((19595 * r + 38470 * g + 7471 * b + 32768) / 65536)


def brightness(x: Tensor, m: Tensor) -> Tensor:
    """Scale intensity by ``1 + m`` (blend with black)."""
    return _blend(torch.zeros_like(x), x, 1 + m)


def color(x: Tensor, m: Tensor) -> Tensor:
    """Scale saturation by ``1 + m`` (blend with the grey image); a no-op on grey images."""
    return _blend(_grey(x).expand_as(x), x, 1 + m)


def contrast(x: Tensor, m: Tensor) -> Tensor:
    """Scale contrast by ``1 + m`` (blend with the image's rounded mean grey level)."""
    mean = torch.floor(_grey(x).mean(dim=(1, 2, 3), keepdim=True) + 0.5)
    return _blend(mean.expand_as(x), x, 1 + m)


def sharpness(x: Tensor, m: Tensor) -> Tensor:
    """Blend with PIL's SMOOTH filter (3x3, centre 5, /13) by ``1 + m``; borders stay as PIL."""
    c = x.shape[1]
    kernel = torch.ones(3, 3, dtype=x.dtype, device=x.device)
    kernel[1, 1] = 5.0
    kernel = (kernel / kernel.sum()).expand(c, 1, 3, 3)
    smooth = x.clone()
    smooth[:, :, 1:-1, 1:-1] = torch.round(F.conv2d(x, kernel, groups=c))
    return _blend(smooth, x, 1 + m)


def posterize(x: Tensor, m: Tensor) -> Tensor:
    """Keep the top ``m`` bits of every value (``m`` in 4..8)."""
    step = _per_image(torch.exp2(8 - m))
    return torch.floor(x / step) * step


def solarize(x: Tensor, m: Tensor) -> Tensor:
    """Invert every value at or above the threshold ``m`` (256 leaves the image alone)."""
    return torch.where(x >= _per_image(m), 255 - x, x)


def invert(x: Tensor, m: Tensor) -> Tensor:
    """Negative image; ``m`` is ignored."""
    return 255 - x


def auto_contrast(x: Tensor, m: Tensor) -> Tensor:
    """Stretch each channel to [0, 255] (PIL's lut ``int((v - lo) * 255 / (hi - lo))``)."""
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    flat = hi <= lo  # constant channels are left alone, as PIL does
    span = torch.where(flat, torch.ones_like(hi), hi - lo)
    out = torch.floor((x - lo) * 255 / span).clamp(0, 255)
    return torch.where(flat, x, out)


def equalize(x: Tensor, m: Tensor) -> Tensor:
    """PIL's ``ImageOps.equalize`` per image-channel, via one batched 256-bin histogram."""
    n, c, h, w = x.shape
    idx = x.reshape(n * c, h * w).long()
    hist = torch.zeros(n * c, 256, dtype=torch.long, device=x.device)
    hist.scatter_add_(1, idx, torch.ones_like(idx))
    top = hist.gather(1, idx.amax(dim=1, keepdim=True))  # count of the last non-empty bin
    step = (h * w - top) // 255
    before = hist.cumsum(dim=1) - hist  # pixels strictly below each value
    lut = ((step // 2 + before) // step.clamp(min=1)).clamp(max=255)
    out = torch.where(step > 0, lut.gather(1, idx), idx)  # step 0: PIL's identity lut
    return out.to(x.dtype).reshape(n, c, h, w)


OPS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "ShearX": shear_x,
    "ShearY": shear_y,
    "TranslateX": translate_x,
    "TranslateY": translate_y,
    "Rotate": rotate,
    "Brightness": brightness,
    "Color": color,
    "Contrast": contrast,
    "Sharpness": sharpness,
    "Posterize": posterize,
    "Solarize": solarize,
    "AutoContrast": auto_contrast,
    "Equalize": equalize,
    "Invert": invert,
}
OP_NAMES: tuple[str, ...] = tuple(OPS)
_SIGNED = frozenset(OP_NAMES[:9])  # geometric and enhance ops go either way


def magnitude_bins(name: str, height: int, width: int) -> Tensor:
    """The 10 magnitudes of an op for this image size (torchvision's AutoAugment space)."""
    lin = torch.linspace(0.0, 1.0, NUM_BINS, dtype=torch.float64)
    if name in ("ShearX", "ShearY"):
        return 0.3 * lin
    if name == "TranslateX":
        return 150.0 / 331.0 * width * lin
    if name == "TranslateY":
        return 150.0 / 331.0 * height * lin
    if name == "Rotate":
        return 30.0 * lin
    if name in ("Brightness", "Color", "Contrast", "Sharpness"):
        return 0.9 * lin
    if name == "Posterize":
        return 8 - torch.round(torch.arange(NUM_BINS, dtype=torch.float64) * 4 / (NUM_BINS - 1))
    if name == "Solarize":
        return 256.0 * (1 - lin)
    return torch.zeros(NUM_BINS, dtype=torch.float64)  # AutoContrast, Equalize, Invert


def _magnitudes(name: str, level: Tensor, sign: Tensor, height: int, width: int) -> Tensor:
    """Per-sample magnitudes: binned value, random sign where the op has one, whole pixels."""
    mag = magnitude_bins(name, height, width).to(level.device)[level]
    if name in _SIGNED:
        mag = mag * sign
    if name in ("TranslateX", "TranslateY"):
        mag = torch.trunc(mag)  # torchvision's int(magnitude)
    return mag.float()


def params_device(generator: torch.Generator | None) -> torch.device:
    """Where random parameters are drawn: the generator's device, CPU for the default one."""
    return generator.device if generator is not None else torch.device("cpu")


def _policy_tables(policy: tuple[SubPolicy, ...]) -> tuple[Tensor, Tensor, Tensor]:
    """Op ids, probabilities and magnitude bins as (P, 2) tensors for vectorised look-up."""
    ops = torch.tensor([[OP_NAMES.index(op[0]) for op in sub] for sub in policy])
    probs = torch.tensor([[op[1] for op in sub] for sub in policy])
    levels = torch.tensor([[op[2] or 0 for op in sub] for sub in policy])
    return ops, probs, levels


def auto_augment(x: Tensor, policy: str, generator: torch.Generator | None = None) -> Tensor:
    """Apply one random sub-policy per image, grouping images by op so no loop runs per sample.

    Random parameters are drawn on the generator's device (CPU when ``None``), so the same
    seed gives the same batch on CPU and CUDA, and choosing images costs no device sync.
    """
    if policy not in POLICIES:
        raise UnknownNameError("AutoAugment policy", policy, list(POLICIES))
    n, _, h, w = x.shape
    ops, probs, levels = _policy_tables(POLICIES[policy])
    gdev = params_device(generator)
    sub = torch.randint(len(ops), (n,), generator=generator, device=gdev).cpu()
    coin = torch.rand(n, 2, generator=generator, device=gdev).cpu()
    sign = torch.randint(0, 2, (n, 2), generator=generator, device=gdev).cpu() * 2.0 - 1.0
    out = x.to(torch.float32, copy=True)  # ops write into it by index; never into the caller's
    for k in range(2):  # the two ops of each sub-policy, in order
        op, level = ops[sub, k], levels[sub, k]
        applied = coin[:, k] < probs[sub, k]
        for op_id, name in enumerate(OP_NAMES):
            idx = torch.nonzero(applied & (op == op_id)).flatten()
            if idx.numel() == 0:
                continue
            mag = _magnitudes(name, level[idx], sign[idx, k], h, w)
            idx_dev = idx.to(x.device)
            out[idx_dev] = OPS[name](out[idx_dev], mag.to(x.device))
    return out.to(x.dtype)
