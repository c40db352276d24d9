"""Measuring and reducing bias by group: metrics and model comparison (``metrics``), sample weighting
(``weighting``) and conformal age intervals by group (``conformal``)."""
