"""MSSA (Remote Sens. 2025): PSCJA (WRGPA + SCA), IGTA, CMSE semantic tokens, MSFM.

Importing the package registers the ``mssa`` architecture; see :mod:`.model` for what
is faithful to the paper and what is substituted, and :mod:`.layers` for the blocks.
"""
from .model import MSSA, MSSAConfig

__all__ = ["MSSA", "MSSAConfig"]
