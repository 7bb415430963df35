"""The streaming service (FastAPI, WebSocket, RTSP ingestion, Prometheus metrics).

Not built yet: it is the subject of issue #5. Nothing here is imported by engines or models.
"""
