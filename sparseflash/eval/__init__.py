"""Evaluation: reports measured over the other stages; may import model/, layout/, runtime/."""
