"""Run settings: TOML profiles, the profile and command-line flags resolved once into ``RunSettings``,
and the memory plan that sizes the device tier.

May import ``offload.config``, ``offload.errors``, ``offload.loading`` and the engine's other sub-packages;
never ``bench``, ``trace`` or ``cli``. ``profile`` and ``profile_toml`` import no torch, so
``offload profiles`` stays quick.
"""
