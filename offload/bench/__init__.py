"""``offload bench``: the rows it measures (the ablation's expert sources), how it measures them, the
cache-policy check against Belady, the prompt, and the report.

Built on the engine; the engine never imports from here.
"""
