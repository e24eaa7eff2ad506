"""Small helpers shared across peftkit (enums, constants, module-tree utilities)."""
