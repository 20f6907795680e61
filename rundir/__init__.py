"""What a run's directory holds, in one home that train/ and infer/ both import: the tokenizer file
(`rundir.tokenizer`), the orbax checkpoint layout (`rundir.checkpoint`), the saved config, and
loading a decoder from a run's workdir or a Hugging Face directory (`rundir.loading`).

Public API: load, load_decoder, restore_module, load_tokenizer, Tokenizer, Checkpointer.
"""

from rundir.checkpoint import Checkpointer
from rundir.loading import load, load_decoder, load_tokenizer, restore_module
from rundir.tokenizer import Tokenizer

__all__ = ["Checkpointer", "Tokenizer", "load", "load_decoder", "load_tokenizer", "restore_module"]
