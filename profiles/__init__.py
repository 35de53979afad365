"""The bundled profiles. They are edited here and ship as the package ``offload.profiles`` (pyproject.toml),
where ``offload.settings.profile`` finds them through importlib.resources."""
