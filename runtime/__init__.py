"""moebench's reference expert-parallel MoE runtime (never imports ``moebench``)."""

from runtime.config import MoEConfig, ParallelConfig
from runtime.engine import Engine, Request
from runtime.layer import MoELayer, MoEOutput
from runtime.model import DecoderConfig, DecoderWeights, MoEDecoder, decoder_weights
from runtime.reference import ReferenceOutput, reference_moe, rel_error
from runtime.stack import MoEStack
from runtime.weights import MoEWeights, init_weights

__all__ = [
    "DecoderConfig",
    "DecoderWeights",
    "Engine",
    "MoEConfig",
    "MoEDecoder",
    "MoELayer",
    "MoEOutput",
    "MoEStack",
    "MoEWeights",
    "ParallelConfig",
    "ReferenceOutput",
    "Request",
    "decoder_weights",
    "init_weights",
    "reference_moe",
    "rel_error",
]
