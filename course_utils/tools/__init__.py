"""The course's own tools: what no notebook imports.

The runner behind `make course`, the machine check (`doctor`), the exporter (`make export`), notebook reading and
stripping, the static site, student copies, nbgrader labs and the GPU check.
"""
