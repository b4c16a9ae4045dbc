from ctxdiff.cli import entrypoint

entrypoint()
