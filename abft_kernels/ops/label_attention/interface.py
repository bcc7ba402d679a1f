"""The public op: label_attention, and resolve_backend that says which backend a call would run on."""
from __future__ import annotations

from .backends import BACKEND_FUNCTIONS, BackendChoice, choose_backend
from .sdpa import autocast_inputs
from .validation import validate_label_attention_args


def label_attention(q, k, v, key_class, num_classes, query_rows=None, causal=True, scale=None,
                    key_padding_mask=None, backend="auto", sinks=None, _check_values: bool = True):
    """Attention output and the attention mass on each label class, without forming the N x N scores.

    For every query row i of every head, with S = scale·q·kᵀ (+ the mask) and P = softmax(S) over the keys i sees::

        out[i]     = sum_j P[i, j] · v[j]                      (ordinary attention)
        mass[i, c] = sum_{j : key_class[j] == c} P[i, j]        (docs/design.md §2: mass = P · onehot(key_class))

    With attention sinks (gpt-oss's s_aux), head h's softmax has one more logit sinks[h] in its denominator that
    no value and no class receives, so the row's probabilities sum to less than 1::

        P[i, j] = exp(S[i, j]) / (exp(sinks[h]) + sum_j' exp(S[i, j']))

    Which keys row i sees (x = visible, . = masked), N = 4, row 1 of sample 0 selected by query_rows::

        causal=True        causal=True, key_padding_mask=[F, T, T, T] (left padding)
        row 0  x . . .     row 0  . . . .   <- sees no key: out and mass are 0 there, not NaN
        row 1  x x . .     row 1  . x . .
        row 2  x x x .     row 2  . x x .
        row 3  x x x x     row 3  . x x x

    ABFT (arXiv 2505.14233, §3) needs mass for the query token only: query_rows = [[N - 1]].

    Args:
        q: float16/bfloat16/float32/float64 [B, Hq, N, D], the queries.
        k: [B, Hkv, N, D] in q's dtype; Hq must be a multiple of Hkv (GQA: query head h reads key head
            h // (Hq / Hkv)).
        v: [B, Hkv, N, Dv] in q's dtype; Dv may differ from D (DeepSeek's multi-head latent attention).
        key_class: integer [B, N]: the class of each key position, -1 for a token that is not a label, else
            0 .. num_classes - 1.
        num_classes: int >= 1, C.
        query_rows: integer [B, R] or None. The rows whose masses are returned; -1 is an empty slot whose mass
            is 0 (to pad samples with fewer rows); a row may repeat (each slot gets the same mass and the
            gradients add). None (default): every row, R = N.
        causal: row i sees keys j <= i (default True).
        scale: softmax scale, default 1 / sqrt(D).
        key_padding_mask: bool [B, N] or None; True = real token (Hugging Face's convention). Padding keys are
            seen by no row; padding rows see what their position allows and are usually ignored by the caller.
        backend: "auto" (default), "reference", "torch", "triton" or "cuda"; see resolve_backend and
            abft_kernels.ops.label_attention.backends for what each takes.
        sinks: float [Hq] (any float dtype, on q's device, finite) or None (default: no sink). One extra logit
            per query head in every row's softmax denominator (see above); computed in fp32 (fp64 by "reference"),
            and differentiable: dL/dsinks[h] = -sum over batch and rows of P_sink[i] · Delta[i], with
            P_sink[i] = exp(sinks[h]) / (exp(sinks[h]) + sum_j exp(S[i, j])) and
            Delta[i] = sum_d dO[i, d]·out[i, d] + sum_c dmass[i, c]·mass[i, c].

    Mixed precision: inside `torch.autocast(device_type, dtype)` for q's device type, q, k and v are cast to `dtype`
    first (float64 ones stay), as torch's scaled_dot_product_attention casts them (it is on autocast's
    lower-precision op list; a float32 model under autocast hands over float32 q and k, as the rotary embedding
    promotes them, and a `dtype` v), and the backend then runs with autocast off: out is in `dtype`, the masses stay
    float32, equal to a call on the cast inputs outside autocast.

    Returns:
        out: [B, Hq, N, Dv] in q's dtype (the autocast dtype under torch.autocast).
        mass: float32 [B, Hq, R, C]: mass[b, h, r, c] is the probability that row query_rows[b, r] of head h puts
            on keys of class c. Rows that see no key and empty slots give zeros. Differentiable w.r.t. q and k
            and sinks (and out w.r.t. q, k, v and sinks) on every backend.

    Raises:
        ValueError: an argument of the wrong type, rank, shape, dtype or device (the message names it); class ids
            outside [-1, C) or rows outside [-1, N); sinks that are not a finite float [Hq]; an unknown backend; a
            backend that is unavailable here or cannot take these arguments (its reason is given; "auto" only
            raises when none can).

    _check_values (private): False skips the checks that read tensor contents (one host sync), for
    abft_kernels.hf, which checks a LabelSpec's values once per model call instead of once per layer.
    """
    q, k, v, context = autocast_inputs(q, k, v)
    args = validate_label_attention_args(q, k, v, key_class, num_classes, query_rows, causal, scale,
                                         key_padding_mask, sinks, check_values=_check_values)
    module, choice = choose_backend(backend, args)
    with context:
        return getattr(module, BACKEND_FUNCTIONS[choice.name])(args)


def resolve_backend(q, k, v, key_class, num_classes, query_rows=None, causal=True, scale=None,
                    key_padding_mask=None, backend="auto", sinks=None) -> BackendChoice:
    """The backend that label_attention would run these arguments on, and why (nothing is computed).

    Args: as label_attention.

    Returns:
        BackendChoice(name, reason): name is a concrete backend ("reference", "torch", "triton" or "cuda"); reason
        says why it was chosen ("requested", or auto's order and the candidates it skipped with their reasons).

    Raises:
        ValueError: as label_attention.
    """
    q, k, v, _ = autocast_inputs(q, k, v)
    args = validate_label_attention_args(q, k, v, key_class, num_classes, query_rows, causal, scale,
                                         key_padding_mask, sinks)
    return choose_backend(backend, args)[1]
