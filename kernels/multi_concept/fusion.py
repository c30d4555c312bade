"""Mix-of-Show's gradient fusion of several concept LoRAs into one weight (Gu et al., NeurIPS 2023, §3.3, Eq. 5),
solved in closed form.

For one linear layer with base weight W0 [out, in] and N concepts, concept i has a LoRA difference ΔW_i and
recorded input activations X_i (rows = tokens, [n_i, in]). With A_i = W0 + ΔW_i, fusion finds

    W* = argmin_W  Σ_i ‖X_i A_iᵀ − X_i Wᵀ‖²_F                                               (Eq. 5)

The objective only sees the inputs through their Gram matrices G_i = X_iᵀ X_i [in, in], so the activations can be
streamed (:class:`GramAccumulator`: memory [in, in], whatever the number of tokens) and the optimum solved
directly (:func:`fuse_layer`). With a ridge toward the concepts' weight average W̄ = W0 + (1/N) Σ_i ΔW_i,

    W* = argmin_W  Σ_i ‖X_i A_iᵀ − X_i Wᵀ‖²_F + λ ‖W − W̄‖²_F
       = W0 + (Σ_i ΔW_i G_i + λ ΔW̄)(Σ_i G_i + λI)⁻¹,

which for λ = 0 and full-rank Σ G_i is the normal-equation solution (Σ_i A_i G_i)(Σ_i G_i)⁻¹ of Eq. 5. The exact
optimum extrapolates: where the concepts' inputs differ only along directions of tiny variance (a text encoder's
padding positions, shared by every prompt up to a small prompt-dependent offset), it fits every concept's targets
by a large weight along those directions, and new prompts, whose offsets differ, turn that weight into noise.
Mix-of-Show's LBFGS, started from W0 and stopped after 50–500 iterations, never travels far along them (early
stopping acts as a spectral filter); the ridge does the same in closed form. Anchored at W̄ rather than W0:
directions the inputs cannot tell apart fall back to weight averaging (Mix-of-Show's baseline) instead of the base
weight, and concepts that agree (ΔW_i all equal) get their common weight back exactly, whatever λ. ``DEFAULT_RIDGE``
was chosen on real concepts' images and held-out activations (tests/benchmarks/fusion_ridge.md).

Mix-of-Show solves Eq. 5 iteratively with ``torch.optim.LBFGS`` on the raw activations; :func:`fuse_layer_lbfgs`
does the same, for side-by-side comparisons. :func:`sum_of_deltas` and :func:`average_of_deltas` are the
weight-fusion baselines, and :func:`low_rank_difference` turns a fused weight back into a LoRA-format difference.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from ..core.errors import UserInputError

__all__ = [
    "DEFAULT_RIDGE",
    "GramAccumulator",
    "fuse_layer",
    "FusionSums",
    "fusion_objective",
    "fuse_layer_lbfgs",
    "sum_of_deltas",
    "average_of_deltas",
    "low_rank_difference",
]


#: λ relative to the mean eigenvalue of Σ G_i (see :func:`fuse_layer`)
DEFAULT_RIDGE = 0.1


def _float64_device(device: torch.device) -> torch.device:
    """Where float64 work can happen: ``device`` itself, except MPS (no float64 there) → CPU."""
    return torch.device("cpu") if device.type == "mps" else device


class GramAccumulator:
    """Streams one layer's input activations into their Gram matrix G = Σ xᵀx (float64) and row count (§3.3).

    ``add`` takes [..., in] (e.g. [B, L, in] hidden states, or [B, H·W, in] pixels of a 1×1 conv) and an
    optional ``mask`` of shape [...] selecting the rows to count (bool, or 0/1 numbers — e.g. a tokenizer's
    attention mask). Memory stays [in, in] however many tokens are added.
    """

    def __init__(self, in_features: int | None = None, device: torch.device | str | None = None):
        if in_features is not None and (isinstance(in_features, bool) or int(in_features) < 1):
            raise ValueError(f"in_features must be a whole number >= 1, got {in_features!r}")
        self.in_features = None if in_features is None else int(in_features)
        self._device = None if device is None else _float64_device(torch.device(device))
        self._gram: torch.Tensor | None = None
        self._count = 0

    def _ensure(self, in_features: int, device: torch.device) -> torch.Tensor:
        if self.in_features is None:
            self.in_features = in_features
        elif in_features != self.in_features:
            raise ValueError(f"activations have {in_features} features, but this layer's Gram has {self.in_features}")
        if self._gram is None:
            if self._device is None:
                self._device = _float64_device(device)
            self._gram = torch.zeros(in_features, in_features, dtype=torch.float64, device=self._device)
        return self._gram

    def add(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add the rows of ``x`` [..., in] (those where ``mask`` [...] is true / 1, if given) to G and the count."""
        if x.dim() < 1:
            raise ValueError("activations need at least one dimension (the features)")
        gram = self._ensure(x.shape[-1], x.device)
        rows = x.detach().reshape(-1, x.shape[-1])
        if mask is not None:
            if tuple(mask.shape) != tuple(x.shape[:-1]):
                raise ValueError(f"the mask has shape {tuple(mask.shape)}, expected the activations' leading "
                                 f"shape {tuple(x.shape[:-1])}")
            if mask.dtype != torch.bool:
                if not bool(((mask == 0) | (mask == 1)).all()):
                    raise ValueError("a non-boolean mask must hold only 0 and 1 (it selects rows, it does not weight them)")
                mask = mask != 0
            rows = rows[mask.reshape(-1).to(rows.device)]
        if rows.shape[0] == 0:
            return
        rows = rows.to(device=gram.device, dtype=torch.float64)
        gram.addmm_(rows.T, rows)
        self._count += rows.shape[0]

    def merge(self, other: GramAccumulator) -> GramAccumulator:
        """Add ``other``'s Gram and count into this one (e.g. activations recorded in two runs); returns self."""
        if other._gram is None:
            return self
        gram = self._ensure(other.in_features, other._gram.device)
        gram += other._gram.to(gram.device)
        self._count += other._count
        return self

    @property
    def gram(self) -> torch.Tensor:
        """G = Σ xᵀx over every added row, float64 [in, in] (zeros when nothing was added yet)."""
        if self._gram is None:
            if self.in_features is None:
                raise ValueError("no activations were added and in_features is unknown: no Gram matrix yet")
            return torch.zeros(self.in_features, self.in_features, dtype=torch.float64,
                               device=self._device or torch.device("cpu"))
        return self._gram

    @property
    def count(self) -> int:
        """Number of rows (tokens) added."""
        return self._count


def _flat(weight: torch.Tensor, what: str) -> torch.Tensor:
    """[out, in] as is; a 1×1 conv weight [out, in, 1, 1] flattened to [out, in]; anything else refused."""
    if weight.dim() == 2:
        return weight
    if weight.dim() == 4 and weight.shape[2:] == (1, 1):
        return weight.reshape(weight.shape[0], weight.shape[1])
    raise UserInputError(f"{what} has shape {tuple(weight.shape)}: fusion handles Linear weights [out, in] and "
                         "1x1 conv weights [out, in, 1, 1] only")


def _as_gram(gram: torch.Tensor | GramAccumulator) -> torch.Tensor:
    return gram.gram if isinstance(gram, GramAccumulator) else gram


def _checked(base: torch.Tensor, deltas: Sequence[torch.Tensor],
             grams: Sequence[torch.Tensor | GramAccumulator] | None) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Flattened float64 base [out, in], deltas [out, in] and Grams [in, in] on one device, after shape checks."""
    if len(deltas) == 0:
        raise UserInputError("fusion needs at least one concept (got no LoRA differences)")
    if grams is not None and len(grams) != len(deltas):
        raise UserInputError(f"got {len(deltas)} LoRA differences but {len(grams)} Gram matrices: one per concept")
    flat_base = _flat(base, "the base weight")
    in_features = flat_base.shape[1]
    device = _float64_device(base.device)
    flat_deltas = []
    for i, delta in enumerate(deltas):
        if tuple(delta.shape) != tuple(base.shape):
            raise UserInputError(f"concept {i}'s LoRA difference has shape {tuple(delta.shape)}, but the base weight "
                                 f"has {tuple(base.shape)}")
        flat_deltas.append(_flat(delta, f"concept {i}'s LoRA difference").to(device=device, dtype=torch.float64))
    flat_grams = []
    for i, gram in enumerate(grams or []):
        g = _as_gram(gram)
        if tuple(g.shape) != (in_features, in_features):
            raise UserInputError(f"concept {i}'s Gram matrix has shape {tuple(g.shape)}, expected "
                                 f"({in_features}, {in_features}) (the layer's input features)")
        flat_grams.append(g.to(device=device, dtype=torch.float64))
    return flat_base.to(device=device, dtype=torch.float64), flat_deltas, flat_grams


def fuse_layer(base: torch.Tensor, deltas: Sequence[torch.Tensor],
               grams: Sequence[torch.Tensor | GramAccumulator], ridge: float = DEFAULT_RIDGE) -> torch.Tensor:
    """Mix-of-Show's fused weight (§3.3, Eq. 5) in closed form, with a ridge toward the weight average:
    W* = W0 + (Σ ΔW_i G_i + λ ΔW̄)(Σ G_i + λI)⁻¹ (module docstring).

    ``base`` W0 [out, in] or [out, in, 1, 1]; ``deltas`` ΔW_i of the same shape; ``grams`` G_i = X_iᵀX_i
    [in, in] (tensors or :class:`GramAccumulator`). The ridge is unit-free: λ = ridge · trace(Σ G_i) / in
    (``ridge`` times the inputs' mean eigenvalue); a tiny one (1e-8) gives Eq. 5's least-squares optimum, and any
    positive one keeps the solve defined for rank-deficient inputs (fewer tokens than features). Solved with a
    Cholesky factorisation in float64 (``ridge=0`` with a singular Σ G_i falls back to the minimum-norm
    least-squares solution); returned in ``base``'s dtype, shape and device.
    """
    _check_ridge(ridge)
    _, flat_deltas, flat_grams = _checked(base, deltas, grams)
    sums = FusionSums()
    for d, g in zip(flat_deltas, flat_grams):
        sums.add(d, g)
    return sums.solve(base, ridge)


def _check_ridge(ridge: float) -> None:
    if not (isinstance(ridge, (int, float)) and math.isfinite(ridge) and ridge >= 0):
        raise UserInputError(f"the ridge must be a finite number >= 0, got {ridge!r}")


class FusionSums:
    """The sums the fused weight needs, Σ G_i [in, in], Σ ΔW_i G_i [out, in] and Σ ΔW_i (for the ridge's anchor),
    accumulated concept by concept, so a layer's memory does not grow with the number of concepts (each G_i can be
    dropped once added)."""

    def __init__(self):
        self.gram: torch.Tensor | None = None
        self.rhs: torch.Tensor | None = None
        self.delta_sum: torch.Tensor | None = None
        self.concepts = 0

    def add(self, delta: torch.Tensor, gram: torch.Tensor | GramAccumulator) -> None:
        """One concept: its ΔW_i ([out, in] or a 1×1 conv weight) and G_i."""
        g = _as_gram(gram)
        d = _flat(delta, "the LoRA difference").to(device=g.device, dtype=torch.float64)
        if g.shape != (d.shape[1], d.shape[1]):
            raise UserInputError(f"a Gram matrix of shape {tuple(g.shape)} does not fit a layer with {d.shape[1]} "
                                 "input features")
        g = g.to(torch.float64)
        self.gram = g.clone() if self.gram is None else self.gram + g
        self.rhs = d @ g if self.rhs is None else self.rhs + d @ g
        self.delta_sum = d.clone() if self.delta_sum is None else self.delta_sum + d
        self.concepts += 1

    def difference(self, ridge: float = DEFAULT_RIDGE) -> torch.Tensor:
        """W* − W0 = (Σ ΔW_i G_i + λ ΔW̄)(Σ G_i + λI)⁻¹ [out, in] in float64: it needs no base weight, so a back end
        that patches weights (ComfyUI) can add it as a difference."""
        _check_ridge(ridge)
        if self.gram is None:
            raise UserInputError("fusion needs at least one concept (got no LoRA differences)")
        in_features = self.gram.shape[0]
        total = (self.gram + self.gram.T) / 2  # exactly symmetric for Cholesky
        scale = float(torch.diagonal(total).sum()) / in_features
        if not scale > 0:
            raise UserInputError("the concepts' Gram matrices are all zero (no activations recorded): nothing to "
                                 "fuse on")
        lam = ridge * scale
        system = total + lam * torch.eye(in_features, dtype=torch.float64, device=total.device)
        rhs = self.rhs + (lam / self.concepts) * self.delta_sum
        # D (S + λI) = R  ⇔  (S + λI) Dᵀ = Rᵀ, S symmetric
        factor, info = torch.linalg.cholesky_ex(system)
        if int(info) == 0:
            return torch.cholesky_solve(rhs.T, factor).T
        # only reachable with ridge = 0 (or a tiny one) on singular inputs: minimum-norm solution
        return torch.linalg.lstsq(system.cpu(), rhs.T.cpu(), driver="gelsd").solution.to(total.device).T

    def solve(self, base: torch.Tensor, ridge: float = DEFAULT_RIDGE) -> torch.Tensor:
        """W* = W0 + (Σ ΔW_i G_i + λ ΔW̄)(Σ G_i + λI)⁻¹ (see :func:`fuse_layer`), in ``base``'s dtype, shape and
        device."""
        if self.gram is None:
            raise UserInputError("fusion needs at least one concept (got no LoRA differences)")
        w0 = _flat(base, "the base weight").to(device=self.gram.device, dtype=torch.float64)
        if w0.shape != self.rhs.shape:
            raise UserInputError(f"the base weight has shape {tuple(w0.shape)}, the LoRA differences "
                                 f"{tuple(self.rhs.shape)}")
        fused = w0 + self.difference(ridge)
        return fused.reshape(base.shape).to(device=base.device, dtype=base.dtype)


def fusion_objective(weight: torch.Tensor, base: torch.Tensor, deltas: Sequence[torch.Tensor],
                     grams: Sequence[torch.Tensor | GramAccumulator]) -> float:
    """Eq. 5's least-squares objective of ``weight`` from Grams: Σ_i tr((A_i − W) G_i (A_i − W)ᵀ), A_i = W0 + ΔW_i.

    Equals Σ_i ‖X_i A_iᵀ − X_i Wᵀ‖²_F (a plain sum of squared errors, not a mean), computed in float64.
    """
    w0, flat_deltas, flat_grams = _checked(base, deltas, grams)
    if tuple(weight.shape) != tuple(base.shape):
        raise UserInputError(f"the weight has shape {tuple(weight.shape)}, but the base weight has {tuple(base.shape)}")
    w = _flat(weight, "the weight").to(device=w0.device, dtype=torch.float64)
    total = torch.zeros((), dtype=torch.float64, device=w0.device)
    for d, g in zip(flat_deltas, flat_grams):
        error = w0 + d - w
        total = total + ((error @ g) * error).sum()
    return float(total)


def fuse_layer_lbfgs(base: torch.Tensor, deltas: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor],
                     iterations: int, history: int = 25, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Mix-of-Show's own solver for Eq. 5 (§3.3), for side-by-side benchmarks with :func:`fuse_layer`.

    Starts from W0 and runs ``torch.optim.LBFGS(lr=1, history_size=history, max_iter=iterations,
    line_search_fn="strong_wolfe")`` (one ``step``, default tolerances) on the raw activations ``inputs``
    (X_i [n_i, in] per concept), with targets X_i A_iᵀ computed once. Mix-of-Show used 500 iterations for
    text-encoder layers and 50 for UNet layers. The loss is the plain sum of squared errors
    Σ_i ‖X_i A_iᵀ − X_i Wᵀ‖²_F, i.e. exactly :func:`fusion_objective` (Mix-of-Show sums per-concept MSEs,
    which rescales each concept's term by 1/(n_i·out): the same optimum when the n_i are equal).
    Computed in ``dtype`` (float32 as Mix-of-Show; float64 for exact comparisons); returned in ``base``'s dtype.
    """
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise UserInputError(f"iterations must be a whole number >= 1, got {iterations!r}")
    if isinstance(history, bool) or not isinstance(history, int) or history < 1:
        raise UserInputError(f"history must be a whole number >= 1, got {history!r}")
    if len(inputs) != len(deltas):
        raise UserInputError(f"got {len(deltas)} LoRA differences but {len(inputs)} activation sets: one per concept")
    flat_base = _flat(base, "the base weight")
    in_features = flat_base.shape[1]
    device = base.device if dtype != torch.float64 else _float64_device(base.device)
    _checked(base, deltas, None)  # shape checks of the deltas
    xs, targets = [], []
    for i, (x, delta) in enumerate(zip(inputs, deltas)):
        if x.dim() != 2 or x.shape[1] != in_features:
            raise UserInputError(f"concept {i}'s activations have shape {tuple(x.shape)}, expected [tokens, {in_features}]")
        x = x.detach().to(device=device, dtype=dtype)
        target_weight = (flat_base + _flat(delta, f"concept {i}'s LoRA difference")).detach().to(device=device, dtype=dtype)
        xs.append(x)
        targets.append(x @ target_weight.T)
    weight = flat_base.detach().to(device=device, dtype=dtype).clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([weight], lr=1, history_size=history, max_iter=iterations,
                                  line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = sum(((x @ weight.T - t) ** 2).sum() for x, t in zip(xs, targets))
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach().reshape(base.shape).to(device=base.device, dtype=base.dtype)


def sum_of_deltas(base: torch.Tensor, deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """Baseline: W0 + Σ_i ΔW_i (every LoRA applied at full strength at once)."""
    _checked(base, deltas, None)
    return base + sum(d.to(base.dtype) for d in deltas)


def average_of_deltas(base: torch.Tensor, deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """Baseline: W0 + (1/N) Σ_i ΔW_i, the weight averaging Mix-of-Show compares against ("weight fusion", §4)."""
    _checked(base, deltas, None)
    return base + sum(d.to(base.dtype) for d in deltas) / len(deltas)


def record_grams(modules: dict[str, torch.nn.Module], record: Callable[[], object], *,
                 tap: Callable[[str, torch.Tensor], None] | None = None,
                 what: str = "recording") -> dict[str, GramAccumulator]:
    """G = XᵀX of the inputs each module receives while ``record()`` runs (forward pre-hooks on the modules,
    removed however it ends; ``tap(name, inputs)`` sees each input). Refuses a module that saw no input."""
    grams = {n: GramAccumulator() for n in modules}

    def hook(name: str, x: torch.Tensor) -> None:
        grams[name].add(x.detach())
        if tap is not None:
            tap(name, x.detach())

    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: hook(n, args[0])) for n, m in modules.items()]
    try:
        with torch.no_grad():
            record()
    finally:
        for h in hooks:
            h.remove()
    silent = [n for n, g in grams.items() if g.count == 0]
    if silent:
        raise UserInputError(f"layer {silent[0]} saw no input while {what}")
    return grams


def low_rank_difference(diff: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-r approximation (Eckart–Young) of a weight difference such as W* − W0, as LoRA factors.

    ``diff`` [out, in] or [out, in, 1, 1] (flattened). Returns ``(down [r, in], up [out, r])`` with
    up @ down = U_r Σ_r V_rᵀ, the singular values split as √σ on both sides; saved with alpha = r, the
    LoRA's scale α/r is 1. A rank above min(out, in) is clamped to it; rank < 1 is refused. Computed in
    float64, returned in ``diff``'s dtype.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise UserInputError(f"the rank must be a whole number >= 1, got {rank!r}")
    flat = _flat(diff, "the weight difference")
    rank = min(rank, *flat.shape)
    device = _float64_device(diff.device)
    u, s, vh = torch.linalg.svd(flat.to(device=device, dtype=torch.float64), full_matrices=False)
    root = s[:rank].sqrt()
    up = u[:, :rank] * root
    down = root[:, None] * vh[:rank]
    return (down.to(device=diff.device, dtype=diff.dtype).contiguous(),
            up.to(device=diff.device, dtype=diff.dtype).contiguous())
