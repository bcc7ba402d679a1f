"""prepare_abft_model: the one function that makes a transformers model ready for attn_implementation="abft".

Every way a model gets the "abft" implementation runs it (registration.py wraps transformers'
PreTrainedModel.post_init and set_attn_implementation):

* construction with it: `from_pretrained(..., attn_implementation="abft")`, `from_config(...)`,
  `abft_kernels.recipes.models.load_model`, or a config whose _attn_implementation is "abft" (post_init runs at the
  end of every model's __init__, so the modules exist);
* `model.set_attn_implementation("abft")` and `apply_abft(model)`.

What it does:

* refuses, with a ValueError naming the model type and why, models whose attention does not go through
  transformers' AttentionInterface (their own attention code would ignore the "abft" function and the 2-D
  mask it is given: e.g. Bloom's ALiBi attention, or state-space models without attention layers);
* Falcon, StableLM and Nemotron, whose decoder layers drop the call's keywords on their way to the attention:
  the spec rides in the rotary position embeddings and a pre-hook of each attention module turns it back into
  the `abft=` keyword (Falcon before transformers 5.25, whose attention does not use the interface, gets a
  forward that does); rotary Falcon on transformers 5 only;
* installs the model call hooks of model_call.py (spec passed on, checks once per call, a spec that reached no
  attention layer or lost its gradient is an error).

The spec travels as a keyword of each layer, never as state read during backward, so gradient
checkpointing's recompute sees the same labels.
"""
from __future__ import annotations

import ast
import inspect
import re
import sys
import textwrap
import types
from functools import lru_cache
from typing import List, Optional

from .attention import ATTN_IMPLEMENTATION
from .model_call import current_call, enter_call, leave_call

# A module computes attention when its class is named so; it goes through the interface when its forward looks
# the attention function up there (as every transformers model that supports set_attn_implementation does).
_ATTENTION_CLASS = re.compile(r"Attention|Attn")
_USES_INTERFACE = "ALL_ATTENTION_FUNCTIONS"
_SOFTMAX = ("softmax", "scaled_dot_product_attention", "flex_attention")


def prepare_abft_class(model_class: type) -> None:
    """Before a model of `model_class` builds its layers with attn_implementation="abft": models that pick
    their attention classes from a per-implementation table (FALCON_ATTENTION_CLASSES, ...) would fail with a
    KeyError. Falcon's table gets an "abft" entry (its eager class, whose forward prepare_abft_model replaces);
    any other such model is refused with a ValueError."""
    module = sys.modules.get(model_class.__module__)
    model_type = getattr(model_class.config_class, "model_type", model_class.__name__)
    for name, table in list(vars(module).items()) if module is not None else []:
        is_table = (name == "ATTENTION_CLASSES" or name.endswith("_ATTENTION_CLASSES")) and isinstance(table, dict)
        if not is_table or ATTN_IMPLEMENTATION in table:
            continue
        if model_type == "falcon":
            table[ATTN_IMPLEMENTATION] = table["eager"]
        else:
            raise ValueError(
                f"attn_implementation='abft' cannot run {model_type}: it builds its attention layers from {name}, "
                f"one class per implementation ({', '.join(table)}) with their own attention code, so the 'abft' "
                "attention function cannot reach them: use attn_implementation='eager'")


def prepare_abft_model(model) -> None:
    """Make `model` (a PreTrainedModel whose config has, or is about to get, attn_implementation="abft")
    ready for it, or raise ValueError saying why it cannot be. Idempotent."""
    refuse_unsupported_model(model)
    if model.config.model_type in _SPEC_IN_POSITION_EMBEDDINGS:
        _carry_spec_in_position_embeddings(model)
    if not getattr(model, "_abft_hooks", False):
        model.register_forward_pre_hook(enter_call, with_kwargs=True)
        model.register_forward_hook(leave_call, always_call=True)
        model._abft_hooks = True


def refuse_unsupported_model(model) -> None:
    """ValueError naming the model type when its attention cannot run through attn_implementation="abft"."""
    model_type = model.config.model_type
    if model_type == "falcon":
        import transformers

        if not transformers.__version__.startswith("5."):
            raise ValueError(f"abft on Falcon needs transformers 5 (found {transformers.__version__}): 4.x builds "
                             "Falcon's attention mask with its own code")
        if model.config.alibi:
            raise ValueError("abft supports rotary Falcon models only, not alibi=True: ALiBi adds a position bias "
                             "to the attention scores, which label_attention does not compute")
        return
    own = _attention_outside_interface(model)
    if own:
        raise ValueError(
            f"attn_implementation='abft' cannot run {model_type}: its attention ({', '.join(own)}) computes the "
            "softmax itself instead of calling transformers' AttentionInterface, so it would ignore the 'abft' "
            "attention function and misread the mask it is given (e.g. ALiBi or relative position biases, custom "
            "attention code): use attn_implementation='eager'")
    reads_mask = sorted({type(m).__name__ for m in model.modules() if _reads_attention_mask(type(m))})
    if reads_mask:
        raise ValueError(
            f"attn_implementation='abft' cannot run {model_type}: its attention ({', '.join(reads_mask)}) reads the "
            "attention mask itself (e.g. to select keys or build its own mask), expecting transformers' 4-D mask, "
            "while 'abft' passes a 2-D padding mask: use attn_implementation='eager'")
    if not any(_uses_interface(type(m)) for m in model.modules()):
        raise ValueError(
            f"attn_implementation='abft' cannot run {model_type}: none of its layers computes softmax attention "
            "through transformers' AttentionInterface (e.g. a state-space or recurrent model), so there are no "
            "attention masses")


def _attention_outside_interface(model) -> List[str]:
    """Class names of the modules of `model` that compute softmax attention themselves: named like attention,
    computing a softmax (or calling SDPA) in their own code, not using the interface and not wrapping a module
    that does. Linear attention and state-space layers (no softmax) are not attention masses and pass."""
    names = set()
    for module in model.modules():
        cls = type(module)
        if not _is_transformers_class(cls) or not _ATTENTION_CLASS.search(cls.__name__) or _uses_interface(cls):
            continue
        if not _computes_softmax(cls) or any(_uses_interface(type(m)) for m in module.modules()):
            continue
        names.add(cls.__name__)
    return sorted(names)


def _is_transformers_class(cls: type) -> bool:
    return cls.__module__.startswith("transformers.models.")


def _source(obj) -> str:
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        return ""


@lru_cache(maxsize=None)
def _uses_interface(cls: type) -> bool:
    return _is_transformers_class(cls) and hasattr(cls, "forward") and _USES_INTERFACE in _source(cls.forward)


@lru_cache(maxsize=None)
def _computes_softmax(cls: type) -> bool:
    code = "".join(_source(c) for c in cls.__mro__ if _is_transformers_class(c))
    return any(word in code for word in _SOFTMAX)


@lru_cache(maxsize=None)
def _reads_attention_mask(cls: type) -> bool:
    """Whether the forward of an interface-using class does more with `attention_mask` than pass it on to an
    attention function: index it, read its attributes, or hand it to another function (a key selector, a mask
    builder)."""
    if not _uses_interface(cls):
        return False
    try:
        tree = ast.parse(textwrap.dedent(_source(cls.forward)))
    except SyntaxError:
        return False
    for node in ast.walk(tree):
        if isinstance(node, (ast.Subscript, ast.Attribute)) and _is_mask(node.value):
            return True
        if isinstance(node, ast.Call) and not re.search(r"attn|attention", ast.unparse(node.func)):
            if any(_is_mask(a) for a in node.args) or any(_is_mask(k.value) for k in node.keywords):
                return True
    return False


def _is_mask(node) -> bool:
    return isinstance(node, ast.Name) and node.id == "attention_mask"


# Families whose decoder layers call their attention without the keywords of the model call (so `abft=` never
# arrives) but with the rotary position embeddings: the spec rides in those. Model type -> the attention
# module's attribute name in each decoder layer.
_SPEC_IN_POSITION_EMBEDDINGS = {"falcon": "self_attention", "stablelm": "self_attn", "nemotron": "self_attn"}


def _attention_layout(attention_class: type) -> str:
    """How an attention class of a _SPEC_IN_POSITION_EMBEDDINGS family is built: "interface" (its forward takes
    position_embeddings and **kwargs and calls the attention interface with them, as Falcon from transformers
    5.25, StableLM and Nemotron), "falcon-own" (Falcon 5.0-5.24: its forward computes attention itself, with
    `alibi` as second argument and `_split_heads`), or "unknown"."""
    try:
        parameters = list(inspect.signature(attention_class.forward).parameters)
    except (TypeError, ValueError):
        return "unknown"
    if _USES_INTERFACE in _source(attention_class.forward) and "position_embeddings" in parameters \
            and "alibi" not in parameters and "kwargs" in parameters:
        return "interface"
    if parameters[1:3] == ["hidden_states", "alibi"] and hasattr(attention_class, "_split_heads"):
        return "falcon-own"
    return "unknown"


def _carry_spec_in_position_embeddings(model) -> None:
    """Let the spec reach the attention of a family whose decoder layers drop the call's keywords: it rides in the
    rotary position embeddings, the one argument those layers pass on (and that gradient checkpointing saves for
    the recompute). Each attention module takes it out again: a forward pre-hook turns it into the `abft=`
    keyword where the attention calls the interface itself, a replaced forward calls the interface where it does
    not (Falcon before transformers 5.25). The class's layout is checked before anything is hooked or replaced."""
    base = model.base_model
    if getattr(base, "_abft_spec_carrier", False):
        return
    model_type = model.config.model_type
    layers = getattr(base, "h", None) if model_type == "falcon" else getattr(base, "layers", None)
    attentions = [getattr(layer, _SPEC_IN_POSITION_EMBEDDINGS[model_type], None) for layer in layers or []]
    layouts = {_attention_layout(type(a)) for a in attentions}
    rotary = getattr(base, "rotary_emb", None)
    if not attentions or rotary is None or len(layouts) != 1 or "unknown" in layouts \
            or ("falcon-own" in layouts and model_type != "falcon"):
        raise ValueError(f"attn_implementation='abft' does not know the layout of {model_type}'s attention in this "
                         "transformers version (its decoder layers drop the call's keywords, and its attention "
                         "classes are not the ones this package was written against): nothing is replaced or hooked "
                         "blindly; use attn_implementation='eager'")
    for attention in attentions:
        if layouts == {"interface"}:
            attention.register_forward_pre_hook(_spec_from_position_embeddings, with_kwargs=True)
        else:
            attention.forward = types.MethodType(_falcon_attention_forward, attention)
    rotary.register_forward_hook(_add_spec_to_position_embeddings)
    base._abft_spec_carrier = True


def _add_spec_to_position_embeddings(module, args, output):
    call = current_call.get()
    if call is not None and call.spec is not None:
        return (*output, call.spec)
    return None


def _spec_from_position_embeddings(module, args, kwargs):
    """Forward pre-hook of an attention module that calls the interface itself: position_embeddings
    (cos, sin, spec) -> (cos, sin), and abft=spec."""
    position_embeddings = kwargs.get("position_embeddings")
    if position_embeddings is None or len(position_embeddings) != 3:
        return None
    cos, sin, kwargs["abft"] = position_embeddings
    kwargs["position_embeddings"] = (cos, sin)
    return args, kwargs


def _falcon_attention_forward(self, hidden_states, alibi, attention_mask, position_ids=None, layer_past=None,
                              use_cache=False, output_attentions=False, position_embeddings=None, **kwargs):
    """FalconAttention.forward of transformers 5.0-5.24 (rotary path) through the attention function of the
    config's implementation ("abft", or the probe of trainable_qk); FalconAttention's own forward for any other
    implementation.

    position_embeddings is (cos, sin) or (cos, sin, spec).
    """
    from transformers.models.falcon.modeling_falcon import apply_rotary_pos_emb
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    implementation = self.config._attn_implementation
    spec = None
    if position_embeddings is not None and len(position_embeddings) == 3:
        *position_embeddings, spec = position_embeddings
    if not implementation.startswith(ATTN_IMPLEMENTATION) or alibi is not None:
        return type(self).forward(self, hidden_states, alibi, attention_mask, position_ids, layer_past, use_cache,
                                  output_attentions, position_embeddings, **kwargs)
    cos, sin = position_embeddings
    batch, seq_len, _ = hidden_states.shape
    query, key, value = (t.transpose(1, 2) for t in self._split_heads(self.query_key_value(hidden_states)))
    query, key = apply_rotary_pos_emb(query, key, cos, sin)
    if layer_past is not None:
        key, value = layer_past.update(key, value, self.layer_idx)
    # Falcon's rotary attention applies no attention dropout and scales by 1/sqrt(head_dim).
    attention = ALL_ATTENTION_FUNCTIONS[implementation]
    out, weights = attention(self, query, key, value, attention_mask, scaling=self.inv_norm_factor, dropout=0.0,
                             abft=spec)
    return self.dense(out.reshape(batch, seq_len, -1)), weights


def requests_abft(attn_implementation) -> bool:
    """Whether a set_attn_implementation argument (a str or a dict per sub-config) asks for "abft"."""
    if isinstance(attn_implementation, dict):
        return any(requests_abft(v) for v in attn_implementation.values())
    return attn_implementation == ATTN_IMPLEMENTATION


def is_abft(config: Optional[object]) -> bool:
    return getattr(config, "_attn_implementation", None) == ATTN_IMPLEMENTATION
