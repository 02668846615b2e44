"""CLML: the low-rank label-structure term for missing labels (DESIGN.md section 3).

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
  (``(Obj_c - lam * Obj_all) / N * lam``); this follows DESIGN.md (one ``lam``), which
  is identical at their default ``lam = 1``.

Gradient: the authors hand-code the subgradient ``U V^T`` of each nuclear norm, dropping
singular values below 1e-6, and none for a class whose norm is below delta. Here autograd
gives the same: each nuclear norm is computed from eigenvalues of Gram matrices (see
below) with eigenvalues below ``max(1e-12, 1e-12 * lambda_max)`` (singular values below
1e-6, absolute and relative) dropped, and ``clamp_min(delta)`` has zero gradient below
delta. A label with no sample in the batch contributes the constant delta (the authors'
code does the same: an empty SVD gives norm 0, then ``max`` gives DELTA); a label with one
sample contributes ``max(delta, ||f_i||)``. Neither yields NaN values or gradients.

Implementation (batched, no loop over labels, on F's device): with G = F F^T (N x N), the
Gram matrix of F_c is G restricted to the rows and columns of label c, and the singular
values of F_c are the square roots of its eigenvalues. Rows of each label are gathered
into a zero-padded block (padding rows and columns are zero, which adds only zero
eigenvalues); labels are bucketed by their sample count rounded up to a power of two
(1, 2, 4, ..., N), and ONE ``torch.linalg.eigvalsh`` call per bucket gives the spectra
of its labels, so a label with 3 samples is decomposed as a 4 x 4 matrix, not padded to
the batch's largest label (the cost is cubic in the block size: at batch 64 with one
label on half the images, one 32 x 32 block, not 80). Empty labels are not decomposed. The Gram matrices are formed and
decomposed in float64: float32 eigenvalues of these rank-deficient matrices are too
inaccurate (square roots of rounding noise add up) and LAPACK's float32 eigh can fail to
converge on them. When N > D the D x D Gram ``F_c^T F_c`` is smaller, so that form is
used instead. On the shared 2-core CPU (N=64, C=80, D=512, forward+backward, 2 threads)
one (C, n_max, n_max) batch padded to the largest label took 20-32 ms at best (median
110-160 ms under load) against 1.3 s at best (median 1.3-1.8 s) for one batched
``torch.linalg.svdvals`` on (C+1, N, D) masked copies (``method="svd"``, kept as a
cross-check); the size buckets cut the padded batch's time further (see
``docs/bench-missing-labels.md``; re-measure with ``bench/clml_step.py``). The
bucketing needs one host sync (the label counts).
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
    eigenvalues below max(1e-12, 1e-12 * largest) dropped (NaN-free gradient)."""
    lam = torch.linalg.eigvalsh(gram)
    thr = (lam.amax(dim=-1, keepdim=True) * _SIGMA_TOL**2).clamp_min(_SIGMA_TOL**2)
    keep = lam > thr
    sigma = torch.where(keep, lam, torch.ones_like(lam)).sqrt() * keep
    return sigma.sum(dim=-1)


def _class_nuclear_gram(f: torch.Tensor, members: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(||F_c||_* for each label (C,), ||F||_*) via float64 Gram eigenvalues."""
    n, d = f.shape
    f64 = f.to(torch.float64)
    if n <= d:
        g = f64 @ f64.T  # (N, N)
        nuc_all = _nuclear_from_gram(g)
        counts = members.sum(dim=1).tolist()  # the one host sync: it sets the buckets
        nuc_c = f64.new_zeros(members.shape[0])  # an empty label: 0 (then delta)
        by_size: dict[int, list[int]] = {}
        for c, k in enumerate(counts):
            if k:  # bucket = the next power of two >= k: padding at most doubles a block
                by_size.setdefault(1 << (int(k) - 1).bit_length(), []).append(c)
        for size, labels in by_size.items():
            idx = torch.tensor(labels, device=f.device)
            mem = members[idx]  # (B, N)
            # first `size` indices of each label's rows (members first; stable order)
            order = torch.argsort(mem.to(torch.int8), dim=1, descending=True, stable=True)[:, :size]
            sel = mem.gather(1, order).to(torch.float64)  # (B, size) 1 for a member, 0 for padding
            g_c = g[order[:, :, None], order[:, None, :]] * (sel[:, :, None] * sel[:, None, :])
            nuc_c = nuc_c.index_put((idx,), _nuclear_from_gram(g_c))
    else:
        # D x D Grams: F_c^T F_c = F^T diag(m_c) F
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
    if method == "gram":
        nuc_c, nuc_all = _class_nuclear_gram(f, members)
    elif method == "svd":
        nuc_c, nuc_all = _class_nuclear_svd(f, members)
    else:
        raise ValueError(f"unknown method {method!r}; known: gram, svd")
    loss = (lam / n) * (nuc_c.clamp_min(delta).sum() - nuc_all)
    return loss.to(f.dtype)
