"""Token-tree speculation runtime."""
