"""The rules service's consumer loop (``consumer.py``)."""
