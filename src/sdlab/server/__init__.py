"""`sdlab serve`: an HTTP API compatible with AUTOMATIC1111's, a FIFO job queue and a web page.

Kept empty of imports so that `sdlab --help` does not load FastAPI: see server.app.create_app.
"""
