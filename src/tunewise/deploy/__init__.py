"""Ship a fine-tune: merged and GGUF export, an OpenAI-compatible server for one base model and
several adapters, and the adapter registry behind its canary routes.

The server pulls in torch and FastAPI; it is imported on first use, so `tunewise registry`
commands stay quick."""

__all__ = ["check_adapter", "create_app", "serve"]


def __getattr__(name: str):
    if name == "check_adapter":
        from tunewise.deploy.engine import check_adapter

        return check_adapter
    if name in ("create_app", "serve"):
        from tunewise.deploy import server

        return getattr(server, name)
    raise AttributeError(name)
