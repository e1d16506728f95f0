"""The torch side of model criticism: gathering a class's selection inputs from a model.

The selection itself is torch-free and lives in :mod:`protocol.criticism`, so RQ workers run
it; :mod:`handlers.criticism.gather` computes its inputs in-process with a model.
"""
