"""GaLR — global and local information for RS image–text retrieval (Yuan et al., TGRS 2022).

- ``model.py``: the architecture (MVSA, object graph + GCN with DREA, MIDF, BiGRU text);
- ``graph.py``: d_A, DREA merge and boosted adjacency, the GCN;
- ``objects.py``: object sources (detector-free clustering, detections from a file);
- ``vocab.py``: the word vocabulary built from the training captions.
"""
from .graph import GCN, Obj, build_graph, d_A, drea_adjacency, drea_merge
from .model import GaLR, GaLRConfig
from .vocab import Vocab

__all__ = ["GaLR", "GaLRConfig", "Vocab", "Obj", "GCN", "build_graph", "d_A", "drea_adjacency", "drea_merge"]
