"""`python -m flatmin.optim > docs/rules.md`: the rules' table, generated from the registry."""

from flatmin.optim import registry

print(registry.docs(), end="")
