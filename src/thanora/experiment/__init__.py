"""The tool around the library: `config` (the YAML run config and its overrides), `pipeline` (the whole flow of
``thanora run``), `stages` (the stand-alone CLI stages), `report` (tables and report.md) and `plots` (figures).
Builds on every other package; nothing below imports it. The console script is `thanora.cli`.
"""
