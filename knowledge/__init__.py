"""The Chroma knowledge base: loaders, splitting, embeddings, retrieval.

Kept light: importing `knowledge` must not import torch, sentence_transformers or chromadb.
"""
