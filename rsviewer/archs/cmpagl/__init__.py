"""CMPAGL (Sun et al., TGRS 2024): Gswin image encoder, text/multimodal split of BERT,
ITC with momentum queue + optimized triplet + ITM + MLM. See :mod:`.model`."""
from .model import CMPAGL, CMPAGLConfig

__all__ = ["CMPAGL", "CMPAGLConfig"]
