"""The math of CMD, with no dependency on torch.optim, torch.distributed or any optional package.

Paper symbols and the names used in the code (docs/architecture.md has the full table):

=============  ===============================================  ==========================================
paper          meaning                                          code
=============  ===============================================  ==========================================
W (T x N)      T snapshots of the N trained scalars             ``trajectory``
K              columns the clustering sees                      ``samples``
M              modes                                            ``modes``, ``Decomposition.num_modes``
r_m(t)         the mode's reference trajectory                  ``Decomposition.profiles[m]``
m(i)           the mode of parameter i                          ``Decomposition.assignment[i]``
a_i, b_i       per-parameter affine fit: w_i ~= a_i r_m + b_i   ``Decomposition.a``, ``.b`` (slope, offset)
u_i            a_i in units of its mode's RMS slope, clipped    ``ModeMap.slopes`` (normalised slope)
phi_m / psi    the trained number of a mode after the switch    mode *coefficient* (``ModeMap`` index)
=============  ===============================================  ==========================================
"""

from .clustering import abs_correlation, cluster_references
from .decomposition import (
    CHUNK_ELEMENTS,
    ColumnSource,
    Decomposition,
    FitQuality,
    FitSums,
    SlopeFit,
    choose_references,
    chunks,
    decompose,
    decompose_to_profiles,
    fit_slopes,
    fit_slopes_to_profiles,
)
from .layout import FlatLayout
from .mode_map import MAX_SLOPE, ModeMap
from .online import OnlineCMD
from .sampling import sample_columns
from .snapshots import SnapshotBuffer
from .subspace import SubspaceMap

__all__ = [
    "CHUNK_ELEMENTS",
    "MAX_SLOPE",
    "ColumnSource",
    "Decomposition",
    "FitQuality",
    "FitSums",
    "FlatLayout",
    "ModeMap",
    "OnlineCMD",
    "SlopeFit",
    "SnapshotBuffer",
    "SubspaceMap",
    "abs_correlation",
    "choose_references",
    "chunks",
    "cluster_references",
    "decompose",
    "decompose_to_profiles",
    "fit_slopes",
    "fit_slopes_to_profiles",
    "sample_columns",
]
