"""Regression comparison: two result sets (``compare``), confirmation by rerun (``confirm``), trends
over many sets (``trend``) and the committed baselines (``baseline``)."""
