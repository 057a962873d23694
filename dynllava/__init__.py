"""dynllava: deployment toolchain for Dynamic-LLaVA (sparse LLaVA-1.5 inference)."""

__version__ = "0.1.0"
