"""Experiment configs: the pydantic schema (``schema``), reading YAML files and ``--set`` overrides (``files``),
the shipped presets and scales (``presets``, YAML in ``yaml/``), and the Lightning settings checked against
this machine (``runtime``)."""
