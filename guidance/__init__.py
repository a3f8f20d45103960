"""Energy functions, face models and guided samplers: plain torch, usable without a server."""
