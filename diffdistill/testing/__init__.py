"""Offline fixtures (tiny random pipelines built from config) shared by tests, benchmarks and notebooks."""
