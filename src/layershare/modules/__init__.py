from layershare.modules.shared_basis import SharedBasis, SharedBasisLinear
from layershare.modules.weights import in_out_features, weight_dxh

__all__ = ["SharedBasis", "SharedBasisLinear", "in_out_features", "weight_dxh"]
