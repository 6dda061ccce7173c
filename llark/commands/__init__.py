"""One module per ``llark`` verb; each defines ``register(subparsers)``. ``llark.cli`` lists them."""
