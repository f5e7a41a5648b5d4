"""Helpers for ``lorax generate``: PNG parameters (A1111's convention), contact sheets, LoRA scale schedules."""
