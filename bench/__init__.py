"""The benchmark (`mlops bench`, `make bench`): this project's serving beside the alternatives.

Outside the product: it needs the `bench` extra (matplotlib for the chart, py-spy for profiles), which
the serving image does not install.
"""
