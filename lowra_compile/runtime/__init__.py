"""Runtime: the packed weight format, the `lowra::*` ops and their pure-torch reference.

Imports nothing from the rest of the package; importing it registers the ops.
"""

from . import ops
from .format import BIT_WIDTHS, PackedWeight, pack_codes, pack_weight, unpack_codes
from .synthetic import random_packed_weight

__all__ = ["BIT_WIDTHS", "PackedWeight", "ops", "pack_codes", "pack_weight", "random_packed_weight", "unpack_codes"]
