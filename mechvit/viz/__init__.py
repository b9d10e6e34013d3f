"""Figures and pages: report, figures, feature pages, circuitsvis views, the feature explorer and feature cards."""

from mechvit.viz.explorer import ExplorerSAE, write_explorer
from mechvit.viz.feature_card import feature_card

__all__ = ["ExplorerSAE", "feature_card", "write_explorer"]
