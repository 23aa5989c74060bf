"""The OpenAI-compatible HTTP server: `create_app(llm, "model-name")` gives a FastAPI app to run with uvicorn."""
from pbs_engine.server.app import create_app

__all__ = ["create_app"]
