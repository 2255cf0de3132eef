"""Plain PyTorch models, their configs and their pickle-free checkpoint folders.

No Lightning here: :class:`StateTransition` (ST) and :class:`StateEmbedding` (SE) are
``nn.Module`` classes you can read top to bottom, each with a config dataclass and a
``from_checkpoint`` that loads a folder written by ``vcell train`` (safetensors + JSON).
"""

from vcell._lazy import lazy_exports

_EXPORTS = {
    ".checkpoint": ["BEST", "LAST", "find_checkpoint", "read_config", "write_checkpoint"],
    ".config": ["ModelConfig", "read_config_file"],
    ".embedding": ["SEConfig", "StateEmbedding", "embed_adata", "tokenize"],
    ".layers": ["energy_distance"],
    ".precision": ["PRECISIONS", "autocast"],
    ".transition": ["STConfig", "StateTransition"],
}
__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
