"""Process supervision: waiting for and stopping processes, MLServer, Prometheus, the team registry server; imports the domain (and the alert rules, lazily)."""
