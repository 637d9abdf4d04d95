"""DALLE-pytorch 1.6.6, the reference the DALL-E benchmarks time beside duomodal (not a dependency).

Install it into the venv with only what its transformer needs:

    .venv/bin/pip install --no-deps dalle-pytorch==1.6.6 einops==0.8.2 rotary-embedding-torch==0.2.3 \
        axial-positional-embedding==0.2.1

Its package also imports its VAE wrappers (taming-transformers, omegaconf) and pkg_resources; those
modules are stubbed while importing, since only its DALLE transformer and DiscreteVAE are used.
"""

from __future__ import annotations

import sys
import types


def import_dalle_pytorch():
    """DALLE-pytorch's DALLE and DiscreteVAE classes, or None when the package is not installed."""
    stubs = {"taming": {}, "taming.models": {}, "taming.models.vqgan": {"VQModel": object, "GumbelVQ": object},
             "omegaconf": {"OmegaConf": object}, "pkg_resources": {"get_distribution": lambda name: None}}
    added = []
    for name, attributes in stubs.items():
        try:
            __import__(name)
        except ImportError:
            module = types.ModuleType(name)
            module.__dict__.update(attributes)
            sys.modules[name] = module
            added.append(name)
    try:
        from dalle_pytorch import DALLE as Reference, DiscreteVAE as ReferenceVAE
    except ImportError:
        return None
    finally:
        for name in added:
            sys.modules.pop(name, None)
    return Reference, ReferenceVAE


def reference_dalle(classes, grid: int, dim_head: int = 32):
    """DALLE-pytorch's DALLE at the issue's size: dim 256, depth 4, 8 heads, 32 text tokens, 512 codes."""
    Reference, ReferenceVAE = classes
    vae = ReferenceVAE(image_size=grid * 8, num_layers=3, num_tokens=512, codebook_dim=256, hidden_dim=64)
    return Reference(dim=256, vae=vae, num_text_tokens=1024, text_seq_len=32, depth=4, heads=8, dim_head=dim_head)
