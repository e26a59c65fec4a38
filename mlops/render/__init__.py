"""Renderers: spec + registry to the generated files (model-settings/, seldon/, dashboards, alerts); import the domain."""
