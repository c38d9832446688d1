"""Workers: ``base`` is what users subclass, ``runner`` is one process, ``pool`` supervises N."""
