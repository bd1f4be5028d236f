"""The HTTP surface: a Starlette app served by uvicorn inside the daemon's event loop."""
