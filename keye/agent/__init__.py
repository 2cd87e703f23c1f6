"""Agentic tool use: the tool-call parser, the tools (frames, search, python) and the environment they run in."""
