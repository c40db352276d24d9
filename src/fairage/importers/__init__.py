"""Importers: models trained elsewhere, converted to fairage model folders."""
