"""AVBERT models: per-clip CNNs, Transformer layers with plain or low-rank shared maps, the full model."""

from avmt.models.avbert import TRANSFORMERS, AVBert, AVBertOutput, EncoderOutput, layer_plan
from avmt.models.cnn import AudioResNet, VisualResNet
from avmt.models.transformer import DenseMap, LowRankLinear, RotationCache, SequenceEmbedding, TransformerLayer

__all__ = [
    "TRANSFORMERS",
    "AVBert",
    "AVBertOutput",
    "AudioResNet",
    "DenseMap",
    "EncoderOutput",
    "LowRankLinear",
    "RotationCache",
    "SequenceEmbedding",
    "TransformerLayer",
    "VisualResNet",
    "layer_plan",
]
