"""The gin configs. This file makes the directory a package so that gin's package-path reader resolves
`include "gin_configs/..."` lines when the repository is on `sys.path` (as a legacy editable install puts it):
without it gin finds a namespace package with no location and fails with a TypeError."""
