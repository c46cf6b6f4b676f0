"""Released 1D tokenizers (TiTok, One-D-Piece) converted into this project's format (docs/released_weights.md).

    from tokenizer.released import convert
    convert("one-d-piece", "path/to/One-D-Piece-S-256", "converted/odp-s256")
    tok = OneDTokenizer.from_pretrained("converted/odp-s256")
"""

from .convert import convert, convert_state, reference_config
from .source import Snapshot, check_convertible, read_snapshot
from .variants import FAMILIES, VARIANTS, Variant, tokenizer_config, variant_by_name

__all__ = ["convert", "convert_state", "reference_config", "read_snapshot", "check_convertible", "Snapshot",
           "FAMILIES", "VARIANTS", "Variant", "tokenizer_config", "variant_by_name"]
