"""Parameter models of the methods both sides validate: explainers, attacks, APEM, the filter.

Citations such as ``[Stock2018, §3.2]`` are keys into ``docs/references.md``.
"""
