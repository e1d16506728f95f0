"""Metrics of explanations: APEM and the Explanation Filter [doValle2019], the feature
audit [Singla2022] and overinterpretation [Carter2021].

Citations such as ``[doValle2019, Alg. 2]`` are keys into ``docs/references.md``.
"""
