"""Tensors out of a TorchScript archive (OpenAI's original CLIP ``.pt`` files) without
running it.

A TorchScript zip keeps the module tree in ``<root>/data.pkl`` — objects of generated
``__torch__.*`` classes whose attributes are sub-modules and tensors — and the tensor
bytes in ``<root>/data/<key>``; the code is in ``code/`` and is never touched here. The
pickle is read by an unpickler that can build only inert stand-ins for ``__torch__``
classes, ``OrderedDict`` and tensors over the archive's storages; any other global (what
a pickle needs to run code) is refused. Walking the attributes gives the state dict,
named exactly as the module's own ``state_dict()`` would be.
"""
from __future__ import annotations

import collections
import io
import pickle
import zipfile
from pathlib import Path

import torch

from ...errors import ModelError

_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "DoubleStorage": torch.float64,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


class _Stub:
    """An inert stand-in for a scripted module: attributes only, no methods."""


def _rebuild(storage, offset, size, stride, *_):
    return storage.as_strided(tuple(size), tuple(stride), offset)


_SAFE_JIT = {"build_intlist": list, "build_doublelist": list, "build_boollist": list,
             "build_tensorlist": list, "restore_type_tag": lambda v, *_: v}


class _Reader(pickle.Unpickler):
    def __init__(self, data: bytes, zf: zipfile.ZipFile, root: str):
        super().__init__(io.BytesIO(data))
        self.zf, self.root = zf, root
        self.stubs: dict[str, type] = {}
        self.storages: dict[str, torch.Tensor] = {}

    def find_class(self, module: str, name: str):
        if module.startswith("__torch__"):
            return self.stubs.setdefault(f"{module}.{name}", type(name, (_Stub,), {}))
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild
        if module == "torch" and name in _DTYPES:
            return _DTYPES[name]
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch.jit._pickle" and name in _SAFE_JIT:
            return _SAFE_JIT[name]
        raise pickle.UnpicklingError(f"{module}.{name}")

    def persistent_load(self, pid):
        _, dtype, key, _location, numel = pid
        if key not in self.storages:
            raw = self.zf.read(f"{self.root}/data/{key}")
            t = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
            self.storages[key] = t.view(dtype)[:numel] if numel else t.view(dtype)
        return self.storages[key]


def _walk(obj, prefix: str, out: dict, seen: set) -> None:
    if id(obj) in seen:
        return
    seen.add(id(obj))
    for k, v in vars(obj).items():
        if isinstance(v, torch.Tensor):
            out[prefix + k] = v
        elif isinstance(v, _Stub):
            _walk(v, f"{prefix}{k}.", out, seen)


def read_torchscript(path: str | Path) -> dict[str, torch.Tensor]:
    p = Path(path)
    try:
        with zipfile.ZipFile(p) as zf:
            names = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if not names:
                raise ModelError(f"{p.name}: a TorchScript archive without data.pkl")
            root = names[0].split("/")[0]
            obj = _Reader(zf.read(names[0]), zf, root).load()
    except pickle.UnpicklingError as e:
        raise ModelError(
            f"{p.name} is a TorchScript archive whose data needs {e} to load, which rsviewer does not run. Convert it "
            f"once (only if you trust the file): python -c \"import torch; torch.save(torch.jit.load('{p}', "
            f"map_location='cpu').state_dict(), '{p.with_suffix('')}-state_dict.pt')\""
        ) from None
    except (zipfile.BadZipFile, KeyError, EOFError, ValueError, RuntimeError) as e:
        raise ModelError(f"{p.name} cannot be read (truncated or corrupt TorchScript archive: {str(e)[:120]})") from None
    out: dict[str, torch.Tensor] = {}
    if isinstance(obj, _Stub):
        _walk(obj, "", out, set())
    if not out:
        raise ModelError(f"{p.name}: no tensors found in the TorchScript archive")
    return out
