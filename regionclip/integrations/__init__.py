"""Plug-ins for other tools' own extension points (CVAT's auto-annotation functions)."""
