"""The serving side: WSGI app, gunicorn application, model sources."""
