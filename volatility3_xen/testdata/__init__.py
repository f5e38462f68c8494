"""Test-data generators: the dump-core writer, the PV page-table converter, the samples.

Every file made here is marked as generated (``volatility3-xen generated test core``)
so that it cannot pass as evidence.
"""
