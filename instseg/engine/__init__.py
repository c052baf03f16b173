"""Running experiments: safe checkpoints, hooks, and train/test entry points on mmengine's Runner."""
from instseg.engine import checkpoint, hooks, loops, optim  # noqa: F401  (register the loader, hooks, loop, constructor)
