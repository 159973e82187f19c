"""Pieces every benchmark shares, written once.

* :mod:`.timing`: device synchronisation, timed calls, medians, interleaved rounds.
* :mod:`.children`: child processes read line by line, under time and memory limits.
* :mod:`.memory`: resident set, its high-water mark, free memory.
* :mod:`.machine`: the software and hardware a result belongs to.
* :mod:`.results`: JSON writing and small formatting helpers.
* :mod:`.problems`: tasks from their own seeds, a model's loss of a flat parameter vector.
* :mod:`.kernel_cases`: the fused-op cases (inputs, fused and reference calls, bytes moved).
* :mod:`.params`: pytest parameters (devices).
"""
