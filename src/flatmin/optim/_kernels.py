"""The arithmetic of model perturbation, as plain single-tensor loops and as `torch._foreach_*` twins.

Every optimizer in `flatmin.optim` does its math here. Each `_single_tensor_*` function is the
obvious reference; its `_multi_tensor_*` twin does the same with one foreach launch per list
(the style of torch.optim's multi-tensor kernels) and the tests hold them equal. Nothing here
reads a tensor value on the host: clipping is `torch.clamp`, never a Python `if` on a norm.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

TINY = 1e-12  # the authors' guard against a zero norm
NormReduce = Callable[[Tensor, str], Tensor]  # local per-tensor norms, ball -> full norms (sharded.py)


# --- norms and clipping ------------------------------------------------------------------------


def clip_coefficients(norms: Tensor, radius: float, ball: str) -> Tensor:
    """min(1, ε/‖Δ‖): one coefficient for the whole group ("global") or one per tensor."""
    if ball == "global":
        norms = torch.linalg.vector_norm(norms)
    return torch.clamp(radius / (norms + TINY), max=1.0)


def rescale_coefficients(norms: Tensor, radius: float, ball: str) -> Tensor:
    """ε/‖d‖ with no clipping: puts a direction exactly on the sphere (SAM, RMP)."""
    if ball == "global":
        norms = torch.linalg.vector_norm(norms)
    return radius / (norms + TINY)


def _stack_norms(norms: list[Tensor] | tuple[Tensor, ...]) -> Tensor:
    """One vector of norms, at least float32 (half-precision norms overflow) but never less precise."""
    dtype = torch.float64 if any(n.dtype == torch.float64 for n in norms) else torch.float32
    return torch.stack([n.to(dtype) for n in norms])


def _single_tensor_norms(tensors: list[Tensor]) -> Tensor:
    """Stacked L2 norms, one per tensor."""
    return _stack_norms([torch.linalg.vector_norm(t) for t in tensors])


def _multi_tensor_norms(tensors: list[Tensor]) -> Tensor:
    """Stacked L2 norms, one foreach launch."""
    return _stack_norms(torch._foreach_norm(tensors))


def _reduced(norms: Tensor, reduce: NormReduce | None, ball: str) -> Tensor:
    """Norms of whole tensors: local ones as they are, a shard's finished by ``reduce`` (one all-reduce)."""
    return norms if reduce is None else reduce(norms, ball)


def _as_list(coefs: Tensor, n: int) -> list[Tensor] | Tensor:
    """A 0-d coefficient is shared by every tensor; a vector gives one per tensor."""
    return coefs if coefs.dim() == 0 else list(coefs.unbind())


# --- AMP: one step of projected gradient ascent on the perturbation ---------------------------


def _single_tensor_amp_ascent(
    params: list[Tensor],
    grads: list[Tensor],
    thetas: list[Tensor],
    deltas: list[Tensor] | None,
    *,
    step_size: float | Tensor,
    epsilon: float,
    ball: str,
    first: bool,
    reduce: NormReduce | None = None,
) -> None:
    """Δ ← Π_ε(Δ + ζ∇J(θ+Δ)); params ← θ + Δ. deltas=None: Δ starts at 0 and lives in the grads.

    ``reduce``: how shards' norms become full norms (`flatmin.optim.sharded`); None: tensors are whole."""
    ds = []
    for i, g in enumerate(grads):
        g.mul_(step_size)
        if deltas is None:
            ds.append(g)
        else:
            if first:
                deltas[i].zero_()
            ds.append(deltas[i].add_(g))
    coefs = clip_coefficients(_reduced(_single_tensor_norms(ds), reduce, ball), epsilon, ball)
    for i, (p, theta, d) in enumerate(zip(params, thetas, ds)):
        d.mul_(coefs if coefs.dim() == 0 else coefs[i])
        if not first:
            p.copy_(theta)
        p.add_(d)


def _multi_tensor_amp_ascent(
    params: list[Tensor],
    grads: list[Tensor],
    thetas: list[Tensor],
    deltas: list[Tensor] | None,
    *,
    step_size: float | Tensor,
    epsilon: float,
    ball: str,
    first: bool,
    reduce: NormReduce | None = None,
) -> None:
    """Foreach twin of `_single_tensor_amp_ascent`."""
    torch._foreach_mul_(grads, step_size)
    if deltas is None:
        ds = grads
    else:
        if first:
            torch._foreach_zero_(deltas)
        torch._foreach_add_(deltas, grads)
        ds = deltas
    coefs = clip_coefficients(_reduced(_multi_tensor_norms(ds), reduce, ball), epsilon, ball)
    torch._foreach_mul_(ds, _as_list(coefs, len(ds)))
    if not first:
        torch._foreach_copy_(params, thetas)
    torch._foreach_add_(params, ds)


# --- SAM / ASAM: the normalised ascent step --------------------------------------------------


def _single_tensor_sam_norm(params: list[Tensor], grads: list[Tensor], adaptive: bool,
                            eta: float = 0.0) -> Tensor:
    """‖T_w ∇L‖ over all tensors (T_w = |w| + η for ASAM, identity for SAM)."""
    if adaptive and eta:
        scaled = [(p.abs() + eta) * g for p, g in zip(params, grads)]
        return torch.linalg.vector_norm(_single_tensor_norms(scaled))
    return torch.linalg.vector_norm(
        _single_tensor_norms([p.abs() * g if adaptive else g for p, g in zip(params, grads)])
    )


def _multi_tensor_sam_norm(params: list[Tensor], grads: list[Tensor], adaptive: bool,
                           eta: float = 0.0) -> Tensor:
    """Foreach twin of `_single_tensor_sam_norm`."""
    if adaptive and eta:
        scaled = torch._foreach_mul(grads, torch._foreach_add(torch._foreach_abs(params), eta))
    else:
        scaled = torch._foreach_mul(grads, torch._foreach_abs(params)) if adaptive else grads
    return torch.linalg.vector_norm(_multi_tensor_norms(scaled))


def _single_tensor_sam_ascent(
    params: list[Tensor], grads: list[Tensor], *, scale: Tensor, adaptive: bool, inplace: bool,
    eta: float = 0.0, by_weight: bool = False,
) -> None:
    """params ← θ + ρ·T_w²∇L/‖T_w∇L‖ (scale = ρ/‖T_w∇L‖ already computed; T_w = |w| + η); ``by_weight``:
    e·|θ| too (GSAM's official adaptive perturbation, |θ|·ρ·∇L/‖∇L‖, its norm taken with T = I)."""
    for p, g in zip(params, grads):
        e = g if inplace else g.clone()
        if adaptive and eta:
            t = p.abs().add_(eta)
            e.mul_(t).mul_(t)
        elif adaptive:
            e.mul_(p).mul_(p)
        if by_weight:
            e.mul_(p.abs())
        p.add_(e.mul_(scale))


def _multi_tensor_sam_ascent(
    params: list[Tensor], grads: list[Tensor], *, scale: Tensor, adaptive: bool, inplace: bool,
    eta: float = 0.0, by_weight: bool = False,
) -> None:
    """Foreach twin of `_single_tensor_sam_ascent`."""
    e = grads if inplace else torch._foreach_mul(grads, 1.0)
    if adaptive and eta:
        t = torch._foreach_abs(params)
        torch._foreach_add_(t, eta)
        torch._foreach_mul_(e, t)
        torch._foreach_mul_(e, t)
    elif adaptive:
        torch._foreach_mul_(e, params)
        torch._foreach_mul_(e, params)
    if by_weight:
        torch._foreach_mul_(e, torch._foreach_abs(params))
    torch._foreach_mul_(e, scale)
    torch._foreach_add_(params, e)


# --- RMP: a random point on the sphere ---------------------------------------------------------


def _single_tensor_random_perturb(
    params: list[Tensor], draws: list[Tensor], norms: Tensor, *, radius: float, ball: str,
) -> None:
    """params ← θ + r·d/‖d‖ with d ~ N(0, I) (``draws``, whose whole tensors have ``norms``): uniform on
    the sphere of radius r. The draws are consumed."""
    coefs = rescale_coefficients(norms, radius, ball)
    for i, (p, d) in enumerate(zip(params, draws)):
        p.add_(d.mul_(coefs if coefs.dim() == 0 else coefs[i]))


def _multi_tensor_random_perturb(
    params: list[Tensor], draws: list[Tensor], norms: Tensor, *, radius: float, ball: str,
) -> None:
    """Foreach twin of `_single_tensor_random_perturb`."""
    coefs = rescale_coefficients(norms, radius, ball)
    torch._foreach_mul_(draws, _as_list(coefs, len(draws)))
    torch._foreach_add_(params, draws)


# --- keeping θ -----------------------------------------------------------------------------------


def copy_(dst: list[Tensor], src: list[Tensor], foreach: bool) -> None:
    """dst ← src bit for bit: how θ is saved before and restored after a perturbation."""
    if foreach:
        torch._foreach_copy_(dst, src)
    else:
        for d, s in zip(dst, src):
            d.copy_(s)


def norms(tensors: list[Tensor], foreach: bool) -> Tensor:
    """Dispatch to the foreach or the single-tensor stacked per-tensor norms."""
    return (_multi_tensor_norms if foreach else _single_tensor_norms)(tensors)


def clone(src: list[Tensor], foreach: bool) -> list[Tensor]:
    """Fresh copies, bit for bit (x·1 = x, NaN and −0 included)."""
    return torch._foreach_mul(src, 1.0) if foreach else [s.clone() for s in src]


def add_(dst: list[Tensor], src: list[Tensor], foreach: bool) -> None:
    """dst ← dst + src: puts a kept Δ on θ (the same bits as the ascent's own ``p.add_(d)``)."""
    if foreach:
        torch._foreach_add_(dst, src)
    else:
        for d, s in zip(dst, src):
            d.add_(s)


def amp_ascent(*args, foreach: bool, **kwargs) -> None:
    """Dispatch to the foreach or the single-tensor AMP ascent."""
    (_multi_tensor_amp_ascent if foreach else _single_tensor_amp_ascent)(*args, **kwargs)


def sam_norm(params: list[Tensor], grads: list[Tensor], adaptive: bool, foreach: bool,
             eta: float = 0.0) -> Tensor:
    """Dispatch to the foreach or the single-tensor SAM gradient norm."""
    return (_multi_tensor_sam_norm if foreach else _single_tensor_sam_norm)(params, grads, adaptive, eta)


def sam_ascent(*args, foreach: bool, **kwargs) -> None:
    """Dispatch to the foreach or the single-tensor SAM ascent."""
    (_multi_tensor_sam_ascent if foreach else _single_tensor_sam_ascent)(*args, **kwargs)


def random_perturb(*args, foreach: bool, **kwargs) -> None:
    """Dispatch to the foreach or the single-tensor random perturbation."""
    (_multi_tensor_random_perturb if foreach else _single_tensor_random_perturb)(*args, **kwargs)


# === the sharpness-aware family (flatmin.optim.rules) ============================================
# Kept apart from the kernels above: GSAM/LookSAM/WSAM/FriendlySAM combine two gradients, BSAM keeps
# a precision vector. Same rule: a readable single-tensor reference and a foreach twin, no host read.


def _single_tensor_dot(a: list[Tensor], b: list[Tensor]) -> Tensor:
    """Σ_i ⟨a_i, b_i⟩ over every tensor (one inner product of the whole model)."""
    return torch.stack([(x * y).sum() for x, y in zip(a, b)]).sum()


def _multi_tensor_dot(a: list[Tensor], b: list[Tensor]) -> Tensor:
    """Foreach twin of `_single_tensor_dot` (one product launch, one reduction)."""
    return torch.cat([t.reshape(-1) for t in torch._foreach_mul(a, b)]).sum()


def _single_tensor_axpby_(x: list[Tensor], y: list[Tensor], a: float | Tensor, b: float | Tensor) -> None:
    """x ← a·x + b·y (a, b numbers or 0-d tensors): how two gradients are combined."""
    for xi, yi in zip(x, y):
        xi.mul_(a)
        if isinstance(b, Tensor):
            xi.add_(yi * b)
        else:
            xi.add_(yi, alpha=b)


def _multi_tensor_axpby_(x: list[Tensor], y: list[Tensor], a: float | Tensor, b: float | Tensor) -> None:
    """Foreach twin of `_single_tensor_axpby_`."""
    torch._foreach_mul_(x, a)
    if isinstance(b, Tensor):
        torch._foreach_add_(x, torch._foreach_mul(y, b))
    else:
        torch._foreach_add_(x, y, alpha=b)


def _single_tensor_bsam_noise(params: list[Tensor], precisions: list[Tensor], draws: list[Tensor], *,
                              num_data: int) -> None:
    """params ← θ + e, e = d/√(N·s) element-wise, d ~ N(0, I) (``draws``, consumed): bSAM's noisy sample."""
    for p, s, n in zip(params, precisions, draws):
        p.add_(n.mul_(s.mul(num_data).reciprocal_().sqrt_()))


def _multi_tensor_bsam_noise(params: list[Tensor], precisions: list[Tensor], draws: list[Tensor], *,
                             num_data: int) -> None:
    """Foreach twin of `_single_tensor_bsam_noise`."""
    ns = draws
    std = torch._foreach_mul(precisions, float(num_data))
    torch._foreach_reciprocal_(std)
    torch._foreach_sqrt_(std)
    torch._foreach_mul_(ns, std)
    torch._foreach_add_(params, ns)


def _single_tensor_bsam_ascent(params: list[Tensor], grads: list[Tensor], thetas: list[Tensor],
                               precisions: list[Tensor], scaled_grads: list[Tensor], *, rho: float,
                               inv_scale: Tensor | float) -> None:
    """gs ← √s·|g|; params ← θ + ρ·g/s (g the noisy-sample gradient, unscaled by ``inv_scale``)."""
    for p, g, t, s, gs in zip(params, grads, thetas, precisions, scaled_grads):
        g.mul_(inv_scale)
        torch.mul(g.abs(), s.sqrt(), out=gs)
        p.copy_(t).add_(g.mul_(rho).div_(s))


def _multi_tensor_bsam_ascent(params: list[Tensor], grads: list[Tensor], thetas: list[Tensor],
                              precisions: list[Tensor], scaled_grads: list[Tensor], *, rho: float,
                              inv_scale: Tensor | float) -> None:
    """Foreach twin of `_single_tensor_bsam_ascent`."""
    torch._foreach_mul_(grads, inv_scale)
    torch._foreach_copy_(scaled_grads,
                         torch._foreach_mul(torch._foreach_abs(grads), torch._foreach_sqrt(precisions)))
    torch._foreach_mul_(grads, rho)
    torch._foreach_div_(grads, precisions)
    torch._foreach_copy_(params, thetas)
    torch._foreach_add_(params, grads)


def _single_tensor_bsam_update(params: list[Tensor], grads: list[Tensor], means: list[Tensor],
                               precisions: list[Tensor], scaled_grads: list[Tensor], *, lr: float,
                               beta1: float, beta2: float, weight_decay: float, damping: float) -> None:
    """gm ← β₁gm + (1−β₁)(g + δθ); θ ← θ − lr·gm/s; s ← β₂s + (1−β₂)(√s|g| + damping + δ)."""
    for p, g, m, s, gs in zip(params, grads, means, precisions, scaled_grads):
        m.mul_(beta1).add_(g.add(p, alpha=weight_decay), alpha=1 - beta1)
        p.sub_(m.div(s).mul_(lr))
        s.mul_(beta2).add_(gs.add(damping + weight_decay), alpha=1 - beta2)


def _multi_tensor_bsam_update(params: list[Tensor], grads: list[Tensor], means: list[Tensor],
                              precisions: list[Tensor], scaled_grads: list[Tensor], *, lr: float,
                              beta1: float, beta2: float, weight_decay: float, damping: float) -> None:
    """Foreach twin of `_single_tensor_bsam_update`."""
    torch._foreach_mul_(means, beta1)
    torch._foreach_add_(means, torch._foreach_add(grads, params, alpha=weight_decay), alpha=1 - beta1)
    step = torch._foreach_div(means, precisions)
    torch._foreach_mul_(step, lr)
    torch._foreach_sub_(params, step)
    torch._foreach_mul_(precisions, beta2)
    torch._foreach_add_(precisions, torch._foreach_add(scaled_grads, damping + weight_decay), alpha=1 - beta2)


def dot(a: list[Tensor], b: list[Tensor], foreach: bool) -> Tensor:
    """Dispatch to the foreach or the single-tensor inner product."""
    return (_multi_tensor_dot if foreach else _single_tensor_dot)(a, b)


def axpby_(x: list[Tensor], y: list[Tensor], a: float | Tensor, b: float | Tensor, foreach: bool) -> None:
    """Dispatch to the foreach or the single-tensor x ← a·x + b·y."""
    (_multi_tensor_axpby_ if foreach else _single_tensor_axpby_)(x, y, a, b)


def bsam_noise(*args, foreach: bool, **kwargs) -> None:
    """Dispatch to the foreach or the single-tensor bSAM noise draw."""
    (_multi_tensor_bsam_noise if foreach else _single_tensor_bsam_noise)(*args, **kwargs)


def bsam_ascent(*args, foreach: bool, **kwargs) -> None:
    """Dispatch to the foreach or the single-tensor bSAM ascent."""
    (_multi_tensor_bsam_ascent if foreach else _single_tensor_bsam_ascent)(*args, **kwargs)


def bsam_update(*args, foreach: bool, **kwargs) -> None:
    """Dispatch to the foreach or the single-tensor bSAM update."""
    (_multi_tensor_bsam_update if foreach else _single_tensor_bsam_update)(*args, **kwargs)
