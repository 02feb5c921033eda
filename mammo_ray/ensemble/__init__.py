"""Ensembles of members that differ only in their seed (paper 000): combining predictions and
reporting the gain (``combine``, numpy only), one torch / MLflow model of all members
(``model``), running the members looped or stacked as measured (``execution``), and resolving a
``--model`` string to member checkpoints (``source``). Import the submodules directly; this
package imports none of them, so the numpy side stays light."""
