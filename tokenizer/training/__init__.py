"""Lightning training stages. Only this subpackage imports Lightning; the models in `tokenizer/` are plain
PyTorch."""

from .module import TokenizerModule

__all__ = ["TokenizerModule"]
