"""flatmin.data.augment / autoaugment: every batched op against an obvious per-image reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flatmin.data import autoaugment as aa
from flatmin.data.augment import (
    AUGMENTATIONS,
    build_transform,
    cutout,
    normalize,
    random_crop,
    random_hflip,
)
from flatmin.errors import UnknownNameError

MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(n: int = 8, c: int = 3, size: int = 32, low: int = 0, seed: int = 0) -> torch.Tensor:
    return torch.randint(low, 256, (n, c, size, size), dtype=torch.uint8, generator=gen(seed))


def window_shifts(out: torch.Tensor, x: torch.Tensor, pad: int, fill: int) -> list[set]:
    """Every (dy, dx) for which out[i] is the window of the padded x[i] shifted by (dy, dx)."""
    n, _, h, w = x.shape
    padded = np.full((n, x.shape[1], h + 2 * pad, w + 2 * pad), fill, dtype=np.uint8)
    padded[:, :, pad : pad + h, pad : pad + w] = x.numpy()
    found = []
    for i in range(n):
        found.append(
            {
                (dy, dx)
                for dy in range(-pad, pad + 1)
                for dx in range(-pad, pad + 1)
                if np.array_equal(
                    out[i].numpy(), padded[i, :, pad + dy : pad + dy + h, pad + dx : pad + dx + w]
                )
            }
        )
    return found


# --- crop, flip, cutout, normalise -----------------------------------------------------------


@pytest.mark.parametrize("pad,fill", [(4, 0), (2, 128)])
def test_random_crop_is_a_shifted_window_of_the_padded_image(pad: int, fill: int) -> None:
    x = images(16)
    out = random_crop(x, pad, gen(1), fill=fill)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    shifts = window_shifts(out, x, pad, fill)
    assert all(len(s) == 1 for s in shifts)  # random data: exactly one window fits
    assert len({next(iter(s)) for s in shifts}) > 1  # and images move independently


def test_random_crop_without_padding_is_identity() -> None:
    x = images(2)
    assert torch.equal(random_crop(x, 0, gen()), x)


def test_hflip_mirrors_exactly_the_drawn_images() -> None:
    x = images(64)
    out = random_hflip(x, gen(3))
    chosen = torch.randint(2, (64,), generator=gen(3)).bool()  # one draw per image
    for i in range(64):
        assert torch.equal(out[i], x[i].flip(-1) if chosen[i] else x[i])
    assert 0 < int(chosen.sum()) < 64


def test_svhn_never_flips_and_cifar_both_ways() -> None:
    x = images(48)
    mirrored = x.flip(-1)
    for dataset, flips in (("svhn", False), ("cifar10", True)):
        t = build_transform(dataset, "standard", MEAN, STD)
        out = t(x, train=True, generator=gen(5))
        # undo normalisation exactly enough to recover the uint8 crop
        raw = torch.round(
            (out * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)) * 255
        ).to(torch.uint8)
        plain = [bool(s) for s in window_shifts(raw, x, t.padding, 128)]
        flipped = [bool(s) for s in window_shifts(raw, mirrored, t.padding, 128)]
        assert all(p != f for p, f in zip(plain, flipped))  # each output is exactly one of them
        assert any(flipped) == flips and all(plain) == (not flips)


def _hole_fits(lo: int, hi: int, size: int, side: int) -> bool:
    """Some centre c in [0, side) gives DeVries' clipped interval [c - size//2, c + size//2)."""
    return any((max(c - size // 2, 0), min(c + size // 2, side)) == (lo, hi) for c in range(side))


@pytest.mark.parametrize("size", [16, 8, 20])
def test_cutout_zeroes_one_clipped_square(size: int) -> None:
    x = images(64, low=1)  # no zeros before cutout
    out = cutout(x, size, gen(2))
    hole = out == 0
    assert torch.equal(hole.all(1), hole.any(1))  # all channels together
    assert torch.equal(torch.where(hole, x, out), x)  # the rest is untouched
    clipped = 0
    for i in range(64):
        ys, xs = torch.nonzero(hole[i, 0], as_tuple=True)
        y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
        assert len(ys) == (y1 - y0) * (x1 - x0)  # one filled rectangle
        assert _hole_fits(y0, y1, size, 32) and _hole_fits(x0, x1, size, 32)
        clipped += (y1 - y0, x1 - x0) != (size, size)
    assert 0 < clipped < 64


def test_eval_is_exactly_normalisation() -> None:
    x = images(4)
    ref = (x.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(
        1, 3, 1, 1
    )
    assert torch.equal(normalize(x, MEAN, STD), ref)
    for augment in AUGMENTATIONS:
        out = build_transform("cifar10", augment, MEAN, STD)(x, train=False, generator=gen())
        assert out.dtype == torch.float32 and torch.equal(out, ref)
    # datasets without a recipe only normalise, even in training
    digits = build_transform("digits", "autoaugment", MEAN, STD)
    assert torch.equal(digits(x, train=True, generator=gen()), ref)


@pytest.mark.parametrize("augment", ["standard", "cutout", "autoaugment"])
@pytest.mark.parametrize("dataset", ["cifar10", "cifar100", "svhn", "gtsrb"])
def test_transforms_are_seeded(dataset: str, augment: str) -> None:
    x = images(32)
    t = build_transform(dataset, augment, MEAN, STD)
    a = t(x, train=True, generator=gen(7))
    assert a.dtype == torch.float32 and a.shape == x.shape
    assert torch.equal(a, t(x, train=True, generator=gen(7)))
    assert not torch.equal(a, t(x, train=True, generator=gen(8)))


def test_recipes_follow_the_authors() -> None:
    t = {d: build_transform(d, "autoaugment", MEAN, STD) for d in ("cifar10", "cifar100", "svhn")}
    assert (t["cifar10"].padding, t["cifar10"].flip, t["cifar10"].cutout_size) == (4, True, 16)
    assert (t["cifar100"].policy, t["cifar100"].cutout_size) == ("cifar10", 8)
    assert (t["svhn"].padding, t["svhn"].flip, t["svhn"].policy, t["svhn"].cutout_size) == (
        0,
        False,
        "svhn",
        20,
    )
    gtsrb = build_transform("gtsrb", "cutout", MEAN, STD)
    assert (gtsrb.padding, gtsrb.flip, gtsrb.policy, gtsrb.cutout_size) == (4, False, None, 8)
    assert build_transform("svhn", "standard", MEAN, STD).padding == 2


def test_unknown_augmentation_lists_valid_ones() -> None:
    with pytest.raises(UnknownNameError, match="autoaugment, cutout, none, standard"):
        build_transform("cifar10", "mixup", MEAN, STD)
    with pytest.raises(ValueError, match="uint8"):
        build_transform("cifar10", "none", MEAN, STD)(torch.zeros(1, 3, 4, 4), train=False)


# --- AutoAugment ops against per-image references --------------------------------------------


def run_op(name: str, x: torch.Tensor, mags: list[float]) -> np.ndarray:
    out = aa.OPS[name](x.float(), torch.tensor(mags, dtype=torch.float32))
    assert torch.equal(out, out.round()) and out.min() >= 0 and out.max() <= 255
    return out.numpy().astype(np.int64)


def test_invert_solarize_posterize() -> None:
    x = images(3)
    xn = x.numpy().astype(np.int64)
    assert np.array_equal(run_op("Invert", x, [0, 0, 0]), 255 - xn)
    thresholds = [256.0, 128.0, 0.0]
    ref = np.stack([np.where(xn[i] >= t, 255 - xn[i], xn[i]) for i, t in enumerate(thresholds)])
    assert np.array_equal(run_op("Solarize", x, thresholds), ref)
    bits = [8, 6, 4]
    ref = np.stack([xn[i] & (0xFF << (8 - b) & 0xFF) for i, b in enumerate(bits)])
    assert np.array_equal(run_op("Posterize", x, bits), ref)


def pil_equalize(channel: np.ndarray) -> np.ndarray:
    """ImageOps.equalize on one channel, written as PIL does it."""
    h = np.bincount(channel.ravel(), minlength=256)
    used = h[h > 0]
    step = (used.sum() - used[-1]) // 255
    if len(used) <= 1 or step == 0:
        return channel
    lut, n = [], step // 2
    for count in h:
        lut.append(min(n // step, 255))
        n += count
    return np.array(lut)[channel]


def test_equalize_matches_pil() -> None:
    x = torch.cat(
        [
            images(2),
            torch.randint(100, 111, (2, 3, 32, 32), dtype=torch.uint8, generator=gen(1)),
            torch.full((1, 3, 32, 32), 77, dtype=torch.uint8),  # one value: unchanged
            (images(1, seed=4) > 200).to(torch.uint8) * 255,  # two values
        ]
    )
    xn = x.numpy().astype(np.int64)
    ref = np.stack([np.stack([pil_equalize(ch) for ch in img]) for img in xn])
    assert np.array_equal(run_op("Equalize", x, [0.0] * len(x)), ref)


def test_auto_contrast_stretches_each_channel() -> None:
    x = torch.cat([images(2, low=60) // 2, torch.full((1, 3, 32, 32), 9, dtype=torch.uint8)])
    xn = x.numpy().astype(np.int64)
    ref = xn.copy()
    for i in range(2):
        for c in range(3):
            lo, hi = xn[i, c].min(), xn[i, c].max()
            ref[i, c] = (xn[i, c] - lo) * 255 // (hi - lo)
    assert np.array_equal(run_op("AutoContrast", x, [0.0] * 3), ref)


def pil_grey(img: np.ndarray) -> np.ndarray:
    r, g, b = img
    return (19595 * r + 38470 * g + 7471 * b + 0x8000) >> 16


def pil_blend(degenerate: np.ndarray, img: np.ndarray, factor: float) -> np.ndarray:
    """Image.blend, truncating; 1e-9 makes exact ties (0.1 * 70 = 7) land as in exact maths."""
    out = degenerate + factor * (img - degenerate) + 1e-9
    return np.floor(np.clip(out, 0, 255)).astype(np.int64)


def pil_smooth(img: np.ndarray) -> np.ndarray:
    """ImageFilter.SMOOTH (3x3 ones, centre 5, /13, rounded); PIL leaves the border as is."""
    out = img.copy()
    acc = sum(img[:, 1 + dy : 31 + dy, 1 + dx : 31 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1))
    out[:, 1:-1, 1:-1] = np.floor((acc + 4 * img[:, 1:-1, 1:-1]) / 13 + 0.5)
    return out


@pytest.mark.parametrize("name", ["Brightness", "Color", "Contrast", "Sharpness"])
def test_enhance_ops_match_pil(name: str) -> None:
    mags = [-0.9, -0.3, 0.0, 0.5, 0.9]
    x = images(len(mags), seed=11)
    xn = x.numpy().astype(np.int64)
    degenerate = {
        "Brightness": lambda img: np.zeros_like(img),
        "Color": lambda img: np.broadcast_to(pil_grey(img), img.shape),
        "Contrast": lambda img: np.full_like(img, int(pil_grey(img).mean() + 0.5)),
        "Sharpness": pil_smooth,
    }[name]
    ref = np.stack([pil_blend(degenerate(xn[i]), xn[i], 1 + m) for i, m in enumerate(mags)])
    out = run_op(name, x, mags)
    assert np.array_equal(out, ref)
    assert np.array_equal(out[2], xn[2])  # factor 1 is the identity


def test_colour_ops_on_grey_images() -> None:
    x = images(2, c=1)
    assert np.array_equal(run_op("Color", x, [0.9, -0.9]), x.numpy())
    assert run_op("Contrast", x, [0.5, -0.5]).shape == (2, 1, 32, 32)


def test_rotate_by_quarter_turns_is_rot90() -> None:
    x = images(3)
    out = run_op("Rotate", x, [90.0, -90.0, 0.0])
    assert np.array_equal(out[0], torch.rot90(x[0], 1, dims=(1, 2)).numpy())  # counter-clockwise
    assert np.array_equal(out[1], torch.rot90(x[1], -1, dims=(1, 2)).numpy())
    assert np.array_equal(out[2], x[2].numpy())


def shifted(img: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Content moved by (dy, dx) whole pixels, grey where nothing came in."""
    out = np.full_like(img, 128)
    h, w = img.shape[1:]
    out[:, max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = img[
        :, max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def test_translate_moves_content_and_fills_grey() -> None:
    x = images(3)
    xn = x.numpy().astype(np.int64)
    moves = [14.0, -5.0, 0.0]
    out_x, out_y = run_op("TranslateX", x, moves), run_op("TranslateY", x, moves)
    for i, t in enumerate(moves):
        assert np.array_equal(out_x[i], shifted(xn[i], 0, int(t)))
        assert np.array_equal(out_y[i], shifted(xn[i], int(t), 0))


def test_shear_matches_nearest_reference() -> None:
    x = images(4)
    xn = x.numpy().astype(np.int64)
    mags = [0.3, -0.3, 0.1, -0.1]  # no rounding ties on a 32-px grid
    centre = 15.5
    out_x, out_y = run_op("ShearX", x, mags), run_op("ShearY", x, mags)
    for i, m in enumerate(mags):
        ref_x, ref_y = np.full_like(xn[i], 128), np.full_like(xn[i], 128)
        for r in range(32):
            for c in range(32):
                src_c = round(c + m * (r - centre))  # x_in = x + m (y - cy)
                src_r = round(r + m * (c - centre))  # y_in = y + m (x - cx)
                if 0 <= src_c < 32:
                    ref_x[:, r, c] = xn[i, :, r, src_c]
                if 0 <= src_r < 32:
                    ref_y[:, r, c] = xn[i, :, src_r, c]
        assert np.array_equal(out_x[i], ref_x) and np.array_equal(out_y[i], ref_y)


# --- policies and the batched sampler --------------------------------------------------------


@pytest.mark.parametrize("policy", ["cifar10", "svhn"])
def test_policies_have_25_valid_sub_policies(policy: str) -> None:
    subs = aa.POLICIES[policy]
    assert len(subs) == 25
    for sub in subs:
        assert len(sub) == 2
        for name, prob, level in sub:
            assert name in aa.OPS and 0.0 <= prob <= 1.0
            assert level is None or 0 <= level < aa.NUM_BINS


def test_magnitude_bins_for_32px() -> None:
    assert aa.magnitude_bins("Posterize", 32, 32).tolist() == [8, 8, 7, 7, 6, 6, 5, 5, 4, 4]
    assert aa.magnitude_bins("TranslateX", 32, 32)[-1].item() == pytest.approx(150 / 331 * 32)
    assert aa.magnitude_bins("Solarize", 32, 32)[[0, -1]].tolist() == [256.0, 0.0]
    assert aa.magnitude_bins("Rotate", 32, 32)[-1].item() == pytest.approx(30.0)


def test_auto_augment_applies_ops_with_their_probability(monkeypatch: pytest.MonkeyPatch) -> None:
    half_invert = ((("Invert", 0.5, None), ("Invert", 0.0, None)),)
    monkeypatch.setitem(aa.POLICIES, "half", half_invert)
    x = images(64)
    out = aa.auto_augment(x, "half", gen(4))
    inverted = torch.tensor([torch.equal(o, 255 - i) for o, i in zip(out, x)])
    kept = torch.tensor([torch.equal(o, i) for o, i in zip(out, x)])
    assert torch.all(inverted ^ kept) and 10 < int(inverted.sum()) < 54


def test_auto_augment_applies_the_two_ops_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(aa.POLICIES, "pair", ((("Solarize", 1.0, 5), ("Posterize", 1.0, 9)),))
    x = images(4)
    out = aa.auto_augment(x, "pair", gen())
    threshold = aa.magnitude_bins("Solarize", 32, 32)[5].item()
    ref = torch.where(x >= threshold, 255 - x, x) & 0xF0
    assert out.dtype == torch.uint8 and torch.equal(out, ref)


def test_auto_augment_is_seeded_and_keeps_dtype() -> None:
    x = images(64)
    a = aa.auto_augment(x, "cifar10", gen(1))
    assert a.dtype == torch.uint8 and a.shape == x.shape
    assert torch.equal(a, aa.auto_augment(x, "cifar10", gen(1)))
    assert not torch.equal(a, aa.auto_augment(x, "cifar10", gen(2)))
    xf = x.float()
    assert torch.equal(aa.auto_augment(xf, "cifar10", gen(1)), a.float())  # float in, float out
    assert torch.equal(xf, x.float())  # the input is never written to
    with pytest.raises(UnknownNameError, match="cifar10, svhn"):
        aa.auto_augment(x, "imagenet", gen())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batch_matches_cpu_for_the_same_seed() -> None:
    x = images(64)
    t = build_transform("cifar10", "autoaugment", MEAN, STD)
    cpu = t(x, train=True, generator=gen(9))
    cuda = t(x.cuda(), train=True, generator=gen(9))
    one_level = 1 / 255 / min(STD) + 1e-5  # CUDA's float maths may round a tie the other way
    diff = (cuda.cpu() - cpu).abs()
    assert cuda.is_cuda and diff.max() <= one_level and (diff > 1e-5).float().mean() < 1e-3
