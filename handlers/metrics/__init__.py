"""Metrics of explanations: APEM and the Explanation Filter (thesis 003)."""
