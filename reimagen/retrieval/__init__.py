"""Retrieval for Re-Imagen (Sec. 3.2, Sec. 4): knowledge bases, BM25 and CLIP retrievers, KNN-ImageText triples.

    base.py         KnowledgeBase, image references, the Retriever interface, saved indexes (manifest.json)
    readers/        COCO, WikiImages (WebQA), LAION/img2dataset (webdataset tar, parquet), image folders
    bm25.py         rank-bm25 reference and the fast default BM25
    clip_embed.py   open-clip models and the resumable embedding of a knowledge base
    clip.py         those embeddings in faiss (exact, IVF-PQ, HNSW), memory-mapped; the CLIP retriever
    precomputed.py  neighbours computed elsewhere, read from a parquet table
    triples.py      KNN-ImageText triples tables for the trainer
    download.py     download helpers (COCO) and instructions (WebQA, LAION)
"""

from .base import (CorruptImageError, KnowledgeBase, Retriever, SearchResult, load_image, load_retriever)  # noqa: F401
from .readers import open_knowledge_base  # noqa: F401
