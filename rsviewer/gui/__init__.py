"""The rsviewer desktop app (PySide6): search, explain, map, localize, compare.

Entry point: :func:`rsviewer.gui.app.run_app`. The GUI only calls the engine, always off
the GUI thread (:mod:`rsviewer.gui.workers`); nothing in the engine imports Qt.
"""
