"""Experts and where they live: the ``ExpertSource`` the MoE block calls (and ``route``), the host store,
the device cache with its eviction policy, the link that moves expert bytes, and their counters.

May import ``offload.config``, ``offload.errors``, ``offload.huge_pages`` and ``offload.scratch``; never ``offload.quant`` (its codecs build the ``Expert``
defined here), ``bench``, ``trace`` or ``cli``.
"""
