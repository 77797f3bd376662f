"""jformer: the Transformer as pure JAX functions over explicit parameter pytrees."""

from jformer import blocks, decoding, layers, positional, training
from jformer.attention import (
    attend,
    causal_mask,
    combine_masks,
    init_multi_head_attention,
    multi_head_attention,
    padding_mask,
    padding_mask_from_ids,
    project_qkv,
    scaled_dot_product_attention,
)
from jformer.models import (
    TransformerConfig,
    classifier_apply,
    decoder,
    encoder,
    init_classifier,
    init_decoder,
    init_encoder,
    init_lm,
    init_seq2seq,
    init_state,
    lm_apply,
    seq2seq_apply,
    seq2seq_decode,
    seq2seq_encode,
)

__version__ = "0.1.0"
