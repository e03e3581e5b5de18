"""Test doubles of PyBit's model classes, at PyBit's module path (``pybit.models``)."""
