"""LangChain: the model registry and the chain factories. Importing this is cheap."""
