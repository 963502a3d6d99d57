"""The Elleci model: config, layers, Mamba-2 and MLA mixers, the LM, generation, checkpoints, tokenizer.

    from elleci.model import ElleciConfig, ElleciLM
    model = ElleciLM(ElleciConfig.from_name("tiny"))
    logits = model(input_ids)                       # [B, L, vocab]
    model = load_original("elleci_v1_final.pth")    # the original checkpoint, same logits
    out = model.generate(prompts, 64, static=True)  # static-cache decoder (CUDA graphs on GPU), see decode.py
    freeze_ternary(model)                           # frozen base: FFN weights as packed ternary codes (ternary.py)
"""
from .checkpoint import from_pretrained, load_original, save_pretrained
from .config import PRESETS, ElleciConfig
from .decode import StaticCache, StaticDecoder, generate_static
from .generation import generate, sample_next
from .layers import BitLinear, RMSNorm, SwiGLU
from .lm import Block, ElleciLM, InferenceCache
from .mamba2 import Mamba2Mixer, ssm_scan_chunked, ssm_scan_ref
from .mla import MLAMixer
from .ternary import TernaryLinear, freeze_ternary, frozen_base_bytes
from .tokenizer import Tokenizer

__all__ = ["ElleciConfig", "PRESETS", "ElleciLM", "Block", "InferenceCache", "RMSNorm", "BitLinear", "SwiGLU",
           "Mamba2Mixer", "MLAMixer", "ssm_scan_ref", "ssm_scan_chunked", "generate", "sample_next",
           "generate_static", "StaticDecoder", "StaticCache",
           "save_pretrained", "from_pretrained", "load_original", "Tokenizer",
           "TernaryLinear", "freeze_ternary", "frozen_base_bytes"]
