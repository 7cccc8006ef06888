"""Make docs/images/napari-widget.png from a real run of the widget.

Opens napari with the defocused sample photo, docks "Deblur (DeMoE)", runs it
with the packaged default model and saves a screenshot of the whole window.
Needs a display; headless: ``QT_API=pyqt6 xvfb-run -a python docs/make_screenshot.py``
(with PyQt5 also installed, qtpy would pick it and napari shows a deprecation
notice over the canvas).
"""

from pathlib import Path

import napari
from qtpy.QtWidgets import QApplication

from napari_demoe._widget import DeblurWidget

OUT = Path(__file__).parent / "images" / "napari-widget.png"


def main():
    viewer = napari.Viewer(show=True)
    viewer.window.resize(1300, 760)
    viewer.open_sample("napari-demoe", "defocus")
    widget = DeblurWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Deblur (DeMoE)", area="right")
    widget.run()
    while widget.worker is not None:
        QApplication.processEvents()
    viewer.grid.enabled = True  # blurry and deblurred side by side
    viewer.reset_view()
    for _ in range(20):
        QApplication.processEvents()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(OUT), canvas_only=False)
    print(f"wrote {OUT}: {widget.routing.value}; {widget.status.value}")
    viewer.close()


if __name__ == "__main__":
    main()
