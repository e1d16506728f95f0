"""What the gateway, the RQ workers and the model server share, without torch.

The gateway <-> handler contract and its binary frames, the model spec, the parameter models
and their validation, the array and PNG codecs, and the numpy-only statistics and criticism
selection that the workers run. Both sides import it; it imports neither of them, nor torch
(checked by the import-linter contracts in ``pyproject.toml``).
"""
