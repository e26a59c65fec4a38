"""MLServer runtimes of this project; name them in model-settings as `runtimes.<module>.<Class>`."""
