"""Backend "torch": exact on any device, memory O(N) per head.

The output comes from torch SDPA. The masses of selected rows come from the row recompute in
row_mass_torch; when every row carries a mass they come from a second SDPA in fp32 whose values are
the one-hot label matrix (mass = P · Y). v may have its own head dim Dv (SDPA takes it; the masses
never read v). Attention sinks: the same computation on the problem one position longer whose
position 0 is the sink as a virtual key (sink_key), then that position is dropped; exact, and autograd
gives the sinks' gradient.
"""
from __future__ import annotations

from .validation import LabelAttentionArgs
from .masks import label_one_hot, mass_compute_dtype
from .row_mass_torch import row_label_mass
from .sdpa import masked_sdpa
from .sink_key import drop_sink_position, with_sink_key

NAME = "torch"


def unsupported(args: LabelAttentionArgs):
    """Takes every valid call: any device, any dtype, any head dims, number of classes and sinks."""
    return None


def _without_sinks(args: LabelAttentionArgs):
    out = masked_sdpa(args.q, args.k, args.v, args)
    if args.query_rows is not None:
        return out, row_label_mass(args)
    dtype = mass_compute_dtype(args.q.dtype)
    one_hot = label_one_hot(args.key_class, args.num_classes, dtype)[:, None].expand(-1, args.k.shape[1], -1, -1)
    mass = masked_sdpa(args.q.to(dtype), args.k.to(dtype), one_hot, args)
    return out, mass.float()


def sdpa_with_row_mass(args: LabelAttentionArgs):
    if args.sinks is None:
        return _without_sinks(args)
    out, mass = _without_sinks(with_sink_key(args))
    return drop_sink_position(out), drop_sink_position(mass) if args.query_rows is None else mass
