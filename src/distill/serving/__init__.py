"""Serving the student: the memory plan, server processes, the load generator, deploy, portable artefacts."""
