"""The ABFT objective (Cho et al., arXiv 2505.14233) on label-class attention masses, and the PID
controller that steers its coefficient A."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import torch

from .ops.label_attention import visible_label_counts

# The paper's values (arXiv 2505.14233 §5 and its appendix; docs/design.md §1): A's start, B, the PID gains
# Cp, Ci, Cd (A per counted head) and the Adam learning rate they were tuned with. settings.PAPER is built on them.
PAPER_A0, PAPER_B = 0.5, 1.0
PAPER_KP, PAPER_KI, PAPER_KD = 0.03, 0.005, 0.005
PAPER_LR = 2e-5


@dataclass
class ABFTLossInfo:
    """What the loss saw, all detached. Shapes: L layers, B samples, H heads, R rows."""

    counted: torch.Tensor  # bool [L,B,H,R]: head passes the induction filter S > T (row has a target)
    counted_heads: torch.Tensor  # float [B]: counted (layer, head) pairs per target row of each sample
    label_mass: torch.Tensor  # [L,B,H,R]: S, the mass on all visible label tokens
    gold_mass: torch.Tensor  # [L,B,H,R]: m_y, the mass on the gold class's label tokens
    threshold: torch.Tensor  # [B,R]: T = k / (k + ln n_t) (inf where no label is visible)
    has_target: torch.Tensor  # bool [B,R]
    num_target_rows: int

    @property
    def mean_counted_heads(self) -> float:
        """Counted heads averaged over the samples that have a target: the PID controller's input."""
        per_sample = self.has_target.any(1)
        if not per_sample.any():
            return 0.0
        return float(self.counted_heads[per_sample].mean())

    @property
    def mean_gold_mass(self) -> float:
        """Gold-label mass averaged over every (layer, head, target row)."""
        if self.num_target_rows == 0:
            return 0.0
        rows = self.has_target[None, :, None, :].expand_as(self.gold_mass)
        return float(self.gold_mass[rows].mean())


def _stack_masses(masses) -> torch.Tensor:
    if isinstance(masses, torch.Tensor):
        if masses.dim() == 4:
            masses = masses[None]
        if masses.dim() != 5:
            raise ValueError(f"masses must be [L,B,H,R,C] or a sequence of [B,H,R,C], got {tuple(masses.shape)}")
        return masses
    masses = list(masses)
    if not masses:
        raise ValueError("masses is empty: give at least one layer's [B,H,R,C] mass")
    for i, m in enumerate(masses):
        if not isinstance(m, torch.Tensor) or m.dim() != 4:
            raise ValueError(f"masses[{i}] must be a [B,H,R,C] tensor, got {getattr(m, 'shape', type(m))}")
        if m.shape != masses[0].shape:
            raise ValueError(f"masses[{i}] has shape {tuple(m.shape)}, but masses[0] has {tuple(masses[0].shape)}")
    return torch.stack(masses)


def abft_loss(masses: Union[torch.Tensor, Sequence[torch.Tensor]], target_class, key_class, query_rows=None,
              A: Union[float, torch.Tensor] = PAPER_A0, B: Union[float, torch.Tensor] = PAPER_B,
              key_padding_mask=None, causal: bool = True, count_all_heads: bool = False):
    """ABFT loss summed over layers and heads, averaged over the (sample, row) pairs with a target.

    Source: arXiv 2505.14233, §3 (induction-head filter and the loss of a counted head); docs/design.md §1. For each
    (layer l, sample b, head h, row r) with gold class y = target_class[b, r]::

        S   = sum_c mass[c]                    mass on every visible label token
        T   = k / (k + ln n_t)                 k label tokens visible to the row, n_t real tokens up to it
        counted  <=>  S > T                    (the filter; no gradient flows through it)
        L   = A·(S − m_y) + B·(n_y − m_y)      for a counted head, else 0

    where m_y is the mass on the gold class and n_y the number of visible label tokens of that class (so
    B·(n_y − m_y) is B·sum_{i in I+} (1 − alpha_i), and S − m_y is the mass on the wrong labels, sum_{i in I−}).

    Args:
        masses: the label masses of every layer: a sequence of L float tensors [B, H, R, C] (outputs.attentions of
            a model called with abft=) or one tensor [L, B, H, R, C]; probabilities, unitless.
        target_class: integer [B, R]: the gold class of each row, -1 = the row carries no target (ignored).
        key_class: integer [B, N]: class of each token as a key, -1 = not a label token (as given to
            label_attention); it gives k, n_y and n_t.
        query_rows: integer [B, R] (the rows the masses belong to, -1 = empty slot: its target must be -1), or None
            when R = N (every row).
        A: weight of the mass on wrong labels (float or 0-d tensor; default 0.5, the paper's A0; the PID controller
            steers it between steps).
        B: weight of the missing mass on gold labels (default 1.0, the paper's B).
        key_padding_mask: bool [B, N], True = real token; padding is neither a visible label nor counted in n_t.
        causal: as given to label_attention: a row sees the keys up to itself (default True).
        count_all_heads: ablation (default False): every head of a target row adds its term, without the filter
            S > T (info.counted still reports the filter).

    Returns:
        (loss, info): loss, a 0-d tensor in masses' dtype: the sum over layers, heads and target rows of L, divided
        by the number of target rows (0 when no row has a target); info, an ABFTLossInfo (detached): counted
        [L, B, H, R], counted_heads [B] (counted (layer, head) pairs per target row of each sample), label_mass and
        gold_mass [L, B, H, R], threshold [B, R] (inf where no label is visible), has_target [B, R],
        num_target_rows; mean_counted_heads is the PID controller's input.

    Raises:
        ValueError: masses of the wrong rank or of different shapes, or not floating point; target_class,
            key_class, query_rows or key_padding_mask of the wrong dtype, shape or device; class ids outside
            [-1, C); rows outside [-1, N); a target on an empty slot. The value checks cost one host sync.
    """
    mass = _stack_masses(masses)
    _, batch, _, num_rows, num_classes = mass.shape
    if not mass.dtype.is_floating_point:
        raise ValueError(f"masses must be floating point, got {mass.dtype}")
    for name, t in (("target_class", target_class), ("key_class", key_class)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.dtype.is_floating_point or t.dtype == torch.bool:
            raise ValueError(f"{name} must be a 2-D integer tensor, got {getattr(t, 'shape', type(t))}")
    if tuple(target_class.shape) != (batch, num_rows):
        raise ValueError(f"target_class must have shape [B={batch}, R={num_rows}], got {tuple(target_class.shape)}")
    if key_class.shape[0] != batch:
        raise ValueError(f"key_class must have shape [B={batch}, N], got {tuple(key_class.shape)}")
    seq_len = key_class.shape[1]
    if query_rows is None:
        if num_rows != seq_len:
            raise ValueError(f"query_rows=None means every row, so masses need R = N = {seq_len}, got R={num_rows}")
        query_rows = torch.arange(seq_len, device=key_class.device).expand(batch, seq_len)
    elif not isinstance(query_rows, torch.Tensor) or tuple(query_rows.shape) != (batch, num_rows):
        raise ValueError(f"query_rows must have shape [B={batch}, R={num_rows}], got {getattr(query_rows, 'shape', None)}")
    if key_padding_mask is not None and (key_padding_mask.dtype != torch.bool
                                         or tuple(key_padding_mask.shape) != tuple(key_class.shape)):
        raise ValueError(f"key_padding_mask must be a bool tensor of shape {tuple(key_class.shape)}")
    for name, t in (("target_class", target_class), ("key_class", key_class), ("query_rows", query_rows),
                    ("key_padding_mask", key_padding_mask)):
        if t is not None and t.device != mass.device:
            raise ValueError(f"{name} is on {t.device} but masses are on {mass.device}")
    # Value checks and the number of target rows in one host sync (abft_loss runs every training step).
    has_target = target_class >= 0
    bad_target, bad_key, bad_row, target_on_empty, num_target_rows = torch.stack([
        ((target_class < -1) | (target_class >= num_classes)).any().long(),
        ((key_class < -1) | (key_class >= num_classes)).any().long(),
        ((query_rows < -1) | (query_rows >= seq_len)).any().long(),
        (has_target & (query_rows < 0)).any().long(),
        has_target.sum(),
    ]).tolist()
    if bad_target:
        raise ValueError(f"target_class values must be -1 (ignore) or in [0, C={num_classes})")
    if bad_key:
        raise ValueError(f"key_class values must be -1 (not a label) or in [0, C={num_classes})")
    if bad_row:
        raise ValueError(f"query_rows values must be -1 (empty slot) or in [0, N={seq_len})")
    if target_on_empty:
        raise ValueError("target_class is set for an empty query_rows slot (-1); give it target -1")

    n_c, n_t = visible_label_counts(key_class, num_classes, query_rows, key_padding_mask, causal)
    num_labels = n_c.sum(-1).to(mass.dtype)  # k
    threshold = torch.where(num_labels > 0, num_labels / (num_labels + torch.log(n_t.clamp(min=1).to(mass.dtype))),
                            torch.full_like(num_labels, math.inf))
    target = target_class.clamp(min=0)

    label_mass = mass.sum(-1)  # S [L,B,H,R]
    gold_index = target[None, :, None, :, None].expand(*mass.shape[:-1], 1)
    gold_mass = mass.gather(-1, gold_index).squeeze(-1)  # m_y
    gold_count = n_c.gather(-1, target[:, :, None]).squeeze(-1).to(mass.dtype)  # n_y [B,R]
    counted = (label_mass.detach() > threshold[None, :, None, :]) & has_target[None, :, None, :]
    in_loss = has_target[None, :, None, :].expand_as(counted) if count_all_heads else counted

    per_head = A * (label_mass - gold_mass) + B * (gold_count[None, :, None, :] - gold_mass)
    loss = torch.where(in_loss, per_head, torch.zeros_like(per_head)).sum() / max(num_target_rows, 1)

    rows_per_sample = has_target.sum(1).clamp(min=1).to(mass.dtype)
    info = ABFTLossInfo(
        counted=counted, counted_heads=counted.sum(dim=(0, 2, 3)).to(mass.dtype) / rows_per_sample,
        label_mass=label_mass.detach(), gold_mass=gold_mass.detach(), threshold=threshold,
        has_target=has_target, num_target_rows=num_target_rows,
    )
    return loss, info


class PIDController:
    """The paper's controller of A (Cho et al., arXiv 2505.14233, section 4.3 and Fig. 5): from the mean number of
    counted heads n_t at step t = 1, 2, ...,
    A_t = A_{t-1} + Cp(n_t − n_{t−1}) + Ci(n_t − n_1) + Cd(n_t − 2n_{t−1} + n_{t−2}) for t > 2, A_1 = A_2 = A0.

    Summed up, A_t = A0 + Cp(n_t − n_2) + Ci Σ_{s=3..t}(n_s − n_1) + Cd((n_t − n_{t−1}) − (n_2 − n_1)): the integral
    term holds the count at the first step's n_1, and A is not bounded (it can turn negative).

    Args:
        A0: the initial A (paper: 0.5). kp, ki, kd: Cp, Ci, Cd (paper: 0.03, 0.005, 0.005), in A per counted head.

    Call update(n_t) after step t's forward; the returned A_t is the coefficient for the next step.
    """

    def __init__(self, A0: float = PAPER_A0, kp: float = PAPER_KP, ki: float = PAPER_KI, kd: float = PAPER_KD):
        self.A0, self.kp, self.ki, self.kd = float(A0), float(kp), float(ki), float(kd)
        self.A = self.A0
        self.history: List[float] = []

    def update(self, counted_heads: float) -> float:
        """Record n_t (float, counted heads per prompt at step t) and return A_{t+1}."""
        n = self.history
        n.append(float(counted_heads))
        if len(n) > 2:
            self.A += (self.kp * (n[-1] - n[-2]) + self.ki * (n[-1] - n[0])
                       + self.kd * (n[-1] - 2 * n[-2] + n[-3]))
        return self.A

    def state_dict(self) -> dict:
        return {"A0": self.A0, "kp": self.kp, "ki": self.ki, "kd": self.kd, "A": self.A, "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.A0, self.kp, self.ki, self.kd = state["A0"], state["kp"], state["ki"], state["kd"]
        self.A, self.history = state["A"], list(state["history"])


class FixedA(PIDController):
    """A stays A0 whatever the count (the no-PID ablation); records the counts like the PID."""

    def __init__(self, A0: float = PAPER_A0):
        super().__init__(A0, 0.0, 0.0, 0.0)


class SetpointController(PIDController):
    """An option beside the paper's PID for learning rates far above the paper's (not the paper's method):
    the same gains, scaled by `scale` (= lr_ref / lr: the paper's gains were set for its lr), on the error to the
    first step's count, e_t = n_t − n_1, in positional form, with A kept >= 0:
    A_t = max(0, A0 + scale·(Cp·e_t + Ci·Σ_{s<=t} e_s + Cd·(e_t − e_{t−1}))); the sum stops growing while A is held
    at 0 (no wind-up below). Call update(n_t) after step t; it returns A_{t+1}.

    Args:
        A0, kp, ki, kd: as PIDController. scale: factor on the three gains (float > 0).

    Raises:
        ValueError: scale <= 0.
    """

    def __init__(self, A0: float = PAPER_A0, kp: float = PAPER_KP, ki: float = PAPER_KI, kd: float = PAPER_KD,
                 scale: float = 1.0):
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        super().__init__(A0, kp * scale, ki * scale, kd * scale)
        self.integral = 0.0

    def update(self, counted_heads: float) -> float:
        n = self.history
        n.append(float(counted_heads))
        error = n[-1] - n[0]
        previous = n[-2] - n[0] if len(n) > 1 else 0.0
        integral = self.integral + error
        A = self.A0 + self.kp * error + self.ki * integral + self.kd * (error - previous)
        if A >= 0:
            self.integral = integral
        self.A = max(A, 0.0)
        return self.A

    def state_dict(self) -> dict:
        return {**super().state_dict(), "integral": self.integral}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.integral = state["integral"]


def make_controller(settings) -> PIDController:
    """The controller of A that `settings.controller` names, with its A0 and gains: "paper" (PIDController),
    "fixed" (FixedA) or "setpoint" (SetpointController, gains scaled by PAPER_LR / settings.lr).

    Args:
        settings: a `settings.ABFTSettings` (controller, A0, kp, ki, kd, lr).

    Raises:
        ValueError: an unknown controller name.
    """
    if settings.controller == "paper":
        return PIDController(settings.A0, settings.kp, settings.ki, settings.kd)
    if settings.controller == "fixed":
        return FixedA(settings.A0)
    if settings.controller == "setpoint":
        return SetpointController(settings.A0, settings.kp, settings.ki, settings.kd, scale=PAPER_LR / settings.lr)
    raise ValueError(f"controller must be one of 'paper', 'fixed', 'setpoint', got {settings.controller!r}")
