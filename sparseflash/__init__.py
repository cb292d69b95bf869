"""sparseflash: stream only the active FFN neurons of sparsely-activated LLMs from SSD."""

__version__ = "0.1.0"
