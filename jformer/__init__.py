"""jformer: the Transformer as pure JAX functions over explicit parameter pytrees."""

from jformer import blocks, cache, config, decoding, ensemble, flash, layers, masks, positional, recurrent, training
from jformer.attention import (
    attend,
    init_multi_head_attention,
    multi_head_attention,
    project_qkv,
    reference_multi_head_attention,
    scaled_dot_product_attention,
)
from jformer.blocks import Context, stack
from jformer.config import ExecConfig, TransformerConfig
from jformer.decoding import init_lm_cache, init_seq2seq_cache, reorder_cache
from jformer.masks import causal_mask, combine_masks, padding_mask, padding_mask_from_ids
from jformer.models import (
    classifier_apply,
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
from jformer.recurrent import (
    RNNConfig,
    additive_attention,
    gru_cell,
    init_additive_attention,
    init_rnn_cell,
    init_rnn_layer,
    init_rnn_seq2seq,
    lstm_cell,
    rnn_greedy_decode,
    rnn_layer,
    rnn_seq2seq_apply,
)

__version__ = "0.1.0"
