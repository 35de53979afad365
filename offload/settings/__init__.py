"""Run settings: TOML profiles, the profile and command-line flags resolved once into ``RunSettings``,
and the memory plan that sizes the device tier.

May import the engine's other sub-packages; never ``bench``, ``trace`` or ``cli``.
"""
