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
"""
from __future__ import annotations

from typing import Optional

import torch

from ..ops.label_attention import label_attention
from .label_spec import LabelSpec
from .model_call import current_call

ATTN_IMPLEMENTATION = "abft"


def abft_mask_function(attention_mask: Optional[torch.Tensor] = None, kv_length: Optional[int] = None, **_):
    """Mask function: bool [B, kv_length] (True = real token) of the last kv_length positions, or None when
    nothing is padded.

    A mask shorter than kv_length (a static cache) is returned as is; the attention function refuses it.
    """
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:].bool()
    if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
        return None
    return attention_mask


def abft_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None,
                           dropout: float = 0.0, abft: Optional[LabelSpec] = None, **kwargs):
    """Attention function: query [B,Hq,Nq,D], key/value [B,Hkv,Nk,D] -> (out [B,Nq,Hq,D], masses or None)."""
    if kwargs.get("softcap") is not None:
        raise ValueError(
            f"attn_implementation='abft' does not support attention logit soft-capping (softcap={kwargs['softcap']}, "
            "e.g. Gemma2's attn_logit_softcapping): load the model with attn_logit_softcapping=None, or use "
            "attn_implementation='eager'")
    if kwargs.get("head_mask") is not None:
        raise ValueError("attn_implementation='abft' does not support head_mask")
    # The module's flag says whether the attention is causal. The is_causal keyword is no substitute: transformers
    # 4.57's GPT-2 passes is_causal=False whenever a mask is given, meaning "the mask carries causality".
    causal = getattr(module, "is_causal", True)
    q_len, kv_len = query.shape[2], key.shape[2]
    sliding_window = kwargs.get("sliding_window")
    # A window only matters when some query would see keys further back than it.
    window = sliding_window if sliding_window is not None and kv_len > sliding_window else None
    if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[1] != kv_len:
        raise ValueError(
            f"attn_implementation='abft' got a padding mask over {attention_mask.shape[1]} keys for {kv_len} keys: "
            "static caches are not supported, use the default DynamicCache")
    position_ids = kwargs.get("position_ids")
    if attention_mask is None and query.shape[0] == 1 and q_len > 1 and position_ids is not None:
        _refuse_packed_sequences(position_ids)

    if abft is None:
        return _plain_attention(module, query, key, value, attention_mask, scaling, dropout, causal, window)
    _check_label_call(abft, q_len, kv_len, attention_mask, window, dropout)
    call = current_call.get()
    if call is not None and call.spec is abft:
        call.used = True
        call.masses_without_grad |= call.grad_enabled and not torch.is_grad_enabled()
    out, mass = label_attention(query, key, value, abft.key_class, abft.num_classes, query_rows=abft.query_rows,
                                causal=causal, scale=scaling, key_padding_mask=attention_mask, backend=abft.backend)
    return out.transpose(1, 2).contiguous(), mass


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


def _plain_attention(module, query, key, value, attention_mask, scaling, dropout, causal, window):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q_len, kv_len = query.shape[2], key.shape[2]
    if attention_mask is not None and attention_mask.dim() == 4:  # a custom mask the caller built: use as is
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=False)
    if window is not None and not causal:
        raise ValueError("attn_implementation='abft' supports sliding windows on causal attention only")
    if attention_mask is None and window is None and (not causal or q_len in (1, kv_len)):
        mask = None  # SDPA's own causal flag (or no mask at all) is exact here
    else:
        mask = _visible_keys(q_len, kv_len, attention_mask, causal, window, query.device)
    return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling,
                                  is_causal=causal and mask is None and q_len > 1)


def _visible_keys(q_len: int, kv_len: int, padding: Optional[torch.Tensor], causal: bool, window: Optional[int],
                  device: torch.device) -> torch.Tensor:
    """bool [B or 1, 1, q_len, kv_len]: which keys each query sees; the queries are the last q_len positions."""
    key_pos = torch.arange(kv_len, device=device)
    query_pos = key_pos[kv_len - q_len:, None]
    visible = torch.ones(q_len, kv_len, dtype=torch.bool, device=device)
    if causal:
        visible &= key_pos <= query_pos
    if window is not None:
        visible &= key_pos > query_pos - window
    visible = visible[None, None]
    if padding is not None:
        visible = visible & padding[:, None, None, :]
    return visible


def _refuse_packed_sequences(position_ids: torch.Tensor) -> None:
    """Several sequences packed in one row (positions restart) need a block mask that the 2-D mask cannot carry."""
    if bool((position_ids[..., 1:] - position_ids[..., :-1] != 1).any()):
        raise ValueError(
            "attn_implementation='abft' does not support packed sequences (position_ids that restart within a "
            "row): pad the sequences into a batch with an attention_mask instead")
