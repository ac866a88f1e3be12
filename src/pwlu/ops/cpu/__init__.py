"""The compiled CPU backend: ``build`` (compiler, cache, loading), ``backend`` (kernel calls),
``plan`` (inference plans)."""
