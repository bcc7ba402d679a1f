"""attn_implementation="abft": the attention function and mask function registered with transformers.

The mask function hands the attention function the 2-D key padding mask (or None), like transformers'
flash-attention one, so no [B, 1, N, N] mask exists unless plain attention needs it. The attention
function then runs one of two paths:

* no `abft=` keyword in the model call: plain attention through transformers' own sdpa function, with
  causality, padding, KV cache (queries are the last positions of the keys) and sliding windows rebuilt
  from the 2-D mask. Returns no weights.
* `abft=LabelSpec(...)`: label_attention, which returns the attention output and the label masses
  [B, Hq, R, C]; the masses come back as the layer's attention weights (`outputs.attentions` under
  `output_attentions=True`) with autograd intact.

Both paths take packed batches (documents given as flash attention's cu_seq_lens_q/k keywords, or by position ids
that restart, which model_call turns into those keywords): each document runs alone, on its own slice of the
queries, keys, values and labels, on any backend. Chunked attention (Llama 4's attention_chunk_size) whose chunk
borders fall among the positions of a call (a long prompt, or cached decoding past the first chunk) gets
transformers' own 4-D mask on the plain path and is refused with labels.

What the attention function cannot compute exactly is refused with a ValueError naming the model type.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch

from ..ops.label_attention import LabelAttentionArgs, attention_output, label_attention, visible_keys
from .label_spec import LabelSpec
from .model_call import (ATTN_IMPLEMENTATION, DOCUMENT_KWARGS, Document, MaskKinds, ModelCall, check_same_documents,
                         current_call, documents_from_boundaries)

# Keywords of transformers' attention functions that change the attention math when not None.
_UNSUPPORTED_KEYWORDS = {
    "softcap": "attention logit soft-capping (e.g. Gemma2's attn_logit_softcapping: load the model with "
               "attn_logit_softcapping=None)",
    "head_mask": "head_mask",
    "position_bias": "an additive position bias (T5-style relative attention bias)",
    "indices": "sparse attention over selected keys (indices=, e.g. DeepSeek sparse attention)",
    "block_indices": "block-sparse attention (block_indices=)",
}


def _model_type(module: torch.nn.Module) -> str:
    return getattr(getattr(module, "config", None), "model_type", None) or type(module).__name__


def abft_mask_function(attention_mask: Optional[torch.Tensor] = None, kv_length: Optional[int] = None,
                       mask_function: Optional[Callable] = None, kv_offset: int = 0, **kwargs):
    """Mask function: bool [B, kv_length] (True = real token) of the last kv_length positions, or None when
    nothing is padded; for chunked attention whose chunk borders fall among the positions, transformers' own
    4-D sdpa mask (bool [B, 1, q_length, kv_length], or None where SDPA's causal flag is exact).

    The attention function rebuilds causality, sliding windows and packed documents itself, so the mask function
    checks that transformers' `mask_function` asks for nothing else (ValueError for bidirectional blocks, a union
    of masks or any other mask function) and records what it asks for in the model call. Whether anything is
    padded was read in the model call's one host sync (model_call.enter_call); outside a model call it is read
    here. A mask shorter than kv_length (a static cache) is returned as is; the attention function refuses it.
    Arguments are those transformers' mask interface passes (see transformers.masking_utils.sdpa_mask).
    """
    call = current_call.get()
    if mask_function is not None and kv_length is not None:
        kinds = call.mask_kinds if call is not None else MaskKinds()
        # Positions 0 .. kv_offset + kv_length - 1 (queries included) are all a chunk can cover.
        if _read_mask_function(mask_function, kv_offset + kv_length, kinds, call):
            from transformers.masking_utils import sdpa_mask

            return sdpa_mask(attention_mask=attention_mask, kv_length=kv_length, mask_function=mask_function,
                             kv_offset=kv_offset, **kwargs)
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:].bool()
    if attention_mask.shape[1] != kv_length:
        return attention_mask
    padding_free = None
    if call is not None and call.mask_length is not None and call.mask_length >= kv_length:
        padding_free = call.padding_free  # this mask is the call's, or its last kv_length positions
    if padding_free is None:
        padding_free = bool(attention_mask.all())
    return None if padding_free else attention_mask


def _read_mask_function(mask_function: Callable, positions: int, kinds: MaskKinds, call: Optional[ModelCall],
                        window: Optional[int] = None) -> bool:
    """Walk a mask function composed from transformers' masking_utils pieces into `kinds`. Returns whether it
    holds chunked attention whose chunks are shorter than `positions` (the number of positions the mask covers,
    from 0), which the 2-D mask cannot carry."""
    from transformers import masking_utils as mu

    name = getattr(mask_function, "__qualname__", type(mask_function).__name__)
    free = _free_variables(mask_function)
    if mask_function is mu.causal_mask_function:
        kinds.causal_windows.add(window)
    elif mask_function is getattr(mu, "bidirectional_mask_function", None):  # not in transformers 4.57
        kinds.bidirectional = True
    elif name.startswith("and_masks.") and "mask_functions" in free:
        windows = [_free_variables(f)["sliding_window"] for f in free["mask_functions"]
                   if getattr(f, "__qualname__", "").startswith("sliding_window_overlay.")]
        window = min(windows + ([window] if window is not None else [])) if windows else window
        return any([_read_mask_function(f, positions, kinds, call, window) for f in free["mask_functions"]])
    elif name.startswith("remap_positions_for_packed_sequence."):
        return _read_mask_function(free["mask_function"], positions, kinds, call, window)  # positions per document
    elif name.startswith("sliding_window_overlay."):
        pass  # read by the enclosing and_masks
    elif name.startswith("chunked_overlay."):
        if free["chunk_size"] < positions:
            kinds.chunks.add(free["chunk_size"])
            return True
        # a chunk at least as long as the positions changes nothing
    elif name.startswith("padding_mask_function."):
        pass  # the 2-D padding mask carries it
    elif name.startswith("packed_sequence_mask_function."):
        # Documents numbered from the position ids, which the model call read and passes on as cu_seq_lens_q/k
        # (transformers 4.57 numbers every call with position ids, all 0 when nothing is packed).
        if (call is None or call.cu_seq_lens_values is None) and bool(free["packed_sequence_mask"][:, -1].any()):
            raise ValueError("attn_implementation='abft' got packed sequences whose position ids the model call did "
                             "not see: pass position_ids (or cu_seq_lens_q/k) to the model call")
    else:
        what = {"blockwise_overlay": "bidirectional blocks",
                "or_masks": "a union of masks (e.g. bidirectional attention over some tokens)"}
        reason = next((v for k, v in what.items() if name.startswith(k + ".")), f"the mask function {name}")
        raise ValueError(f"attn_implementation='abft' does not support {reason}: it computes causal attention with "
                         "key padding, sliding windows, chunks and packed documents only; use "
                         "attn_implementation='eager'")
    return False


def _free_variables(function: Callable) -> dict:
    code = getattr(function, "__code__", None)
    cells = getattr(function, "__closure__", None) or ()
    return dict(zip(getattr(code, "co_freevars", ()), (c.cell_contents for c in cells)))


def abft_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None,
                           dropout: float = 0.0, abft: Optional[LabelSpec] = None, **kwargs):
    """Attention function: query [B,Hq,Nq,D], key [B,Hkv,Nk,D], value [B,Hkv,Nk,Dv] ->
    (out [B,Nq,Hq,Dv], masses [B,Hq,R,C] or None)."""
    for name, what in _UNSUPPORTED_KEYWORDS.items():
        if kwargs.get(name) is not None:
            raise ValueError(f"attn_implementation='abft' does not support {what} ({_model_type(module)} passes "
                             f"{name}=): use attn_implementation='eager'")
    sinks = _attention_sinks(module, query, kwargs)
    # The module's flag says whether the attention is causal. The is_causal keyword is no substitute: transformers
    # 4.57's GPT-2 passes is_causal=False whenever a mask is given, meaning "the mask carries causality".
    causal = getattr(module, "is_causal", True)
    q_len, kv_len = query.shape[2], key.shape[2]
    sliding_window = kwargs.get("sliding_window")
    window = _effective_window(sliding_window, kv_len)
    call = current_call.get()
    if call is not None:
        _check_against_masks(module, causal, window, q_len, kv_len, call.mask_kinds)
    if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[1] != kv_len:
        raise ValueError(
            f"attn_implementation='abft' got a padding mask over {attention_mask.shape[1]} keys for {kv_len} keys: "
            "static caches are not supported, use the default DynamicCache")

    documents = _packed_documents(module, query, key, attention_mask, kwargs, call)
    if abft is None:
        if call is not None and call.spec is not None:
            raise ValueError(
                f"abft= did not reach {type(module).__name__} ({_model_type(module)}): a layer of this model drops "
                "the keywords that the model call passes to its attention, so its masses cannot be returned")
        if documents is None:
            return _plain_attention(module, query, key, value, attention_mask, scaling, dropout, causal, window, sinks)
        return _plain_attention_by_document(documents, module, query, key, value, scaling, dropout, causal,
                                            sliding_window, sinks)
    if call is not None and call.mask_kinds.chunks:
        chunk = min(call.mask_kinds.chunks)
        raise ValueError(f"abft= does not support chunked attention (attention_chunk_size={chunk}) over more positions "
                         f"than one chunk ({kv_len} keys): shorten the prompts to {chunk} tokens or raise the config's "
                         "attention_chunk_size")
    if call is not None and call.spec is abft:
        call.masses_without_grad |= call.grad_enabled and not torch.is_grad_enabled()
    if documents is None:
        _check_label_call(abft, q_len, kv_len, attention_mask, window, dropout)
        out, mass = label_attention(query, key, value, abft.key_class, abft.num_classes, query_rows=abft.query_rows,
                                    causal=causal, scale=scaling, key_padding_mask=attention_mask,
                                    backend=abft.backend, sinks=sinks, _check_values=not abft.values_checked)
    else:
        _check_label_call(abft, q_len, kv_len, None, None, dropout)  # the windows are checked per document
        out, mass = _label_attention_by_document(documents, query, key, value, abft, causal, scaling, sliding_window,
                                                 sinks)
    if call is not None and call.spec is abft:
        call.masses.append(mass)
    return out.transpose(1, 2).contiguous(), mass


def _packed_documents(module, query: torch.Tensor, key: torch.Tensor, attention_mask, kwargs,
                      call: Optional[ModelCall]) -> Optional[Tuple[Document, ...]]:
    """The documents of a packed batch (cu_seq_lens_q/k keywords: cumulative lengths over the flattened [B x N]
    tokens), or None when the batch is not packed. Their values were read once by the model call; outside one
    (gradient checkpointing's recompute, a direct call) they are read here."""
    cu_seq_lens = kwargs.get("cu_seq_lens_q")
    if cu_seq_lens is None:
        if call is not None and call.cu_seq_lens is not None:
            raise ValueError(
                f"the packed documents (cu_seq_lens_q/k) did not reach {type(module).__name__} "
                f"({_model_type(module)}): a layer of this model drops the keywords that the model call passes to "
                "its attention, so it would attend across documents; pad the sequences into a batch instead")
        return None
    if call is not None and cu_seq_lens is call.cu_seq_lens:
        values = call.cu_seq_lens_values
    else:
        both = [torch.as_tensor(kwargs.get(name, cu_seq_lens)).reshape(-1) for name in DOCUMENT_KWARGS]
        read = torch.cat(both).tolist()  # one host sync
        values = read[:both[0].numel()]
        check_same_documents(values, read[both[0].numel():])
    if query.shape[2] != key.shape[2]:
        raise ValueError(f"attn_implementation='abft' cannot run packed sequences (cu_seq_lens_q/k) with cached keys "
                         f"({query.shape[2]} queries over {key.shape[2]} keys): call the model without past key values")
    if attention_mask is not None:
        chunks = call.mask_kinds.chunks if call is not None else set()
        if chunks:
            what = f"chunked attention (attention_chunk_size={min(chunks)}) shorter than the row ({key.shape[2]})"
        elif attention_mask.dim() == 2:
            what = "an attention_mask that pads (pack the sequences or pad them, not both)"
        else:  # e.g. transformers 4.57's OPT and BioGPT build their own
            what = f"the {attention_mask.dim()}-D attention mask that {_model_type(module)} builds itself"
        raise ValueError(f"attn_implementation='abft' cannot run packed sequences (cu_seq_lens_q/k) with {what}: "
                         "run the documents as a padded batch")
    return documents_from_boundaries(values, query.shape[0], query.shape[2])


def _effective_window(sliding_window: Optional[int], length: int) -> Optional[int]:
    """The sliding window over `length` keys, or None: a window only matters when some query would see keys
    further back than it."""
    return sliding_window if sliding_window is not None and length > sliding_window else None


def _plain_attention_by_document(documents, module, query, key, value, scaling, dropout, causal, sliding_window,
                                 sinks):
    """_plain_attention on each document alone: out [B, N, Hq, Dv], None."""
    rows: List[List[torch.Tensor]] = [[] for _ in range(query.shape[0])]
    for row, start, end in documents:
        part = (slice(row, row + 1), slice(None), slice(start, end))
        out, _ = _plain_attention(module, query[part], key[part], value[part], None, scaling, dropout, causal,
                                  _effective_window(sliding_window, end - start), sinks)
        rows[row].append(out)
    return torch.cat([torch.cat(parts, dim=1) for parts in rows]), None


def _label_attention_by_document(documents, query, key, value, abft: LabelSpec, causal: bool, scaling,
                                 sliding_window, sinks):
    """label_attention on each document alone, its labels and query rows restricted to the document (a row of
    another document is an empty slot there, mass 0): out [B, Hq, N, Dv], mass [B, Hq, R, C]."""
    batch, seq_len = query.shape[0], query.shape[2]
    if tuple(abft.key_class.shape) != (batch, seq_len):
        raise ValueError(f"key_class must have shape [B, N] = [{batch}, {seq_len}] like the packed input, got "
                         f"{tuple(abft.key_class.shape)}")
    outs: List[List[torch.Tensor]] = [[] for _ in range(batch)]
    masses: List[List[torch.Tensor]] = [[] for _ in range(batch)]
    for row, start, end in documents:
        _check_label_call(abft, end - start, end - start, None, _effective_window(sliding_window, end - start), 0.0)
        rows = None
        if abft.query_rows is not None:
            rows = abft.query_rows[row:row + 1]
            rows = torch.where((rows >= start) & (rows < end), rows - start, -1)
        part = (slice(row, row + 1), slice(None), slice(start, end))
        out, mass = label_attention(query[part], key[part], value[part], abft.key_class[row:row + 1, start:end],
                                    abft.num_classes, query_rows=rows, causal=causal, scale=scaling,
                                    backend=abft.backend, sinks=sinks, _check_values=not abft.values_checked)
        outs[row].append(out)
        masses[row].append(mass)
    out = torch.cat([torch.cat(parts, dim=2) for parts in outs])
    if abft.query_rows is None:  # every row: the documents' rows in order
        return out, torch.cat([torch.cat(parts, dim=2) for parts in masses])
    return out, torch.cat([torch.stack(parts).sum(0) for parts in masses])  # each slot's mass is one document's


def _check_against_masks(module, causal: bool, window: Optional[int], q_len: int, kv_len: int,
                         kinds: MaskKinds) -> None:
    """The module's causality and sliding window must be what the masks of the call ask for, where the masks
    leave no doubt (a model may build several kinds of masks for different layers)."""
    what = None
    if not causal and kinds.causal_windows and q_len == kv_len and not getattr(module, "is_cross_attention", False):
        what = "says it is not causal (is_causal=False) while the model builds causal masks"
    elif causal and kinds.bidirectional and not kinds.causal_windows:
        what = "says it is causal while the model builds bidirectional masks only"
    elif window is None and causal and kinds.causal_windows and None not in kinds.causal_windows \
            and min(kinds.causal_windows) < kv_len:
        what = f"passes no sliding window while the model builds sliding-window masks {sorted(kinds.causal_windows)} only"
    elif window is not None and kinds.causal_windows and window not in kinds.causal_windows:
        what = f"passes sliding_window={window} while the model builds no mask with that window"
    if what:
        raise ValueError(f"attn_implementation='abft' cannot run {_model_type(module)}: {type(module).__name__} "
                         f"{what}, so the 'abft' attention would differ from the model's masks")


def _attention_sinks(module, query: torch.Tensor, kwargs) -> Optional[torch.Tensor]:
    """The attention sinks the model passes (gpt-oss's s_aux: one logit per query head in every softmax
    denominator), or None. label_attention computes them exactly; a shape other than [Hq] is refused."""
    sinks = [kwargs[name] for name in ("s_aux", "sinks") if kwargs.get(name) is not None]
    if not sinks:
        return None
    if sinks[0].shape != (query.shape[1],):
        raise ValueError(f"attn_implementation='abft' supports attention sinks of shape [num_heads={query.shape[1]}], "
                         f"{_model_type(module)} passes {tuple(sinks[0].shape)}: use attn_implementation='eager'")
    return sinks[0]


def _check_label_call(abft, q_len: int, kv_len: int, attention_mask, window: Optional[int], dropout: float) -> None:
    """What label_attention cannot do exactly is refused: it sees one whole causal sequence with key padding."""
    if not isinstance(abft, LabelSpec):
        raise ValueError(f"abft must be an abft_kernels.hf.LabelSpec, got {type(abft).__name__}")
    if q_len != kv_len:
        raise ValueError(
            f"abft= needs the whole sequence in one forward, but this layer has {q_len} queries over {kv_len} "
            "cached keys: call the model without past key values")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"abft= needs a 2-D attention_mask [B, N] (True/1 = real token), got a {attention_mask.dim()}-D mask")
    if window is not None:
        raise ValueError(
            f"abft= does not support a sliding window ({window}) shorter than the sequence ({kv_len}): "
            "shorten the prompts or raise the config's sliding_window")
    if dropout > 0:
        raise ValueError(
            f"abft= does not support attention dropout (p={dropout}): call model.eval() or set the config's "
            "attention dropout to 0")


def _plain_attention(module, query, key, value, attention_mask, scaling, dropout, causal, window, sinks=None):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q_len, kv_len = query.shape[2], key.shape[2]
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    if sinks is not None:  # transformers' sdpa function has no sinks
        if attention_mask is not None and attention_mask.dim() == 4:
            raise ValueError("attn_implementation='abft' supports attention sinks with a 2-D padding mask only")
        if window is None and q_len == kv_len and dropout == 0:
            # The sink as a virtual key (sink_key.py) in front of SDPA: O(B·H·N) memory, no N x N scores.
            return _output_only(query, key, value, attention_mask, causal, scale, sinks)
        # A sliding window or cached keys: eager, as the model's own eager attention (O(Nq·Nk) memory).
        mask = _visible_keys(q_len, kv_len, attention_mask, causal, window, query.device)
        return _attention_with_sinks(module, query, key, value, mask, scaling, dropout, sinks)
    if attention_mask is not None and attention_mask.dim() == 4:  # a custom mask the caller built: use as is
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=False)
    if window is not None and not causal:
        raise ValueError("attn_implementation='abft' supports sliding windows on causal attention only")
    if attention_mask is not None and window is None and q_len == kv_len and dropout == 0:
        # A padded batch: label_attention's output path, which builds no [B, 1, N, N] mask and keeps none for
        # backward (O(B·H·N) memory, like the masses' path).
        return _output_only(query, key, value, attention_mask, causal, scale)
    if attention_mask is None and window is None and (not causal or q_len in (1, kv_len)):
        mask = None  # SDPA's own causal flag (or no mask at all) is exact here
    else:
        mask = _visible_keys(q_len, kv_len, attention_mask, causal, window, query.device)
    return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling,
                                  is_causal=causal and mask is None and q_len > 1)


def _output_only(query, key, value, key_padding_mask, causal: bool, scale: float, sinks=None):
    """label_attention's output path (sdpa.attention_output) on one whole sequence: out [B, N, Hq, Dv], None."""
    args = LabelAttentionArgs(q=query, k=key, v=value, key_class=None, num_classes=1, query_rows=None, causal=causal,
                              scale=scale, key_padding_mask=key_padding_mask, sinks=sinks)
    return attention_output(args).transpose(1, 2).contiguous(), None


def _attention_with_sinks(module, query, key, value, visible, scaling, dropout, sinks):
    """Plain attention whose softmax has one extra logit per head (the sink) that no value receives, as the eager
    attention of gpt-oss computes it (O(Nq·Nk) memory, like that eager path): out [B, Nq, Hq, Dv], None."""
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = query @ key.transpose(-1, -2) * scale  # in the autocast dtype under autocast, as eager computes it
    scores = scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
    sink = sinks.to(scores.dtype).reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
    probs = torch.softmax(torch.cat([scores, sink], dim=-1).float(), dim=-1)[..., :-1].to(value.dtype)
    probs = torch.nn.functional.dropout(probs, p=dropout, training=module.training)
    return (probs @ value).transpose(1, 2).contiguous(), None


def _visible_keys(q_len: int, kv_len: int, padding: Optional[torch.Tensor], causal: bool, window: Optional[int],
                  device: torch.device) -> torch.Tensor:
    """bool [B or 1, 1, q_len, kv_len]: which keys each query sees (the op's rule, `visible_keys`); the queries are
    the last q_len positions."""
    rows = torch.arange(kv_len - q_len, kv_len, device=device)[None]
    return visible_keys(rows, kv_len, causal, padding, window)[:, None]
