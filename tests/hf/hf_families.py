"""Tiny random models of every causal-LM model type that the installed transformers can build.

The tiny config of a model type is its config class's defaults with every size shrunk by the name of
the attribute (hidden sizes, layers, heads, intermediate sizes, vocabulary, experts, ...), per-layer lists
cut to the first layers (enough to hold an attention layer), and token ids moved into the tiny vocabulary.
A few model types whose default config does not build at all get the smallest fix in `_FIXES`.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import importlib
import os
import inspect
import re
import traceback
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import transformers
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

VOCAB, HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, FFN, POSITIONS = 128, 64, 2, 4, 2, 16, 64, 256
EXPERTS, EXPERTS_PER_TOKEN, RANK = 4, 2, 16
MAMBA_HEADS = 8  # x HEAD_DIM = 2 (the usual mamba expand) x HIDDEN

_SIZES = [  # (attribute names as a regular expression matched in full, tiny value); first match wins
    (r"vocab_size|.*_vocab_size|vocab_size_.*|.*_vocab", VOCAB),
    (r"mamba_n_heads|mamba_num_heads", MAMBA_HEADS),
    (r"(mamba_)?(d_head|head_dim|headdim)|.*_head_dim|dim_head|kv_channels|attention_head_(dim|size)|rotary_dim",
     HEAD_DIM),
    (r"hidden_size|n_embd|d_model|dim|embed_dim|word_embed_proj_dim|embedding_size|embedding_dim|"
     r"attention_hidden_size|backbone_hidden_size|(input|output)_embedding_size|emb_dim|lru_width", HIDDEN),
    (r"num_hidden_layers|n_layer|num_layers|n_layers|(en|de)coder_layers|num_blocks", LAYERS),
    (r"n_\w+_layers|num_\w+_layers|first_k_dense_replace", 1),
    (r"\w+_offset|n_group|topk_group|num_expert_group", 1),
    (r"\w+_period", 2),
    (r"num_attention_heads|n_head|num_heads|n_heads|(en|de)coder_attention_heads|swa_num_attention_heads|"
     r"index_n_heads|linear_num_(key_|value_)?heads", HEADS),
    (r"num_experts|num_local_experts|n_routed_experts|moe_num_experts", EXPERTS),
    (r"num_experts_per_tok|moe_topk|moe_k|num_experts_per_token|top_k", EXPERTS_PER_TOKEN),
    (r"max_position_embeddings|n_positions|n_ctx|max_seq_len|model_max_length|max_(target|source)_positions|"
     r"original_max_position_embeddings|context_length", POSITIONS),
    (r".*(intermediate_size|ffn_dim|ffn_hidden_size|n_inner|dff|dim_ff|feed_forward_size|d_inner)(_mlp)?", FFN),
    (r"mamba_d_state|state_size|ssm_state_size|mamba_d_ssm|.*_rank", RANK),
]
_KV_HEADS = re.compile(r"num_key_value_heads|num_kv_heads|n_kv_heads|multi_query_group_num|num_query_groups|"
                       r"swa_num_key_value_heads")
_GENERATION_KEYS = set(transformers.GenerationConfig().to_dict())
_LAYER_COUNT = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers")
_NOT_ATTENTION = re.compile(r"linear|mamba|recurrent|conv|mlp|moe|dense|sparse|ssm|rwkv")
# Default configs that do not build as they are, and the smallest change that makes them build.
_FIXES = {
    "dots1": dict(n_routed_experts=EXPERTS, num_experts_per_tok=EXPERTS_PER_TOKEN, n_shared_experts=1),
    "musicgen": dict(num_codebooks=1),  # input_ids [B, N] rather than [B x codebooks, N]
    "musicgen_melody": dict(num_codebooks=1),
    "lfm2_moe": dict(layer_types=["full_attention", "conv"]),
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]]),
    "mamba2": dict(num_heads=MAMBA_HEADS),
    "deepseek_v2": dict(num_experts_per_tok=EXPERTS_PER_TOKEN),
    "bamba": dict(attn_layer_indices=[1]),
    "granitemoehybrid": dict(layer_types=["mamba", "attention"]),
    "reformer": dict(axial_pos_embds_dim=[HIDDEN // 2, HIDDEN // 2]),
    "dory": dict(n_input_layers=1, n_recurrent_layers=0, n_output_layers=1),
    "zamba": dict(attention_hidden_size=2 * HIDDEN),  # the attention sees [hidden states, embeddings]
    "zamba2": dict(attention_hidden_size=2 * HIDDEN),
}


def causal_lm_model_types():
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def model_class(model_type: str):
    return getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _tiny_value(name: str, value):
    if not _is_count(value) or value <= 0:
        return value
    for pattern, tiny in _SIZES:
        if re.fullmatch(pattern, name):
            return min(value, tiny)
    return value


def _is_attention_entry(entry) -> bool:
    return isinstance(entry, str) and re.search(r"attention|attn|global|local|hybrid", entry) is not None \
        and _NOT_ATTENTION.search(entry) is None


def _tiny_kwargs(config) -> dict:
    defaults = config.to_dict()
    kwargs = {}
    own = inspect.signature(type(config).__init__).parameters
    for name, value in defaults.items():
        if name in _GENERATION_KEYS and name not in own:  # transformers 4.x: generation defaults on every config
            continue
        sub = getattr(config, name, None) if name in getattr(config, "sub_configs", {}) else None
        if sub is not None and isinstance(value, dict):
            kwargs[name] = {**value, **_tiny_kwargs(sub)}
            continue
        tiny = _tiny_value(name, value)
        if tiny != value:
            kwargs[name] = tiny
    heads = defaults.get("num_attention_heads")
    for name, value in defaults.items():  # keep multi-head, grouped or multi-query attention as it is
        if _KV_HEADS.fullmatch(name) and (_is_count(value) or value is None):
            kwargs[name] = HEADS if value in (heads, None) else 1 if value == 1 else KV_HEADS
    if "head_dim" in defaults and defaults["head_dim"] is None:
        kwargs["head_dim"] = HEAD_DIM
    if "qk_head_dim" in defaults and "qk_nope_head_dim" in defaults:  # multi-head latent attention: a sum
        kwargs["qk_head_dim"] = kwargs.get("qk_nope_head_dim", 0) + kwargs.get("qk_rope_head_dim", 0)
    # Per-layer lists: cut to the first layers, enough of them to hold an attention layer.
    layer_count = next((n for n in _LAYER_COUNT if _is_count(defaults.get(n))), None)
    lists = {n: v for n, v in defaults.items() if isinstance(v, (list, tuple)) and v}
    first_attention = [next((i for i, e in enumerate(v) if _is_attention_entry(e)), None) for v in lists.values()]
    layers = max([LAYERS] + [i + 1 for i in first_attention if i is not None])
    if layer_count is not None:
        kwargs[layer_count] = min(layers, defaults[layer_count])
        for name, value in lists.items():
            if len(value) == defaults[layer_count]:
                kwargs[name] = [_tiny_value(name, v) for v in value[:kwargs[layer_count]]]
        for name, value in defaults.items():  # per-layer settings keyed by layer index
            if "layer" in name and isinstance(value, dict) and value and all(str(k).isdigit() for k in value):
                kwargs[name] = {k: v for k, v in value.items() if int(k) < kwargs[layer_count]}
    vocab = kwargs.get("vocab_size", defaults.get("vocab_size"))
    vocab = vocab if _is_count(vocab) else VOCAB
    for name, value in defaults.items():
        if name.endswith(("token_id", "token_ids", "token_index")):
            tiny = _token_id(value, vocab)
            if tiny != value:
                kwargs[name] = tiny
    return kwargs


def _token_id(value, vocab: int):
    if _is_count(value) and value >= vocab:
        return vocab - 1 - value % 8
    if isinstance(value, list):
        return [_token_id(v, vocab) for v in value]
    return value


def tiny_config(model_type: str, **overrides):
    """The config class's defaults with every size shrunk, initializer_range raised (attention far from
    uniform), decoder mode on (encoder families' causal LM heads need it); `overrides` last."""
    defaults = model_class(model_type).config_class()
    kwargs = _tiny_kwargs(defaults)
    kwargs.update(initializer_range=0.2, is_decoder=True, **_FIXES.get(model_type, {}))
    kwargs.update(overrides)
    return type(defaults)(**kwargs)


def tiny_model(model_type: str, attn_implementation: str = "eager", **overrides):
    torch.manual_seed(0)
    config = tiny_config(model_type, **overrides)
    model = model_class(model_type)._from_config(config, attn_implementation=attn_implementation)
    with torch.no_grad():  # zero-initialised weights (gates, residual scales) would hide dependencies
        for param in model.parameters():
            if param.numel() > 1 and not param.any():
                param.normal_(0.0, 0.2)
    if hasattr(model, "set_default_language"):  # X-MOD: language adapters
        model.set_default_language(config.languages[0])
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------
# The family matrix: every model type through attn_implementation="abft" against eager attention.

SEQ_LEN, NUM_CLASSES = 13, 3
MASS_TOL, LOGITS_TOL, GRAD_TOL = 1e-4, 1e-4, 1e-3
PASS, REFUSED, SKIPPED = "PASS", "REFUSED", "SKIPPED"


@dataclasses.dataclass
class Outcome:
    status: str  # PASS, REFUSED (a ValueError raised by abft_kernels) or SKIPPED (no tiny model to test)
    reason: str = ""  # the ValueError's message, or why there is no tiny model
    projections: str = ""  # PASS: the trained query/key projections


class Refused(Exception):
    """A ValueError raised by abft_kernels itself (not by transformers or torch)."""


def _abft_value_error(exc: BaseException) -> bool:
    if not isinstance(exc, ValueError):
        return False
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and f"{os.sep}abft_kernels{os.sep}" in frames[-1].filename


@contextlib.contextmanager
def _refusals():
    """Turns abft_kernels' ValueErrors into Refused; anything else propagates (and fails the matrix)."""
    try:
        yield
    except ValueError as exc:
        if _abft_value_error(exc):
            raise Refused(str(exc)) from exc
        raise


def icl_batch(vocab: int, seed: int = 0):
    """Three rows: left-padded, right-padded, unpadded. Almost every real token is a label, so that the
    induction filter counts heads; the query row is each sample's last real token."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (3, SEQ_LEN), generator=gen)
    mask = torch.ones(3, SEQ_LEN, dtype=torch.long)
    mask[0, :4] = 0
    mask[1, -3:] = 0
    key_class = torch.randint(0, NUM_CLASSES, (3, SEQ_LEN), generator=gen)
    key_class[:, [0, 6]] = -1
    last_real = torch.tensor([[SEQ_LEN - 1], [SEQ_LEN - 4], [SEQ_LEN - 1]])
    target = torch.randint(0, NUM_CLASSES, (3, 1), generator=gen)
    return input_ids, mask, key_class, last_real, target


def masses_from_weights(attentions, key_class, rows):
    """Per-layer masses [B,H,R,C] summed from eager attention weights: the oracle."""
    one_hot = (key_class[:, :, None] == torch.arange(NUM_CLASSES)).to(torch.float32)
    masses = []
    for weights in attentions:
        if weights is None or weights.dim() != 4 or weights.shape[-2:] != (SEQ_LEN, SEQ_LEN):
            continue  # not softmax attention weights (e.g. a linear attention layer's output)
        picked = weights.gather(2, rows[:, None, :, None].expand(-1, weights.shape[1], -1, weights.shape[-1]))
        masses.append(picked.float() @ one_hot[:, None])
    return masses


def abft_loss_per_layer(masses, key_class, rows, target, mask):
    """abft_loss summed layer by layer (layers may differ in their number of heads); whether any head counted."""
    import abft_kernels as ak

    total, counted = 0.0, False
    for mass in masses:
        loss, info = ak.abft_loss([mass], target, key_class, rows, key_padding_mask=mask.bool())
        total, counted = total + loss, counted or bool(info.counted.any())
    return total, counted


def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().double(), ref.detach().double()
    if not torch.isfinite(x).all():
        return float("inf")
    denom = ref.norm().item()
    return (x - ref).norm().item() / (denom if denom else 1.0)


def _trained(model):
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


# Families whose eager attention returns the softmax WITHOUT the sink (their sink only rescales the output by
# sigmoid(lse - sink)). abft's masses are the probabilities of the softmax with the sink, so the oracle's weights
# get the same factor.
_EAGER_WEIGHTS_WITHOUT_SINK = ("granite_swa", "granitemoe_swa")


@contextlib.contextmanager
def _eager_weights_with_sink(model_type: str):
    if model_type not in _EAGER_WEIGHTS_WITHOUT_SINK:
        yield
        return
    modeling = importlib.import_module(model_class(model_type).__module__)
    original = modeling.eager_attention_forward

    def with_sink(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        out, weights = original(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
        keys = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        scores = query @ keys.transpose(-1, -2) * scaling
        if attention_mask is not None:
            scores = scores + attention_mask
        share = torch.sigmoid(torch.logsumexp(scores.float(), dim=-1) - module.sinks.float().view(1, -1, 1))
        return out, weights * share[..., None].to(weights.dtype)

    modeling.eager_attention_forward = with_sink
    try:
        yield
    finally:
        modeling.eager_attention_forward = original


def run_family(model_type: str) -> Outcome:
    """PASS, REFUSED or SKIPPED for one model type; AssertionError (or any other exception) when "abft" gives a
    wrong answer or fails in a way that is not a ValueError of abft_kernels."""
    from abft_kernels.hf import LabelSpec, trainable_qk

    try:
        eager = tiny_model(model_type)
    except Exception as exc:  # noqa: BLE001
        return Outcome(SKIPPED, f"no tiny model: {type(exc).__name__}: {_first_line(exc)}")
    vocab = eager.get_input_embeddings().num_embeddings if hasattr(eager.get_input_embeddings(), "num_embeddings") \
        else eager.config.vocab_size
    input_ids, mask, key_class, rows, target = icl_batch(vocab)
    real = mask.bool()
    try:
        with torch.no_grad():
            eager(input_ids, attention_mask=mask, output_attentions=True, use_cache=False)
    except Exception as exc:  # noqa: BLE001
        return Outcome(SKIPPED, f"the tiny eager model does not run: {type(exc).__name__}: {_first_line(exc)}")
    # Two load paths must agree: switching a built model, and building with the implementation.
    abft = copy.deepcopy(eager)
    try:
        with _refusals():
            abft.set_attn_implementation("abft")
    except Refused as exc:
        try:
            with _refusals():
                tiny_model(model_type, attn_implementation="abft")
        except Refused:
            return Outcome(REFUSED, str(exc))
        raise AssertionError(f"{model_type}: set_attn_implementation refused but construction did not: {exc}")
    with _refusals():
        tiny_model(model_type, attn_implementation="abft")

    try:
        with _refusals():
            trainable_qk(abft)
            with torch.no_grad():
                plain = abft(input_ids, attention_mask=mask, use_cache=False).logits
            spec = LabelSpec(key_class, rows, NUM_CLASSES)
            abft_out = abft(input_ids, attention_mask=mask, abft=spec, output_attentions=True, use_cache=False)
    except Refused as exc:
        return Outcome(REFUSED, str(exc))
    trainable_qk(eager)
    with _eager_weights_with_sink(model_type):
        eager_out = eager(input_ids, attention_mask=mask, output_attentions=True, use_cache=False)
    want = masses_from_weights(eager_out.attentions or (), key_class, rows)
    got = list(abft_out.attentions)
    assert len(got) == len(want) > 0, f"{model_type}: {len(got)} layers of masses, eager has {len(want)}"
    for layer, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, f"{model_type} layer {layer}: masses {tuple(g.shape)}, eager {tuple(w.shape)}"
        err = _rel_err(g, w)
        assert err < MASS_TOL, f"{model_type} layer {layer}: masses differ from eager (rel. err. {err:.2e})"
    err = _rel_err(plain[real], eager_out.logits[real])
    assert err < LOGITS_TOL, f"{model_type}: logits without abft= differ from eager (rel. err. {err:.2e})"

    eager_loss, counted = abft_loss_per_layer(want, key_class, rows, target, mask)
    abft_loss, _ = abft_loss_per_layer(got, key_class, rows, target, mask)
    assert counted, f"{model_type}: no head passes the induction filter: the gradient check would be empty"
    eager_loss.backward()
    abft_loss.backward()
    want_grads, got_grads = _trained(eager), _trained(abft)
    assert want_grads and sorted(got_grads) == sorted(want_grads), f"{model_type}: trained parameters differ"
    assert all(p.grad is not None for p in want_grads.values()), f"{model_type}: a trained parameter has no gradient"
    # Relative to the parameter's gradient, or to 1e-3 of the whole gradient where the parameter's own is nearly
    # zero by construction (a key bias shifts every score of a row alike: its gradient is rounding noise).
    floor = 1e-3 * torch.cat([p.grad.flatten() for p in want_grads.values()]).norm().item()
    for name, param in want_grads.items():
        err = (got_grads[name].grad - param.grad).norm().item() / max(param.grad.norm().item(), floor)
        assert err < GRAD_TOL, f"{model_type}: gradient of {name} differs from eager (rel. err. {err:.2e})"
    return Outcome(PASS, projections=_projection_names(want_grads))


_WINDOWS = re.compile(r"sliding_window|sliding_window_size|attention_chunk_size|local_attention|window_size")
WINDOW = 5  # shorter than SEQ_LEN


def window_overrides(model_type: str) -> dict:
    """The tiny config's sliding-window / chunk sizes set to WINDOW (empty when it has none)."""
    try:
        defaults = model_class(model_type).config_class().to_dict()
    except Exception:  # noqa: BLE001  (a default config that does not build: the matrix skips it)
        return {}
    return {k: WINDOW for k, v in defaults.items() if _WINDOWS.fullmatch(k) and _is_count(v)}


def run_windows(model_type: str) -> Optional[Outcome]:
    """Plain attention (no labels) with sliding windows / chunks shorter than the sequence, against eager:
    PASS, REFUSED or SKIPPED; None for a model type without such a setting. (With labels such windows are
    refused by design.)"""
    overrides = window_overrides(model_type)
    if not overrides:
        return None
    try:
        eager = tiny_model(model_type, **overrides)
        vocab = getattr(eager.get_input_embeddings(), "num_embeddings", None) or eager.config.vocab_size
        input_ids, mask, *_ = icl_batch(vocab)
        with torch.no_grad():
            want = eager(input_ids, attention_mask=mask, use_cache=False).logits
    except Exception as exc:  # noqa: BLE001
        return Outcome(SKIPPED, f"no tiny model with windows of {WINDOW}: {type(exc).__name__}: {_first_line(exc)}")
    abft = copy.deepcopy(eager)
    try:
        with _refusals():
            abft.set_attn_implementation("abft")
            with torch.no_grad():
                got = abft(input_ids, attention_mask=mask, use_cache=False).logits
    except Refused as exc:
        return Outcome(REFUSED, str(exc))
    real = mask.bool()
    err = _rel_err(got[real], want[real])
    assert err < LOGITS_TOL, f"{model_type} with windows {overrides}: logits differ from eager (rel. err. {err:.2e})"
    return Outcome(PASS)


def _projection_names(trained) -> str:
    """The trained projections' names within a layer, `name (split)` where only some features are trained."""
    names = set()
    for name in trained:
        parts = name.split(".")
        if "parametrizations" in parts:
            names.add(f"{parts[parts.index('parametrizations') - 1]} (split)")
        else:
            names.add(parts[-2])
    return ", ".join(sorted(names))


def _first_line(exc: BaseException) -> str:
    """The exception's first line without the machine's paths (a library's file named in an import error), cut to
    160 characters: the same text on every machine."""
    line = (str(exc).strip().splitlines() or [""])[0]
    return re.sub(r"[^\s(]*/site-packages/", "", line)[:160]


# ---------------------------------------------------------------------------------------------------------------
# docs/huggingface.md's family tables, one per transformers major version (the newest release and the oldest
# declared one), generated from the matrix: `python tests/hf/hf_families.py` rewrites the installed version's.

DOC = Path(__file__).resolve().parents[2] / "docs" / "huggingface.md"
TABLE_START = "<!-- family matrix: generated by `python tests/hf/hf_families.py`, checked by tests/hf/test_hf_families.py -->"
TABLE_END = "<!-- end of family matrix -->"


def run_matrix(model_types=None) -> Dict[str, Tuple[Outcome, Optional[Outcome]]]:
    return {t: (run_family(t), run_windows(t)) for t in (model_types or causal_lm_model_types())}


def _short(reason: str, model_type: str) -> str:
    """A refusal's reason without what differs between model types (names, sizes) so that rows group."""
    reason = re.split(r"[:;] use attn_implementation", reason.replace("attn_implementation='abft' ", ""))[0]
    reason = re.sub(r" \((?:[A-Z]\w*(?:, )?)+\)| \(\d+\)|\[[\d, ]+\]", "", reason)
    reason = re.sub(rf"\b{re.escape(model_type)}'s ", "", reason)
    reason = re.sub(rf"\b{re.escape(model_type)}\b", "…", reason)
    return re.sub(r"\b[A-Z]\w*(Attention|Attn)\b", "its attention", reason)


def _detail(outcome: Outcome, windows: Optional[Outcome], model_type: str) -> str:
    if outcome.status == SKIPPED:
        return outcome.reason
    if outcome.status == REFUSED:
        return _short(outcome.reason, model_type)
    detail = ", ".join(re.sub(r"^(\S+)", r"`\1`", p) for p in outcome.projections.split(", "))
    if windows is not None:
        detail += "; windows shorter than N: " + ("exact without labels" if windows.status == PASS
                                                  else f"{windows.status.lower()}: {_short(windows.reason, model_type)}")
    return detail


def readme_table(results: Dict[str, Tuple[Outcome, Optional[Outcome]]]) -> str:
    rows: Dict[Tuple[str, str], List[str]] = {}
    for model_type, (outcome, windows) in sorted(results.items()):
        rows.setdefault((outcome.status, _detail(outcome, windows, model_type)), []).append(model_type)
    counts = collections.Counter(outcome.status for outcome, _ in results.values())
    order = {PASS: 0, REFUSED: 1, SKIPPED: 2}
    lines = [TABLE_START,
             f"transformers {transformers.__version__}: {len(results)} causal-LM model types, "
             f"{counts[PASS]} PASS, {counts[REFUSED]} REFUSED, {counts[SKIPPED]} SKIPPED.", "",
             "| outcome | model types | trained Q/K projections, or why |", "|---|---|---|"]
    for (status, detail), types in sorted(rows.items(), key=lambda kv: (order[kv[0][0]], -len(kv[1]), kv[0][1])):
        lines.append(f"| {status} | {', '.join(types)} | {detail.replace('|', '/')} |")
    return "\n".join(lines + [TABLE_END])


def readme_sections() -> Dict[str, str]:
    """{transformers version: its generated table} of every table in the doc."""
    text, sections, start = DOC.read_text(), {}, 0
    while TABLE_START in text[start:]:
        start = text.index(TABLE_START, start)
        end = text.index(TABLE_END, start) + len(TABLE_END)
        block = text[start:end]
        sections[re.search(r"^transformers (\S+):", block, re.M).group(1)] = block
        start = end
    return sections


def readme_section(version: Optional[str] = None) -> Optional[str]:
    """The table generated on `version` (default: the installed one), or None."""
    return readme_sections().get(version or transformers.__version__)


if __name__ == "__main__":
    import sys
    import warnings

    sys.path.insert(0, str(DOC.parents[1]))
    import abft_kernels  # noqa: F401  (registers "abft")

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    table = readme_table(run_matrix())
    major = transformers.__version__.split(".")[0]
    old = next((block for version, block in readme_sections().items() if version.split(".")[0] == major), None)
    if old is None:
        raise SystemExit(f"{DOC} has no table of transformers {major}.x ({TABLE_START!r}) to replace")
    DOC.write_text(DOC.read_text().replace(old, table))
    print(table)
