"""Checkers: the cluster model, schemas, project rules, plaintext secrets; import the domain and the renderers' constants."""
