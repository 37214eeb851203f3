"""Streaming generate+train: the producer loop (``producer``), the one supervisor of producers and
trainers (``supervisor``), and the plain-Python stage that drives them on one machine (``run``).

The Prefect pipeline (``flows/pipeline.py``) runs the same producer entry point and the same
supervisor, with Prefect runs as its children.
"""
