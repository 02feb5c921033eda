"""Ensembles of members that differ only in their seed (paper 000): combining predictions and
reporting the gain (``combine``, numpy only), and one torch / MLflow model of all members
(``model``). Import the submodules directly; this package imports neither, so the numpy side
stays light."""
