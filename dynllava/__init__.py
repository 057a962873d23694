"""dynllava: deployment toolchain for Dynamic-LLaVA (sparse LLaVA-1.5 inference).

    from dynllava import Engine, Request, SamplingParams
"""

__version__ = "0.1.0"

_LAZY = {"Engine": "dynllava.runtime.engine", "Request": "dynllava.runtime.sequence",
         "RequestOutput": "dynllava.runtime.sequence", "SamplingParams": "dynllava.runtime.sampling"}


def __getattr__(name: str):  # imported on first use: the CLI's light commands never load torch
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dynllava' has no attribute {name!r}")
