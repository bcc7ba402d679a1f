"""State of the model call in progress, and the checks made once per call.

Every model with attn_implementation="abft" gets two hooks (installed by patching.prepare_abft_model; they do
nothing while the model's implementation is another one):

* `enter_call`, before the forward: the call's label spec goes into a context variable that the attention
  layers read; a model inside a call in progress (e.g. the base model of a causal LM) gets the spec passed on
  in its keywords where the outer model's code drops it. Then the call's inputs are checked in one host sync:
  the LabelSpec's values, whether the 2-D attention mask pads anything (read by the mask function), and the
  documents of a packed batch (below).
* `leave_call`, after it: a spec that reached no attention layer, or whose masses were computed with autograd
  off although the call had it on (reentrant gradient checkpointing runs the layers under no_grad), is an error;
  otherwise outputs.attentions keeps only the masses (one per attention layer).

Packed batches (padding-free packing: transformers' DataCollatorWithFlattening, TRL) mark document boundaries with
`cu_seq_lens_q`/`cu_seq_lens_k` (the flash-attention keywords: cumulative lengths over the flattened [B x N] tokens),
position ids that restart at each document and/or document ids (`seq_idx`); where several are given they must agree.
enter_call reads them once; where no cu_seq_lens_q/k are given, it passes the documents on as those keywords, so
every attention layer (and gradient checkpointing's recompute) gets them as flash attention does. The attention
function then runs each document alone.
"""
from __future__ import annotations

import inspect
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Dict, List, NamedTuple, Optional, Set, Tuple

import torch

from ..ops.label_attention import index_value_flags, raise_for_index_values
from .label_spec import LabelSpec

ATTN_IMPLEMENTATION = "abft"
ABFT_KWARG = "abft"
DOCUMENT_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k")
_OTHER_MASK_INPUTS = ("encoder_hidden_states", "encoder_attention_mask", "cross_attention_mask")


@dataclass
class MaskKinds:
    """What the masks built in one model call ask for (read off transformers' mask functions by the "abft"
    mask function)."""

    causal_windows: Set[Optional[int]] = field(default_factory=set)  # causal masks: their window, None = full
    bidirectional: bool = False  # some mask lets every query see every key
    chunks: Set[int] = field(default_factory=set)  # chunked-attention sizes shorter than the positions they cover


class Document(NamedTuple):
    """One document of a packed batch: positions start .. end - 1 of batch row `row`."""

    row: int
    start: int
    end: int


def documents_from_boundaries(cu_seq_lens: List[int], batch_size: int, seq_len: int,
                              source: str = "cu_seq_lens_q") -> Tuple[Document, ...]:
    """The documents that cumulative lengths over the flattened [batch_size x seq_len] tokens mark.

    Raises:
        ValueError: naming `source`, when the lengths do not start at 0, decrease, do not end at batch_size x
            seq_len (every token belongs to one document), or a document spans two batch rows.
    """
    total = batch_size * seq_len
    if not cu_seq_lens or cu_seq_lens[0] != 0 or cu_seq_lens[-1] != total or \
            any(b < a for a, b in zip(cu_seq_lens, cu_seq_lens[1:])):
        raise ValueError(f"{source} must be non-decreasing cumulative document lengths from 0 to the number of "
                         f"tokens B x N = {total}, got {cu_seq_lens}")
    documents = []
    for start, end in zip(cu_seq_lens, cu_seq_lens[1:]):
        if end == start:
            continue
        row = start // seq_len
        if (end - 1) // seq_len != row:
            raise ValueError(f"{source} has a document ({start} .. {end - 1}) that spans two batch rows of "
                             f"{seq_len} tokens: packed documents must each lie within one row")
        documents.append(Document(row, start - row * seq_len, end - row * seq_len))
    return tuple(documents)


@dataclass
class ModelCall:
    """The state of one model call with attn_implementation="abft", shared by the hf modules through the context
    variable `current_call` (one object per outermost forward; nested calls of the same forward see it too).

    Who writes and who reads each field:

    =====================  ==============================================  =============================================
    field                  written by                                      read by
    =====================  ==============================================  =============================================
    owner, spec,           enter_call (from the forward's arguments)       leave_call; attention.abft_attention_forward
    grad_enabled, token                                                    (spec: which call the masses belong to);
                                                                           patching (spec carried in rotary embeddings)
    padding_free,          enter_call (_check_call: one host sync)         attention.abft_mask_function
    mask_length
    mask_kinds             attention._read_mask_function (as transformers  attention.abft_attention_forward,
                           builds each mask)                               attention._packed_documents
    cu_seq_lens,           enter_call (_check_call, _read_cu_seq_lens)     enter_call (passes them on as keywords);
    cu_seq_lens_values                                                     attention._packed_documents, _read_mask_function
    masses,                attention.abft_attention_forward (one per       leave_call (outputs.attentions; the checks)
    masses_without_grad    layer, in layer order)
    =====================  ==============================================  =============================================
    """

    owner: torch.nn.Module  # the outermost model whose forward this is
    spec: Optional[LabelSpec]
    grad_enabled: bool  # autograd mode of the call
    token: Optional[Token] = None
    padding_free: Optional[bool] = None  # whether the call's 2-D attention mask is all ones; None = not known
    mask_length: Optional[int] = None  # the length of that mask
    masses_without_grad: bool = False  # ... with autograd off although the call had it on
    mask_kinds: MaskKinds = field(default_factory=MaskKinds)
    masses: List[torch.Tensor] = field(default_factory=list)  # computed from `spec`, in layer order
    # A packed batch: the cu_seq_lens_q keyword that the attention layers get, and its values (read once here).
    cu_seq_lens: Optional[torch.Tensor] = None
    cu_seq_lens_values: Optional[List[int]] = None


current_call: ContextVar[Optional[ModelCall]] = ContextVar("abft_model_call", default=None)


@lru_cache(maxsize=None)
def _takes_keywords(forward_class: type, name: Optional[str] = None) -> bool:
    """Whether forward_class.forward takes any extra keyword (**kwargs), or the keyword `name`."""
    try:
        parameters = inspect.signature(forward_class.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind == p.VAR_KEYWORD or p.name == name for p in parameters)


@lru_cache(maxsize=None)
def _positional_names(forward_class: type) -> Tuple[str, ...]:
    try:
        parameters = list(inspect.signature(forward_class.forward).parameters.values())[1:]  # without self
    except (TypeError, ValueError):
        return ()
    return tuple(p.name for p in parameters if p.kind == p.POSITIONAL_OR_KEYWORD)


def _call_argument(module, args, kwargs, name: str):
    if name in kwargs:
        return kwargs[name]
    names = _positional_names(type(module))
    return args[names.index(name)] if name in names and names.index(name) < len(args) else None


def enter_call(module, args, kwargs):
    """Forward pre-hook (with_kwargs=True) of an "abft" model; inert once the model is switched to another
    implementation (set_attn_implementation("sdpa"), ...), which then gets the call as a plain model."""
    if getattr(module.config, "_attn_implementation", None) != ATTN_IMPLEMENTATION:
        return None
    outer = current_call.get()
    if outer is not None:
        # Pass the spec and the packed documents on where the outer model's code drops them.
        passed = {}
        if outer.spec is not None and kwargs.get(ABFT_KWARG) is None:
            _check_takes_keywords(module)
            passed[ABFT_KWARG] = outer.spec
        if outer.cu_seq_lens is not None and kwargs.get(DOCUMENT_KWARGS[0]) is None and _takes_keywords(type(module)):
            passed.update(dict.fromkeys(DOCUMENT_KWARGS, outer.cu_seq_lens))  # else the attention layers refuse
        if not passed:
            return None
        kwargs.update(passed)
        return args, kwargs
    spec = kwargs.get(ABFT_KWARG)
    call = ModelCall(module, spec, torch.is_grad_enabled())
    call.token = current_call.set(call)  # before any check: leave_call runs even when this hook raises
    if spec is not None:
        _check_takes_keywords(module)
        if not isinstance(spec, LabelSpec):
            raise ValueError(f"abft must be an abft_kernels.hf.LabelSpec, got {type(spec).__name__}")
        if not kwargs.get("output_attentions", getattr(module.config, "output_attentions", False)):
            raise ValueError("abft= needs output_attentions=True in the same call: the masses come back as "
                             "outputs.attentions")
    # Masks of other inputs (an encoder's, for cross-attention) must not borrow the padding flag of this one.
    other_masks = any(kwargs.get(name) is not None for name in _OTHER_MASK_INPUTS)
    inputs = _call_argument(module, args, kwargs, "input_ids")
    inputs = _call_argument(module, args, kwargs, "inputs_embeds") if inputs is None else inputs
    _check_call(call, None if other_masks else _call_argument(module, args, kwargs, "attention_mask"),
                _call_argument(module, args, kwargs, "position_ids"), kwargs,
                inputs.shape[0] if isinstance(inputs, torch.Tensor) and inputs.dim() >= 2 else None)
    if call.cu_seq_lens is not None and kwargs.get(DOCUMENT_KWARGS[0]) is not call.cu_seq_lens:
        # Documents marked by position ids or seq_idx alone: the layers get them as flash attention's keywords.
        if not _takes_keywords(type(module)):
            raise ValueError(f"attn_implementation='abft' cannot run packed sequences (position_ids that restart "
                             f"within a row, or seq_idx) through {type(module).__name__}: its forward takes no "
                             "cu_seq_lens_q/k keywords to pass the documents on; pad the sequences into a batch")
        kwargs.update(dict.fromkeys(DOCUMENT_KWARGS, call.cu_seq_lens))
        return args, kwargs
    return None


def _check_takes_keywords(module) -> None:
    """ValueError where the forward of `module` takes no extra keywords (e.g. encoder-decoder causal LMs on
    transformers 4.57), which torch would otherwise report as a TypeError."""
    if not _takes_keywords(type(module), ABFT_KWARG):
        model_type = getattr(getattr(module, "config", None), "model_type", type(module).__name__)
        raise ValueError(f"abft= cannot reach the attention of {model_type}: {type(module).__name__}.forward takes no "
                         "extra keywords in this transformers version, so the label spec cannot be passed to its "
                         "attention layers; use a newer transformers")


def leave_call(module, args, output):
    """Forward hook (always_call=True) of an "abft" model."""
    call = current_call.get()
    if call is None or call.owner is not module:
        return
    current_call.reset(call.token)
    if output is None or call.spec is None:  # output is None when the forward raised
        return
    if not call.masses:
        raise ValueError(f"abft= reached no attention layer of {type(module).__name__}: its modelling code "
                         "does not pass extra keywords to the attention")
    if call.masses_without_grad:
        raise ValueError(f"abft= masses of {type(module).__name__} were computed with autograd off although the call "
                         "had it on, so they carry no gradient: under reentrant gradient checkpointing (transformers "
                         "4.x's default) enable it with gradient_checkpointing_enable(gradient_checkpointing_kwargs="
                         "{'use_reentrant': False}); a model that runs some layers under no_grad cannot be trained so")
    if getattr(output, "attentions", None) is not None:
        # Only the masses: layers of other kinds (linear attention, state-space) may put other tensors there.
        masses = tuple(a for a in output.attentions if any(a is m for m in call.masses))
        if not masses:
            raise ValueError(f"abft= masses did not come back through outputs.attentions of {type(module).__name__}")
        output.attentions = masses


def _check_call(call: ModelCall, attention_mask, position_ids, kwargs, batch_size: Optional[int]) -> None:
    """The call's checks that read tensor values, in one host sync per device (one in practice)."""
    spec = call.spec
    tensors: Dict[str, torch.Tensor] = {}
    if spec is not None and not spec.values_checked:
        seq_len = spec.key_class.shape[1]
        for i, flag in enumerate(index_value_flags(spec.key_class, spec.num_classes, spec.query_rows, seq_len)):
            tensors[f"spec{i}"] = flag
    mask = attention_mask if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 else None
    if mask is not None:
        tensors["padded"] = ~mask.bool().all()
    given = [name for name in DOCUMENT_KWARGS if kwargs.get(name) is not None]
    for name in given:
        tensors[name] = torch.as_tensor(kwargs[name])
    # Where each document starts: position ids that restart, document ids (seq_idx, as Mamba kernels take) that change.
    markers = {"position_ids": position_ids, "seq_idx": kwargs.get("seq_idx")}
    markers = {k: v for k, v in markers.items() if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[-1] > 1}
    if "position_ids" in markers:
        tensors["position_ids"] = position_ids[..., 1:] - position_ids[..., :-1] != 1
    if "seq_idx" in markers:
        tensors["seq_idx"] = markers["seq_idx"][..., 1:] != markers["seq_idx"][..., :-1]
    values = _read_values(tensors)
    if spec is not None and not spec.values_checked:
        raise_for_index_values([values[f"spec{i}"] for i in range(1 + (spec.query_rows is not None))],
                               spec.key_class, spec.num_classes, spec.query_rows, spec.key_class.shape[1])
        object.__setattr__(spec, "values_checked", True)
    padded = mask is not None and bool(values["padded"])
    if mask is not None:
        call.padding_free, call.mask_length = not padded, mask.shape[1]
    if given:
        _read_cu_seq_lens(call, kwargs, given, values, padded)
    source = "cu_seq_lens_q" if given else None
    for name, marker in markers.items():
        starts = values[name]
        if not any(starts) or (padded and name == "position_ids"):  # padded rows restart their position ids
            continue
        if padded:
            raise ValueError("attn_implementation='abft' does not take seq_idx (packed sequences) together with an "
                             "attention_mask that pads: pack the sequences or pad them, not both")
        if marker.dim() > 2 or (batch_size is not None and marker.shape[0] not in (1, batch_size)):
            raise ValueError(f"attn_implementation='abft' reads packed sequences from {name} of shape [B, N] only, got "
                             f"{tuple(marker.shape)} that marks documents within a row: pass them as cu_seq_lens_q/k")
        boundaries = _boundaries_from_starts(starts, marker.shape[-1],
                                             batch_size if batch_size is not None else marker.shape[0])
        if call.cu_seq_lens_values is None:
            call.cu_seq_lens_values, source = boundaries, name
            call.cu_seq_lens = torch.tensor(boundaries, dtype=torch.int32, device=marker.device)
        elif sorted(set(call.cu_seq_lens_values)) != boundaries:
            raise ValueError(f"{source} and {name} disagree on where the packed documents start: "
                             f"{sorted(set(call.cu_seq_lens_values))[1:-1]} and {boundaries[1:-1]}")


def check_same_documents(cu_seq_lens_q: List[int], cu_seq_lens_k: List[int]) -> None:
    """Packed documents are read from cu_seq_lens_q and cu_seq_lens_k only when both are equal: queries and keys
    are the same tokens (no cached keys).

    Raises:
        ValueError: the two differ.
    """
    if cu_seq_lens_q != cu_seq_lens_k:
        raise ValueError("attn_implementation='abft' supports packed sequences whose cu_seq_lens_q and "
                         f"cu_seq_lens_k are equal (no cached keys), got {cu_seq_lens_q} and {cu_seq_lens_k}")


def _read_cu_seq_lens(call: ModelCall, kwargs, given: List[str], values: Dict[str, list], padded: bool) -> None:
    """Documents given as flash attention's keywords: both, equal (queries and keys are the same tokens), no padding."""
    if len(given) != len(DOCUMENT_KWARGS):
        raise ValueError(f"packed sequences need both cu_seq_lens_q and cu_seq_lens_k, got only {given[0]}")
    check_same_documents(values["cu_seq_lens_q"], values["cu_seq_lens_k"])
    if padded:
        raise ValueError("attn_implementation='abft' does not take cu_seq_lens_q/k (packed sequences) together with "
                         "an attention_mask that pads: pack the sequences or pad them, not both")
    call.cu_seq_lens, call.cu_seq_lens_values = kwargs["cu_seq_lens_q"], values["cu_seq_lens_q"]


def _boundaries_from_starts(starts: list, seq_len: int, batch_size: int) -> List[int]:
    """Cumulative document lengths over the flattened [batch_size x seq_len] tokens, from the flags `a document
    starts at position i + 1` of each row (one row of flags may serve every batch row)."""
    per_row = len(starts) // (seq_len - 1)
    boundaries = []
    for row in range(batch_size):
        flags = starts[(row % per_row) * (seq_len - 1):(row % per_row + 1) * (seq_len - 1)]
        boundaries += [row * seq_len] + [row * seq_len + i + 1 for i, flag in enumerate(flags) if flag]
    return boundaries + [batch_size * seq_len]


def _read_values(tensors: Dict[str, torch.Tensor]) -> Dict[str, object]:
    """The values of integer or bool tensors, one host sync per device: a 0-d tensor gives an int, any other a
    flat list of ints."""
    by_device: Dict[torch.device, List[str]] = {}
    for name, tensor in tensors.items():
        by_device.setdefault(tensor.device, []).append(name)
    values = {}
    for names in by_device.values():
        flat = torch.cat([tensors[n].reshape(-1).to(torch.long) for n in names]).tolist()
        for name in names:
            size = tensors[name].numel()
            values[name], flat = (flat[0] if tensors[name].dim() == 0 else flat[:size]), flat[size:]
    return values
