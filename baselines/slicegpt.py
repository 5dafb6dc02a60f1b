"""SliceGPT (Ashkboos et al., ICLR 2024, arXiv 2401.15024; microsoft/TransformerCompression ``rotate.py``).

Fold the RMSNorm scales into the linears they feed, then per position of the residual stream rotate by the
principal directions of the calibration signal there (float64 eigendecomposition of ``sum X^T X``) and delete
the weakest ``d - d'`` of them; the residual path carries a ``d' x d'`` shortcut matrix between positions with
different bases (:mod:`saes.core.slicegpt`, :mod:`saes.engine.slicing`). Sequential: each block's PCA is taken
on the outputs of the blocks already sliced (the compressed stream), as the reference's
``rotate_and_slice_sequential``.

Our readings, where the harness differs from the reference's defaults:

* the width: the reference slices a given fraction ``s`` of the width (``d' = (1 - s) d``); here ``d'`` is the
  largest width whose sliced blocks (projections plus the shortcut matrices) remove the linear parameters the
  uniform SVD plan at ``ratio`` removes (within one hidden dimension's worth), the same at every position;
* the embeddings and the head are outside that count, as for every method; a tied head is untied (+vocab x d'
  parameters against the dense model's single table) and kept at the full width (``do_slice_head=False``, the
  reference's default); the record's whole-model count shows it;
* the norms use the model's own epsilon (the reference's ``RMSN`` hard-codes 1e-5) and no damping is added to
  ``sum X^T X`` (the reference adds 1% of its mean diagonal, which moves the eigenvalues, not the directions).
"""

from __future__ import annotations

from saes.core.slicegpt import Slicer


class SliceGPT(Slicer):
    def __init__(self, name: str = "slicegpt") -> None:
        super().__init__(name, "float64")  # the PCA is float64 whatever the model's dtype
