"""Prefect flows that chain the pipeline's stages. Nothing imports this package."""
