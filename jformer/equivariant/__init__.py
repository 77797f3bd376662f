"""Equivariant models on point clouds: the SE(3)-Transformer (Fuchs et al. 2020), its TFN
kernels, EGNN (Satorras et al. 2021), a plain set-Transformer baseline and N-body predictors.

Features are dicts ``{degree l: [N, C_l, 2l+1]}`` in e3nn-jax's real basis (for l = 1 the
Cartesian (x, y, z)); see docs/equivariant.md for the equations and shapes.
"""

from jformer.equivariant.attention import (init_se3_attention, key_fiber, resolve_neighbours, se3_attention,
                                           single_head_attention)
from jformer.equivariant.baseline import SetTransformerConfig, init_set_transformer, set_transformer
from jformer.equivariant.egnn import EGNNConfig, egnn, egnn_layer, init_egnn
from jformer.equivariant.features import (check_features, check_fiber, check_node_mask, check_positions, concat,
                                          fiber_of, init_linear, init_norm_nonlinearity, linear, mask_features,
                                          norm_nonlinearity, safe_norm)
from jformer.equivariant.kernels import (basis, edge_inputs, full_neighbours, gather, init_tfn, init_tfn_conv,
                                         knn_neighbours, relative_positions, safe_length, spherical_harmonics,
                                         tfn_conv, tfn_messages)
from jformer.equivariant.model import SE3TransformerConfig, init_se3_transformer, se3_transformer
from jformer.equivariant.nbody_models import MODELS, nbody_model

__all__ = [
    "init_se3_attention", "key_fiber", "resolve_neighbours", "se3_attention", "single_head_attention",
    "SetTransformerConfig", "init_set_transformer", "set_transformer",
    "EGNNConfig", "egnn", "egnn_layer", "init_egnn",
    "check_features", "check_fiber", "check_node_mask", "check_positions", "concat", "fiber_of", "init_linear",
    "init_norm_nonlinearity", "linear", "mask_features", "norm_nonlinearity", "safe_norm",
    "basis", "edge_inputs", "full_neighbours", "gather", "init_tfn", "init_tfn_conv", "knn_neighbours",
    "relative_positions", "safe_length", "spherical_harmonics", "tfn_conv", "tfn_messages",
    "SE3TransformerConfig", "init_se3_transformer", "se3_transformer",
    "MODELS", "nbody_model",
]
