"""Volatility 3 glue: layers, stackers and the automagic for Xen memory files.

memory (the pseudo-physical and machine-address layers), stackers (what puts them on a
file), pv (Linux PV page walks through machine frames), windows (the vCPU-CR3 stacker),
magic (the ``xen.*`` plugins' requirement).  Imports the formats wing, never upward.
"""
