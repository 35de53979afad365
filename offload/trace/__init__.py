"""Routing traces: the file format, the recorder that hooks a loaded model, and the cache-policy replay.

Built on the engine; the engine never imports from here.
"""
