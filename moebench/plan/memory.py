"""TEMP shim."""
from dataclasses import dataclass
@dataclass(frozen=True)
class TrainShape:
    hidden: int; ffn_hidden: int; experts: int; top_k: int; layers: int; dense_layers: int; shared_experts: int
    heads: int; kv_heads: int; head_dim: int; vocab: int; activation: str; bytes_per_element: int; tokens: int
    seq_len: int; ep: int; recompute: str; optimizer: str
def train_memory(s):
    return {k: 1 for k in ("param_bytes", "grad_bytes", "optimizer_bytes", "activation_bytes", "expert_param_bytes")}
