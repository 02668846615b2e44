"""CLML: the low-rank label-structure term for missing labels (docs/method.md).

Paper: "Label Structure Preserving Contrastive Embedding for Multi-Label Learning with
Missing Labels" (arXiv 2022, ``papers/clml-abstract.txt``). Authors' code:
github.com/chuangua/ContrastiveLossMLML, ``ConLoss_MLML.py`` (classes ``CLML`` and
``CLLoss``) and ``train_clml.py`` (how it is called).

For a batch of embeddings F (N x D), logits z (N x C) and targets y (N x C, float {0,1},
unknown read as 0):

1. Label correction (from ``start_epoch`` on): an entry with y == 0 whose predicted
   probability ``sigmoid(z - margin * y)`` exceeds ``tau`` counts as positive *for this
   term only*. The logits are detached: the correction selects rows, it is not trained.
2. ``L = (lam / N) * (sum_c max(delta, ||F_c||_*) - ||F||_*)``, where F_c are the rows of
   the samples carrying (corrected) label c and ||.||_* is the nuclear norm.

Defaults (no config dataclass; these are the keyword defaults of :func:`clml_loss`):

* ``tau = 0.75``: ``--threshold`` default of ``train_clml.py`` (the ``CLML`` class itself
  defaults to 0.7, but the training script passes 0.75).
* ``start_epoch = 1``, ``epoch`` 1-based as in this project's training loop: correction
  from the first epoch. NOTE the authors' loop is 0-based (``for epoch in range(Epochs)``)
  with ``change_epoch = 1``, i.e. their correction starts with the *second* epoch; pass
  ``start_epoch=2`` to reproduce that exactly.
* ``margin = 1.0`` (the ``CLML`` class default). The authors subtract it from the logits
  of entries whose target is already 1, so it never changes the correction of a y == 0
  entry: it is kept for fidelity and has no effect on the result.
* ``delta = 1.0`` (``DELTA`` in ``CLLoss``).
* ``lam``: no default; ``train_clml.py`` uses ``--lambda_ 1.0``. The authors' code
  multiplies the global term by ``lam`` a second time
  (``(Obj_c - lam * Obj_all) / N * lam``); this follows docs/method.md (one ``lam``), which
  is identical at their default ``lam = 1``.

Gradient: the authors hand-code the subgradient ``U V^T`` of each nuclear norm, dropping
singular values below 1e-6, and none for a class whose norm is below delta. Here autograd
gives the same: each nuclear norm is computed from eigenvalues of Gram matrices (see
below) with eigenvalues below ``max(1e-12, 1e-12 * lambda_max)`` (singular values below
1e-6, absolute and relative) dropped, and ``clamp_min(delta)`` has zero gradient below
delta. A label with no sample in the batch contributes the constant delta (the authors'
code does the same: an empty SVD gives norm 0, then ``max`` gives DELTA); a label with one
sample contributes ``max(delta, ||f_i||)``. Neither yields NaN values or gradients.

Implementation (batched, no loop over labels, on F's device; :class:`_NuclearTerm`): with
G = F F^T (N x N, float64), the Gram matrix of F_c is G restricted to the rows and columns
of label c, the singular values of F_c are the square roots of its eigenvalues, and the
gradient of ||F_c||_* is P_c F_c with P_c = W diag(1/sigma) W^T (its inverse square root
on the kept eigenpairs). The forward pass sums the P_c of the labels whose norm reaches
delta, scattered to their rows and columns, minus P of F itself, into one N x N matrix A,
so the backward pass is one product, A F, and no autograd graph runs through the
eigendecompositions. A label with one sample needs none (norm ||f_i||); the others are
gathered into zero-padded blocks (padding adds only zero eigenvalues), bucketed by
sample count (the next power of two up to 8, the next multiple of 8 above), ONE batched
``torch.linalg.eigh`` per bucket. The Gram matrices are formed and decomposed in
float64: float32 eigenvalues of these rank-deficient matrices are too inaccurate (square
roots of rounding noise add up) and LAPACK's float32 eigh can fail to converge on them.
When N > D the D x D Grams ``F_c^T F_c`` are smaller, and that form is used instead
(autograd through ``eigvalsh``). ``method="svd"`` (one batched ``torch.linalg.svdvals``
on C+1 masked copies of F) is kept as a cross-check; it is about 30x slower on the CPU.
The bucketing needs one host sync (the label counts). Cost: ``bench/clml_step.py``
(results in ``docs/bench-missing-labels.md``).
"""

from __future__ import annotations

import torch

_SIGMA_TOL = 1e-6  # authors' eigThd: singular values below it carry no gradient


def corrected_targets(
    logits: torch.Tensor,
    y: torch.Tensor,
    *,
    epoch: int,
    tau: float = 0.75,
    start_epoch: int = 1,
    margin: float = 1.0,
) -> torch.Tensor:
    """Bool (N, C): which entries count as positive for the CLML term.

    y == 1 entries always count; from ``start_epoch`` on, a y == 0 entry counts too when
    ``sigmoid(z - margin * y) > tau``. Uses detached logits."""
    pos = y > 0.5
    if epoch < start_epoch:
        return pos
    z = logits.detach() - margin * y.to(logits.dtype)
    return pos | (torch.sigmoid(z) > tau)


def _nuclear_from_gram(gram: torch.Tensor) -> torch.Tensor:
    """Sum of square roots of the eigenvalues of symmetric PSD matrices (..., n, n),
    eigenvalues below max(1e-12, 1e-12 * largest) dropped (NaN-free gradient). Autograd
    through ``eigvalsh``: used for the D x D form (N > D)."""
    lam = torch.linalg.eigvalsh(gram)
    thr = (lam.amax(dim=-1, keepdim=True) * _SIGMA_TOL**2).clamp_min(_SIGMA_TOL**2)
    keep = lam > thr
    sigma = torch.where(keep, lam, torch.ones_like(lam)).sqrt() * keep
    return sigma.sum(dim=-1)


def _nuclear_and_inverse_root(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For Gram matrices G = X X^T (..., n, n): ||X||_* and P = W diag(1/sigma) W^T over
    the kept eigenpairs (same threshold as :func:`_nuclear_from_gram`). The gradient of
    ||X||_* with respect to X is U V^T = P X."""
    lam, w = torch.linalg.eigh(gram)
    thr = (lam.amax(dim=-1, keepdim=True) * _SIGMA_TOL**2).clamp_min(_SIGMA_TOL**2)
    keep = lam > thr
    sigma = torch.where(keep, lam, torch.ones_like(lam)).sqrt()
    inv = keep / sigma
    return (sigma * keep).sum(dim=-1), (w * inv[..., None, :]) @ w.mT


def _bucket(k: int) -> int:
    """Block size for a label with k samples: the next power of two up to 8, then the
    next multiple of 8 (padding costs at most 2x a small block and (1 + 7/k)^3 a large
    one, and the many labels of a batch share a few eigh calls)."""
    return 1 << (k - 1).bit_length() if k <= 8 else -(-k // 8) * 8


class _NuclearTerm(torch.autograd.Function):
    """sum_c max(delta, ||F_c||_*) - ||F||_* for N <= D, with its gradient assembled in
    the forward pass.

    Every nuclear norm and its gradient come from ONE N x N Gram matrix G = F F^T
    (float64): the Gram matrix of F_c is G restricted to label c's rows, and the gradient
    of ||F_c||_* is P_c F_c with P_c its inverse square root on the kept eigenpairs.
    Summing the P_c (scattered to their rows and columns, minus P for F itself, and only
    for labels whose norm reaches delta: ``clamp_min`` passes no gradient below it) into
    one N x N matrix A makes the backward pass one product, A F. A label with one sample
    needs no decomposition (its norm is ||f_i||, P = 1/||f_i||); the other labels go
    through one batched ``eigh`` per block size (:func:`_bucket`). A block is padded
    with a dummy row N of zeros (G gets a zero row and column N; padding adds only zero
    eigenvalues, and what lands on row N of A is dropped)."""

    @staticmethod
    def forward(ctx, f: torch.Tensor, members: torch.Tensor, delta: float) -> torch.Tensor:
        n = f.shape[0]
        f64 = f.detach().to(torch.float64)
        g = f64.new_zeros(n + 1, n + 1)
        g[:n, :n] = f64 @ f64.T
        nuc_all, p_all = _nuclear_and_inverse_root(g[:n, :n])
        a = f64.new_zeros(n + 1, n + 1)
        a[:n, :n] -= p_all
        total = -nuc_all
        counts = members.sum(dim=1).tolist()  # the one host sync: it sets the buckets
        total = total + delta * sum(1 for k in counts if k == 0)  # an empty label: max(delta, 0)
        # each label's rows first (stable order), then the dummy row n
        flags, order = torch.sort(members.to(torch.int8), dim=1, descending=True, stable=True)
        order = torch.where(flags.bool(), order, n)
        by_size: dict[int, list[int]] = {}
        for c, k in enumerate(counts):
            if k:
                by_size.setdefault(min(_bucket(int(k)), n), []).append(c)
        for size, labels in by_size.items():
            o = order[torch.tensor(labels, device=f.device), :size]  # (B, size)
            if size == 1:
                i = o[:, 0]  # the label's one sample
                sq = g[i, i]
                keep = sq > _SIGMA_TOL**2
                nuc = torch.where(keep, sq, 1.0).sqrt() * keep
                a = a.index_put((i, i), torch.where(keep & (nuc >= delta), 1.0 / torch.where(keep, nuc, 1.0), 0.0),
                                accumulate=True)
            else:
                rows, cols = o[:, :, None].expand(-1, -1, size), o[:, None, :].expand(-1, size, -1)
                nuc, p = _nuclear_and_inverse_root(g[rows, cols])
                a = a.index_put((rows, cols), p * (nuc >= delta)[:, None, None], accumulate=True)
            total = total + nuc.clamp_min(delta).sum()
        ctx.save_for_backward(a[:n, :n], f64)
        ctx.dtype = f.dtype
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        a, f64 = ctx.saved_tensors
        return (grad * (a @ f64)).to(ctx.dtype), None, None


def _class_nuclear_dd(f: torch.Tensor, members: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(||F_c||_* for each label (C,), ||F||_*) via the D x D Grams F_c^T F_c =
    F^T diag(m_c) F, smaller than N x N when N > D (autograd through ``eigvalsh``)."""
    f64 = f.to(torch.float64)
    m = members.to(torch.float64)  # (C, N)
    nuc_c = _nuclear_from_gram(torch.einsum("cn,nd,ne->cde", m, f64, f64))
    nuc_all = _nuclear_from_gram(f64.T @ f64)
    return nuc_c, nuc_all


def _class_nuclear_svd(f: torch.Tensor, members: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Same via ONE ``torch.linalg.svdvals`` on (C+1, N, D) masked copies (zero rows
    add only zero singular values); the last copy is F itself."""
    m = torch.cat([members, torch.ones_like(members[:1])]).to(f.dtype)  # (C+1, N)
    s = torch.linalg.svdvals(m[:, :, None] * f[None])
    s = s * (s > _SIGMA_TOL)
    nuc = s.sum(dim=-1)
    return nuc[:-1], nuc[-1]


def clml_loss(
    f: torch.Tensor,
    logits: torch.Tensor,
    y: torch.Tensor,
    *,
    epoch: int,
    lam: float,
    tau: float = 0.75,
    delta: float = 1.0,
    start_epoch: int = 1,
    margin: float = 1.0,
    method: str = "gram",
) -> torch.Tensor:
    """The CLML term ``(lam / N) * (sum_c max(delta, ||F_c||_*) - ||F||_*)``.

    Args:
        f: (N, D) batch embeddings (gradients flow into them).
        logits: (N, C) classifier logits; only used, detached, for label correction.
        y: (N, C) float {0, 1} targets, unknown read as 0.
        epoch: current epoch, 1-based (correction applies when ``epoch >= start_epoch``).
        lam: weight of the term (0 gives an exact zero that keeps the graph).
        tau, delta, start_epoch, margin: see the module docstring.
        method: "gram" (default, fastest on the CPU) or "svd" (a cross-check).

    Returns:
        A scalar tensor of ``f``'s dtype on ``f``'s device.
    """
    n = f.shape[0]
    if n == 0 or lam == 0:
        return f.sum() * 0.0
    members = corrected_targets(logits, y, epoch=epoch, tau=tau, start_epoch=start_epoch, margin=margin).T
    if method == "gram" and n <= f.shape[1]:
        return ((lam / n) * _NuclearTerm.apply(f, members, delta)).to(f.dtype)
    if method == "gram":
        nuc_c, nuc_all = _class_nuclear_dd(f, members)
    elif method == "svd":
        nuc_c, nuc_all = _class_nuclear_svd(f, members)
    else:
        raise ValueError(f"unknown method {method!r}; known: gram, svd")
    loss = (lam / n) * (nuc_c.clamp_min(delta).sum() - nuc_all)
    return loss.to(f.dtype)
