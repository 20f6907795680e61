"""Our Pallas kernels, each with a plain-jnp reference beside it."""

from pallas_kernels.flash_attention import (BlockSizes, flash_attention, flash_attention_block,
                                            flash_attention_block_backward)
from pallas_kernels.paged_attention import paged_attention
from pallas_kernels.paged_reference import paged_attention_reference
from pallas_kernels.reference import reference_attention

__all__ = ["BlockSizes", "flash_attention", "flash_attention_block", "flash_attention_block_backward",
           "paged_attention", "paged_attention_reference", "reference_attention"]
