"""Experts and where they live: the ``ExpertSource`` the MoE block calls, the host store, the device cache
with its eviction policy, the link that moves expert bytes, and their counters.

May import ``offload.config``, ``offload.errors`` and ``offload.quant``; never ``bench``, ``trace`` or ``cli``.
"""
