"""One consistent light theme (Fusion + a small style sheet) and shared colours."""
from __future__ import annotations

from PySide6.QtGui import QColor, QFont, QPalette
from PySide6.QtWidgets import QApplication

ACCENT = "#2563eb"
GOOD = "#16a34a"
BAD = "#dc2626"
TEXT = "#1f2937"
MUTED = "#6b7280"
BG = "#f3f4f6"
PANEL = "#ffffff"
BORDER = "#d1d5db"

# 21 UCM labels and beyond: a qualitative palette (Tableau 20 + extras), stable per label
PALETTE = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94",
    "#f7b6d2", "#5c5c5c", "#dbdb8d", "#9edae5", "#393b79", "#637939", "#8c6d31", "#843c39",
]

STYLE = f"""
QMainWindow, QDialog {{ background: {BG}; }}
QWidget {{ color: {TEXT}; }}
QDockWidget::title {{ background: {BG}; padding: 6px 8px; font-weight: 600; }}
QGroupBox {{ border: 1px solid {BORDER}; border-radius: 6px; margin-top: 14px; background: {PANEL};
            padding: 8px 8px 6px 8px; }}
QGroupBox::title {{ subcontrol-origin: margin; left: 8px; padding: 0 4px; color: {MUTED}; font-weight: 600; }}
QLineEdit, QComboBox, QSpinBox, QPlainTextEdit, QTextBrowser {{ border: 1px solid {BORDER}; border-radius: 4px;
            padding: 4px 6px; background: {PANEL}; selection-background-color: {ACCENT}; }}
QLineEdit:focus, QComboBox:focus, QSpinBox:focus {{ border: 1px solid {ACCENT}; }}
QPushButton {{ border: 1px solid {BORDER}; border-radius: 4px; padding: 5px 12px; background: {PANEL}; }}
QPushButton:hover {{ border-color: {ACCENT}; }}
QPushButton:disabled {{ color: #9ca3af; }}
QPushButton#primary {{ background: {ACCENT}; color: white; border-color: {ACCENT}; font-weight: 600; }}
QPushButton#primary:disabled {{ background: #93c5fd; border-color: #93c5fd; }}
QTabWidget::pane {{ border: 1px solid {BORDER}; border-radius: 4px; background: {PANEL}; top: -1px; }}
QTabBar::tab {{ padding: 6px 16px; border: 1px solid transparent; border-bottom: none; color: {MUTED}; }}
QTabBar::tab:selected {{ background: {PANEL}; border-color: {BORDER}; border-top-left-radius: 4px;
            border-top-right-radius: 4px; color: {TEXT}; font-weight: 600; }}
QListView {{ background: {PANEL}; border: none; }}
QStatusBar {{ background: {BG}; border-top: 1px solid {BORDER}; }}
QStatusBar QLabel {{ color: {MUTED}; padding: 0 6px; }}
QLabel#hint {{ color: {MUTED}; }}
QLabel#error {{ color: {BAD}; }}
QLabel#title {{ font-size: 13pt; font-weight: 600; }}
QFrame#dropZone {{ border: 2px dashed {BORDER}; border-radius: 8px; background: {PANEL}; }}
QFrame#dropZone[hover="true"] {{ border-color: {ACCENT}; background: #eff6ff; }}
QFrame#banner {{ background: #eff6ff; border: 1px solid #bfdbfe; border-radius: 4px; }}
QToolTip {{ background: {PANEL}; color: {TEXT}; border: 1px solid {BORDER}; padding: 4px; }}
"""


def apply_theme(app: QApplication) -> None:
    app.setStyle("Fusion")
    pal = QPalette()
    pal.setColor(QPalette.Window, QColor(BG))
    pal.setColor(QPalette.Base, QColor(PANEL))
    pal.setColor(QPalette.AlternateBase, QColor("#f9fafb"))
    pal.setColor(QPalette.Text, QColor(TEXT))
    pal.setColor(QPalette.WindowText, QColor(TEXT))
    pal.setColor(QPalette.Button, QColor(PANEL))
    pal.setColor(QPalette.ButtonText, QColor(TEXT))
    pal.setColor(QPalette.Highlight, QColor(ACCENT))
    pal.setColor(QPalette.HighlightedText, QColor("white"))
    pal.setColor(QPalette.ToolTipBase, QColor(PANEL))
    pal.setColor(QPalette.ToolTipText, QColor(TEXT))
    app.setPalette(pal)
    f = QFont(app.font())
    if f.pointSizeF() < 10:
        f.setPointSizeF(10)
    app.setFont(f)
    app.setStyleSheet(STYLE)


def label_colors(labels) -> dict:
    """Stable label → hex colour (sorted labels take the palette in order)."""
    uniq = sorted({str(lab) for lab in labels if lab})
    return {lab: PALETTE[i % len(PALETTE)] for i, lab in enumerate(uniq)}
